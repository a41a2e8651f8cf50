"""The one segmentation path for volumes whose slices do not fit in memory: blocks in z, y and x with a
halo, each block's probabilities exactly those of whole-slice tiled inference, cell ids stitched across
blocks, and the results handed out as whole slices in slice order, like `segment_volume`'s.

Exact probabilities: the whole slice's tile plan (`tiling.plan_tiles` on the full height and width) is
kept; a block runs only the tiles of that plan that touch its read box (so it reads the image those
tiles cover: the read box plus at most one tile around it), in the plan's order and in batches of the
sizes the whole slice uses, and blends them with the same Gaussian window. Every pixel of the read box
then gets the very tiles, in the same order, and the same weight sum as in the whole slice: the same
float32 numbers (a tile is computed in a batch of the same size, filled with copies where the block does
not need the rest of that batch, so a compiled network rounds it as in the whole slice).

Objects: each block labels its read box (2-D: `slice_instances` per slice, linked through the block's
slices with `SliceLinker`; 3-D: `volume_instances`), with a label halo of `HALO_YX` pixels in y and x
(about a cell radius: the labelling sees the cell across a face as the whole slice does; the
probabilities there are still exact, from whole-slice tiles) and of one slice in z (2-D: links between
two slices are made by both blocks that see them) or `HALO_YX` slices (3-D). Blocks agree on ids through
`emunet.inference.stitch.local_pairs` in their overlaps. The volume goes slab by slab (the blocks of one
z range): a slab's ids are decided when it is done, continuing the ids of the slab before, so memory and
scratch disk stay with one slab (numpy memory maps of its probabilities and local labels in a temporary
folder), never the volume. Two cells of earlier slabs that a later slab finds to be one keep the earlier
of the two ids there (ids already written are not rewritten); with one-to-one links (2-D) this does not
arise.
"""

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from emunet.core.normalize import normalize, stack_stats
from emunet.inference.context import context_indices
from emunet.inference.blocks import (MIN_YX, Block, block_shape_for_memory, box_shape, default_memory_budget,
                                     overlap_slabs, overlaps_by_block, plan_blocks, plan_overlaps, read_box)
from emunet.inference.instances import SliceLinker, slice_instances
from emunet.inference.instances3d import volume_instances
from emunet.inference.params import SegmentParams
from emunet.inference.segment import BYTES_PER_VOXEL_3D, SliceResult, Truth, _score_row, instance_mode
from emunet.inference.stitch import MeasurePartial, block_measures, core_sizes, local_pairs
from emunet.inference.tiling import TilePlan, gaussian_window, mirror_pad, plan_tiles, with_tta


HALO_YX = 64  # label halo in y and x: about a cell radius (see the module)
# Bytes a pixel of a block's read box holds while it is labelled: its probabilities (4) and the
# labelling's temporaries (foreground, components, seeds, flood priorities, the watershed's ids, the
# linker's int64 ids: about 40).
BYTES_PER_PIXEL = 48
# Bytes a pixel of the block's tile region (the read box plus the tiles around it) holds while its
# probabilities are made: the raw image (up to 4), normalised (4), blended sums (4) and weights (4).
TILE_BYTES_PER_PIXEL = 16


def _tile_rows(plan: TilePlan, start: int, stop: int, axis: int) -> list[int]:
    """Starts of the plan's tiles along `axis` (0: y, 1: x) that cover some of `[start, stop)`."""
    side = plan.tile_h if axis == 0 else plan.tile_w
    return sorted({box[axis] for box in plan.boxes if box[axis] < stop and box[axis] + side > start})


def tile_region(plan: TilePlan, read: tuple[tuple[int, int], tuple[int, int]]) -> tuple[tuple[int, int], tuple[int, int]]:
    """The `((y0, y1), (x0, x1))` of the (mirror-padded) slice that the tiles touching `read` cover."""
    ys, xs = _tile_rows(plan, *read[0], 0), _tile_rows(plan, *read[1], 1)
    return (ys[0], ys[-1] + plan.tile_h), (xs[0], xs[-1] + plan.tile_w)


def _batch_sizes(plan: TilePlan, depth: int) -> Callable[[int, int], tuple[int, int]]:
    """For slice z and tile number i of a `depth`-slice volume: `(pass and batch key, size of that batch)`
    as `tiling.iter_probabilities` batches the whole volume (`slices_per_pass` slices a pass, jobs in
    slice then tile order, `plan.batch` jobs a batch, the last one shorter)."""
    per_pass, count = plan.slices_per_pass, len(plan.boxes)

    def where(z: int, i: int) -> tuple[int, int]:
        first = z - z % per_pass
        jobs = (min(depth, first + per_pass) - first) * count
        job = (z - first) * count + i
        start = job // plan.batch * plan.batch
        return (first, start), min(plan.batch, jobs - start)

    return where


def _channels(volume, z0: int, z1: int, ys, xs, context: int, low: float, high: float) -> np.ndarray:
    """`(z1 - z0, h, w, 2 * context + 1)` normalised float32: the box `ys`, `xs` of slices z0..z1-1, each
    with its `context` neighbours above and below as channels, mirrored at the volume's ends as the
    whole-volume path takes them (`emunet.inference.context`); each slice read once."""
    n = volume.shape[0]
    indices = [context_indices(z, context, n) for z in range(z0, z1)]
    lo, hi = min(min(i) for i in indices), max(max(i) for i in indices) + 1
    image = normalize(read_box(volume, ((lo, hi), ys, xs)), low, high)
    return np.stack([np.moveaxis(image[[i - lo for i in group]], 0, -1) for group in indices])


def block_probabilities(forward, volume, plan: TilePlan, low: float, high: float, read, tta: str = "none",
                        depth: int | None = None, context: int = 0) -> np.ndarray:
    """`(rz, ry, rx)` float32 probabilities of the box `read` `((z0, z1), (y0, y1), (x0, x1))` of a raw
    volume, equal to those of `tiling.iter_probabilities` on the whole slices with `plan` (see the
    module). `forward` maps `(n, h, w, 2 * context + 1)` float32 tiles to `(n, h, w, 1)` probabilities
    (`context`: a 2.5-D network's neighbouring slices as channels); `depth` is the volume's number of
    slices (the batches of the last pass are shorter)."""
    (z0, z1), ys, xs = read
    height, width = volume.shape[1:]
    depth = volume.shape[0] if depth is None else depth
    predict = with_tta(forward, tta)
    (ty0, ty1), (tx0, tx1) = tile_region(plan, (ys, xs))
    image = _channels(volume, z0, z1, (ty0, min(ty1, height)), (tx0, min(tx1, width)), context, low, high)
    # Past the slice's end only when the slice is smaller than a tile: then the region is the whole axis.
    image = np.stack([mirror_pad(image[..., c], ty1 - ty0, tx1 - tx0) for c in range(image.shape[-1])], axis=-1)
    window = gaussian_window(plan.tile_h, plan.tile_w)
    tiles = [(i, y, x) for i, (y, x) in enumerate(plan.boxes)
             if y < ys[1] and y + plan.tile_h > ys[0] and x < xs[1] and x + plan.tile_w > xs[0]]
    weight = np.zeros(image.shape[1:3], np.float32)
    for _, y, x in tiles:
        weight[y - ty0:y - ty0 + plan.tile_h, x - tx0:x - tx0 + plan.tile_w] += window
    sums = np.zeros(image.shape[:3], np.float32)
    where = _batch_sizes(plan, depth)
    groups: dict[tuple, list] = {}
    for k in range(z1 - z0):
        for i, y, x in tiles:
            key, size = where(z0 + k, i)
            groups.setdefault(key, [size]).append((k, y - ty0, x - tx0))
    for size, *jobs in groups.values():
        batch = [image[k, y:y + plan.tile_h, x:x + plan.tile_w] for k, y, x in jobs]
        batch += [batch[0]] * (size - len(batch))  # the whole slice's batch size, filled with copies
        probs = np.asarray(predict(np.stack(batch)), np.float32)[..., 0]
        for (k, y, x), p in zip(jobs, probs):
            sums[k, y:y + plan.tile_h, x:x + plan.tile_w] += p * window
    del image
    crop = (slice(None), slice(ys[0] - ty0, ys[1] - ty0), slice(xs[0] - tx0, xs[1] - tx0))
    return sums[crop] / weight[crop[1:]]


def label_block(prob: np.ndarray, params: SegmentParams, mode: str) -> np.ndarray:
    """int32 ids of a block's `(rz, ry, rx)` probabilities, ids of its own: "2d" objects of each slice
    linked through the block's slices, or "3d" objects (`volume_instances`)."""
    if mode == "3d":
        return volume_instances(prob, params.threshold, params.seed_threshold, params.min_object_size,
                                params.seed_depth, params.grow_over_all)
    linker, out = SliceLinker(), np.zeros(prob.shape, np.int32)
    for k, plane in enumerate(prob):
        out[k] = linker.ids(slice_instances(plane, params.threshold, params.seed_threshold,
                                            params.min_object_size, params.seed_depth))
    return out


def halo_for(mode: str) -> tuple[int, int, int]:
    """The label halo (z, y, x): one slice in z for linked 2-D objects, `HALO_YX` for 3-D ones."""
    return (HALO_YX if mode == "3d" else 1, HALO_YX, HALO_YX)


def block_bytes(block: Block, tiles: TilePlan) -> int:
    """Bytes segmenting `block` holds: `TILE_BYTES_PER_PIXEL` of its tile region and `BYTES_PER_PIXEL` of
    its read box, for each slice it reads."""
    (y0, y1), (x0, x1) = tile_region(tiles, block.read[1:])
    depth, height, width = box_shape(block.read)
    return int(depth) * ((y1 - y0) * (x1 - x0) * TILE_BYTES_PER_PIXEL + height * width * BYTES_PER_PIXEL)


def plan_for(shape, params: SegmentParams, multiple: int, budget: float | None = None, block=None,
             halo=None, mode: str = "2d") -> tuple[list[Block], TilePlan]:
    """The blocks of a `(Z, H, W)` volume and its slices' tile plan. Without `block`, blocks are as large
    as `budget` bytes allow (default `blocks.default_memory_budget()`) by `block_bytes`: the largest
    blocks `blocks.block_shape_for_memory` gives for the read box, made smaller until their tile regions
    fit too."""
    tiles = plan_tiles(shape[1], shape[2], params.tile_size, multiple, params.overlap, params.batch_size)
    halo = halo_for(mode) if halo is None else tuple(int(h) for h in np.broadcast_to(halo, 3))
    if block is not None:
        return plan_blocks(shape, block, halo), tiles
    budget = default_memory_budget() if budget is None else budget
    share = float(budget)
    while True:
        try:
            block = block_shape_for_memory(shape, BYTES_PER_PIXEL, share, halo)
        except ValueError:
            smallest = plan_blocks(shape, (1, min(MIN_YX, shape[1]), min(MIN_YX, shape[2])), halo)
            raise ValueError(f"blocks of a volume of {shape} need at least {block_bytes(smallest[0], tiles) / 2**20:.0f} "
                             f"MiB (a {MIN_YX}-pixel block with its halo and its tiles) but the memory budget is "
                             f"{budget / 2**20:.0f} MiB") from None
        blocks = plan_blocks(shape, block, halo)
        if max(block_bytes(b, tiles) for b in blocks) <= budget:
            return blocks, tiles
        share *= 0.9


def needs_blocks(shape, params: SegmentParams, multiple: int, budget: float, voxel_size=None) -> bool:
    """Whether a `(Z, H, W)` volume must go by blocks to stay within `budget` bytes: one slice's working
    memory (`BYTES_PER_PIXEL` and `TILE_BYTES_PER_PIXEL` of the padded slice) for objects found slice
    by slice, the volume's (`segment.BYTES_PER_VOXEL_3D` a voxel) for 3-D objects."""
    z_size, height, width = (int(n) for n in shape)
    tiles = plan_tiles(height, width, params.tile_size, multiple, params.overlap, params.batch_size)
    if instance_mode(params, voxel_size) == "3d":
        return z_size * height * width * BYTES_PER_VOXEL_3D > budget
    return tiles.pad_h * tiles.pad_w * (BYTES_PER_PIXEL + TILE_BYTES_PER_PIXEL) > budget


class _Scratch:
    """A `(Z, H, W)` array in a file, opened as a memory map only while one block is written or one slice
    read, so its pages leave the process with each map (a map kept open would hold the whole slab)."""

    def __init__(self, path: Path, shape, dtype):
        self.path, self.shape, self.dtype = path, tuple(shape), np.dtype(dtype)
        np.lib.format.open_memmap(path, "w+", self.dtype, self.shape)

    def write(self, where, values) -> None:
        store = np.load(self.path, mmap_mode="r+")
        store[where] = values
        del store

    def read(self, where) -> np.ndarray:
        return np.load(self.path, mmap_mode="r")[where]


class BlockSliceResult(SliceResult):
    """A `SliceResult` assembled from blocks: `prob`, `objects` and `ids` are memory maps of scratch
    files (read as they are used), `areas` were counted block by block, and `measures` is the slice's
    share of the instances table (`stitch.MeasurePartial`: `combine_measures` over the slices, then
    `stitch.merge_measures` give the table without reading whole slices)."""

    def __init__(self, *args, areas: list[int], measures: MeasurePartial, **kwargs):
        super().__init__(*args, **kwargs)
        self._areas, self.measures = areas, measures

    @property
    def areas(self) -> list[int]:
        return self._areas


def _final_ids(slab: list[int], pairs: list, written: dict, tables: dict, next_id: int) -> tuple[dict, int]:
    """Tables `local id -> volume id` of the slab's blocks (0: not written in the block's core), joining
    their ids with each other and with the ids earlier slabs gave (`tables`: an earlier cell keeps its
    id), new ids numbered from `next_id` in the order they first appear in the slab's cores. `pairs` are
    `(a, b, local_pairs)` of overlaps; `written[n]` marks the ids present in block n's core."""
    sizes = [len(written[n]) for n in slab]
    offset = dict(zip(slab, np.cumsum([0, *sizes[:-1]], dtype=np.int64)))
    base = int(sum(sizes))  # nodes: the slab's local ids, then one per volume id given so far
    edges = []
    for a, b, found in pairs:
        for ends in found:
            nodes = []
            for n, local in zip((a, b), ends):
                if n in offset:
                    nodes.append(offset[n] + local if written[n][local] else -1)
                else:
                    old = tables[n][local]
                    nodes.append(base + old if old else -1)
            if min(nodes) >= 0:
                edges.append(nodes)
    edges = np.asarray(edges, np.int64).reshape(-1, 2)
    total = base + next_id
    graph = coo_matrix((np.ones(len(edges), np.int8), (edges[:, 0], edges[:, 1])), shape=(total, total))
    count, cell = connected_components(graph, directed=False)
    none = np.iinfo(np.int64).max
    earlier = np.full(count, none)
    np.minimum.at(earlier, cell[base + 1:], np.arange(1, next_id))
    out = {}
    for n in slab:
        table = np.zeros(len(written[n]), np.int64)
        for local in np.flatnonzero(written[n]):
            c = cell[offset[n] + local]
            if earlier[c] == none:
                earlier[c], next_id = next_id, next_id + 1
            table[local] = earlier[c]
        out[n] = table
    return out, next_id


def segment_in_blocks(segmenter, volume, params: SegmentParams, block=None, budget: float | None = None,
                      progress: Callable[[int, int], None] | None = None, truth: Truth | None = None,
                      voxel_size=None, halo=None) -> Iterator[SliceResult]:
    """Segment a raw `(Z, H, W)` volume (array or lazily read) block by block, yielding one `SliceResult`
    per slice in slice order, as `segment_volume` does: `prob` `(H, W)` float32, `mask` bool, `objects`
    int32 1..N of the slice, `ids` uint32 volume-wide ids (one per cell, agreeing across blocks), and with
    `truth` the slice's score row. `segmenter` has `forward` and `multiple` (`Segmenter`, the pyfunc's
    `StackSegmenter`). `block` (bz, by, bx) is the core size; default: as large as `budget` bytes allow
    (`plan_for`). `halo` (z, y, x) default `halo_for(mode)`. `progress(done, total)` after each block.
    Memory is bounded by a block's tile region; `prob`, `objects` and `ids` are memory maps of one slab's
    scratch files in a temporary folder (the slab is `(bz, H, W)`: 9 bytes a voxel on disk)."""
    shape = tuple(int(n) for n in volume.shape)
    voxel_size = voxel_size if voxel_size is not None else getattr(volume, "voxel_size", None)
    mode = instance_mode(params, voxel_size)
    low, high = (params.low, params.high) if params.low is not None else stack_stats(volume)
    blocks, tiles = plan_for(shape, params, segmenter.multiple, budget, block, halo, mode)
    # The forward of the params' engine and precision, where the segmenter has several (`forward_for`).
    forward = segmenter.forward_for(params) if hasattr(segmenter, "forward_for") else segmenter.forward
    context = int(getattr(segmenter, "context", 0))  # a 2.5-D network's neighbouring slices
    overlaps = plan_overlaps(blocks)
    of_block = overlaps_by_block(overlaps)
    report = progress or (lambda done, total: None)
    slabs: dict[int, list[int]] = {}
    for n, blk in enumerate(blocks):
        slabs.setdefault(blk.index[0], []).append(n)
    pending, tables, next_id, done = {}, {}, 1, 0
    with tempfile.TemporaryDirectory(prefix="emunet-blockwise-") as folder:
        for slab in slabs.values():
            (z0, z1) = blocks[slab[0]].core[0]
            depth = (z1 - z0, shape[1], shape[2])
            prob_file = _Scratch(Path(folder) / f"prob{z0}.npy", depth, np.float32)
            local_file = _Scratch(Path(folder) / f"local{z0}.npy", depth, np.int32)
            pairs, written = [], {}
            for n in slab:
                blk = blocks[n]
                prob = block_probabilities(forward, volume, tiles, low, high, blk.read, params.tta, shape[0], context)
                labels = label_block(prob, params, mode)
                core = tuple(slice(c0 - r0, c1 - r0) for (c0, c1), (r0, _) in zip(blk.core, blk.read))
                place = (slice(None), slice(*blk.core[1]), slice(*blk.core[2]))
                prob_file.write(place, prob[core])
                local_file.write(place, labels[core])
                del prob
                present = np.zeros(int(labels.max(initial=0)) + 1, bool)
                present[core_sizes(labels[core])[:, 0]] = True
                written[n] = present
                for o, part in overlap_slabs(overlaps, of_block.get(n, []), blk, labels).items():
                    if o in pending:  # the other block came first
                        pairs.append((overlaps[o].a, overlaps[o].b, local_pairs(pending.pop(o), part)))
                    else:
                        pending[o] = part
                del labels
                done += 1
                report(done, len(blocks))
            slab_tables, next_id = _final_ids(slab, pairs, written, tables, next_id)
            tables.update(slab_tables)
            yield from _slab_slices(folder, z0, z1, shape, slab, blocks, tables, prob_file, local_file, params,
                                    truth)
            for scratch in (prob_file, local_file):
                scratch.path.unlink(missing_ok=True)


def combine_measures(parts: list[MeasurePartial]) -> MeasurePartial:
    """One `stitch.MeasurePartial` of several (blocks, slices): per id, voxels and coordinate sums added,
    first and last coordinates the least and the greatest. Keeps the instances table of a volume at a few
    numbers a cell while its slices go by."""
    ids = np.concatenate([p.ids for p in parts])
    cells, where = np.unique(ids, return_inverse=True)
    voxels, sums = np.zeros(len(cells), np.int64), np.zeros((len(cells), 3), np.int64)
    low, high = np.full((len(cells), 3), np.iinfo(np.int64).max), np.full((len(cells), 3), -1, np.int64)
    np.add.at(voxels, where, np.concatenate([p.voxels for p in parts]))
    np.add.at(sums, where, np.concatenate([p.sums for p in parts]).reshape(-1, 3))
    np.minimum.at(low, where, np.concatenate([p.low for p in parts]).reshape(-1, 3))
    np.maximum.at(high, where, np.concatenate([p.high for p in parts]).reshape(-1, 3))
    return MeasurePartial(cells.astype(np.int64), voxels, sums, low, high)


def _slab_slices(folder, z0, z1, shape, slab, blocks, tables, prob_file, local_file, params, truth):
    """The slab's slices as `BlockSliceResult`s: volume ids, per-slice objects and the mask written block
    by block into arrays or scratch files of one slice; areas and measures counted per block."""
    for k in range(z1 - z0):
        z = z0 + k
        ids_file = _Scratch(Path(folder) / f"ids{z}.npy", shape[1:], np.uint32)
        mask = np.zeros(shape[1:], bool)
        present, parts = [], []
        for n in slab:
            (y0, y1), (x0, x1) = blocks[n].core[1:]
            where = (slice(y0, y1), slice(x0, x1))
            ids = tables[n][local_file.read((k, *where))]
            ids_file.write(where, ids)
            mask[where] = prob_file.read((k, *where)) >= params.threshold
            present.append(np.unique(ids))
            parts.append(block_measures(ids[None], ((z, z + 1), (y0, y1), (x0, x1))))
        cells = np.unique(np.concatenate(present))
        cells = cells[cells > 0]
        objects_file = _Scratch(Path(folder) / f"objects{z}.npy", shape[1:], np.int32)
        areas = np.zeros(len(cells) + 1, np.int64)
        for n in slab:
            (y0, y1), (x0, x1) = blocks[n].core[1:]
            ids = ids_file.read((slice(y0, y1), slice(x0, x1)))
            objects = np.where(ids > 0, np.searchsorted(cells, ids) + 1, 0).astype(np.int32)
            objects_file.write((slice(y0, y1), slice(x0, x1)), objects)
            areas += np.bincount(objects.ravel(), minlength=len(areas))
        # Fresh maps: their pages are read only if the caller reads them (a map kept since the blocks
        # were written would hold the whole slice in this process's memory).
        result = BlockSliceResult(z, prob_file.read(k), mask, objects_file.read(slice(None)),
                                  ids_file.read(slice(None)), areas=[int(a) for a in areas[1:]],
                                  measures=combine_measures(parts))
        if truth is not None:
            result.row, result.truth_objects, result.annotated = _score_row(
                z, result.mask, result.objects, truth, params.min_object_size)
            result.truth_ids = truth.volume_ids(z, result.truth_objects)
        yield result
        del result
        for scratch in (ids_file, objects_file):
            scratch.path.unlink(missing_ok=True)  # a map still held by the caller keeps the data (POSIX)
