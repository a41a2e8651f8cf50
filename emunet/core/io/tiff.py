"""Readers of TIFF (ImageJ and OME calibration), `.npy`, PNG and folders of 2-D slices (`emunet.core.io`)."""

import re
import warnings
from pathlib import Path

import cv2
import numpy as np
import tifffile

from emunet.core.errors import InputError
from emunet.core.io.volume import (Volume, _check_file, _checked, _gray_axes, _in_memory, _one_unit, _size, _unit,
                                   _warn, check_fits, read_dtype)


SLICE_SUFFIXES = (".tif", ".tiff", ".png")


def natural_key(name: str) -> list:
    """Sort key that puts `slice_2.tif` before `slice_10.tif`."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


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
