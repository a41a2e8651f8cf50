"""Checks a run (predict, predict_spark) makes before any work: that its results never land on the user's
data, and that it can be segmented in the memory there is (slice by slice or, beyond, by blocks).

What a run reads is a *container*: a file (TIFF, MRC, .npy; an HDF5 `file.h5:/dataset` is the file), or a
whole folder tree (a Zarr image, `x.ome.zarr/0` included, or a folder of slices): writing anywhere inside
it changes what was read, and a later run that reads the folder sees the results as data. Paths are
compared resolved (symlinks and `..` followed), so another spelling of the same file cannot hide a clash.

A result path that already exists is replaced only when em-unet wrote it: a TIFF whose first page says
so (Software or ImageDescription "em-unet"), an OME-Zarr image with our marker
(`emunet.core.omezarr.written_by_us`), a CSV whose first line is one of our headers. A user's file of that
name (their `cells_mask.tif` ground truth, say) is never overwritten.

    check_results([*inputs, *labels], output_dir, names, formats, probability, labels)  # before output_dir is made
    check_slices_fit(inputs, scored=bool(labels), budget=budget, params=params, level=level, region=region)
"""

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import tifffile

from emunet.core.errors import InputError
from emunet.core.io import HDF5_SPEC, ZARR_MARKERS, available_memory, open_volume
from emunet.core.objects import MEASURE_COLUMNS
from emunet.core.omezarr import written_by_us
from emunet.inference.blockplan import BYTES_PER_PIXEL as LABELLING_BYTES_PER_PIXEL
from emunet.inference.blockplan import halo_for, smallest_block_bytes
from emunet.inference.instances import labelled_at_once
from emunet.inference.blocks import MEMORY_FRACTION
from emunet.inference.outputs import OBJECT_COLUMNS, result_targets
from emunet.inference.params import DEFAULTS, SegmentParams
from emunet.inference.tiling import plan_tiles

WRITER = "em-unet"  # the TIFF Software / ImageDescription of our results' first page
# The first lines of the CSVs we write: per input `<name>_objects.csv` and `<name>_instances.csv`, and
# predict_spark's `objects.csv` (a stack column first).
CSV_HEADERS = (OBJECT_COLUMNS, MEASURE_COLUMNS, ["stack", *OBJECT_COLUMNS])


def real(path: str | Path) -> Path:
    """`path` with symlinks, `.` and `..` resolved (the parts that exist), absolute."""
    return Path(os.path.realpath(path))


def _zarr_like(folder: Path) -> bool:
    return folder.name.lower().endswith(".zarr") or any((folder / m).exists() for m in ZARR_MARKERS)


def read_container(spec: str | Path) -> Path:
    """The resolved file or folder tree that reading `spec` depends on (see the module)."""
    match = HDF5_SPEC.fullmatch(str(spec))
    path = real(match[1] if match else spec)
    while path.is_dir() and path.parent != path and path.parent.is_dir() and _zarr_like(path.parent):
        path = path.parent  # an array or level inside a Zarr image: the image is what is read
    return path


def _zarr_result(path: Path) -> bool:
    return path.name.lower().endswith(".zarr")


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _csv_header(path: Path) -> list[str]:
    with open(path, newline="", errors="replace") as handle:
        return handle.readline(64 * 1024).rstrip("\r\n").split(",")


def written_by_em_unet(path: Path, csv_headers: Iterable[Sequence[str]] = CSV_HEADERS) -> bool:
    """Whether the existing file or folder at `path` is a result em-unet wrote (and may replace)."""
    path = real(path)
    try:
        if path.is_dir():  # only an OME-Zarr result is a folder
            return _zarr_result(path) and written_by_us(path)
        if not path.is_file():
            return False
        if path.suffix.lower() == ".csv":
            return _csv_header(path) in [list(h) for h in csv_headers]
        if path.suffix.lower() in (".tif", ".tiff"):
            with tifffile.TiffFile(path) as tif:
                tags = tif.pages.first.tags
                return any(WRITER == str(tags[name].value) for name in ("Software", "ImageDescription") if name in tags)
    except Exception:  # unreadable, truncated, not what its name says: not ours
        return False
    return False


def check_writes(reads: Iterable[str | Path], writes: Iterable[str | Path],
                 csv_headers: Iterable[Sequence[str]] = CSV_HEADERS) -> None:
    """Before any work: refuse a run that would write any of `writes` (every result path: files, and
    OME-Zarr folders that replace the whole folder) onto or inside what it reads (`reads`: inputs and
    labels, as given), or onto an existing file em-unet did not write (`csv_headers`: the header rows of
    the CSVs it writes). One `InputError` names both paths and the remedy."""
    reads = [(str(spec), read_container(spec)) for spec in reads]
    headers = list(csv_headers)
    for target in map(Path, writes):
        where = real(target)
        for spec, container in reads:
            if _within(where, container) or _within(container, where):
                into = "onto" if where == container else "inside" if _within(where, container) else "over"
                raise InputError(f"the result {target} would be written {into} {spec}, which this run reads "
                                 f"({container}); results never replace what they read: pass another output_dir, "
                                 f"outside it (e.g. output_dir={container.parent / 'predictions'})")
        if os.path.lexists(target) and not written_by_em_unet(target, headers):
            what = "is a folder" if where.is_dir() and not _zarr_result(target) else "exists"
            raise InputError(f"{target} {what} and was not written by em-unet; results never replace what they "
                             f"did not write: move it away or pass another output_dir")


def check_results(reads: Iterable[str | Path], out_dir: str | Path, names: list[str], formats: list[str],
                  probability: bool = False, labels: bool = False, objects: bool = True,
                  extra: Iterable[str | Path] = ()) -> None:
    """`check_writes` for a run that writes, into `out_dir`, the results of inputs `names` in `formats`
    (`emunet.inference.outputs.result_targets` with `probability`, `labels`, `objects`) and the `extra`
    files (predict_spark's `objects.csv`); `reads` are its inputs and labels. Call it before `out_dir` is
    made: a folder made inside an input is already a write."""
    out_dir = Path(out_dir)
    targets = [t for name, fmt in zip(names, formats)
               for t in result_targets(out_dir, name, probability, objects, labels, fmt).values()]
    check_writes(reads, [*targets, *map(Path, extra)])


# Peak memory that segmenting one slice adds, per pixel, uint8 slice read included: bench/slice_memory.py,
# predict's real per-slice path (read, normalise to float32, mirror-pad, Gaussian-blended tile sums and
# weights, probabilities, mask, instances with their components and watershed, 3-D ids, writers), square
# uint8 slices, the larger of a fresh tiny U-Net and an 'identity' network (watershed on most of the slice);
# `python bench/slice_memory.py [--sizes 2048 4096]` on 2 CPU cores, 24 GiB:
#   plain (mask, tables):   2048^2 55.8, 4096^2 57.0 B/pixel, slope 57.3 (one segmentation path, 03:40 UTC)
#                           [before it: 2048^2 46.9, 4096^2 55.6, 8192^2 56.6, slope 4096->8192 56.9]
#   full (+ probabilities, instance labels, scored against a label slice):
#                           2048^2 118.0, 4096^2 111.2 B/pixel, slope 108.9
#                           [before it: 2048^2 108.5, 4096^2 100.0, 8192^2 96.5, slope 95.4]
# At 2048^2 the figures still mix in the runtime's fixed part and reuse of memory freed earlier; from
# 4096^2 on they settle. The largest of the settled figures and the slopes, rounded up:
BYTES_PER_PIXEL = 58
SCORED_BYTES_PER_PIXEL = 112


def slice_working_bytes(height: int, width: int, itemsize: int = 1, scored: bool = False) -> int:
    """Peak bytes that segmenting one `(height, width)` slice of `itemsize`-byte pixels adds to the
    runtime (measured, see `BYTES_PER_PIXEL`); `scored`: also against a label slice (predict with labels).
    Where slices are small enough to be labelled several at once (`instances.labelled_at_once`), each
    other one adds its labelling's bytes (`blockplan.BYTES_PER_PIXEL`)."""
    pixels = float(height) * float(width)
    per_pixel = (SCORED_BYTES_PER_PIXEL if scored else BYTES_PER_PIXEL) + int(itemsize) - 1
    others = labelled_at_once(int(pixels)) - 1
    return int(pixels * (per_pixel + others * LABELLING_BYTES_PER_PIXEL))


def check_slice_memory(path: str | Path, shape: tuple, dtype, scored: bool = False,
                       available: int | None = None, budget: float | None = None,
                       params: SegmentParams | None = None) -> None:
    """Before any work: refuse a volume of `shape` `(Z, Y, X)` that cannot be segmented in the memory
    available (`available`, default `available_memory()`). A slice whose working memory
    (`slice_working_bytes`) is more than that goes by blocks in z, y and x (`emunet.inference.blockwise`),
    so it is refused only when even the smallest block (`blockplan.smallest_block_bytes`, with the tiles of
    `params`, default `DEFAULTS`) does not fit `budget` (default half of `available`, as predict's
    `memory_gb` 0). `scored` (against labels) refuses a slice that does not fit: the scores are counted
    on whole slices. The readers' up-front checks count a slice's pixels only; the work on it takes some
    60 to 110 times that."""
    height, width = int(shape[-2]), int(shape[-1])
    needed = slice_working_bytes(height, width, np.dtype(dtype).itemsize, scored)
    free = available_memory() if available is None else int(available)
    if scored and needed > free:
        raise InputError(f"{path}: one {height} x {width} slice needs about {needed / 2**30:.1f} GiB of memory to "
                         f"segment and score but only {free / 2**30:.1f} GiB is available; segment part of it with "
                         f"region=z0:z1,y0:y1,x0:x1 (a block of y and x), or use a machine with more memory")
    budget = free * MEMORY_FRACTION if budget is None else float(budget)
    if needed <= budget:
        return
    params = params or DEFAULTS
    tiles = plan_tiles(height, width, params.tile_size, 1, params.overlap, params.batch_size)
    smallest = smallest_block_bytes((int(shape[0]), height, width), tiles, halo_for("2d"))
    if smallest > budget:
        raise InputError(f"{path}: one {height} x {width} slice goes by blocks, but even the smallest block needs "
                         f"about {smallest / 2**20:.0f} MiB of memory and the budget is {budget / 2**20:.0f} MiB; "
                         f"pass a larger memory_gb, a smaller tile_size, segment part of it with "
                         f"region=z0:z1,y0:y1,x0:x1, or use a machine with more memory")


def check_slices_fit(paths: Iterable[str | Path], scored: bool = False, budget: float | None = None,
                     params: SegmentParams | None = None, **where) -> None:
    """`check_slice_memory` for every input, opened lazily (headers only); `scored`: the run scores against
    labels; `budget`, `params`: the run's block budget and segmentation params; `where`: `open_volume`'s
    `level` and `region`, as the run will read them."""
    for path in paths:
        with open_volume(path, **where) as volume:
            check_slice_memory(path, volume.shape, volume.dtype, scored, budget=budget, params=params)
