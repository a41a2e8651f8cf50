"""One way to open a volume: `open_volume(path)` gives a lazy `(Z, Y, X)` grayscale array read slice by
slice (or block by block), with its voxel size where the file records one. Every mistake comes out as an
`InputError` that names the file.

Formats, and how a path names them:
- multi-page TIFF and OME-TIFF (ImageJ and OME calibration), a single 2-D TIFF or PNG;
- `.npy` (memory-mapped), and folders of 2-D TIFF/PNG slices (natural sort order);
- MRC (`.mrc`, `.rec`, `.st`, `.map`, `.mrcs`), memory-mapped; a 2-D MRC is one slice. MRC headers give the
  voxel size in ångström; it is reported in nm (divided by 10) so that tomograms and volume-EM stacks
  share a unit. A header voxel size of 0 means "not set" (`voxel_size` None);
- a Zarr folder (`*.zarr`, `*.ome.zarr`, or any folder holding `zarr.json` / `.zarray` / `.zgroup`): an
  OME-Zarr image (NGFF 0.1-0.5, also the bioformats2raw layout), read at level 0 of its multiscales, its
  scale from `coordinateTransformations` (the level's times the image's) and its unit from `axes`; a
  `c` or `t` axis of size 1 is dropped, more than one channel or time point is refused. A plain Zarr
  array (`image.ome.zarr/1` included) is read as `(Z, Y, X)` or `(Y, X)` after dropping leading size-1 axes;
- HDF5 as `file.h5:/path/to/dataset` (also `.hdf5`, `.hdf`); the dataset may be left out when the file
  holds exactly one. Voxel size from the dataset's `element_size_um` (Fiji, ilastik; unit µm) or
  `resolution` (unit from a `unit` attribute, else None), ilastik `axistags` name the axes.

Voxel size: `volume.voxel_size` is `(z, y, x)` in `volume.unit`, each axis None where the file does not give
it (a size the file does not give is unknown, never guessed: serial sections of 50 nm cut from 4 nm pixels
must not become 4 nm cubes), and None as a whole when no axis is known. Axes given in different units are
converted to x's (`NM_PER_UNIT`). Where each format keeps it: ImageJ TIFF `unit` + X/YResolution (+ `spacing`,
`yunit`, `zunit`; ImageJ omits `spacing` when it is 1 or unset, so such a stack has z unknown); OME-TIFF
`PhysicalSize{X,Y,Z}` and their `...Unit` (µm when absent, as the OME schema says); MRC header (0 = unset);
OME-Zarr scale and axis units (an axis without a unit while others have one is unknown, and so is every
axis when none has a unit and every scale is 1: the writers' defaults); HDF5 as above. A calibration that
is there but cannot be used (zero, negative, not a number) is a `CalibrationWarning` naming the file and
that axis is unknown; in OME-Zarr metadata it is an `InputError` (the structure is checked field by field).

Missing chunks: a Zarr array whose chunk files are missing (an interrupted copy) would read as holes of the
fill value. `open_volume` lists the array's folder once and refuses when any chunk the read will touch (the
whole array, or those meeting `region`) is absent, giving the count and the first keys; with
`allow_missing_chunks=True` they are read as the fill value after one warning. An array (or its OME-Zarr
image group) whose attributes hold `"sparse_chunks": true` was written sparse on purpose (absent chunks are
the fill value, as zarr-python writes by default); `emunet.core.omezarr` sets it on every result it writes.

Options, keyword arguments of `open_volume` (and `read_volume`), the same for every format (`ReadOptions`
holds them, for entry points to pass on unchanged: `open_volume(path, **asdict(options))`):
- `level=1`: another level of an OME-Zarr multiscale image (0 is full resolution); an error elsewhere.
- `region="z0:z1,y0:y1,x0:x1"`: a lazy sub-block; only that block is read. Python slice bounds (a negative
  one counts from the end, a single number is one index), any part may be empty ("10:20,,", ",0:512").
- `allow_missing_chunks=True`: read absent Zarr chunks as the fill value (one warning) instead of refusing.
- `voxel_size="50,4,4"` (z,y,x; a part may be empty, "50,," gives z only) and `unit="nm"`: what the file
  lacks. A value that contradicts the file's is used, with a warning; `unit` alone converts the file's.

    with open_volume("tomo.tif") as volume:
        volume.shape, volume.dtype, volume.voxel_size, volume.unit   # (30, 512, 512), uint8, (50.0, 4.0, 4.0), "nm"
        volume[12]          # (Y, X) slice, read now
        volume[0:4]         # (4, Y, X)
    with open_volume("cells.ome.zarr", level=1, region="10:20,,") as volume: ...
    with open_volume("sample.h5:/volumes/raw") as volume: ...
"""

import contextlib
import dataclasses
import math
import os
import re
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import psutil
import tifffile

from emunet.core.errors import InputError

SLICE_SUFFIXES = (".tif", ".tiff", ".png")
MRC_SUFFIXES = (".mrc", ".rec", ".st", ".map", ".mrcs")
STACK_SUFFIXES = (".tif", ".tiff", ".png", ".npy", *MRC_SUFFIXES, ".h5", ".hdf5", ".hdf")
MRC_MODES = (0, 1, 2, 3, 4, 6, 12, 101)
ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup")
# `file.h5:/group/dataset`; the non-greedy name lets a folder called `x.h5/` hold the file.
HDF5_SPEC = re.compile(r"(.+?\.(?:h5|hdf5|hdf))(?::(.*))?", re.IGNORECASE)
# uint8/uint16 are what detectors write; int and float come from processing (e.g. Fiji 32-bit).
ACCEPTED_KINDS = "uif"
# Units as files spell them, to one spelling. ImageJ writes "micron" or "\u00b5m" (often as "\\u00B5m").
UNITS = {"micron": "µm", "microns": "µm", "um": "µm", "\\u00b5m": "µm", "µm": "µm", "μm": "µm",
         "nm": "nm", "nanometer": "nm", "nanometre": "nm", "mm": "mm", "millimeter": "mm", "pixel": None,
         "pixels": None, "": None, "angstrom": "Å", "å": "Å", "a": "Å", "micrometer": "µm", "micrometre": "µm",
         "millimetre": "mm"}
# Lengths in nm, to put axes given in different units (OME-Zarr allows it) into one.
NM_PER_UNIT = {"Å": 0.1, "nm": 1.0, "µm": 1e3, "mm": 1e6}


def natural_key(name: str) -> list:
    """Sort key that puts `slice_2.tif` before `slice_10.tif`."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def list_stack_paths(spec: str) -> list[Path]:
    """Split a comma-separated list of stack files or folders into paths (empty entries ignored)."""
    return [Path(part.strip()).expanduser() for part in spec.split(",") if part.strip()]


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


def _ome_tiff_calibration(path, pixels: dict) -> dict:
    """OME `PhysicalSize{Z,Y,X}` with their units (µm when absent, the schema's default)."""
    axes = {}
    for a in "ZYX":
        value = pixels.get(f"PhysicalSize{a}")
        size = None if value is None else _size(value, path, f"OME PhysicalSize{a}")
        axes[a.lower()] = (size, _unit(pixels.get(f"PhysicalSize{a}Unit", "µm")))
    return _one_unit(path, axes)


def _imagej_calibration(path, meta: dict, tags) -> dict:
    """ImageJ's `unit` (and `yunit`, `zunit`), X/YResolution (pixels per unit) and `spacing`; {} without a unit
    (ImageJ then has pixels, not lengths)."""
    unit = _unit(meta.get("unit", ""))
    if not unit:
        return {}
    axes = {}
    for a, tag in (("x", "XResolution"), ("y", "YResolution")):
        if tag in tags:
            num, den = tags[tag].value
            axes[a] = (_size(den / num if num else float("inf"), path, f"ImageJ {tag} {num}/{den}"),
                       _unit(meta.get(f"{a}unit", unit)) if a == "y" else unit)
    if "spacing" in meta:  # absent when 1 or unset: unknown, not guessed
        axes["z"] = (_size(meta["spacing"], path, "ImageJ spacing"), _unit(meta.get("zunit", unit)))
    return _one_unit(path, axes)


def _tiff_calibration(tif: tifffile.TiffFile, path) -> dict:
    """`voxel_size` (z, y, x) and `unit` from ImageJ or OME metadata; {} when the file has neither. Metadata
    that cannot be parsed is a `CalibrationWarning` naming the file: the pixels are still read."""
    try:
        if tif.is_ome and tif.ome_metadata:
            pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
            pixels = (pixels[0] if isinstance(pixels, list) else pixels)["Pixels"]
            return _ome_tiff_calibration(path, pixels)
        if tif.is_imagej and tif.imagej_metadata is not None:
            return _imagej_calibration(path, tif.imagej_metadata, tif.pages[0].tags)
    except (KeyError, TypeError, ValueError, ZeroDivisionError, IndexError, AttributeError) as exc:
        _warn(f"{path}: the TIFF's calibration metadata cannot be parsed ({type(exc).__name__}: {exc}); "
              f"read as uncalibrated (pass voxel_size=z,y,x and unit to give it)")
    return {}


def _open_tiff(path: Path) -> Volume:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tif = tifffile.TiffFile(path)
    except Exception as exc:  # tifffile raises ValueError, TiffFileError, struct.error, ... on bad files
        raise InputError(f"{path}: not a readable TIFF, it may be truncated or corrupt ({exc})") from None
    try:
        if not tif.series:
            raise InputError(f"{path}: the TIFF holds no image")
        series = tif.series[0]
        _gray_axes(series.shape, series.axes, path)
        calibration = _tiff_calibration(tif, path)
        # Singleton axes (ImageJ's T=1, C=1) are dropped; what is left must be (Y, X) or (Z, Y, X).
        shape = tuple(n for n, a in zip(series.shape, series.axes) if n > 1 or a in "YX")
        if len(shape) not in (2, 3):
            raise InputError(f"{path}: expected a 2-D image or a (Z, H, W) stack but found shape "
                             f"{tuple(series.shape)} with axes {series.axes!r}")
        dtype, pages = read_dtype(series.dtype, path), series.pages
        if len(shape) == 3 and len(pages) == shape[0] and all(p is not None and p.ndim == 2 for p in pages):
            check_fits(path, shape[1:], dtype, "one slice of the TIFF header", "crop the slices (e.g. in Fiji)")

            def read(a: int, b: int) -> np.ndarray:
                out = np.empty((b - a, *shape[1:]), dtype)
                for i, z in enumerate(range(a, b)):
                    try:
                        out[i] = pages[z].asarray()
                    except Exception as exc:
                        raise InputError(f"{path}: slice {z} is not readable, the file may be truncated "
                                         f"({exc})") from None
                return out

            return Volume(path, shape, dtype, read, close=tif.close, **calibration)
        check_fits(path, series.shape, series.dtype, "the TIFF header",
                   "crop the stack (e.g. in Fiji), or save it as one page per slice")
        try:
            array = series.asarray()
        except Exception as exc:
            raise InputError(f"{path}: not a readable TIFF, it may be truncated or corrupt ({exc})") from None
        tif.close()
        return _in_memory(array.reshape(shape), path, **calibration)
    except BaseException:
        tif.close()
        raise


def _open_npy(path: Path) -> Volume:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise InputError(f"{path}: not a readable .npy array ({exc})") from None
    if array.ndim not in (2, 3):
        raise InputError(f"{path}: expected a 2-D image or a (Z, H, W) stack but found shape {array.shape}")
    flat = array.ndim == 2
    array = array[None] if flat else array
    if min(array.shape) == 0:
        raise InputError(f"{path}: the stack is empty (shape {array.shape})")
    dtype, shape = read_dtype(array.dtype, path), tuple(array.shape)
    del array

    def read_block(a: int, b: int, ys: slice = slice(None), xs: slice = slice(None)) -> np.ndarray:
        # A map of its own per read, dropped after it: the pages a read touched leave this process with
        # the map (one map kept open holds every page ever read: a 16384^2 slice read by blocks grew the
        # process by the whole slice, bench/big_slice.py).
        mapped = np.load(path, mmap_mode="r", allow_pickle=False)
        mapped = mapped[None] if flat else mapped
        out = np.array(mapped[a:b, ys, xs], dtype=dtype)
        del mapped
        return out

    return Volume(path, shape, dtype, lambda a, b: read_block(a, b), read_block=read_block)


def _read_png(path: Path) -> np.ndarray:
    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if array is None:
        raise InputError(f"{path}: not a readable PNG, it may be truncated or corrupt")
    if array.ndim == 3:
        _gray_axes(array.shape, "YXS", path)
    return array


def _read_slice(path: Path) -> np.ndarray:
    """One 2-D slice of a folder of slices."""
    _check_file(path)
    if path.suffix.lower() == ".png":
        image = _read_png(path)
    else:
        with _open_tiff(path) as volume:
            image = volume[:]
    image = _checked(np.asarray(image), path)
    if image.shape[0] != 1:
        raise InputError(f"{path}: expected a 2-D slice in a folder of slices but found a stack {image.shape}")
    return image[0]


def _open_folder(path: Path) -> Volume:
    files = sorted((p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SLICE_SUFFIXES),
                   key=lambda p: natural_key(p.name))
    if not files:
        raise InputError(f"{path}: the folder holds no {'/'.join(SLICE_SUFFIXES)} slices")
    first = _read_slice(files[0])

    def read(a: int, b: int) -> np.ndarray:
        out = np.empty((b - a, *first.shape), first.dtype)
        for i, f in enumerate(files[a:b]):
            image = _read_slice(f)
            if image.shape != first.shape:
                raise InputError(f"{f}: slice has shape {image.shape} but {files[0].name} has {first.shape}")
            out[i] = image
        return out

    return Volume(path, (len(files), *first.shape), first.dtype, read)


def _spatial_axes(shape: tuple, names: list[str] | None, path) -> list:
    """For each stored axis, its name ("z", "y", "x") or 0 (a size-1 axis to drop). Named axes (OME-Zarr,
    ilastik) must include y and x, and any other axis must have size 1: more than one channel or time point
    is refused, as colour TIFFs are. Unnamed axes (plain arrays) lose their leading size-1 axes and what is
    left is read as (Y, X) or (Z, Y, X)."""
    if names is None:
        drop = 0
        while len(shape) - drop > 3 and shape[drop] == 1:
            drop += 1
        if len(shape) - drop not in (2, 3):
            raise InputError(f"{path}: expected a 2-D image or a (Z, H, W) stack but found shape {tuple(shape)}")
        return [0] * drop + list("zyx"[3 - (len(shape) - drop):])
    names = [str(n).lower() for n in names]
    if len(names) != len(shape) or not {"y", "x"} <= set(names) or len(set(names)) != len(names):
        raise InputError(f"{path}: expected axes including y and x, one for each of the shape's {len(shape)} "
                         f"dimensions, but found axes {names} for shape {tuple(shape)}")
    extra = {n: size for n, size in zip(names, shape) if n not in ("z", "y", "x") and size > 1}
    if extra:
        what = {"c": "channels", "t": "time points"}
        found = ", ".join(f"{size} {what.get(n, 'values along ' + n)}" for n, size in extra.items())
        raise InputError(f"{path}: expected a grayscale stack (Z, H, W) but found shape {tuple(shape)} with axes "
                         f"{''.join(names)!r} ({found}); save one channel and time point as its own image")
    return [n if n in ("z", "y", "x") else 0 for n in names]


def _chunk_keys(directory: Path) -> set[str]:
    """Every file under an array's folder as a `/`-joined relative key: one walk of the folder (nested for
    `/` separators, flat for `.`), metadata files left out."""
    keys = set()
    for root, _, files in os.walk(directory):
        rel = os.path.relpath(root, directory)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        keys.update(prefix + f for f in files if f not in (".zarray", ".zattrs", ".zgroup", "zarr.json"))
    return keys


FEW_CHUNKS = 256  # up to this many chunks (a tile, a Spark task's block) are looked up one by one, not listed


def _chunk_checker(array, axes: list, sparse: bool):
    """For a local Zarr array not written sparse: `((zs, ys, xs)) -> (missing, total, first missing keys,
    fill value)` over the stored chunks (shards when sharded) that the block meets; None otherwise."""
    root = getattr(getattr(array, "store", None), "root", None)
    if root is None or sparse or bool(dict(array.attrs).get(SPARSE_ATTR)) or not array.ndim:
        return None
    directory = Path(root) / array.path if array.path else Path(root)
    grid = tuple(int(c) for c in (getattr(array, "shards", None) or array.chunks))
    encode = array.metadata.encode_chunk_key
    listing = {}

    def check(block: tuple) -> tuple:
        spans = dict(zip("zyx", block))
        ranges = []
        for name, n, c in zip(axes, array.shape, grid):
            span = spans.get(name, slice(0, 1)) if name else slice(0, 1)
            ranges.append(range(span.start // c, -(-min(span.stop, n) // c)))
        total = int(np.prod([len(r) for r in ranges]))
        if total <= FEW_CHUNKS and "keys" not in listing:  # a small block of a big array: ask for its keys only
            present = None
        else:
            if "keys" not in listing:  # one walk of the folder per opened volume
                listing["keys"] = _chunk_keys(directory)
            present = listing["keys"]
        first, missing = [], 0
        for coords in np.ndindex(*[len(r) for r in ranges]):
            key = encode(tuple(r[i] for r, i in zip(ranges, coords)))
            if (key not in present) if present is not None else not (directory / key).is_file():
                missing += 1
                if len(first) < 3:
                    first.append(key)
        return missing, total, first, array.fill_value

    return check


def _array_volume(path, array, names: list[str] | None = None, copy: bool = False, close=lambda: None,
                  sparse: bool = False, **calibration) -> Volume:
    """A `Volume` over anything indexed like numpy with slices (a Zarr array, an HDF5 dataset, a memmap), read
    block by block. `copy` detaches blocks from a memory map that `close` unmaps."""
    axes = _spatial_axes(tuple(array.shape), names, path)
    kept = [n for n in axes if n]
    order = [kept.index(n) for n in "zyx" if n in kept]
    sizes = dict(zip(axes, array.shape))
    shape = (sizes.get("z", 1), sizes["y"], sizes["x"])
    dtype = read_dtype(np.dtype(array.dtype).newbyteorder("="), path)
    if min(shape) == 0:
        raise InputError(f"{path}: the stack is empty (shape {tuple(array.shape)})")
    check_fits(path, shape[1:], dtype, "one slice of the header", "crop the slices")

    def read_block(a: int, b: int, ys: slice = slice(None), xs: slice = slice(None)) -> np.ndarray:
        key = tuple({"z": slice(a, b), "y": ys, "x": xs}.get(n, 0) for n in axes)
        try:
            out = np.asarray(array[key]).transpose(order)
        except Exception as exc:  # a corrupt chunk, a truncated file: codec errors, OSError, ...
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            which = f"slice {a}" if b - a == 1 else f"slices {a}-{b - 1}"
            raise InputError(f"{path}: {which} is not readable, the data may be truncated or "
                             f"corrupt ({reason})") from None
        if "z" not in sizes:  # a 2-D image is slice 0
            out = out[None][a:b]
        return np.array(out, dtype) if copy else out.astype(dtype, copy=False)

    stored = getattr(array, "chunks", None)
    chunks = dict(zip(axes, stored)) if isinstance(stored, tuple) and len(stored) == len(axes) else None
    checker = _chunk_checker(array, axes, sparse) if type(array).__module__.startswith("zarr") else None
    return Volume(Path(str(path)), shape, dtype, lambda a, b: read_block(a, b), close=close,
                  read_block=read_block, chunks=tuple(chunks.get(n, 1) for n in "zyx") if chunks else None,
                  missing_chunks=checker, **calibration)


def _check_mrc_header(path: Path) -> None:
    """Refuse what is not an MRC header before `mrcfile` reads it: in permissive mode it allocates whatever
    extended-header length a corrupt header declares (gigabytes for random bytes)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(1024)
    if len(head) == 1024:
        for order in "<>":  # the machine stamp may be wrong: accept either byte order that makes sense
            mode, nsymbt = struct.unpack_from(order + "i", head, 12)[0], struct.unpack_from(order + "i", head, 92)[0]
            if mode in MRC_MODES and 0 <= nsymbt <= size - 1024:
                return
    raise InputError(f"{path}: not a readable MRC file, it may be truncated or corrupt (" +
                     ("its header declares no known data mode, or more extended header than the file holds)"
                      if len(head) == 1024 else f"{size} bytes, less than the 1024-byte header)"))


def _open_mrc(path: Path) -> Volume:
    import mrcfile

    _check_mrc_header(path)
    # Permissive: files from older tools often lack the map ID or machine stamp yet hold good data.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            mrc = mrcfile.mmap(path, mode="r", permissive=True)
        except Exception as exc:
            raise InputError(f"{path}: not a readable MRC file, it may be truncated or corrupt ({exc})") from None
    if mrc.data is None:
        mrc.close()
        reason = "; ".join(str(w.message) for w in caught[:2]) or "no data block"
        raise InputError(f"{path}: not a readable MRC file, it may be truncated or corrupt ({reason})")
    size = mrc.voxel_size  # Å; 0 means "not set": unknown, not guessed
    axes = {a: (_size(float(getattr(size, a)) / 10, path, f"the MRC header's {a} voxel size")
                if float(getattr(size, a)) != 0 else None, "nm") for a in "zyx"}
    calibration = _one_unit(path, axes)
    try:
        return _array_volume(path, mrc.data, copy=True, close=mrc.close, **calibration)
    except BaseException:
        mrc.close()
        raise


# Written by `emunet.core.omezarr` in an image group's attributes: axes whose scale is a placeholder (1.0,
# NGFF needs one per axis) because the size was unknown.
UNKNOWN_AXES_ATTR = "em-unet.unknown_axes"
SPARSE_ATTR = "sparse_chunks"  # an array (or image group) attribute: absent chunks are the fill value by design


def _attrs_file(path: Path, node) -> Path:
    """The file holding a Zarr node's attributes, for messages."""
    inner = Path(path) / node.path if node.path else Path(path)
    return inner / ("zarr.json" if node.metadata.zarr_format == 3 else ".zattrs")


def _bad_field(where: Path, name: str, found, expected: str) -> InputError:
    shown = repr(found)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return InputError(f"{where}: OME-Zarr metadata field {name} is {shown} but should be {expected}; correct that "
                      f"field or write the image again (e.g. with ome-zarr-py)")


def _number_list(where, name: str, values, n: int, positive: bool) -> list[float]:
    if not isinstance(values, list) or len(values) != n:
        raise _bad_field(where, name, values, f"a list of {n} numbers, one per axis")
    for j, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
            raise _bad_field(where, f"{name}[{j}]", v, "a positive finite number" if positive else "a finite number")
    return [float(v) for v in values]


def _ome_scale(where, name: str, transforms, n: int) -> np.ndarray:
    """The product of the `scale` transformations of a `coordinateTransformations` list (ones when absent)."""
    scale = np.ones(n)
    if transforms is None:
        return scale
    if not isinstance(transforms, list):
        raise _bad_field(where, name, transforms, "a list of transformations")
    for i, t in enumerate(transforms):
        field_name = f"{name}[{i}]"
        if not isinstance(t, dict) or not isinstance(t.get("type"), str):
            raise _bad_field(where, field_name, t, 'an object with a "type" (scale, translation)')
        if t["type"] == "scale":
            if "scale" not in t:
                raise _bad_field(where, f"{field_name}.scale", None, "the scale values inline (a scale kept in a "
                                 "file named by 'path' is not read)")
            scale = scale * np.asarray(_number_list(where, f"{field_name}.scale", t["scale"], n, True))
        elif t["type"] == "translation":
            if "translation" not in t:
                raise _bad_field(where, f"{field_name}.translation", None, "the translation values inline")
            _number_list(where, f"{field_name}.translation", t["translation"], n, False)
    return scale


def _ome_multiscale(where: Path, attrs: dict) -> dict | None:
    """The first image of an OME-Zarr group's attributes, checked field by field (NGFF 0.1-0.5); None when
    the group has no `multiscales` (not an image)."""
    root = attrs
    if "ome" in attrs:
        if not isinstance(attrs["ome"], dict):
            raise _bad_field(where, "ome", attrs["ome"], "an object holding multiscales")
        root = attrs["ome"]
    if "multiscales" not in root and root is not attrs and "multiscales" in attrs:
        root = attrs
    if root.get("multiscales") is None:
        return None
    multiscales = root["multiscales"]
    if not isinstance(multiscales, list) or not multiscales:
        raise _bad_field(where, "multiscales", multiscales, "a non-empty list of images")
    multiscale = multiscales[0]
    if not isinstance(multiscale, dict):
        raise _bad_field(where, "multiscales[0]", multiscale, "an object with datasets and axes")
    datasets = multiscale.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise _bad_field(where, "multiscales[0].datasets", datasets, "a non-empty list of levels")
    for i, dataset in enumerate(datasets):
        if not isinstance(dataset, dict):
            raise _bad_field(where, f"multiscales[0].datasets[{i}]", dataset, 'an object with a "path"')
        if not isinstance(dataset.get("path"), str) or not dataset["path"].strip("/"):
            raise _bad_field(where, f"multiscales[0].datasets[{i}].path", dataset.get("path"),
                             "the name of the level's array")
    axes = multiscale.get("axes")
    if axes is not None:
        if not isinstance(axes, list) or not axes:
            raise _bad_field(where, "multiscales[0].axes", axes, "a list of axes")
        for i, axis in enumerate(axes):
            name = axis.get("name") if isinstance(axis, dict) else axis
            if not isinstance(name, str) or not name:
                raise _bad_field(where, f"multiscales[0].axes[{i}].name", name, 'an axis name ("z", "y", "x", "c")')
            if isinstance(axis, dict) and axis.get("unit") is not None and not isinstance(axis["unit"], str):
                raise _bad_field(where, f"multiscales[0].axes[{i}].unit", axis["unit"], 'a unit name ("nanometer")')
    return multiscale


def _ome_calibration(where, multiscale: dict, level: int, names: list[str], units: list, unknown) -> dict:
    """`voxel_size` (z, y, x) and `unit` of one level: its scale times the image's. An axis without a unit
    while another has one, or named in `unknown` (our writer's placeholders), is unknown; with no unit at
    all, scales that are all 1 (the writers' default) say nothing."""
    n = len(names)
    scale = _ome_scale(where, f"multiscales[0].datasets[{level}].coordinateTransformations",
                       multiscale["datasets"][level].get("coordinateTransformations"), n)
    scale = scale * _ome_scale(where, "multiscales[0].coordinateTransformations",
                               multiscale.get("coordinateTransformations"), n)
    axis = {str(a).lower(): (float(s), _unit(u)) for a, s, u in zip(names, scale, units)}
    spatial = {a: axis[a] for a in "zyx" if a in axis and a not in (unknown or ())}
    if not any(u for _, u in spatial.values()):
        if all(s == 1 for s, _ in spatial.values()):
            return {}
        return {"voxel_size": tuple(spatial[a][0] if a in spatial else None for a in "zyx"), "unit": None}
    return _one_unit(where, {a: v for a, v in spatial.items() if v[1]})


def _open_ome_image(path: Path, group, multiscale: dict, level) -> tuple:
    where = _attrs_file(path, group)
    datasets = multiscale["datasets"]
    level = 0 if level is None else level
    if not 0 <= level < len(datasets):
        raise InputError(f"{path}: level {level} does not exist; the image has levels 0-{len(datasets) - 1}")
    name = datasets[level]["path"].strip("/")
    try:
        array = group[name]
    except Exception:
        array = None
    if array is None or not hasattr(array, "shape"):
        raise InputError(f"{path}: the multiscales metadata names level {level} as {name!r} "
                         f"but the group holds no such array")
    axes = multiscale.get("axes") or list("tczyx"[5 - array.ndim:])  # NGFF 0.1/0.2: always tczyx
    if len(axes) != array.ndim:
        raise _bad_field(where, "multiscales[0].axes", axes, f"{array.ndim} axes, one per dimension of level "
                         f"{level}'s array {tuple(array.shape)}")
    names = [a["name"] if isinstance(a, dict) else a for a in axes]
    units = [a.get("unit") if isinstance(a, dict) else None for a in axes]
    for i, dataset in enumerate(datasets):  # every level's, not only the one read: the metadata is one document
        _ome_scale(where, f"multiscales[0].datasets[{i}].coordinateTransformations",
                   dataset.get("coordinateTransformations"), len(names))
    unknown = dict(group.attrs).get(UNKNOWN_AXES_ATTR)
    return array, names, _ome_calibration(where, multiscale, level, names, units, unknown)


def _group_multiscale(path: Path, group) -> dict | None:
    attrs = dict(group.attrs)
    return _ome_multiscale(_attrs_file(path, group), attrs)


def _open_zarr(path: Path, level) -> Volume:
    import zarr

    try:
        node = zarr.open(store=str(path), mode="r")
    except Exception as exc:
        raise InputError(f"{path}: not a readable Zarr array or group ({type(exc).__name__}: {exc})") from None
    names, calibration, sparse = None, {}, False
    if isinstance(node, zarr.Group):
        multiscale = _group_multiscale(path, node)
        attrs = dict(node.attrs)
        if multiscale is None and "bioformats2raw.layout" in (attrs.get("ome") if isinstance(attrs.get("ome"), dict)
                                                              else attrs) and "0" in node.group_keys():
            node = node["0"]  # bioformats2raw: the first image is the group "0"
            multiscale = _group_multiscale(path, node)
        if multiscale is None:
            arrays = sorted(node.array_keys())
            listed = ", ".join(f"{path}/{k}" for k in arrays[:5]) + (", ..." if len(arrays) > 5 else "")
            raise InputError(f"{path}: a Zarr group without OME-Zarr 'multiscales' metadata is not an image; "
                             + (f"open one of its arrays: {listed}" if arrays else "it holds no array"))
        sparse = bool(dict(node.attrs).get(SPARSE_ATTR))
        node, names, calibration = _open_ome_image(path, node, multiscale, level)
    elif level is not None:
        raise InputError(f"{path}: level {level} asked for, but this is a plain Zarr array, not a multiscale image")
    elif any((path.parent / m).exists() for m in ZARR_MARKERS):  # a level inside an OME-Zarr image
        try:
            parent = zarr.open_group(store=str(path.parent), mode="r")
        except Exception:
            parent = None  # a folder that merely sits beside Zarr files
        if parent is not None:
            try:
                multiscale = _group_multiscale(path.parent, parent)
                for i, dataset in enumerate((multiscale or {}).get("datasets") or ()):
                    if dataset["path"].strip("/") == path.name:
                        _, names, calibration = _open_ome_image(path.parent, parent, multiscale, i)
                        sparse = bool(dict(parent.attrs).get(SPARSE_ATTR))
            except InputError as exc:  # the array itself is fine: read it, but say why it is uncalibrated
                _warn(f"{exc}; {path} is read as a plain array, uncalibrated")
                names, calibration = None, {}
    return _array_volume(path, node, names, sparse=sparse, **calibration)


def _h5_datasets(group) -> list[str]:
    import h5py

    found = []
    prefix = group.name.rstrip("/")
    group.visititems(lambda name, obj: found.append(f"{prefix}/{name}") if isinstance(obj, h5py.Dataset) else None)
    return found


def _h5_calibration(dataset, names: list[str] | None, path) -> dict:
    """(z, y, x) from `element_size_um` (Fiji's HDF5 plugin, ilastik) or `resolution` (CREMI and others); an
    axis the attribute does not cover (a 2-D image's z) is unknown."""
    for key, unit in (("element_size_um", "µm"), ("resolution", None)):
        if key in dataset.attrs:
            try:
                sizes = [float(v) for v in np.ravel(dataset.attrs[key])]
            except (TypeError, ValueError):
                _warn(f"{path}: the {key} attribute {dataset.attrs[key]!r} is not a list of numbers; read as "
                      f"uncalibrated")
                continue
            spatial = [n for n in (names or "zyx"[3 - min(len(sizes), 3):]) if n in ("z", "y", "x")]
            if names and len(sizes) == len(names):
                sizes = [s for s, n in zip(sizes, names) if n in ("z", "y", "x")]
            if len(sizes) != len(spatial) or "x" not in spatial:
                _warn(f"{path}: the {key} attribute has {len(sizes)} values for the axes {''.join(spatial)}; "
                      f"read as uncalibrated")
                continue
            if unit is None:
                unit = dataset.attrs.get("unit", dataset.attrs.get("units", ""))
                unit = _unit(unit.decode() if isinstance(unit, bytes) else unit)
            return _one_unit(path, {a: (_size(v, path, f"the {key} attribute's {a}"), unit)
                                    for a, v in zip(spatial, sizes)})
    return {}


def _open_hdf5(file: Path, inner: str | None, spec: str) -> Volume:
    import h5py

    try:
        h5 = h5py.File(file, "r")
    except Exception as exc:
        raise InputError(f"{file}: not a readable HDF5 file, it may be truncated or corrupt ({exc})") from None
    try:
        inner = (inner or "").strip()
        node = h5.get(inner) if inner not in ("", "/") else h5
        if not isinstance(node, h5py.Dataset):
            datasets = _h5_datasets(node if isinstance(node, h5py.Group) else h5)
            if node is h5 and len(datasets) == 1:
                node = h5[datasets[0]]  # one dataset in the file: no need to name it
            else:
                listed = ", ".join(datasets[:8]) + (f", ... ({len(datasets)} in all)" if len(datasets) > 8 else "")
                where = f"no dataset {inner!r}" if inner not in ("", "/") else "no dataset path was given"
                raise InputError(f"{file}: {where}; name one as {file.name}:/path/to/dataset, "
                                 + (f"the file holds {listed}" if datasets else "the file holds no dataset"))
        names = None
        if "axistags" in node.attrs:  # ilastik: JSON {"axes": [{"key": "z"}, ...]}
            try:
                import json
                names = [a["key"] for a in json.loads(node.attrs["axistags"])["axes"]]
            except (KeyError, TypeError, ValueError):
                names = None
        return _array_volume(spec, node, names, close=h5.close, **_h5_calibration(node, names, spec))
    except BaseException:
        h5.close()
        raise


def parse_region(text: str, shape: tuple, path) -> tuple[slice, slice, slice]:
    """`"z0:z1,y0:y1,x0:x1"` as three step-1 slices within `shape`; any part may be empty (the whole axis),
    a single number is one index, negative bounds count from the end."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) > 3:
        raise InputError(f"{path}: region {text!r} has {len(parts)} parts; expected z0:z1,y0:y1,x0:x1")
    out = []
    for part, n, axis in zip(parts + [""] * (3 - len(parts)), shape, "zyx"):
        match = re.fullmatch(r"(-?\d*)\s*(:?)\s*(-?\d*)", part)
        if not match or (not match[2] and match[3]):
            raise InputError(f"{path}: region {text!r} is not of the form z0:z1,y0:y1,x0:x1 (bad part {part!r})")
        if match[2]:
            start, stop = (int(match[1]) if match[1] else 0), (int(match[3]) if match[3] else n)
        elif match[1]:
            start = int(match[1])
            stop = start + 1 if start != -1 else n
        else:
            start, stop = 0, n
        start, stop = (v + n if v < 0 else v for v in (start, stop))
        if not 0 <= start < stop <= n:
            raise InputError(f"{path}: region {text!r} asks for {axis} {part or ':'} but the volume has {n} along "
                             f"{axis} (shape {tuple(shape)}); expected 0 <= start < stop <= {n}")
        out.append(slice(start, stop))
    return tuple(out)


def crop_volume(volume: Volume, region: str) -> Volume:
    """A lazy `Volume` of the block `region` ("z0:z1,y0:y1,x0:x1") of `volume`; reads only that block
    where the format allows (Zarr, HDF5, MRC, .npy), else only its slices."""
    zs, ys, xs = parse_region(region, volume.shape, volume.path)
    inner = volume

    def read_block(a: int, b: int, y: slice = slice(None), x: slice = slice(None)) -> np.ndarray:
        y0, y1, _ = y.indices(ys.stop - ys.start)
        x0, x1, _ = x.indices(xs.stop - xs.start)
        y, x = slice(ys.start + y0, ys.start + max(y0, y1)), slice(xs.start + x0, xs.start + max(x0, x1))
        if inner.read_block:
            return inner.read_block(zs.start + a, zs.start + b, y, x)
        return inner.read(zs.start + a, zs.start + b)[:, y, x]

    shape = (zs.stop - zs.start, ys.stop - ys.start, xs.stop - xs.start)
    return Volume(volume.path, shape, volume.dtype, lambda a, b: read_block(a, b), volume.voxel_size,
                  volume.unit, volume.close, read_block, volume.chunks)


def stack_exists(path: str | Path) -> bool:
    """Whether the file or folder behind a stack path (`file.h5:/dataset`: the file) exists."""
    spec = HDF5_SPEC.fullmatch(str(path))
    return Path(spec[1] if spec else path).exists()


def _check_file(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.is_file() and path.stat().st_size == 0:
        raise InputError(f"{path}: the file is empty (0 bytes)")


def _open(path: str | Path, level) -> Volume:
    spec = HDF5_SPEC.fullmatch(str(path))
    if spec:
        _check_file(Path(spec[1]))
        return _open_hdf5(Path(spec[1]), spec[2], str(path))
    path = Path(path)
    _check_file(path)
    suffix = path.suffix.lower()
    if path.is_dir() and (suffix == ".zarr" or any((path / m).exists() for m in ZARR_MARKERS)):
        return _open_zarr(path, level)
    if level is not None:
        raise InputError(f"{path}: level {level} asked for, but levels exist only in a multiscale OME-Zarr image")
    if path.is_dir():
        return _open_folder(path)
    if suffix in (".tif", ".tiff"):
        return _open_tiff(path)
    if suffix == ".npy":
        return _open_npy(path)
    if suffix == ".png":
        return _in_memory(_read_png(path), path)
    if suffix in MRC_SUFFIXES:
        return _open_mrc(path)
    raise InputError(f"{path}: unsupported file type {suffix!r}; expected one of {', '.join(STACK_SUFFIXES)}, "
                     f"a .zarr folder or a folder of slices")


def _level(level) -> int | None:
    if level is None or (isinstance(level, str) and not level.strip()):
        return None
    try:
        value = int(str(level).strip())
    except ValueError:
        value = -1
    if value < 0:
        raise InputError(f"level: expected a whole number >= 0 (0 is full resolution) but found {level!r}")
    return value


@dataclass(frozen=True)
class ReadOptions:
    """`open_volume`'s options as entry points take them (strings as on a command line), passed on unchanged:
    `open_volume(path, **asdict(options))`. `read_options(cfg)` picks them from a step's config."""

    level: str = ""  # level of an OME-Zarr multiscale image; "" = 0, full resolution
    region: str = ""  # z0:z1,y0:y1,x0:x1: only this block is read; "" = all
    allow_missing_chunks: bool = False  # absent Zarr chunks are an error (an interrupted copy), not zeros
    voxel_size: str = ""  # z,y,x the file lacks (a part may be empty: "50,,"); "" = the file's own
    unit: str = ""  # unit of voxel_size (nm, µm, Å, mm); "" = the file's


def read_options(cfg, **changes) -> ReadOptions:
    """The `ReadOptions` fields of any config object that has them (others keep their defaults)."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ReadOptions) if hasattr(cfg, f.name)}
    return ReadOptions(**{**values, **changes})


def parse_voxel_size(text) -> tuple[float | None, float | None, float | None] | None:
    """`"50,4,4"` (z,y,x; a part may be empty) or a 3-sequence as `(z, y, x)`, None entries unknown; None
    for empty. `InputError` for anything that is not three positive finite numbers or blanks."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    parts = [p.strip() for p in text.split(",")] if isinstance(text, str) else list(text)
    out = []
    for part in parts:
        if part is None or part == "":
            out.append(None)
            continue
        try:
            value = float(part)
        except (TypeError, ValueError):
            value = float("nan")
        if not math.isfinite(value) or value <= 0:
            out = None
            break
        out.append(value)
    if out is None or len(out) != 3 or all(v is None for v in out):
        raise InputError(f"voxel_size {text!r}: expected z,y,x as three positive numbers (e.g. 50,4,4), a part "
                         f"may be empty to keep the file's (50,, gives z only)")
    return tuple(out)


def parse_unit(text) -> str | None:
    """A length unit as `open_volume` reports it ("nm", "µm", "Å", "mm"), None for empty; `InputError` else."""
    if text is None or not str(text).strip():
        return None
    unit = _unit(text)
    if unit not in NM_PER_UNIT:
        raise InputError(f"unit {text!r}: expected a length unit, one of nm, um (µm), A (Å), mm")
    return unit


def with_calibration(volume: Volume, voxel_size=None, unit=None) -> Volume:
    """`volume` with the user's `voxel_size` (z, y, x, None = the file's) and `unit` where given. The file's
    sizes are converted to `unit` (or, with no unit of their own, taken to be in it); a given size that
    differs from the file's wins, with a `CalibrationWarning` naming both."""
    given, unit = parse_voxel_size(voxel_size), parse_unit(unit)
    if given is None and unit is None:
        return volume
    sizes, own = list(volume.voxel_size or (None, None, None)), volume.unit
    target = unit or own
    if unit and own and own != unit and any(v is not None for v in sizes):
        if own in NM_PER_UNIT:
            sizes = [None if v is None else v * NM_PER_UNIT[own] / NM_PER_UNIT[unit] for v in sizes]
        else:
            _warn(f"{volume.path}: the file's voxel size is in {own!r}, which does not convert to unit={unit}; "
                  f"its numbers are taken as {unit}")
    for i, (axis, value) in enumerate(zip("zyx", given or (None, None, None))):
        if value is None:
            continue
        if sizes[i] is not None and not math.isclose(sizes[i], value, rel_tol=1e-6):
            _warn(f"{volume.path}: voxel_size gives {axis} = {value:g} {target or ''} but the file says "
                  f"{sizes[i]:g} {target or ''}; using {value:g}")
        sizes[i] = value
    known = any(v is not None for v in sizes)
    return dataclasses.replace(volume, voxel_size=tuple(sizes) if known else None, unit=target if known else None)


def check_chunks(volume: Volume, block: tuple, allow_missing: bool = False) -> None:
    """Refuse (or, with `allow_missing`, warn once about) absent chunks of a Zarr volume that the block
    `(zs, ys, xs)` meets: they would be read as the fill value, holes that look like data."""
    if volume.missing_chunks is None:
        return
    missing, total, first, fill = volume.missing_chunks(block)
    if not missing:
        return
    keys = ", ".join(first) + (", ..." if missing > len(first) else "")
    if not allow_missing:
        raise InputError(f"{volume.path}: {missing} of the {total} chunks to read are missing ({keys}); the copy "
                         f"may be incomplete: copy it again, or pass allow_missing_chunks=true to read them as the "
                         f"fill value {fill}")
    _warn(f"{volume.path}: {missing} of the {total} chunks to read are missing ({keys}); read as the fill value "
          f"{fill} (allow_missing_chunks)")


@contextlib.contextmanager
def open_volume(path: str | Path, *, level: int | str | None = None, region: str | None = None,
                allow_missing_chunks: bool = False, voxel_size=None, unit: str | None = None):
    """Open a volume for lazy reading; yields a `Volume` and closes its file at the end of the block.

    `path` is a file, a folder of slices, a `.zarr` folder or `file.h5:/dataset`; `level` picks a level of
    an OME-Zarr multiscale image (0, full resolution, by default); `region` ("z0:z1,y0:y1,x0:x1", parts may
    be empty) narrows the volume to a block that is read alone; `allow_missing_chunks` reads absent Zarr
    chunks as the fill value (else an error); `voxel_size` ("z,y,x", parts may be empty, or a sequence) and
    `unit` give what the file lacks (`with_calibration`). Raises `InputError` for a missing, empty,
    unreadable, colour, wrongly shaped or unsupported input, malformed metadata, missing chunks, and for a
    bad option."""
    volume = _open(path, _level(level))
    try:
        volume = with_calibration(volume, voxel_size, unit)
        cropped = region is not None and str(region).strip()
        block = parse_region(region, volume.shape, volume.path) if cropped else \
            tuple(slice(0, n) for n in volume.shape)
        check_chunks(volume, block, bool(allow_missing_chunks))
        if cropped:
            volume = crop_volume(volume, region)
        yield volume
    finally:
        volume.close()


def read_volume(path: str | Path, **options) -> np.ndarray:
    """The whole volume (or the `region` of it) as a raw `(Z, Y, X)` array in its own dtype, after checking
    it fits in memory. `options` are `open_volume`'s."""
    with open_volume(path, **options) as volume:
        return np.asarray(volume)


def check_same_shape(labels: Volume, image_shape: tuple, image_path: str | Path) -> None:
    if tuple(labels.shape) != tuple(image_shape):
        raise InputError(f"{Path(labels.path).name} has shape {tuple(labels.shape)} but {Path(image_path).name} "
                         f"has {tuple(image_shape)}")


VOXEL_TOLERANCE = 0.01  # labels drawn on the image's grid have its voxel size; 1 % covers rounding in headers


def voxel_mismatch(labels: Volume, image: Volume) -> list[str]:
    """Axes ("z", "y", "x") whose size is known in both volumes, in units that compare, and differs by more
    than `VOXEL_TOLERANCE`."""
    if labels.voxel_size is None or image.voxel_size is None:
        return []
    if labels.unit == image.unit:
        factor = 1.0
    elif labels.unit in NM_PER_UNIT and image.unit in NM_PER_UNIT:
        factor = NM_PER_UNIT[labels.unit] / NM_PER_UNIT[image.unit]
    else:
        return []  # one has no unit: nothing to compare
    return [axis for axis, a, b in zip("zyx", labels.voxel_size, image.voxel_size)
            if a is not None and b is not None and abs(a * factor - b) > VOXEL_TOLERANCE * b]


def check_labels(labels: Volume, image: Volume, allow_voxel_mismatch: bool = False) -> None:
    """The checks for every labels/image pair: the same shape, and the same voxel size (within 1 % on every
    axis both know), else `InputError` naming both; with `allow_voxel_mismatch` a different voxel size is a
    warning (labels known to match voxel for voxel despite their header)."""
    check_same_shape(labels, image.shape, image.path)
    axes = voxel_mismatch(labels, image)
    if not axes:
        return
    text = (f"{Path(labels.path).name} has voxel size {describe_voxel(labels.voxel_size, labels.unit)} but "
            f"{Path(image.path).name} has {describe_voxel(image.voxel_size, image.unit)} (z, y, x; "
            f"{', '.join(axes)} differ by more than {VOXEL_TOLERANCE:.0%})")
    if not allow_voxel_mismatch:
        raise InputError(f"{text}; resample the labels to the image's grid, or pass allow_voxel_mismatch=true "
                         f"if they match voxel for voxel")
    _warn(f"{text}; accepted (allow_voxel_mismatch)")


def nonfinite(array) -> int:
    """How many values of `array` are NaN or infinite (0 for integers)."""
    array = np.asarray(array)
    return int(array.size - np.count_nonzero(np.isfinite(array))) if array.dtype.kind in "fc" else 0


def check_finite_labels(page, path, z: int) -> None:
    """For labels read lazily, slice by slice: `InputError` naming the slice and the count of NaN or
    infinite values (a label is a class or an object id: there is no such one)."""
    count = nonfinite(page)
    if count:
        raise InputError(f"{path}: slice {z} of the labels holds {count} NaN or infinite value(s); labels must be "
                         f"finite numbers (0 background): fix or export the label file again")


def read_label_slices(labels: Volume, convert: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Every slice of `labels` through `convert` (e.g. `!= 0`), stacked; `InputError` giving the total
    count of NaN or infinite values when there are any."""
    out, bad, first = [], 0, None
    for z in range(labels.shape[0]):
        page = np.asarray(labels[z])
        count = nonfinite(page)
        if count:
            bad, first = bad + count, z if first is None else first
        out.append(convert(page))
    if bad:
        raise InputError(f"{labels.path}: the labels hold {bad} NaN or infinite value(s) (the first in slice "
                         f"{first}); labels must be finite numbers (0 background): fix or export the label file "
                         f"again")
    return np.stack(out)


def read_mask(path: str | Path, image, image_path: str | Path | None = None, allow_voxel_mismatch: bool = False,
              **options) -> np.ndarray:
    """Read a label stack for `image` (its `Volume`, or only its shape with `image_path`) and binarise it: any
    non-zero value is foreground. `options` are `open_volume`'s (give the labels the image's `level`,
    `region`).

    Returns `(Z, H, W)` uint8 in {0, 1}. Raises `InputError` if the shapes (or, given a `Volume`, the voxel
    sizes: `check_labels`) differ, a label is NaN or infinite, or nothing is foreground."""
    with open_volume(path, **options) as labels:
        if isinstance(image, Volume):
            check_labels(labels, image, allow_voxel_mismatch)
        else:
            check_same_shape(labels, image, image_path)
        mask = read_label_slices(labels, lambda page: page != 0).astype(np.uint8)
    if not mask.any():
        raise InputError(f"{path}: the label stack is all background (no non-zero pixel)")
    return mask
