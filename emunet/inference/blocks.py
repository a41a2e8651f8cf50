"""Blocks of a large volume: a plan of boxes in z, y and x, each read with a halo of context, each writing
only its core, so a volume beyond one machine's memory (or one task of a cluster) goes block by block.

Every block has a *core* (the voxels it owns and writes; the cores tile the volume exactly, no overlap)
and a *read box* (the core grown by the halo on every side, clipped to the volume): the network and the
labelling see the context of the read box, and the result is cut back to the core. Neighbouring read
boxes overlap; `emunet.inference.stitch` makes the cell ids of neighbouring blocks agree there.

With output `chunks` (an OME-Zarr result's chunk shape), block sides are multiples of the chunk, so every
block writes whole chunks and two tasks never write the same chunk.
"""

from bisect import bisect_right
from dataclasses import dataclass
from itertools import product

import numpy as np

from emunet.core.io import available_memory

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # ((z0, z1), (y0, y1), (x0, x1)), stops excluded

# Half of the memory free now: the read box is what `bytes_per_voxel` counts, but the labelling's
# temporaries, the model, the writer's buffers and other processes need the rest, and an estimate per
# voxel is only an estimate.
MEMORY_FRACTION = 0.5
# A block narrower than this in y or x spends more on its halo than on its core for the usual halos
# (16-32 px) and gives the network tiles smaller than it was trained on.
MIN_YX = 64
# Side lengths tried per axis by `block_shape_for_memory`: beyond this many, a geometric subset (steps of
# a few per cent), so the search stays instant on 20000-pixel axes and the block is near the best.
MAX_CANDIDATES = 160


def box_slices(box: Box) -> tuple[slice, slice, slice]:
    return tuple(slice(a, b) for a, b in box)


def box_shape(box: Box) -> tuple[int, int, int]:
    return tuple(b - a for a, b in box)


def intersect(first: Box, second: Box) -> Box | None:
    """The box both cover, or None when they share no voxel."""
    out = tuple((max(a0, b0), min(a1, b1)) for (a0, a1), (b0, b1) in zip(first, second))
    return out if all(a < b for a, b in out) else None


def crop(array: np.ndarray, array_box: Box, box: Box) -> np.ndarray:
    """The part of `array` (covering `array_box` of the volume) that lies in `box` (inside `array_box`)."""
    return array[tuple(slice(a - o, b - o) for (a, b), (o, _) in zip(box, array_box))]


@dataclass(frozen=True)
class Block:
    """One block of a plan: `index` (i, j, k) in the grid of blocks, `core` the box it owns and writes,
    `read` the core plus the halo, clipped to the volume (what it reads and labels)."""

    index: tuple[int, int, int]
    core: Box
    read: Box

    @property
    def core_in_read(self) -> tuple[slice, slice, slice]:
        """Slices of the core within an array of the read box."""
        return tuple(slice(c0 - r0, c1 - r0) for (c0, c1), (r0, _) in zip(self.core, self.read))


@dataclass(frozen=True)
class Overlap:
    """Two neighbouring blocks, by their positions `a < b` in the plan, and `box`, the voxels both of
    their read boxes cover: where their labels are compared."""

    a: int
    b: int
    box: Box


# The 13 directions to the neighbours after a block (face, edge and corner: the 26-neighbourhood, each
# pair once): a cell that spans the eight blocks around a corner is joined through every pair of them,
# and a thin one that crosses near an edge or corner only is still seen by the two blocks it crosses.
FORWARD = [d for d in product((-1, 0, 1), repeat=3) if d > (0, 0, 0)]


def _triple(values, name: str, minimum: int) -> tuple[int, int, int]:
    values = tuple(int(v) for v in np.broadcast_to(np.asarray(values), (3,)))
    if any(v < minimum for v in values):
        raise ValueError(f"{name} must be {minimum} or more on each axis (z, y, x), got {values}")
    return values


def _aligned(size: int, chunk: int, length: int) -> int:
    """`size` rounded down to a multiple of `chunk` (at least one chunk), or the whole axis when larger."""
    return min(length, max(chunk, size // chunk * chunk))


def plan_blocks(shape, block, halo, chunks=None) -> list[Block]:
    """The blocks of a `(Z, Y, X)` volume, in z, then y, then x order.

    `block` (bz, by, bx) is the core size (the last block of an axis is what is left), `halo` (hz, hy, hx)
    the context read on each side, `chunks` (cz, cy, cx) the output's chunk shape: block sides are rounded
    down to multiples of it (at least one chunk), so every core is whole chunks. Each argument may be one
    number for all three axes. Returns a list of `Block`; their cores tile the volume exactly."""
    shape = _triple(shape, "shape", 1)
    block = [min(b, n) for b, n in zip(_triple(block, "block", 1), shape)]
    halo = _triple(halo, "halo", 0)
    if chunks is not None:
        block = [_aligned(b, c, n) for b, c, n in zip(block, _triple(chunks, "chunks", 1), shape)]
    starts = [range(0, n, b) for n, b in zip(shape, block)]
    out = []
    for index in product(*(range(len(s)) for s in starts)):
        core = tuple((s[i], min(s[i] + b, n)) for s, i, b, n in zip(starts, index, block, shape))
        read = tuple((max(0, c0 - h), min(n, c1 + h)) for (c0, c1), h, n in zip(core, halo, shape))
        out.append(Block(tuple(index), core, read))
    return out


def plan_overlaps(blocks: list[Block]) -> list[Overlap]:
    """Every pair of neighbouring blocks of a plan (26-neighbourhood) whose read boxes share voxels,
    with the box they share; none when the halo is 0 (then neighbouring blocks cannot agree on ids)."""
    position = {block.index: n for n, block in enumerate(blocks)}
    out = []
    for n, block in enumerate(blocks):
        for step in FORWARD:
            m = position.get(tuple(i + d for i, d in zip(block.index, step)))
            box = intersect(block.read, blocks[m].read) if m is not None else None
            if box is not None:
                out.append(Overlap(n, m, box))
    return out


def overlaps_by_block(overlaps: list[Overlap]) -> dict[int, list[int]]:
    """`{block number: numbers of the overlaps it is part of}`, once per plan (not a scan per block)."""
    out: dict[int, list[int]] = {}
    for o, overlap in enumerate(overlaps):
        out.setdefault(overlap.a, []).append(o)
        out.setdefault(overlap.b, []).append(o)
    return out


def overlap_slabs(overlaps: list[Overlap], numbers: list[int], block: Block, labels: np.ndarray) -> dict:
    """`{overlap number: the block's labels of that overlap's box}` for the overlaps `numbers` of `block`
    (`overlaps_by_block`); `labels` are of its read box. Copies, so the block's labels can be freed: these
    slabs (twice the halo thick) are all a cluster task sends on for `stitch.local_pairs`."""
    return {o: np.array(crop(labels, block.read, overlaps[o].box)) for o in numbers}


def _sizes(length: int, chunk: int, smallest: int = 1) -> list[int]:
    """Block sides worth trying on an axis, ascending: multiples of `chunk` of at least `smallest` (one
    chunk at least) and the whole axis; thinned to about `MAX_CANDIDATES` on long axes."""
    first = min(length, max(chunk, -(-smallest // chunk) * chunk))
    sizes = sorted({*range(first, length, chunk), length})
    if len(sizes) > MAX_CANDIDATES:
        keep = np.unique(np.geomspace(1, len(sizes), MAX_CANDIDATES).astype(int) - 1)
        sizes = sorted({sizes[i] for i in keep} | {length})
    return sizes


def _axis_read(length: int, size: int, halo: int) -> int:
    """Voxels read along one axis by all blocks of side `size`: the axis plus the halos at inner faces."""
    return sum(min(length, s + size + halo) - max(0, s - halo) for s in range(0, length, size))


def _balanced(length: int, size: int, chunk: int) -> int:
    """The smallest side (a multiple of `chunk`) giving as few blocks as `size` does: equal blocks, not a
    sliver at the end, for the same reading (the halos are the same in number)."""
    count = -(-length // size)
    return min(size, -(-(-(-length // count)) // chunk) * chunk)


def block_shape_for_memory(shape, bytes_per_voxel: float, budget_bytes: float, halo=0, chunks=None,
                           min_yx: int = MIN_YX) -> tuple[int, int, int]:
    """The `(bz, by, bx)` core of the blocks for a `(Z, Y, X)` volume whose read box (core + halo on both
    sides, clipped to the volume) takes at most `budget_bytes` at `bytes_per_voxel` (what labelling one
    read voxel holds: input, probabilities, labels, temporaries).

    Whole slices in y/x are preferred (no halo or seam in the plane), in as few blocks along z as fit, at
    least one slice (one z chunk) deep; when one whole slice with its z halo does not fit, y and x are
    split too, at least `min_yx` a side, into the blocks that read the fewest voxels in all (the volume
    plus its halos: the work). Blocks along an axis are made equal rather than leaving a sliver. Sides
    are multiples of `chunks` when given. Raises `ValueError` naming the bytes needed when even the
    smallest block does not fit."""
    shape, halo = _triple(shape, "shape", 1), _triple(halo, "halo", 0)
    chunks = _triple(chunks if chunks is not None else 1, "chunks", 1)
    limit = float(budget_bytes) / float(bytes_per_voxel)  # read voxels the budget allows

    def read(size: int, axis: int) -> int:
        return min(shape[axis], size + 2 * halo[axis])

    z_sizes = _sizes(shape[0], chunks[0])
    whole = [bz for bz in z_sizes if read(bz, 0) * shape[1] * shape[2] <= limit]
    if whole:
        return _balanced(shape[0], whole[-1], chunks[0]), shape[1], shape[2]
    y_sizes = _sizes(shape[1], chunks[1], min(min_yx, shape[1]))
    x_sizes = _sizes(shape[2], chunks[2], min(min_yx, shape[2]))
    x_reads = [read(bx, 2) for bx in x_sizes]  # ascending, so the widest that fits is found by bisection
    totals = [{b: _axis_read(n, b, h) for b in sizes} for n, h, sizes in zip(shape, halo, (z_sizes, y_sizes, x_sizes))]
    best, best_key = None, None
    for bz in z_sizes:
        for by in y_sizes:
            fits = bisect_right(x_reads, limit / (read(bz, 0) * read(by, 1)))
            if not fits:
                break  # a taller block fits even less
            bx = x_sizes[fits - 1]  # the widest: the fewest x faces
            blocks = tuple(-(-n // b) for n, b in zip(shape, (bz, by, bx)))
            key = (totals[0][bz] * totals[1][by] * totals[2][bx], np.prod(blocks))  # least read, fewest blocks
            if best_key is None or key < best_key:
                best, best_key = (bz, by, bx), key
    if best is None:
        smallest = read(z_sizes[0], 0) * read(y_sizes[0], 1) * read(x_sizes[0], 2)
        raise ValueError(f"the smallest block of {shape} ({z_sizes[0]} x {y_sizes[0]} x {x_sizes[0]} voxels, "
                         f"read with a halo of {halo}) needs {smallest * bytes_per_voxel / 2**20:.1f} MiB "
                         f"but the memory budget is {budget_bytes / 2**20:.1f} MiB")
    return tuple(_balanced(n, b, c) for n, b, c in zip(shape, best, chunks))


def default_memory_budget(fraction: float = MEMORY_FRACTION) -> int:
    """Bytes a block may take: `fraction` (default half, see `MEMORY_FRACTION`) of the memory free now."""
    return int(available_memory() * fraction)


def read_box(volume, box: Box) -> np.ndarray:
    """`volume[z0:z1, y0:y1, x0:x1]` as an array: `volume` is a NumPy array or a lazily read volume whose
    `__getitem__` takes three slices (an `emunet.core.io.Volume` reads only that block)."""
    out = np.asarray(volume[box_slices(box)])
    if out.shape != box_shape(box):
        raise ValueError(f"reading box {box} gave an array of shape {out.shape}, expected {box_shape(box)}")
    return out


def core_of(block: Block, array: np.ndarray) -> np.ndarray:
    """The part of `array` (a result computed on `block`'s read box; extra trailing axes kept) in its core."""
    if tuple(array.shape[:3]) != box_shape(block.read):
        raise ValueError(f"block {block.index} reads {box_shape(block.read)} voxels but the array has shape "
                         f"{array.shape}")
    return array[block.core_in_read]
