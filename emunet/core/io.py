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

Options, keyword arguments of `open_volume` (and `read_volume`), the same for every format:
- `level=1`: another level of an OME-Zarr multiscale image (0 is full resolution); an error elsewhere.
- `region="z0:z1,y0:y1,x0:x1"`: a lazy sub-block; only that block is read. Python slice bounds (a negative
  one counts from the end, a single number is one index), any part may be empty ("10:20,,", ",0:512").

    with open_volume("tomo.tif") as volume:
        volume.shape, volume.dtype, volume.voxel_size, volume.unit   # (30, 512, 512), uint8, (50.0, 4.0, 4.0), "nm"
        volume[12]          # (Y, X) slice, read now
        volume[0:4]         # (4, Y, X)
    with open_volume("cells.ome.zarr", level=1, region="10:20,,") as volume: ...
    with open_volume("sample.h5:/volumes/raw") as volume: ...
"""

import contextlib
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
    # Formats that can read part of a slice (Zarr, HDF5, MRC, .npy) also give slices [a, b) cropped to
    # rows `ys` and columns `xs` (step 1), so that a region or a tile never decodes whole slices.
    read_block: Callable[[int, int, slice, slice], np.ndarray] | None = None
    # `(z, y, x)` chunk shape of a chunked store (Zarr, HDF5), which results written as OME-Zarr keep.
    chunks: tuple[int, int, int] | None = None

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

    def read_block(a: int, b: int, ys: slice = slice(None), xs: slice = slice(None)) -> np.ndarray:
        return np.asarray(array[a:b, ys, xs]).astype(dtype, copy=False)

    return Volume(path, tuple(array.shape), dtype, lambda a, b: read_block(a, b), read_block=read_block)


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


def _array_volume(path, array, names: list[str] | None = None, copy: bool = False, close=lambda: None,
                  **calibration) -> Volume:
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
    return Volume(Path(str(path)), shape, dtype, lambda a, b: read_block(a, b), close=close,
                  read_block=read_block, chunks=tuple(chunks.get(n, 1) for n in "zyx") if chunks else None,
                  **calibration)


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
    size = mrc.voxel_size
    z, y, x = (float(size.z), float(size.y), float(size.x))
    calibration = {"voxel_size": (z / 10 if z > 0 else x / 10, y / 10, x / 10), "unit": "nm"} if x > 0 and y > 0 else {}
    try:
        return _array_volume(path, mrc.data, copy=True, close=mrc.close, **calibration)
    except BaseException:
        mrc.close()
        raise


def _ome_calibration(multiscale: dict, dataset: dict, names: list[str], units: list) -> dict:
    """`voxel_size` (z, y, x) and `unit` of one level: its scale times the image's; {} when neither a unit
    nor a scale other than 1 says anything."""
    scale = np.ones(len(names))
    for transforms in (dataset.get("coordinateTransformations"), multiscale.get("coordinateTransformations")):
        for t in transforms or ():
            if t.get("type") == "scale" and len(t.get("scale", ())) == len(names):
                scale *= np.asarray(t["scale"], float)
    axis = {n: (float(s), _unit(u)) for n, s, u in zip(names, scale, units)}
    if "y" not in axis or "x" not in axis:
        return {}
    unit = axis["x"][1]
    z = axis.get("z", axis["x"])
    sizes = [z, axis["y"], axis["x"]]
    if any(u != unit for _, u in sizes):  # e.g. z in µm, y and x in nm: all in x's unit when both are known
        if unit not in NM_PER_UNIT or any(u not in NM_PER_UNIT for _, u in sizes):
            return {"voxel_size": tuple(s for s, _ in sizes), "unit": None}
        sizes = [(s * NM_PER_UNIT[u] / NM_PER_UNIT[unit], unit) for s, u in sizes]
    if unit is None and all(s == 1 for s, _ in sizes):
        return {}
    return {"voxel_size": tuple(s for s, _ in sizes), "unit": unit}


def _multiscales(group) -> list:
    attrs = dict(group.attrs)
    return (attrs.get("ome") or attrs).get("multiscales") or []


def _open_ome_image(path: Path, group, multiscale: dict, level) -> tuple:
    datasets = multiscale.get("datasets") or []
    level = 0 if level is None else level
    if not 0 <= level < len(datasets):
        raise InputError(f"{path}: level {level} does not exist; the image has levels 0-{len(datasets) - 1}")
    dataset = datasets[level]
    try:
        array = group[dataset["path"]]
    except Exception:
        raise InputError(f"{path}: the multiscales metadata names level {level} as {dataset.get('path')!r} "
                         f"but the group holds no such array") from None
    axes = multiscale.get("axes") or list("tczyx"[5 - array.ndim:])  # NGFF 0.1/0.2: always tczyx
    names = [a["name"] if isinstance(a, dict) else a for a in axes]
    units = [a.get("unit") if isinstance(a, dict) else None for a in axes]
    return array, names, _ome_calibration(multiscale, dataset, names, units)


def _open_zarr(path: Path, level) -> Volume:
    import zarr

    try:
        node = zarr.open(store=str(path), mode="r")
    except Exception as exc:
        raise InputError(f"{path}: not a readable Zarr array or group ({type(exc).__name__}: {exc})") from None
    names, calibration = None, {}
    if isinstance(node, zarr.Group):
        multiscales = _multiscales(node)
        if not multiscales and "bioformats2raw.layout" in (dict(node.attrs).get("ome") or dict(node.attrs)) \
                and "0" in node.group_keys():
            node = node["0"]  # bioformats2raw: the first image is the group "0"
            multiscales = _multiscales(node)
        if not multiscales:
            arrays = sorted(node.array_keys())
            listed = ", ".join(f"{path}/{k}" for k in arrays[:5]) + (", ..." if len(arrays) > 5 else "")
            raise InputError(f"{path}: a Zarr group without OME-Zarr 'multiscales' metadata is not an image; "
                             + (f"open one of its arrays: {listed}" if arrays else "it holds no array"))
        node, names, calibration = _open_ome_image(path, node, multiscales[0], level)
    elif level is not None:
        raise InputError(f"{path}: level {level} asked for, but this is a plain Zarr array, not a multiscale image")
    elif any((path.parent / m).exists() for m in ZARR_MARKERS):  # a level inside an OME-Zarr image
        try:
            parent = zarr.open_group(store=str(path.parent), mode="r")
            for multiscale in _multiscales(parent):
                for i, dataset in enumerate(multiscale.get("datasets") or ()):
                    if dataset.get("path") == path.name:
                        _, names, calibration = _open_ome_image(path, parent, multiscale, i)
        except Exception:
            names, calibration = None, {}  # the parent's metadata is a bonus: the array is read uncalibrated
    return _array_volume(path, node, names, **calibration)


def _h5_datasets(group) -> list[str]:
    import h5py

    found = []
    prefix = group.name.rstrip("/")
    group.visititems(lambda name, obj: found.append(f"{prefix}/{name}") if isinstance(obj, h5py.Dataset) else None)
    return found


def _h5_calibration(dataset, names: list[str] | None) -> dict:
    """(z, y, x) from `element_size_um` (Fiji's HDF5 plugin, ilastik) or `resolution` (CREMI and others)."""
    for key, unit in (("element_size_um", "µm"), ("resolution", None)):
        if key in dataset.attrs:
            try:
                sizes = [float(v) for v in np.ravel(dataset.attrs[key])]
            except (TypeError, ValueError):
                continue
            spatial = [n for n in (names or "zyx"[3 - len(sizes):]) if n in ("z", "y", "x")]
            if names and len(sizes) == len(names):
                sizes = [s for s, n in zip(sizes, names) if n in ("z", "y", "x")]
            if len(sizes) != len(spatial) or "x" not in spatial or min(sizes) <= 0:
                continue
            axis = dict(zip(spatial, sizes))
            if unit is None:
                unit = dataset.attrs.get("unit", dataset.attrs.get("units", ""))
                unit = _unit(unit.decode() if isinstance(unit, bytes) else unit)
            return {"voxel_size": (axis.get("z", axis["x"]), axis["y"], axis["x"]), "unit": unit}
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
        return _array_volume(spec, node, names, close=h5.close, **_h5_calibration(node, names))
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


@contextlib.contextmanager
def open_volume(path: str | Path, *, level: int | str | None = None, region: str | None = None):
    """Open a volume for lazy reading; yields a `Volume` and closes its file at the end of the block.

    `path` is a file, a folder of slices, a `.zarr` folder or `file.h5:/dataset`; `level` picks a level of
    an OME-Zarr multiscale image (0, full resolution, by default); `region` ("z0:z1,y0:y1,x0:x1", parts may
    be empty) narrows the volume to a block that is read alone. Raises `InputError` for a missing, empty,
    unreadable, colour, wrongly shaped or unsupported input, and for a bad level or region."""
    volume = _open(path, _level(level))
    try:
        if region is not None and str(region).strip():
            volume = crop_volume(volume, region)
        yield volume
    finally:
        volume.close()


def read_volume(path: str | Path, **options) -> np.ndarray:
    """The whole volume (or the `region` of it) as a raw `(Z, Y, X)` array in its own dtype, after checking
    it fits in memory. `options` are `open_volume`'s (`level`, `region`)."""
    with open_volume(path, **options) as volume:
        return np.asarray(volume)


def check_same_shape(labels: Volume, image_shape: tuple, image_path: str | Path) -> None:
    if tuple(labels.shape) != tuple(image_shape):
        raise InputError(f"{Path(labels.path).name} has shape {tuple(labels.shape)} but {Path(image_path).name} "
                         f"has {tuple(image_shape)}")


def read_mask(path: str | Path, image_shape: tuple, image_path: str | Path, **options) -> np.ndarray:
    """Read a label stack for an image of `image_shape` and binarise it: any non-zero value is foreground.
    `options` are `open_volume`'s (`level`, `region`: give the labels the image's).

    Returns `(Z, H, W)` uint8 in {0, 1}. Raises `InputError` if the shapes differ or nothing is foreground."""
    with open_volume(path, **options) as labels:
        check_same_shape(labels, image_shape, image_path)
        mask = np.stack([np.asarray(labels[z]) != 0 for z in range(labels.shape[0])]).astype(np.uint8)
    if not mask.any():
        raise InputError(f"{path}: the label stack is all background (no non-zero pixel)")
    return mask
