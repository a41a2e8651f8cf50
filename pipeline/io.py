"""Reading image and label stacks from what microscopes and Fiji write: multi-page TIFF, folders of 2-D
TIFF/PNG slices (natural sort order), single 2-D images and `.npy` arrays. Every stack comes out as
`(Z, H, W)`; every mistake comes out as an `InputError` that names the file."""

import os
import re
import warnings
from pathlib import Path

import cv2
import numpy as np
import tifffile

from pipeline.errors import InputError

SLICE_SUFFIXES = (".tif", ".tiff", ".png")
STACK_SUFFIXES = (".tif", ".tiff", ".png", ".npy")
# uint8/uint16 are what detectors write; int and float come from processing (e.g. Fiji 32-bit).
ACCEPTED_KINDS = "uif"


def natural_key(name: str) -> list:
    """Sort key that puts `slice_2.tif` before `slice_10.tif`."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _check_gray(array: np.ndarray, axes: str, path: Path) -> np.ndarray:
    """Refuse colour / multi-channel data: segmentation of RGB renderings of EM is almost always a mistake
    (a screenshot, an overlay), and silently converting would hide it."""
    if "S" in axes or "C" in axes:
        raise InputError(
            f"{path}: expected a grayscale stack (Z, H, W) but found {array.shape} with axes {axes!r} "
            f"(colour or multi-channel); save one channel as grayscale"
        )
    return array


def _as_stack(array: np.ndarray, path: Path) -> np.ndarray:
    if array.size == 0:
        raise InputError(f"{path}: the image is empty (shape {array.shape})")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if array.dtype.kind not in ACCEPTED_KINDS:
        raise InputError(f"{path}: expected integer or float pixels but found dtype {array.dtype}")
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise InputError(f"{path}: expected a 2-D image or a (Z, H, W) stack but found shape {array.shape}")
    if min(array.shape) == 0:
        raise InputError(f"{path}: the stack is empty (shape {array.shape})")
    return array


def available_memory() -> int:
    """Bytes that new arrays can take now: MemAvailable on Linux, else physical memory, else 16 GiB."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


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


def _read_tiff(path: Path) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with tifffile.TiffFile(path) as tif:
                if not tif.series:
                    raise InputError(f"{path}: the TIFF holds no image")
                series = tif.series[0]
                check_fits(path, series.shape, series.dtype, "the TIFF header",
                           "crop the stack (e.g. in Fiji), or segment it with `predict`, which reads one slice at a time")
                array = series.asarray()
                axes = series.axes
    except InputError:
        raise
    except Exception as exc:  # tifffile raises ValueError, TiffFileError, struct.error, ... on bad files
        raise InputError(f"{path}: not a readable TIFF, it may be truncated or corrupt ({exc})") from exc
    return _check_gray(array, axes, path)


def _read_png(path: Path) -> np.ndarray:
    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if array is None:
        raise InputError(f"{path}: not a readable PNG, it may be truncated or corrupt")
    return _check_gray(array, "YXS" if array.ndim == 3 else "YX", path)


def _read_file(path: Path) -> np.ndarray:
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise InputError(f"{path}: the file is empty (0 bytes)")
    if suffix in (".tif", ".tiff"):
        return _read_tiff(path)
    if suffix == ".png":
        return _read_png(path)
    if suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except Exception as exc:
            raise InputError(f"{path}: not a readable .npy array ({exc})") from exc
    raise InputError(f"{path}: unsupported file type {suffix!r}; expected one of {', '.join(STACK_SUFFIXES)}")


def _read_folder(path: Path) -> np.ndarray:
    files = sorted((p for p in path.iterdir() if p.suffix.lower() in SLICE_SUFFIXES), key=lambda p: natural_key(p.name))
    if not files:
        raise InputError(f"{path}: the folder holds no {'/'.join(SLICE_SUFFIXES)} slices")
    slices = []
    for f in files:
        image = _as_stack(_read_file(f), f)
        if image.shape[0] != 1:
            raise InputError(f"{f}: expected a 2-D slice in a folder of slices but found a stack {image.shape}")
        if slices and image.shape[1:] != slices[0].shape:
            raise InputError(f"{f}: slice has shape {image.shape[1:]} but {files[0].name} has {slices[0].shape}")
        slices.append(image[0])
    return np.stack(slices)


def list_stack_paths(spec: str) -> list[Path]:
    """Split a comma-separated list of stack files or folders into paths (empty entries ignored)."""
    return [Path(part.strip()).expanduser() for part in spec.split(",") if part.strip()]


def read_stack(path: str | Path) -> np.ndarray:
    """Read one stack: a multi-page TIFF, a 2-D TIFF/PNG, a `.npy`, or a folder of 2-D slices.

    Returns the raw `(Z, H, W)` array in its own dtype (uint8, uint16, int or float). Raises `InputError`
    for a missing, empty, unreadable, colour or wrongly shaped input.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    array = _read_folder(path) if path.is_dir() else _read_file(path)
    return _as_stack(np.asarray(array), path)


def read_mask(path: str | Path, like: np.ndarray, image_path: str | Path) -> np.ndarray:
    """Read a label stack for the image stack `like` and binarise it: any non-zero value is foreground.

    Returns `(Z, H, W)` uint8 in {0, 1}. Raises `InputError` if the shapes differ or nothing is foreground.
    """
    labels = read_stack(path)
    if labels.shape != like.shape:
        raise InputError(
            f"{Path(path).name} has shape {labels.shape} but {Path(image_path).name} has {like.shape}"
        )
    mask = (labels != 0).astype(np.uint8)
    if not mask.any():
        raise InputError(f"{path}: the label stack is all background (no non-zero pixel)")
    return mask


class TiffStack:
    """A multi-page grayscale TIFF as a `(Z, H, W)` stack whose slices are read from disk when indexed,
    so that a 200 x 2048 x 2048 stack never sits in memory. Supports `shape`, `dtype`, `len`,
    `stack[z]` and `stack[a:b]`."""

    def __init__(self, path: Path, tif: tifffile.TiffFile):
        series = tif.series[0]
        self.path, self._tif, self._pages = path, tif, series.pages
        self.shape = (len(self._pages), *series.pages[0].shape)
        self.dtype = series.dtype
        check_fits(path, self.shape[1:], self.dtype, "one slice of the TIFF header", "crop the slices (e.g. in Fiji)")

    def __len__(self) -> int:
        return self.shape[0]

    def _page(self, z: int) -> np.ndarray:
        try:
            array = self._pages[z].asarray()
        except Exception as exc:
            raise InputError(f"{self.path}: slice {z} is not readable, the file may be truncated ({exc})") from exc
        return array.astype(np.uint8) if array.dtype == bool else array

    def __getitem__(self, key):
        if isinstance(key, slice):
            return np.stack([self._page(z) for z in range(*key.indices(self.shape[0]))])
        return self._page(int(key))

    def close(self) -> None:
        self._tif.close()


def lazy_stack(path: str | Path):
    """A stack for slice-by-slice reading: a `TiffStack` for a multi-page grayscale TIFF with one page per
    slice, a memory-mapped array for `.npy`, otherwise the array `read_stack` returns."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() in (".tif", ".tiff") and path.stat().st_size > 0:
        try:
            tif = tifffile.TiffFile(path)
        except Exception as exc:
            raise InputError(f"{path}: not a readable TIFF, it may be truncated or corrupt ({exc})") from exc
        series = tif.series[0] if tif.series else None
        pages_are_slices = (series is not None and len(series.pages) > 1 and series.ndim == 3
                            and all(p is not None for p in series.pages))
        if pages_are_slices and "S" not in series.axes and "C" not in series.axes:
            try:
                return TiffStack(path, tif)
            except InputError:
                tif.close()
                raise
        tif.close()
    if path.is_file() and path.suffix.lower() == ".npy" and path.stat().st_size > 0:
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as exc:
            raise InputError(f"{path}: not a readable .npy array ({exc})") from exc
        return _as_stack(array, path)
    return read_stack(path)
