"""`open_volume`: a path to its format's reader, then a region, a level, the voxel size the user gives and
the chunk check; and the options entry points pass on (`ReadOptions`). See `emunet.core.io`."""

import contextlib
import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emunet.core.errors import InputError
from emunet.core.io.mrc_hdf5 import _open_hdf5, _open_mrc
from emunet.core.io.ome import ZARR_MARKERS, _open_zarr
from emunet.core.io.tiff import _open_folder, _open_npy, _open_tiff, _read_png
from emunet.core.io.volume import NM_PER_UNIT, Volume, _check_file, _in_memory, _unit, _warn


MRC_SUFFIXES = (".mrc", ".rec", ".st", ".map", ".mrcs")
STACK_SUFFIXES = (".tif", ".tiff", ".png", ".npy", *MRC_SUFFIXES, ".h5", ".hdf5", ".hdf")
# `file.h5:/group/dataset`; the non-greedy name lets a folder called `x.h5/` hold the file.
HDF5_SPEC = re.compile(r"(.+?\.(?:h5|hdf5|hdf))(?::(.*))?", re.IGNORECASE)


def list_stack_paths(spec: str) -> list[Path]:
    """Split a comma-separated list of stack files or folders into paths (empty entries ignored)."""
    return [Path(part.strip()).expanduser() for part in spec.split(",") if part.strip()]


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
