"""The one segmentation path for volumes whose slices do not fit in memory: blocks in z, y and x with a
halo (`blockplan`), each block's probabilities exactly those of whole-slice tiled inference and its cells
labelled (`blocktask`), cell ids stitched across blocks, and the results handed out as whole slices in
slice order, like `segment_volume`'s.

Blocks agree on ids through `emunet.inference.stitch.local_pairs` in their overlaps. The volume goes slab
by slab (the blocks of one z range): a slab's ids are decided when it is done, continuing the ids of the
slab before, so memory and scratch disk stay with one slab (numpy memory maps of its probabilities and
local labels in a temporary folder), never the volume. 3-D objects: two cells of earlier slabs that a
later slab finds to be one keep the earlier of the two ids there (ids already written are not
rewritten). 2-D objects (`_linked_ids`): a slab's blocks count the links into each of their slices from
the slice before (`blocktask.label_slices`), so a slab decides the links into its own slices with the
objects of the slab before's last slice (kept as small tables, with their ids): the cells of
`stitch.link_tables`, the whole volume's, which links never merge after the fact (they are one-to-one).
(A cluster, `serving.predict_spark`, decides all at once with `stitch.merge_pairs` or
`stitch.link_tables` instead: its tasks run in any order.)
"""

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from emunet.core.normalize import stack_stats
from emunet.inference.blockplan import plan_for
from emunet.inference.blocks import overlaps_by_block, plan_overlaps
from emunet.inference.blocktask import label_in_block
from emunet.inference.params import SegmentParams
from emunet.inference.segment import SliceResult, Truth, _score_row, instance_mode
from emunet.inference.measures import MeasurePartial, block_measures
from emunet.inference.stitch import link_tables, local_pairs


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
    share of the instances table (`measures.MeasurePartial`: `combine_measures` over the slices, then
    `measures.merge_measures` give the table without reading whole slices)."""

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


def _linked_ids(slab: list[int], pairs: list, found: tuple, before: tuple, tables: dict, next_id: int
                ) -> tuple[dict, int]:
    """Tables `local id -> volume id` of the slab's blocks for 2-D objects (`stitch.link_tables`): `found`
    holds their `(objects, links, id_counts)`, `pairs` the pairs of this slab's overlaps; `before` is
    `(blocks, pairs, found)` of the slab before, whose ids (`tables`) are kept and whose objects give the
    sizes of the last slice before this slab, to which its first slice links."""
    earlier, earlier_pairs, (earlier_objects, _, earlier_counts) = before
    objects, links, counts = found
    out, next_id = link_tables(earlier_pairs + pairs, {**earlier_objects, **objects}, {**earlier_counts, **counts},
                               links, {n: tables[n] for n in earlier}, next_id)
    return {n: out[n] for n in slab}, next_id


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
    context = int(getattr(segmenter, "context", 0))  # a 2.5-D network's neighbouring slices
    blocks, tiles = plan_for(shape, params, segmenter.multiple, budget, block, halo, mode, channels=2 * context + 1)
    # The forward of the params' engine and precision, where the segmenter has several (`forward_for`).
    forward = segmenter.forward_for(params) if hasattr(segmenter, "forward_for") else segmenter.forward
    overlaps = plan_overlaps(blocks)
    of_block = overlaps_by_block(overlaps)
    report = progress or (lambda done, total: None)
    slabs: dict[int, list[int]] = {}
    for n, blk in enumerate(blocks):
        slabs.setdefault(blk.index[0], []).append(n)
    pending, tables, next_id, done, before = {}, {}, 1, 0, ([], [], ({}, {}, {}))
    with tempfile.TemporaryDirectory(prefix="emunet-blockwise-") as folder:
        for slab in slabs.values():
            (z0, z1) = blocks[slab[0]].core[0]
            depth = (z1 - z0, shape[1], shape[2])
            prob_file = _Scratch(Path(folder) / f"prob{z0}.npy", depth, np.float32)
            local_file = _Scratch(Path(folder) / f"local{z0}.npy", depth, np.int32)
            pairs, written, tables_2d = [], {}, ({}, {}, {})  # 2-D: objects, links, id counts
            for n in slab:
                blk = blocks[n]
                part = label_in_block(forward, volume, tiles, low, high, blk, params, mode, overlaps,
                                      of_block.get(n, []), context)
                place = (slice(None), slice(*blk.core[1]), slice(*blk.core[2]))
                prob_file.write(place, part.prob)
                local_file.write(place, part.labels)
                written[n] = part.written
                if mode == "2d":
                    for table, value in zip(tables_2d, (part.objects, part.links, part.id_count)):
                        table[n] = value
                for o, slab_labels in part.slabs.items():
                    if o in pending:  # the other block came first
                        pairs.append((overlaps[o].a, overlaps[o].b, local_pairs(pending.pop(o), slab_labels)))
                    else:
                        pending[o] = slab_labels
                del part
                done += 1
                report(done, len(blocks))
            if mode == "2d":
                slab_tables, next_id = _linked_ids(slab, pairs, tables_2d, before, tables, next_id)
                before = (slab, pairs, tables_2d)
            else:
                slab_tables, next_id = _final_ids(slab, pairs, written, tables, next_id)
            tables.update(slab_tables)
            yield from _slab_slices(folder, z0, z1, shape, slab, blocks, tables, prob_file, local_file, params,
                                    truth)
            for scratch in (prob_file, local_file):
                scratch.path.unlink(missing_ok=True)


def combine_measures(parts: list[MeasurePartial]) -> MeasurePartial:
    """One `measures.MeasurePartial` of several (blocks, slices): per id, voxels and coordinate sums added,
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
