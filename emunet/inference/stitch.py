"""Cell ids that agree across blocks (the blockwise method of daisy and large-scale connectomics): each
block labels its own read box with ids of its own, neighbouring blocks agree through the voxels both
labelled, and one table per block turns its ids into the volume's, numbered 1..N.

Agreement: for each pair of neighbouring blocks (26-neighbourhood, `blocks.plan_overlaps`) the ids of the
two blocks are compared over the box both read boxes cover: for face neighbours a slab of twice the halo
around their common face, half in each core. That slab holds each block's best-seen voxels (its core by
the face, with a full halo of context beyond) and its worst (its halo by its read border, where objects
are cut off), so the two sides weigh equally. Two ids are the same cell when their intersection over
union within the slab exceeds one half. A rule on the smaller piece alone would merge two cells touching
at the face: the block that sees the neighbour cell only as a sliver in its halo, without that cell's
core, floods the sliver from its own cell, and the sliver is then wholly inside that cell; the union
counts the rest of the cell and keeps them apart. IoU above one half is also one-to-one: an id pairs
with at most one other. Connected components need no such care and take `rule="overlap"` (see `RULES`).
Only ids that both blocks write (present in their cores) join: see `merge_pairs`.

The halo must hold the context the labelling needs to split two cells at a face the way the whole volume
would (for a watershed from cell cores: the core of the cell across the face, about a cell radius); with
less, both blocks see one cell by the face and the two merge. Cells are compared, never re-segmented.

Objects found slice by slice and linked through the slices ("2d", `instances.SliceLinker`) are not
joined as cells at all: a block would link the objects of its slices from what its read box shows, and
a cell longer than a block, or an object its read box cuts off, would be linked otherwise than in the
whole volume (whose links pick each object's largest overlap: a cut changes which is largest). Each
block's ids are the objects of each slice; they join across y/x faces by the rule above (within a slice:
ids of two slices never share a voxel), and `link_tables` links the volume's objects from the blocks'
counts (sizes, first pixels, pixels shared with the slice before, each counted by the one block whose
core holds the pixel), added up: the very numbers `SliceLinker` counts on whole slices, decided by the
same function (`instances.one_to_one`). The cells are then the whole volume's by construction, as far
as the objects of each slice are (those depend on the y/x halo as above).

For a cluster, every step is small or per block: `local_pairs` per overlap (pairs of ids), `merge_pairs`
on the driver (union-find over all pairs: tables of ids, not voxels), `relabel` and `measures.block_measures`
per block, `measures.merge_measures` on the driver (a few numbers per cell). `segment_blockwise` runs them in one process.
"""

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from emunet.inference.blocks import (Box, box_slices, core_of, overlap_slabs, overlaps_by_block, plan_blocks,
                                     plan_overlaps, read_box)
from emunet.inference.instances import one_to_one
from emunet.inference.measures import block_measures, merge_measures

SAME_CELL_IOU = 0.5  # intersection over union, within the overlap, above which two ids are one cell
# How two blocks' ids are found to be one cell: "iou" (above) for labellings that split touching cells
# (watersheds, `instances`); "overlap", any shared voxel, for connected components, where it is exact (a
# block's component never spans two of the volume's, and every path between blocks crosses an overlap),
# while "iou" would split an object whose two arms meet beyond one block's read box.
RULES = ("iou", "overlap")


def local_pairs(labels_a: np.ndarray, labels_b: np.ndarray, rule: str = "iou") -> np.ndarray:
    """`(n, 2)` int64 pairs `(id in a, id in b)` of the ids that are one cell: two blocks' labels of the
    same overlap box (equal shapes, 0 = background) whose IoU within it exceeds `SAME_CELL_IOU`, or with
    `rule="overlap"` that share a voxel (see `RULES`)."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
    if labels_a.shape != labels_b.shape:
        raise ValueError(f"the two blocks' labels of one overlap differ in shape: {labels_a.shape} and "
                         f"{labels_b.shape}")
    a, b = np.asarray(labels_a).ravel().astype(np.int64), np.asarray(labels_b).ravel().astype(np.int64)
    both = (a > 0) & (b > 0)
    if not both.any():
        return np.zeros((0, 2), np.int64)
    ids_a, size_a = np.unique(a[a > 0], return_counts=True)
    ids_b, size_b = np.unique(b[b > 0], return_counts=True)
    width = int(ids_b[-1]) + 1  # one int64 key per pair: a 1-D unique is several times faster than rows
    keys, shared = np.unique(a[both] * width + b[both], return_counts=True)
    pairs = np.stack(np.divmod(keys, width), axis=1)
    if rule == "overlap":
        return pairs
    union = size_a[np.searchsorted(ids_a, pairs[:, 0])] + size_b[np.searchsorted(ids_b, pairs[:, 1])] - shared
    return pairs[shared > SAME_CELL_IOU * union]


def core_sizes(core_labels: np.ndarray) -> np.ndarray:
    """`(n, 2)` int64 rows `(id, voxels)` of the ids present in a block's core labels (0 left out)."""
    ids, counts = np.unique(np.asarray(core_labels), return_counts=True)
    keep = ids > 0
    return np.stack([ids[keep], counts[keep]], axis=1).astype(np.int64)


def _id_dtype(count: int):
    return np.int32 if count < 2**31 else np.int64


def _components(edges: np.ndarray, total: int) -> tuple[int, np.ndarray]:
    """Union-find over all `(n, 2)` `edges` of `total` nodes at once: `(count, component of each node)`."""
    graph = coo_matrix((np.ones(len(edges), np.int8), (edges[:, 0], edges[:, 1])), shape=(total, total))
    return connected_components(graph, directed=False)


def merge_pairs(pairs, id_counts: list[int], sizes: list[np.ndarray], min_voxels: int = 0) -> list[np.ndarray]:
    """Relabel tables, one per block: `tables[n][local id]` is the volume-wide id (0: background or not
    written), numbered 1..N densely in the order cells first appear in the plan's cores.

    `pairs`: `(a, b, local_pairs(...))` for each overlap of blocks a and b (positions in the plan);
    `id_counts[n]`: the largest id block n used in its read box; `sizes[n]`: `core_sizes` of its core.
    A pair joins only when both ids are written (in `sizes`). Cells of fewer than `min_voxels` voxels in
    the whole volume are dropped (table entry 0). Tables are int32 (int64 beyond 2**31 - 1 cells)."""
    offsets = np.concatenate([[0], np.cumsum(id_counts, dtype=np.int64)])  # block n's id i is node offsets[n] + i
    total = int(offsets[-1]) + 1
    nodes = np.concatenate([s[:, 0] + offsets[n] for n, s in enumerate(sizes)] or [np.zeros(0, np.int64)])
    voxels = np.concatenate([s[:, 1] for s in sizes] or [np.zeros(0, np.int64)])
    written = np.zeros(total, bool)
    written[nodes] = True
    edges = [np.asarray(p, np.int64).reshape(-1, 2) + offsets[[a, b]] for a, b, p in pairs]
    edges = np.concatenate(edges) if edges else np.zeros((0, 2), np.int64)
    # Only ids both blocks write join: an id seen only in its block's halo was labelled with the least
    # context (by the read box's border) and is not needed to join anything (a cell written by two
    # blocks is seen by both, and all neighbours, diagonal ones too, are compared directly); through
    # such an id, two cells that one block saw as one at its border would chain into one.
    edges = edges[written[edges[:, 0]] & written[edges[:, 1]]]
    count, cell = _components(edges, total)
    per_cell = np.bincount(cell[nodes], voxels, minlength=count)
    first = np.full(count, total)
    np.minimum.at(first, cell[nodes], nodes)
    kept = np.flatnonzero(per_cell >= max(min_voxels, 1))  # cells with no core voxel were never written
    dtype = _id_dtype(len(kept))
    global_id = np.zeros(count, dtype)
    global_id[kept[np.argsort(first[kept], kind="stable")]] = np.arange(1, len(kept) + 1, dtype=dtype)
    return [np.concatenate([[0], global_id[cell[offsets[n] + 1:offsets[n + 1] + 1]]]).astype(dtype)
            for n in range(len(id_counts))]


OBJECT_COLUMNS = ("id", "z", "core", "area", "first")  # a block's table of its 2-D objects (`link_tables`)
LINK_COLUMNS = ("old", "new", "shared")  # a block's counts of shared pixels between slices z - 1 and z


def _summed_links(links: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(old, new, shared)` with the rows of one pair of objects (from several blocks) added up."""
    pair, where = np.unique(links[:, 0] * count + links[:, 1], return_inverse=True)
    shared = np.zeros(len(pair), np.int64)
    np.add.at(shared, where.ravel(), links[:, 2])
    return *np.divmod(pair, count), shared


def link_tables(pairs, objects: dict, id_counts: dict, links: dict, known: dict | None = None,
                next_id: int = 1) -> tuple[dict[int, np.ndarray], int]:
    """Relabel tables for blocks whose ids are 2-D objects, one id per object of one slice (the "2d"
    labelling): `(tables, next_id)`, `tables[n][local id]` the volume-wide 3-D id (0: not written). Where
    the blocks' objects of each slice are the whole slice's, the cells are exactly those
    `instances.SliceLinker` makes of the whole slices, up to their numbering.

    Each block's objects join those of its neighbours within a slice through the overlaps (`pairs`:
    `(a, b, local_pairs(...))`, as `merge_pairs`): the volume's 2-D objects. Their sizes, first pixels and
    the pixels they share with the slice before are the blocks' counts added up, from which
    `instances.one_to_one` links them as it links whole slices; the chains of links are the cells. Block
    n (any hashable key) gives `id_counts[n]` (its largest local id), `objects[n]` (`OBJECT_COLUMNS` rows
    for each object present in its core columns, in any slice it read: `core` 1 in a slice of its core,
    `area` its pixels in the core columns, `first` the raster index `y * width + x` of its first pixel
    there) and `links[n]` (`LINK_COLUMNS` rows, in the core columns, for each slice z of its core: a
    pair counted by one block only). Objects in no block's core (seen in halos only) take their size
    from the halo rows; they are never written.

    Cells are numbered from `next_id` by their first slice, then first pixel. `known[n]`, for blocks
    whose ids were given earlier (a slab before, `blockwise`), keeps those ids: such blocks give their
    objects (the sizes of the slice before this slab's), no links (theirs were decided)."""
    known = known or {}
    order = list(id_counts)
    sizes = [int(id_counts[n]) + 1 for n in order]
    offsets = dict(zip(order, np.cumsum([0, *sizes[:-1]], dtype=np.int64).tolist()))
    total = int(sum(sizes))

    def nodes(n, local) -> np.ndarray:
        return np.asarray(local, np.int64) + offsets[n]

    per_block = [np.asarray(objects[n], np.int64).reshape(-1, len(OBJECT_COLUMNS)) for n in order]
    rows = np.concatenate([*per_block, np.zeros((0, len(OBJECT_COLUMNS)), np.int64)])
    node = np.concatenate([*(nodes(n, t[:, 0]) for n, t in zip(order, per_block)), np.zeros(0, np.int64)])
    present = np.zeros(total, bool)
    present[node] = True
    edges = [np.stack([nodes(a, p[:, 0]), nodes(b, p[:, 1])], axis=1)
             for a, b, p in ((a, b, np.asarray(p, np.int64).reshape(-1, 2)) for a, b, p in pairs)
             if a in offsets and b in offsets]
    edges = np.concatenate(edges) if edges else np.zeros((0, 2), np.int64)
    count, piece = _components(edges[present[edges[:, 0]] & present[edges[:, 1]]], total)  # the 2-D objects
    obj, core = piece[node], rows[:, 2] > 0
    own = core | ~np.isin(obj, obj[core])  # an object's core rows; all its rows if it has none
    area = np.bincount(obj[own], rows[own, 3], count).astype(np.int64)
    first = np.full(count, np.iinfo(np.int64).max)
    np.minimum.at(first, obj[own], rows[own, 4])
    z = np.full(count, np.iinfo(np.int64).max)
    z[obj] = rows[:, 1]
    counted = [np.stack([piece[nodes(n, l[:, 0])], piece[nodes(n, l[:, 1])], l[:, 2]], axis=1)
               for n, l in ((n, np.asarray(links[n], np.int64).reshape(-1, 3)) for n in order if n in links)]
    old, new, shared = _summed_links(np.concatenate(counted) if counted else np.zeros((0, 3), np.int64), count)
    linked = one_to_one(new, old, shared, area[new], area[old], first[new], first[old])
    cells, cell = _components(np.stack([old[linked], new[linked]], axis=1), count)
    given = np.zeros(cells, np.int64)  # an id given before, else 0
    for n, table in known.items():
        ids = np.asarray(table, np.int64)
        np.maximum.at(given, cell[piece[nodes(n, np.arange(len(ids)))]], ids)
    written = np.zeros(cells, bool)
    written[cell[obj[core]]] = True
    start = np.lexsort((first, z))  # each cell's first object: by slice, then first pixel
    firsts = start[np.unique(cell[start], return_index=True)[1]]  # one per cell, in cell order
    fresh = np.flatnonzero(written & (given == 0))
    fresh = fresh[np.lexsort((first[firsts[fresh]], z[firsts[fresh]]))]
    given[fresh] = np.arange(next_id, next_id + len(fresh))
    next_id += len(fresh)
    dtype = _id_dtype(next_id)
    ids = given[cell[piece]].astype(dtype)
    tables = {n: np.concatenate([[0], ids[offsets[n] + 1:offsets[n] + size]]).astype(dtype)
              for n, size in zip(order, sizes)}
    return tables, next_id


def relabel(core_labels: np.ndarray, table: np.ndarray) -> np.ndarray:
    """A block's core labels in volume-wide ids: `table[core_labels]` (same shape, the table's dtype)."""
    core_labels = np.asarray(core_labels)
    if core_labels.size and (core_labels.min() < 0 or core_labels.max() >= len(table)):
        raise ValueError(f"labels {core_labels.min()}..{core_labels.max()} are outside the block's table of "
                         f"ids 0..{len(table) - 1}")
    return table[core_labels]


def _local_labels(labels, block) -> np.ndarray:
    """`label_block`'s result checked: non-negative integer ids of the read box's shape, renumbered when
    they are so sparse that the id tables would outgrow the block."""
    labels = np.asarray(labels)
    shape = tuple(b - a for a, b in block.read)
    if labels.shape != shape or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"label_block gave {labels.dtype} labels of shape {labels.shape} for block "
                         f"{block.index}; expected integer labels of its read box, {shape}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"label_block gave a negative id ({labels.min()}) for block {block.index}")
    if labels.size and labels.max() > min(labels.size, 2**31 - 1):
        labels = np.unique(labels, return_inverse=True)[1].reshape(shape)  # 0 stays 0: it sorts first
    return labels.astype(np.int32)  # the scratch store's type


def segment_blockwise(volume, label_block: Callable[..., np.ndarray], block, halo, chunks=None,
                      write: Callable[[Box, np.ndarray], None] | None = None, voxel_size=None,
                      unit: str | None = None, min_voxels: int = 0, scratch=None,
                      progress: Callable[[int, int], None] | None = None, with_block: bool = False,
                      rule: str = "iou"):
    """Instance labels of a `(Z, Y, X)` volume made block by block in one process, ids agreeing across
    blocks; returns `(labels, rows)`.

    `volume`: an array or a lazily read volume (`emunet.core.io.Volume`); `label_block` maps a read box's
    `(rz, ry, rx)` array to integer labels of that shape, ids of its own (0 background); with `with_block`
    it is called `label_block(array, block)` with the `Block`, so that it can write what needs no
    stitching (probabilities, mask) at `block.core` itself (`blocks.core_of`); `block`, `halo`,
    `chunks` as `blocks.plan_blocks` (halo at least 1 on every axis split into blocks). Each block's core,
    in volume-wide ids 1..N, goes to `write(core_box, labels)` (boxes whole chunks of `chunks`); with
    `write` None, `labels` is the assembled `(Z, Y, X)` array, else None. `rows` is the instances table
    (`merge_measures`; `voxel_size`, `unit` as there). Cells under `min_voxels` voxels are dropped.
    `rule` (`RULES`): "iou" for labellings that split touching cells, "overlap" for connected components.
    The local labels wait between the two passes in `scratch` (an array-like of the volume's shape taking
    int32), by default a memory-mapped file in the temporary folder (4 bytes a voxel). `progress(done,
    total)` is called after each block of each pass (label, then relabel and write; total = 2 blocks)."""
    if rule not in RULES:  # before any block is labelled
        raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
    shape = tuple(int(n) for n in volume.shape)
    blocks = plan_blocks(shape, block, halo, chunks)
    for axis in range(3):  # on a split axis, the first block reads past its core exactly when the halo is not 0
        if blocks[0].core[axis][1] < shape[axis] and blocks[0].read[axis] == blocks[0].core[axis]:
            raise ValueError(f"halo {halo} is 0 on axis {'zyx'[axis]}, which is split into blocks: "
                             "neighbouring blocks would share no voxel to agree on cell ids; use a halo of 1 or more")
    overlaps = plan_overlaps(blocks)
    of_block = overlaps_by_block(overlaps)
    report = progress or (lambda done, total: None)
    with tempfile.TemporaryDirectory(prefix="emunet-blocks-") as folder:
        if write is None:
            store = np.zeros(shape, np.int32)
        elif scratch is None:
            store = np.lib.format.open_memmap(Path(folder) / "local_labels.npy", "w+", np.int32, shape)
        else:
            store = scratch
        pending, pairs, id_counts, sizes = {}, [], [], []
        for n, blk in enumerate(blocks):
            raw = read_box(volume, blk.read)
            labels = _local_labels(label_block(raw, blk) if with_block else label_block(raw), blk)
            del raw
            core = core_of(blk, labels)
            id_counts.append(int(labels.max(initial=0)))
            sizes.append(core_sizes(core))
            store[box_slices(blk.core)] = core
            for o, slab in overlap_slabs(overlaps, of_block.get(n, []), blk, labels).items():
                if o in pending:  # block a came first (a < b): both sides are here
                    pairs.append((overlaps[o].a, overlaps[o].b, local_pairs(pending.pop(o), slab, rule)))
                else:
                    pending[o] = slab
            report(n + 1, 2 * len(blocks))
        tables = merge_pairs(pairs, id_counts, sizes, min_voxels)
        partials = []
        for n, blk in enumerate(blocks):
            core = relabel(np.asarray(store[box_slices(blk.core)]), tables[n])
            if write is None:
                store[box_slices(blk.core)] = core
            else:
                write(blk.core, core)
            partials.append(block_measures(core, blk.core))
            report(len(blocks) + n + 1, 2 * len(blocks))
        result = store if write is None else None
        del store  # the memory map's file goes with the folder
    return result, merge_measures(partials, voxel_size, unit)
