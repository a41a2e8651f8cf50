"""A lazily read `(Z, Y, X)` grayscale volume (`Volume`), the dtypes and shapes it accepts, and the voxel
sizes and units files give (see `emunet.core.io`): the part every format's reader shares."""

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

from emunet.core.errors import InputError


# uint8/uint16 are what detectors write; int and float come from processing (e.g. Fiji 32-bit).
ACCEPTED_KINDS = "uif"
# Units as files spell them, to one spelling. ImageJ writes "micron" or "\u00b5m" (often as "\\u00B5m").
UNITS = {"micron": "µm", "microns": "µm", "um": "µm", "\\u00b5m": "µm", "µm": "µm", "μm": "µm",
         "nm": "nm", "nanometer": "nm", "nanometre": "nm", "mm": "mm", "millimeter": "mm", "pixel": None,
         "pixels": None, "": None, "angstrom": "Å", "å": "Å", "a": "Å", "micrometer": "µm", "micrometre": "µm",
         "millimetre": "mm"}
# Lengths in nm, to put axes given in different units (OME-Zarr allows it) into one.
NM_PER_UNIT = {"Å": 0.1, "nm": 1.0, "µm": 1e3, "mm": 1e6}


def available_memory() -> int:
    """Bytes that new arrays can take now."""
    return int(psutil.virtual_memory().available)


def check_fits(path: Path, shape: tuple, dtype, what: str, advice: str) -> None:
    """Refuse to allocate what a file header declares when it exceeds the memory available: a corrupt or
    hostile header (a few bytes declaring 300000 x 300000 pixels) must give a message, not an
    out-of-memory kill or a machine swapping for minutes."""
    needed = int(np.prod(shape, dtype=np.float64)) * np.dtype(dtype).itemsize
    free = available_memory()
    if needed > free:
        raise InputError(f"{path}: {what} declares {tuple(int(n) for n in shape)} {np.dtype(dtype)}, "
                         f"{needed / 2**30:.1f} GiB, but only {free / 2**30:.1f} GiB of memory is available; "
                         f"{advice}")


def _unit(text) -> str | None:
    text = str(text or "").strip()
    return UNITS.get(text.lower(), text or None)


class CalibrationWarning(UserWarning):
    """A voxel size that is there but cannot be used, or a choice made about one: the file still reads."""


def _warn(message: str) -> None:
    warnings.warn(message, CalibrationWarning, stacklevel=3)


def _size(value, path, what: str) -> float | None:
    """A voxel size a file gives: a positive finite float, or None with a warning naming the file and `what`."""
    try:
        size = float(value)
    except (TypeError, ValueError):
        size = float("nan")
    if math.isfinite(size) and size > 0:
        return size
    _warn(f"{path}: {what} is {value!r}, not a positive size; that axis is read as uncalibrated")
    return None


def _one_unit(path, axes: dict) -> dict:
    """`{"voxel_size", "unit"}` from `{axis: (size or None, unit or None)}` for z, y, x: every size in x's unit
    (else y's, z's) when both units are lengths (`NM_PER_UNIT`); a size whose unit does not convert is
    unknown (warned). {} when no axis is known."""
    known = {a: v for a, v in axes.items() if v[0] is not None}
    if not known:
        return {}
    unit = next(known[a][1] for a in "xyz" if a in known)
    sizes = []
    for a in "zyx":
        size, own = axes.get(a, (None, None))
        if size is not None and own != unit:
            if own in NM_PER_UNIT and unit in NM_PER_UNIT:
                size = size * NM_PER_UNIT[own] / NM_PER_UNIT[unit]
            else:
                _warn(f"{path}: the {a} size is in {own!r} but x's is in {unit!r}, which do not convert; "
                      f"{a} is read as uncalibrated")
                size = None
        sizes.append(size)
    return {"voxel_size": tuple(sizes), "unit": unit}


def describe_voxel(voxel_size, unit: str | None) -> str:
    """`"50 x 4 x 4 nm"` (z, y, x), `?` for an unknown axis, `"unknown"` for none."""
    if voxel_size is None:
        return "unknown"
    return " x ".join("?" if v is None else f"{float(v):g}" for v in voxel_size) + (f" {unit}" if unit else "")


@dataclass
class Volume:
    """A `(Z, Y, X)` grayscale volume whose slices are read when indexed, so that a 200 x 2048 x 2048
    stack never sits in memory. `volume[z]` is `(Y, X)`, `volume[a:b]` is `(b - a, Y, X)`, and a tuple
    key crops Y and X too. `voxel_size` is `(z, y, x)` in `unit`, an axis None where the file does not
    say (None as a whole when no axis is known)."""

    path: Path
    shape: tuple[int, int, int]
    dtype: np.dtype
    read: Callable[[int, int], np.ndarray]  # slices [a, b) -> (b - a, Y, X)
    voxel_size: tuple[float | None, float | None, float | None] | None = None
    unit: str | None = None
    close: Callable[[], None] = field(default=lambda: None)
    # Formats that can read part of a slice (Zarr, HDF5, MRC, .npy) also give slices [a, b) cropped to
    # rows `ys` and columns `xs` (step 1), so that a region or a tile never decodes whole slices.
    read_block: Callable[[int, int, slice, slice], np.ndarray] | None = None
    # `(z, y, x)` chunk shape of a chunked store (Zarr, HDF5), which results written as OME-Zarr keep.
    chunks: tuple[int, int, int] | None = None
    # Zarr: `((zs, ys, xs)) -> (missing, total, first keys, fill value)` for the stored chunks a block meets.
    missing_chunks: Callable | None = None

    @property
    def ndim(self) -> int:
        return 3

    def __len__(self) -> int:
        return self.shape[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getitem__(self, key):
        rest = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            if rest and step == 1 and self.read_block and len(rest) <= 2 and \
                    all(isinstance(k, slice) and k.step in (None, 1) for k in rest):
                ys, xs = (_step1(k, n) for k, n in zip((*rest, slice(None)), self.shape[1:]))
                return self.read_block(start, max(start, stop), ys, xs)
            out = self.read(start, max(start, stop)) if step == 1 else \
                np.stack([self.read(z, z + 1)[0] for z in range(start, stop, step)])
            return out[(slice(None), *rest)] if rest else out
        z = int(key)
        if not -self.shape[0] <= z < self.shape[0]:
            raise IndexError(f"slice {z} is outside {self.path}'s {self.shape[0]} slices")
        z %= self.shape[0]
        out = self.read(z, z + 1)[0]
        return out[rest] if rest else out

    def __array__(self, dtype=None, copy=None):
        check_fits(self.path, self.shape, self.dtype, "the stack", "read it slice by slice (`predict` does)")
        out = self.read(0, self.shape[0])
        return out if dtype is None else out.astype(dtype)


def _step1(key: slice, n: int) -> slice:
    start, stop, _ = key.indices(n)
    return slice(start, max(start, stop))


def read_dtype(dtype, path: Path) -> np.dtype:
    """The dtype slices stored as `dtype` are read as (booleans become uint8 {0, 1}); `InputError` for
    anything that is not integer or float pixels."""
    dtype = np.dtype(np.uint8) if np.dtype(dtype) == bool else np.dtype(dtype)
    if dtype.kind not in ACCEPTED_KINDS:
        raise InputError(f"{path}: expected integer or float pixels but found dtype {dtype}")
    return dtype


def _checked(array: np.ndarray, path: Path) -> np.ndarray:
    """A decoded array as `(Z, Y, X)` of an accepted dtype, or an `InputError` that says what is wrong."""
    array = array.astype(read_dtype(array.dtype, path), copy=False)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise InputError(f"{path}: expected a 2-D image or a (Z, H, W) stack but found shape {array.shape}")
    if min(array.shape) == 0:
        raise InputError(f"{path}: the stack is empty (shape {array.shape})")
    return array


def _gray_axes(shape: tuple, axes: str, path: Path) -> None:
    """Refuse colour / multi-channel data: segmentation of RGB renderings of EM is almost always a mistake
    (a screenshot, an overlay), and silently converting would hide it."""
    if any(a in axes and shape[axes.index(a)] > 1 for a in "SC"):
        raise InputError(f"{path}: expected a grayscale stack (Z, H, W) but found {tuple(shape)} with axes "
                         f"{axes!r} (colour or multi-channel); save one channel as grayscale")


def _in_memory(array: np.ndarray, path: Path, **calibration) -> Volume:
    array = _checked(array, path)
    return Volume(path, tuple(array.shape), array.dtype, lambda a, b: array[a:b], **calibration)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.is_file() and path.stat().st_size == 0:
        raise InputError(f"{path}: the file is empty (0 bytes)")
