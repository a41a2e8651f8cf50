"""One block's share of a blockwise segmentation, written once for the two places that run it: one
process (`emunet.inference.blockwise.segment_in_blocks`, predict) and a cluster task
(`serving.predict_spark`).

First pass (`label_in_block`): the block's read box becomes probabilities and ids of its own; what
leaves the block is its core (probabilities, local labels), the labels of its overlaps with the
neighbours (`blocks.overlap_slabs`), from which `stitch.local_pairs` finds the ids two blocks share, and
for 2-D objects the tables from which `stitch.link_tables` links them through the slices.

Exact probabilities: the whole slice's tile plan (`tiling.plan_tiles` on the full height and width) is
kept; a block runs only the tiles of that plan that touch its read box (so it reads the image those
tiles cover: the read box plus at most one tile around it), in the plan's order and in batches of the
sizes the whole slice uses, and blends them with the same Gaussian window. Every pixel of the read box
then gets the very tiles, in the same order, and the same weight sum as in the whole slice: the same
float32 numbers (a tile is computed in a batch of the same size, filled with copies where the block does
not need the rest of that batch, so a compiled network rounds it as in the whole slice).

Objects: each block labels its read box with the halo of `blockplan.halo_for`. 3-D: `volume_instances`.
2-D (`label_slices`): `slice_instances` per slice (`iter_slice_instances`), NOT linked here: linking in the block would decide
links from objects its read box cuts off, and a cell longer than a block would be linked otherwise
than in the whole volume. Instead the block counts, in its core's columns only (the cores tile every
slice), each object's pixels and first pixel, and the pixels each object shares with each object of the
slice before, for its core slices (the z halo gives it the slice before its first): added up over the
blocks, these are exactly the counts `SliceLinker` makes on whole slices, whatever cuts the blocks make.

Second pass (`relabel_in_block`): once `stitch.merge_pairs` or `stitch.link_tables` (or the slab-by-slab
tables of `blockwise`) has given each block its table `local id -> volume id`, the core is relabelled, and the block's share of
the instances table (`measures.block_measures`) and of the per-slice objects table (`slice_counts`) is
counted, so that no one ever holds the volume's ids.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from emunet.core.normalize import normalize
from emunet.inference.blockplan import tile_region
from emunet.inference.blocks import Block, Box, Overlap, core_of, overlap_slabs, read_box
from emunet.inference.context import context_indices
from emunet.inference.instances import first_pixels, iter_slice_instances, overlap_counts
from emunet.inference.instances3d import volume_instances
from emunet.inference.params import SegmentParams
from emunet.inference.measures import MeasurePartial, block_measures
from emunet.inference.stitch import core_sizes, relabel
from emunet.inference.tiling import TilePlan, gaussian_window, mirror_pad, with_tta


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
    out = np.empty((z1 - z0, *image.shape[1:], 2 * context + 1), np.float32)
    for k, group in enumerate(indices):
        for c, i in enumerate(group):
            out[k, ..., c] = image[i - lo]
    return out


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
    window = gaussian_window(plan.tile_h, plan.tile_w)
    tiles = [(i, y, x) for i, (y, x) in enumerate(plan.boxes)
             if y < ys[1] and y + plan.tile_h > ys[0] and x < xs[1] and x + plan.tile_w > xs[0]]
    weight = np.zeros((ty1 - ty0, tx1 - tx0), np.float32)
    for _, y, x in tiles:
        weight[y - ty0:y - ty0 + plan.tile_h, x - tx0:x - tx0 + plan.tile_w] += window
    crop = (slice(None), slice(ys[0] - ty0, ys[1] - ty0), slice(xs[0] - tx0, xs[1] - tx0))
    out = np.empty((z1 - z0, ys[1] - ys[0], xs[1] - xs[0]), np.float32)
    where = _batch_sizes(plan, depth)
    per_pass = plan.slices_per_pass
    # One of the whole volume's passes at a time (a batch never spans two): the tile region's image and
    # sums are held for a pass's slices only, the block's probabilities for all its slices.
    for first in range(z0 - z0 % per_pass, z1, per_pass):
        a, b = max(z0, first), min(z1, first + per_pass)
        image = _channels(volume, a, b, (ty0, min(ty1, height)), (tx0, min(tx1, width)), context, low, high)
        # Past the slice's end only when the slice is smaller than a tile: then the region is the whole axis.
        if image.shape[1:3] != (ty1 - ty0, tx1 - tx0):
            image = mirror_pad(image, ty1 - ty0, tx1 - tx0)  # every channel alike
        sums = np.zeros(image.shape[:3], np.float32)
        groups: dict[tuple, list] = {}
        for z in range(a, b):
            for i, y, x in tiles:
                key, size = where(z, i)
                groups.setdefault(key, [size]).append((z - a, y - ty0, x - tx0))
        for size, *jobs in groups.values():
            batch = [image[k, y:y + plan.tile_h, x:x + plan.tile_w] for k, y, x in jobs]
            batch += [batch[0]] * (size - len(batch))  # the whole slice's batch size, filled with copies
            probs = np.asarray(predict(np.stack(batch)), np.float32)[..., 0]
            for (k, y, x), p in zip(jobs, probs):
                sums[k, y:y + plan.tile_h, x:x + plan.tile_w] += p * window
        out[a - z0:b - z0] = sums[crop] / weight[crop[1:]]
    return out


def _slice_tables(objects: np.ndarray, count: int, offset: int, z: int, in_core: bool, block: Block, width: int,
                  previous: tuple | None) -> tuple[np.ndarray, np.ndarray | None, tuple]:
    """One slice's share of `stitch.link_tables`: its objects' rows (`stitch.OBJECT_COLUMNS`, ids moved
    by `offset`) in the block's core columns and, in a core slice, its links to the slice before
    (`stitch.LINK_COLUMNS`); and what the next slice needs of this one."""
    (y0, y1), (x0, x1) = block.core[1:]
    core = objects[block.core_in_read[1:]]
    area = np.bincount(core.ravel(), minlength=count + 1)
    present = np.flatnonzero(area[1:]) + 1
    y, x = np.divmod(first_pixels(core, count)[present], x1 - x0)
    rows = np.stack([present + offset, np.full(len(present), z), np.full(len(present), int(in_core)),
                     area[present], (y + y0) * width + x + x0], axis=1)
    links = None
    if in_core and previous is not None:
        before, before_count, before_offset = previous
        (new, old, shared), _ = overlap_counts(core, before, before_count + 1, count + 1)
        links = np.stack([old + before_offset, new + offset, shared], axis=1)
    return rows, links, (core, count, offset)


def label_slices(prob: np.ndarray, params: SegmentParams, block: Block, width: int) -> tuple:
    """The "2d" labelling of a block's `(rz, ry, rx)` probabilities: `(labels, objects, links)`, int32
    labels of each slice's objects (`slice_instances`), ids of the block's own and never two slices'
    alike, not linked here; `objects` and `links` are its int64 tables for `stitch.link_tables` (a slice
    is `width` pixels wide), which links the volume's objects as `SliceLinker` links whole slices."""
    labels = np.zeros(prob.shape, np.int32)
    objects, links, offset, previous = [], [], 0, None
    core_z = block.core_in_read[0]
    found_in_slices = iter_slice_instances(prob, params.threshold, params.seed_threshold, params.min_object_size,
                                           params.seed_depth, link=False)
    for k, (_, found, _) in enumerate(found_in_slices):
        count = int(found.max(initial=0))
        rows, pairs, previous = _slice_tables(found, count, offset, block.read[0][0] + k,
                                              core_z.start <= k < core_z.stop, block, width, previous)
        np.add(found, offset, out=labels[k], where=found > 0)
        objects.append(rows)
        links += [] if pairs is None else [pairs]
        offset += count
    return (labels, np.concatenate(objects).astype(np.int64),
            np.concatenate(links).astype(np.int64) if links else np.zeros((0, 3), np.int64))


@dataclass
class LabelledBlock:
    """What the first pass keeps of one block: `prob` `(cz, cy, cx)` float32 and `labels` int32 local ids
    of its core, `sizes` (`stitch.core_sizes`: the ids written there and their voxels), `id_count` the
    largest local id of the read box, `slabs` `{overlap number: local labels of that overlap's box}`,
    and for "2d" objects `objects` and `links`, the tables of `stitch.link_tables` (None for "3d")."""

    prob: np.ndarray
    labels: np.ndarray
    sizes: np.ndarray
    id_count: int
    slabs: dict[int, np.ndarray]
    objects: np.ndarray | None = None
    links: np.ndarray | None = None

    @property
    def written(self) -> np.ndarray:
        """`written[local id]`: whether the id is present in the core (bool, `id_count + 1` long)."""
        out = np.zeros(self.id_count + 1, bool)
        out[self.sizes[:, 0]] = True
        return out


def label_in_block(forward, volume, tiles: TilePlan, low: float, high: float, block: Block,
                   params: SegmentParams, mode: str, overlaps: list[Overlap], numbers: list[int],
                   context: int = 0) -> LabelledBlock:
    """The first pass on `block` of a raw `(Z, H, W)` `volume` (array or lazily read): probabilities of its
    read box with the slices' tile plan `tiles` and window `low`, `high` (`block_probabilities`; `forward`
    the network, `context` a 2.5-D network's neighbouring slices), labelled in `mode`: "2d" objects of
    each slice (`label_slices`, with their tables), "3d" ones (`volume_instances`); `numbers` are the
    overlaps of `overlaps` the block is part of."""
    prob = block_probabilities(forward, volume, tiles, low, high, block.read, params.tta, volume.shape[0], context)
    if mode == "3d":
        labels = volume_instances(prob, params.threshold, params.seed_threshold, params.min_object_size,
                                  params.seed_depth, params.grows_over_all)
        objects = links = None
    else:
        labels, objects, links = label_slices(prob, params, block, volume.shape[2])
    core = np.ascontiguousarray(core_of(block, labels))
    slabs = overlap_slabs(overlaps, numbers, block, labels)
    # 2-D: the ids written and their voxels are the objects' core rows, no pass over the core needed.
    sizes = core_sizes(core) if objects is None else objects[objects[:, 2] > 0][:, [0, 3]]
    return LabelledBlock(np.ascontiguousarray(core_of(block, prob)), core, sizes, int(labels.max(initial=0)), slabs,
                         objects, links)


def slice_counts(ids: np.ndarray, z0: int) -> np.ndarray:
    """`(n, 3)` int64 rows `(z, id, pixels)`: the pixels of each id (0 left out) in each slice of a block's
    `(cz, cy, cx)` volume ids whose first slice is `z0`; summed over the blocks of a slice, they are that
    slice's objects and areas (`outputs.object_row`)."""
    rows = []
    for k, plane in enumerate(np.asarray(ids)):
        found, counts = np.unique(plane, return_counts=True)
        keep = found > 0
        rows.append(np.stack([np.full(keep.sum(), z0 + k), found[keep], counts[keep]], axis=1))
    return np.concatenate(rows).astype(np.int64) if rows else np.zeros((0, 3), np.int64)


def slice_areas(counts: np.ndarray, depth: int) -> list[list[int]]:
    """Per slice `0..depth-1`, the areas of its objects by volume id, from `slice_counts` rows of all the
    blocks (rows of one slice and id from several blocks are added)."""
    counts = np.asarray(counts, np.int64).reshape(-1, 3)
    keys, where = np.unique(counts[:, :2], axis=0, return_inverse=True)
    totals = np.bincount(where.ravel(), counts[:, 2], len(keys)).astype(np.int64)
    out: list[list[int]] = [[] for _ in range(depth)]
    for (z, _), area in zip(keys, totals):  # by slice, then by id
        out[int(z)].append(int(area))
    return out


def relabel_in_block(local_core: np.ndarray, table: np.ndarray, core: Box
                     ) -> tuple[np.ndarray, MeasurePartial, np.ndarray]:
    """The second pass on a block whose core `core` holds the local ids `local_core`: `(ids, measures,
    counts)`, its volume ids (`table[local_core]`, uint32 as the labels image stores them), its
    `measures.MeasurePartial` and its `slice_counts`."""
    ids = relabel(local_core, table).astype(np.uint32)
    return ids, block_measures(ids, core), slice_counts(ids, core[0][0])
