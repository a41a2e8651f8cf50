"""One way to open a volume: `open_volume(path)` gives a lazy `(Z, Y, X)` grayscale array read slice by
slice, with its voxel size where the file records one. Formats: multi-page TIFF and OME-TIFF (ImageJ and
OME calibration), a single 2-D TIFF or PNG, `.npy` (memory-mapped), and folders of 2-D TIFF/PNG slices
(natural sort order). Every mistake comes out as an `InputError` that names the file.

    with open_volume("tomo.tif") as volume:
        volume.shape, volume.dtype, volume.voxel_size, volume.unit   # (30, 512, 512), uint8, (50.0, 4.0, 4.0), "nm"
        volume[12]          # (Y, X) slice, read now
        volume[0:4]         # (4, Y, X)
"""

import contextlib
import re
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
STACK_SUFFIXES = (".tif", ".tiff", ".png", ".npy")
# uint8/uint16 are what detectors write; int and float come from processing (e.g. Fiji 32-bit).
ACCEPTED_KINDS = "uif"
# Units as files spell them, to one spelling. ImageJ writes "micron" or "\u00b5m" (often as "\\u00B5m").
UNITS = {"micron": "µm", "microns": "µm", "um": "µm", "\\u00b5m": "µm", "µm": "µm", "μm": "µm",
         "nm": "nm", "nanometer": "nm", "nanometre": "nm", "mm": "mm", "millimeter": "mm", "pixel": None,
         "pixels": None, "": None, "angstrom": "Å", "å": "Å", "a": "Å"}


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


@dataclass
class Volume:
    """A `(Z, Y, X)` grayscale volume whose slices are read when indexed, so that a 200 x 2048 x 2048
    stack never sits in memory. `volume[z]` is `(Y, X)`, `volume[a:b]` is `(b - a, Y, X)`, and a tuple
    key crops Y and X too. `voxel_size` is `(z, y, x)` in `unit` where the file says so, else None."""

    path: Path
    shape: tuple[int, int, int]
    dtype: np.dtype
    read: Callable[[int, int], np.ndarray]  # slices [a, b) -> (b - a, Y, X)
    voxel_size: tuple[float, float, float] | None = None
    unit: str | None = None
    close: Callable[[], None] = field(default=lambda: None)

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


def _tiff_calibration(tif: tifffile.TiffFile) -> dict:
    """`voxel_size` (z, y, x) and `unit` from ImageJ or OME metadata; {} when the file has neither."""
    try:
        if tif.is_ome and tif.ome_metadata:
            pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
            pixels = (pixels[0] if isinstance(pixels, list) else pixels)["Pixels"]
            sizes = [pixels.get(f"PhysicalSize{a}") for a in "ZYX"]
            if sizes[1] and sizes[2]:
                unit = _unit(pixels.get("PhysicalSizeXUnit", "µm"))
                return {"voxel_size": tuple(float(s or sizes[2]) for s in sizes), "unit": unit}
        if tif.is_imagej and tif.imagej_metadata is not None:
            meta, page = tif.imagej_metadata, tif.pages[0]
            unit = _unit(meta.get("unit", ""))
            tags = page.tags
            if unit and "XResolution" in tags and "YResolution" in tags:
                x_res, y_res = (n / d for n, d in (tags["XResolution"].value, tags["YResolution"].value))
                x, y = 1 / x_res, 1 / y_res
                return {"voxel_size": (float(meta.get("spacing", x)), float(y), float(x)), "unit": unit}
    except (KeyError, TypeError, ValueError, ZeroDivisionError, IndexError):
        pass  # calibration is a bonus: a file with odd metadata is still read, uncalibrated
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
        calibration = _tiff_calibration(tif)
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
    array = array[None] if array.ndim == 2 else array
    if min(array.shape) == 0:
        raise InputError(f"{path}: the stack is empty (shape {array.shape})")
    dtype = read_dtype(array.dtype, path)
    return Volume(path, tuple(array.shape), dtype, lambda a, b: np.asarray(array[a:b]).astype(dtype, copy=False))


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


def _check_file(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.is_file() and path.stat().st_size == 0:
        raise InputError(f"{path}: the file is empty (0 bytes)")


@contextlib.contextmanager
def open_volume(path: str | Path):
    """Open a volume for lazy reading; yields a `Volume` and closes its file at the end of the block.

    Raises `InputError` for a missing, empty, unreadable, colour, wrongly shaped or unsupported input."""
    path = Path(path)
    _check_file(path)
    suffix = path.suffix.lower()
    if path.is_dir():
        volume = _open_folder(path)
    elif suffix in (".tif", ".tiff"):
        volume = _open_tiff(path)
    elif suffix == ".npy":
        volume = _open_npy(path)
    elif suffix == ".png":
        volume = _in_memory(_read_png(path), path)
    else:
        raise InputError(f"{path}: unsupported file type {suffix!r}; expected one of {', '.join(STACK_SUFFIXES)} "
                         f"or a folder of slices")
    try:
        yield volume
    finally:
        volume.close()


def read_volume(path: str | Path) -> np.ndarray:
    """The whole volume as a raw `(Z, Y, X)` array in its own dtype, after checking it fits in memory."""
    with open_volume(path) as volume:
        return np.asarray(volume)


def check_same_shape(labels: Volume, image_shape: tuple, image_path: str | Path) -> None:
    if tuple(labels.shape) != tuple(image_shape):
        raise InputError(f"{Path(labels.path).name} has shape {tuple(labels.shape)} but {Path(image_path).name} "
                         f"has {tuple(image_shape)}")


def read_mask(path: str | Path, image_shape: tuple, image_path: str | Path) -> np.ndarray:
    """Read a label stack for an image of `image_shape` and binarise it: any non-zero value is foreground.

    Returns `(Z, H, W)` uint8 in {0, 1}. Raises `InputError` if the shapes differ or nothing is foreground."""
    with open_volume(path) as labels:
        check_same_shape(labels, image_shape, image_path)
        mask = np.stack([np.asarray(labels[z]) != 0 for z in range(labels.shape[0])]).astype(np.uint8)
    if not mask.any():
        raise InputError(f"{path}: the label stack is all background (no non-zero pixel)")
    return mask
