"""Writing results as OME-Zarr images (NGFF 0.4 on Zarr v2, the version every OME-Zarr reader takes:
napari-ome-zarr, Fiji's n5-viewer / MoBIE, neuroglancer, webKnossos, `ome-zarr-py`).

A result is one single-level image `(Z, Y, X)` with the input's voxel size as its scale and the input's
chunking where it had one. NGFF needs a scale for every axis: an axis whose size the input did not give
gets the placeholder 1.0 and no unit, and is listed in the group attribute `em-unet.unknown_axes` so that
`open_volume` reads it back as unknown (other readers see an axis without a unit). Chunks that hold only
zeros are not stored (zarr-python's default); the array's attribute `sparse_chunks: true` says so, which
`open_volume` takes to mean that an absent chunk is not a missing one.

Slices are buffered until a whole row of chunks along Z is complete and then written at once, so memory
holds one chunk depth of slices, whatever the volume's size; several writers (Spark tasks) may write
disjoint chunk-aligned Z ranges of the same array at the same time.

    create_image(path, (Z, Y, X), np.uint8, chunks=(16, 256, 256), voxel_size=(40, 8, 8), unit="nm")
    with SliceWriter(open_image(path)) as write:
        for z, page in enumerate(pages):
            write(z, page)
"""

from pathlib import Path

import numpy as np

from emunet.core.errors import InputError
from emunet.core.io import SPARSE_ATTR, UNKNOWN_AXES_ATTR

NGFF_VERSION = "0.4"
# NGFF axis units are UDUNITS-2 names; `open_volume` reports short ones.
NGFF_UNITS = {"nm": "nanometer", "µm": "micrometer", "Å": "angstrom", "mm": "millimeter"}
WRITER_TAG = "em-unet"  # in the group's attributes: lets a later run know it may replace the folder
# Chunks when the input had none (TIFF, MRC...): 64 slices would hold 64 slices in memory per writer;
# 16 x 512 x 512 (4 MiB of uint8) is what ome-zarr-py and webKnossos use for EM, give or take.
DEFAULT_CHUNKS = (16, 512, 512)


def chunking(shape: tuple[int, int, int], chunks: tuple | None) -> tuple[int, int, int]:
    """The `(z, y, x)` chunk shape for an image of `shape`: `chunks` (the input's) or `DEFAULT_CHUNKS`,
    each no larger than the image."""
    chunks = tuple(chunks) if chunks else DEFAULT_CHUNKS
    return tuple(int(max(1, min(c, n))) for c, n in zip(chunks, shape))


def unknown_axes(voxel_size) -> list[str]:
    """The axes ("z", "y", "x") whose size `voxel_size` (z, y, x, entries may be None; None: all) lacks."""
    return list("zyx") if voxel_size is None else [a for a, s in zip("zyx", voxel_size) if s is None]


def multiscales(name: str, voxel_size, unit: str | None) -> list[dict]:
    """NGFF 0.4 `multiscales` metadata of a single-level `(Z, Y, X)` image stored at path "0": the scale of
    the axes `voxel_size` gives, in `unit`; 1.0 and no unit for the others (`unknown_axes`)."""
    unknown = unknown_axes(voxel_size)
    axes = [{"name": a, "type": "space"} for a in "zyx"]
    if unit:
        for axis in axes:
            if axis["name"] not in unknown:
                axis["unit"] = NGFF_UNITS.get(unit, unit)
    scale = [1.0 if a in unknown else float(s) for a, s in zip("zyx", voxel_size or (None,) * 3)]
    return [{"version": NGFF_VERSION, "name": name, "axes": axes,
             "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}]}]


def create_image(path, shape: tuple[int, int, int], dtype, chunks=None, voxel_size=None, unit: str | None = None,
                 name: str = "") -> None:
    """Make an empty OME-Zarr image at `path` (a folder that must not exist yet): array "0" of `shape`
    and `dtype`, chunked as `chunking(shape, chunks)`, scaled by `voxel_size` (z, y, x) in `unit`."""
    import zarr

    group = zarr.open_group(store=str(path), mode="w-", zarr_format=2)
    array = group.create_array("0", shape=tuple(int(n) for n in shape), chunks=chunking(shape, chunks), dtype=dtype,
                               fill_value=0, chunk_key_encoding={"name": "v2", "separator": "/"})  # NGFF 0.4: "/"
    array.attrs[SPARSE_ATTR] = True  # all-zero chunks are not stored: absent is zero, not missing
    attrs = {"multiscales": multiscales(name, voxel_size, unit), WRITER_TAG: True}
    if unknown_axes(voxel_size):
        attrs[UNKNOWN_AXES_ATTR] = unknown_axes(voxel_size)
    group.attrs.update(attrs)


def open_image(path):
    """Array "0" of an OME-Zarr image made by `create_image`, for writing."""
    import zarr

    return zarr.open_array(store=str(path), path="0", mode="r+")


def written_by_us(path) -> bool:
    """Whether the folder at `path` is an OME-Zarr image this project wrote (and may replace)."""
    import zarr

    try:
        return bool(zarr.open_group(store=str(path), mode="r").attrs.get(WRITER_TAG))
    except Exception:
        return False


class SliceWriter:
    """Write `(Y, X)` slices in order into a `(Z, Y, X)` Zarr array, one row of chunks at a time:
    `write(z, page)` buffers, and every `chunks[0]` slices (and at the end) the block is stored. `start`
    is the first slice this writer owns (a Spark task's block, aligned to the chunks)."""

    def __init__(self, array, start: int = 0):
        self.array, self.start, self.depth = array, start, int(array.chunks[0])
        if start % self.depth:
            raise ValueError(f"a writer must start on a chunk boundary (a multiple of {self.depth}), not {start}")
        self.pending: list[np.ndarray] = []
        self.next = start

    def __call__(self, z: int, page: np.ndarray) -> None:
        if z != self.next:
            raise ValueError(f"slices must come in order: expected {self.next}, got {z}")
        self.pending.append(np.asarray(page, self.array.dtype))
        self.next += 1
        if self.next % self.depth == 0:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            first = self.next - len(self.pending)
            self.array[first:self.next] = np.stack(self.pending)
            self.pending = []

    def __enter__(self):
        return self

    def __exit__(self, kind, *exc):
        if kind is None:
            self.flush()


def check_replaceable(path) -> None:
    """Refuse (before any work) to replace a folder at `path` that this project did not write."""
    path = Path(path)
    if path.exists() and not (path.is_dir() and written_by_us(path)):
        raise InputError(f"{path} exists and was not written by em-unet; move it away or pick another output_dir "
                         f"(results never replace what they did not write)")
