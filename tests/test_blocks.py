"""Blocks of a large volume and cell ids that agree across them, on small synthetic volumes whose
whole-volume labelling is the reference: the blockwise labels must equal it up to a renumbering."""

from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndi
from skimage.segmentation import watershed

from emunet.core.io import Volume, open_volume
from emunet.core.objects import ObjectMeasures
from emunet.inference import blocks as blocks_module
from emunet.inference.blocks import (block_shape_for_memory, box_shape, box_slices, core_of, default_memory_budget,
                                     overlap_slabs, overlaps_by_block, plan_blocks, plan_overlaps, read_box)
from emunet.inference.measures import block_measures, merge_measures
from emunet.inference.stitch import core_sizes, link_tables, local_pairs, merge_pairs, relabel, segment_blockwise


def balls(shape, cells) -> np.ndarray:
    """A `(Z, Y, X)` float32 'probability' volume, 1 inside the balls `((z, y, x), radius)`, 0 outside."""
    zz, yy, xx = np.indices(shape)
    out = np.zeros(shape, np.float32)
    for (z, y, x), r in cells:
        out[(zz - z) ** 2 + (yy - y) ** 2 + (xx - x) ** 2 <= r * r] = 1
    return out


def components(prob: np.ndarray) -> np.ndarray:
    return ndi.label(prob > 0.5)[0]


def split_touching(prob: np.ndarray, seed_depth: float = 4.5) -> np.ndarray:
    """Touching balls apart: a watershed of the distance map from the cores deeper than `seed_depth`; a
    foreground piece without a core (a cell cut off by the block's border) stays one object."""
    mask = prob > 0.5
    depth = ndi.distance_transform_edt(mask)
    seeds, count = ndi.label(depth > seed_depth)
    labels = watershed(-depth, seeds, mask=mask)
    rest, _ = ndi.label(mask & (labels == 0))
    return np.where(rest > 0, rest + count, labels)


def bijection(first: np.ndarray, second: np.ndarray) -> dict[int, int]:
    """`{id in first: id in second}` when the two label volumes are the same up to renumbering (0 kept),
    else an AssertionError naming an id that is split or merged."""
    pairs = np.unique(np.stack([first.ravel(), second.ravel()], axis=1), axis=0)
    assert len(np.unique(pairs[:, 0])) == len(pairs), f"an id of the first is split: {pairs.tolist()}"
    assert len(np.unique(pairs[:, 1])) == len(pairs), f"ids of the first are merged: {pairs.tolist()}"
    mapping = {int(a): int(b) for a, b in pairs}
    assert mapping.get(0, 0) == 0
    return mapping


# 32^3 split at 16 in every axis: one ball centred on the corner where the eight blocks meet, one wholly
# in the first block's core but within 3 voxels of the next block in x (that block sees it in its halo
# only), small ones in other blocks, one across a single face.
SHAPE = (32, 32, 32)
CELLS = [((16, 16, 16), 6), ((4, 5, 5), 3), ((26, 5, 26), 4), ((5, 26, 12), 3), ((24, 24, 5), 3),
         ((24, 8, 16), 3.5)]
NEAR_FACE = ((6, 6, 13.5), 1.6)  # x 12..15 of block x 0..16: B's halo (x 13..15) holds most of it


def test_cores_tile_the_volume_and_read_boxes_are_the_core_plus_the_halo():
    shape, halo = (10, 23, 17), (1, 2, 3)
    plan = plan_blocks(shape, (4, 8, 5), halo)
    owners = np.zeros(shape, int)
    for block in plan:
        owners[tuple(slice(a, b) for a, b in block.core)] += 1
        assert block.read == tuple((max(0, a - h), min(n, b + h)) for (a, b), h, n in zip(block.core, halo, shape))
        assert tuple(s.stop - s.start for s in block.core_in_read) == box_shape(block.core)
    assert (owners == 1).all()
    assert len(plan) == 3 * 3 * 4 and plan[0].index == (0, 0, 0) and plan[-1].core == ((8, 10), (16, 23), (15, 17))


def test_block_sides_are_whole_chunks_so_no_two_blocks_write_one_chunk():
    plan = plan_blocks((20, 50, 33), (7, 20, 9), 2, chunks=(3, 8, 8))
    inner = [b for b in plan if b.core[0][1] < 20 and b.core[1][1] < 50 and b.core[2][1] < 33]
    assert {box_shape(b.core) for b in inner} == {(6, 16, 8)}
    for block in plan:
        for (start, stop), chunk, length in zip(block.core, (3, 8, 8), (20, 50, 33)):
            assert start % chunk == 0 and (stop % chunk == 0 or stop == length)
    # a block beyond the volume is the volume
    assert box_shape(plan_blocks((4, 10, 10), 100, 0, chunks=64)[0].core) == (4, 10, 10)
    with pytest.raises(ValueError, match="halo"):
        plan_blocks((4, 4, 4), 2, -1)


def test_overlaps_join_face_edge_and_corner_neighbours_once():
    plan = plan_blocks(SHAPE, 16, 3)
    overlaps = plan_overlaps(plan)
    assert len(overlaps) == 8 * 7 // 2  # 2 x 2 x 2 blocks: every pair is a neighbour
    corner = next(o for o in overlaps if plan[o.a].index == (0, 0, 0) and plan[o.b].index == (1, 1, 1))
    assert corner.box == ((13, 19),) * 3
    assert plan_overlaps(plan_blocks(SHAPE, 16, 0)) == []


def test_memory_block_is_whole_slices_in_as_few_equal_blocks_as_fit():
    shape, halo = (100, 256, 256), (2, 16, 16)
    budget = 8 * 256 * 256 * 20  # 20 whole slices at 8 bytes a voxel: 16 + 2 x 2 halo slices
    assert block_shape_for_memory(shape, 8, budget, halo) == (15, 256, 256)  # 7 blocks of 15 (the last 10), not 16 + 4
    assert block_shape_for_memory(shape, 8, budget, halo, chunks=(5, 64, 64)) == (15, 256, 256)
    assert block_shape_for_memory(shape, 8, budget, halo, chunks=(8, 64, 64)) == (16, 256, 256)
    assert block_shape_for_memory(shape, 8, budget * 100, halo) == (100, 256, 256)


def read_total(shape, block, halo) -> int:
    """Voxels all read boxes of a plan hold together: the work, halos counted as often as read."""
    return sum(int(np.prod(box_shape(b.read))) for b in plan_blocks(shape, block, halo))


def test_memory_block_splits_the_plane_when_a_slice_does_not_fit_and_reads_least():
    shape, halo, chunks, bpv = (4, 300, 400), (1, 8, 8), (1, 4, 4), 4
    budget = bpv * 3 * 120 * 130
    bz, by, bx = block_shape_for_memory(shape, bpv, budget, halo, chunks, min_yx=64)
    reads = [min(n, b + 2 * h) for n, b, h in zip(shape, (bz, by, bx), halo)]
    assert np.prod(reads) * bpv <= budget and by % 4 == 0 and bx % 4 == 0 and by < 300
    # no chunk-aligned block that fits reads fewer voxels in all
    fitting = [(z, y, x) for z in range(1, 5) for y in [*range(64, 300, 4), 300] for x in [*range(64, 400, 4), 400]
               if min(4, z + 2) * min(300, y + 16) * min(400, x + 16) * bpv <= budget]
    def axis(n, b, h):
        return sum(min(n, s + b + h) - max(0, s - h) for s in range(0, n, b))

    least = min(axis(4, z, 1) * axis(300, y, 8) * axis(400, x, 8) for z, y, x in fitting)
    assert read_total(shape, (bz, by, bx), halo) == least < read_total(shape, (1, 64, 64), halo)
    with pytest.raises(ValueError, match="MiB"):
        block_shape_for_memory(shape, bpv, bpv * 3 * 70 * 70, halo, min_yx=64)


def test_default_budget_is_half_the_free_memory(monkeypatch):
    monkeypatch.setattr(blocks_module, "available_memory", lambda: 1000)
    assert default_memory_budget() == 500 and default_memory_budget(0.25) == 250


def test_read_box_reads_only_the_block_of_a_lazy_volume():
    data = np.arange(6 * 8 * 10).reshape(6, 8, 10)
    calls = []

    def read_block(a, b, ys, xs):
        calls.append((a, b, ys, xs))
        return data[a:b, ys, xs]

    volume = Volume(Path("v.npy"), data.shape, data.dtype, read=lambda a, b: 1 / 0, read_block=read_block)
    box = ((1, 4), (2, 7), (3, 9))
    assert (read_box(volume, box) == data[1:4, 2:7, 3:9]).all()
    assert calls == [(1, 4, slice(2, 7), slice(3, 9))]
    block = plan_blocks(data.shape, (2, 4, 5), 1)[4]
    assert (core_of(block, read_box(data, block.read)) == data[tuple(slice(a, b) for a, b in block.core)]).all()
    with pytest.raises(ValueError, match="read"):
        core_of(block, data)


def test_a_sliver_flooded_from_the_neighbour_cell_does_not_merge_two_cells():
    # An overlap of two planes: z 0 in block A's core, z 1 in block B's. A sees both cells (P = 1, a
    # sliver by the face, and Q = 2); B has no core of P in its read box and floods the sliver from Q (5).
    a = np.array([[[1, 1, 2, 2], [2, 2, 2, 2]], [[2, 2, 2, 2], [2, 2, 2, 2]]])
    b = np.where(a > 0, 5, 0)
    # The sliver is wholly inside Q in B (a rule on the smaller piece would pair it and merge P and Q);
    # its IoU with B's cell is 2 / 16.
    assert local_pairs(a, b).tolist() == [[2, 5]]
    assert local_pairs(a, np.zeros_like(b)).shape == (0, 2)


def test_merge_pairs_numbers_written_cells_densely_in_plan_order():
    # block 0 writes ids 1 and 2 and sees 3 in its halo only; block 1 writes 1 and 2. 0:1 = 1:2 joins;
    # 0:3 = 1:1 does not: 0:3 is never written, and 1:1 keeps its own id
    pairs, counts = [(0, 1, np.array([[1, 2], [3, 1]]))], [3, 2]
    sizes = [np.array([[1, 10], [2, 1]]), np.array([[1, 7], [2, 5]])]
    tables = merge_pairs(pairs, counts, sizes)
    assert [t.tolist() for t in tables] == [[0, 1, 2, 0], [0, 3, 1]]
    small = merge_pairs(pairs, counts, sizes, min_voxels=7)
    assert [t.tolist() for t in small] == [[0, 1, 0, 0], [0, 2, 1]]  # 0:2 (1 voxel) dropped; 0:1 + 1:2 has 15
    assert relabel(np.array([[0, 2], [1, 1]]), tables[1]).tolist() == [[0, 1], [3, 3]]
    with pytest.raises(ValueError, match="outside"):
        relabel(np.array([3]), tables[1])


def slice_objects_by_blocks(prob: np.ndarray, block, halo) -> tuple:
    """The 2-D path without a network: each block's objects of each slice and their tables
    (`blocktask.label_slices`), the pairs of its overlaps; `(blocks, pairs, objects, links, id counts,
    core labels)`, per block number."""
    from emunet.inference.blocktask import label_slices
    from emunet.inference.params import SegmentParams

    blocks = plan_blocks(prob.shape, block, halo)
    overlaps = plan_overlaps(blocks)
    of_block = overlaps_by_block(overlaps)
    objects, links, counts, cores, slabs = {}, {}, {}, {}, {}
    for n, blk in enumerate(blocks):
        labels, objects[n], links[n] = label_slices(read_box(prob, blk.read), SegmentParams(), blk, prob.shape[2])
        counts[n], cores[n] = int(labels.max(initial=0)), core_of(blk, labels)
        slabs.update({(o, n): s for o, s in overlap_slabs(overlaps, of_block.get(n, []), blk, labels).items()})
    pairs = [(o.a, o.b, local_pairs(slabs[i, o.a], slabs[i, o.b])) for i, o in enumerate(overlaps)]
    return blocks, pairs, objects, links, counts, cores


def test_link_tables_give_the_whole_volumes_linked_cells_numbered_by_first_voxel():
    """Objects of each slice, linked through the slices from the blocks' summed counts, are the cells
    `SliceLinker` makes of whole slices (`tests.test_blockwise.crossing_volume`: a block alone would link
    WIDE to TUBE), numbered 1..N by their first slice, then first pixel."""
    from emunet.inference.instances import label_instances
    from tests.test_blockwise import crossing_volume

    prob = (crossing_volume() > 100).astype(np.float32)
    blocks, pairs, objects, links, counts, cores = slice_objects_by_blocks(prob, (4, 48, 48), (1, 24, 24))
    assert len(blocks) == 12
    tables, next_id = link_tables(pairs, objects, counts, links)
    labels = np.zeros(prob.shape, np.int64)
    for n, blk in enumerate(blocks):
        labels[box_slices(blk.core)] = relabel(cores[n], tables[n])
    assert len(bijection(label_instances(prob), labels)) == 4 and next_id == 4  # TUBE, FAR + WIDE, LOW
    ids, first = np.unique(labels, return_index=True)
    assert ids.tolist() == list(range(4)) and np.all(np.diff(first) > 0)


def test_link_tables_slab_by_slab_keep_the_ids_of_all_at_once():
    """`blockwise` decides a slab at a time, with the slab before's objects and ids: the same tables."""
    from tests.test_blockwise import crossing_volume

    prob = (crossing_volume() > 100).astype(np.float32)
    blocks, pairs, objects, links, counts, _ = slice_objects_by_blocks(prob, (4, 48, 48), (1, 24, 24))
    at_once, _ = link_tables(pairs, objects, counts, links)
    tables, next_id, earlier = {}, 1, []
    for slab in ([n for n, b in enumerate(blocks) if b.index[0] == i] for i in range(3)):
        mine = [*earlier, *slab]
        found, next_id = link_tables([p for p in pairs if p[1] in mine], {n: objects[n] for n in mine},
                                     {n: counts[n] for n in mine}, {n: links[n] for n in slab},
                                     {n: tables[n] for n in earlier}, next_id)
        tables.update({n: found[n] for n in slab})
        earlier = slab
    assert next_id == 4
    for n in range(len(blocks)):
        written = objects[n][objects[n][:, 2] > 0, 0]  # the ids of the block's core
        assert tables[n][written].tolist() == at_once[n][written].tolist()


@pytest.mark.parametrize("block", [16, (16, 16, 11), (10, 32, 32)])
def test_blockwise_components_equal_whole_volume_components(block):
    prob = balls(SHAPE, [*CELLS, NEAR_FACE])
    whole = components(prob)
    labels, rows = segment_blockwise(prob, components, block, 3)
    mapping = bijection(whole, labels)
    assert sorted(mapping.values()) == list(range(len(CELLS) + 2))  # dense 1..N
    assert len(rows) == len(CELLS) + 1


def test_a_cell_seen_only_in_a_neighbour_halo_is_written_once_with_its_own_voxels():
    (z, y, x), r = NEAR_FACE
    prob = balls(SHAPE, [NEAR_FACE])
    # all in block A's core, most of it in block B's halo
    assert prob[:, :, 16:].sum() == 0 and prob[:, :, 13:16].sum() > prob[:, :, :13].sum()
    labels, rows = segment_blockwise(prob, components, 16, 3)
    assert np.unique(labels).tolist() == [0, 1]
    assert rows[0][:4] == [1, int(prob.sum()), int(np.ceil(z - r)), int(np.floor(z + r))]


@pytest.mark.parametrize("centre, halo", [((8, 8), 3), ((8, 8), (8, 3, 3)), ((14, 14), 6), ((14, 14), (8, 5, 5))])
def test_touching_cells_a_face_separates_stay_two(centre, halo):
    # Two balls meeting in a neck on the face z = 16 between blocks, symmetric about it; centred at y, x
    # = 14 they cross the y and x faces too. The halo must hold the context the watershed needs (the
    # core of the neighbouring cell): with a halo of 2 each block sees one cell only, and they merge.
    prob = balls(SHAPE, [((10, *centre), 6.5), ((21, *centre), 6.5), ((5, 26, 26), 3)])
    whole = split_touching(prob)
    assert len(np.unique(whole)) == 4 and whole[(10, *centre)] != whole[(21, *centre)]
    labels, _ = segment_blockwise(prob, split_touching, 16, halo)
    bijection(whole, labels)
    assert labels[(10, *centre)] != labels[(21, *centre)]


@pytest.mark.parametrize("voxel_size", [None, (40.0, 4.0, 4.0)])
def test_merged_measures_equal_whole_volume_measures(voxel_size):
    prob = balls(SHAPE, [*CELLS, NEAR_FACE])
    labels, rows = segment_blockwise(prob, components, 16, 3, voxel_size=voxel_size, unit="nm")
    measures = ObjectMeasures(voxel_size, "nm")
    for z, plane in enumerate(labels):
        measures.add(z, plane)
    assert rows == measures.rows() and len(rows) == len(CELLS) + 1


def test_measures_with_an_unknown_z_size_leave_z_and_the_volume_empty():
    prob = balls(SHAPE, CELLS)
    _, known = segment_blockwise(prob, components, 16, 3, voxel_size=(40.0, 4.0, 4.0), unit="nm")
    _, unknown = segment_blockwise(prob, components, 16, 3, voxel_size=(None, 4.0, 4.0), unit="nm")
    assert [r[:7] for r in unknown] == [r[:7] for r in known]
    assert [r[7:] for r in unknown] == [["", "", r[9], r[10], "nm"] for r in known]


def test_block_measures_extent_is_the_bounding_box():
    labels = np.zeros((4, 5, 6), int)
    labels[1:3, 0:2, 2:5] = 7
    labels[3, 4, 0] = 9
    part = block_measures(labels, ((10, 14), (20, 25), (30, 36)))
    assert part.ids.tolist() == [7, 9] and part.voxels.tolist() == [12, 1]
    assert part.low.tolist() == [[11, 20, 32], [13, 24, 30]] and part.high.tolist() == [[12, 21, 34], [13, 24, 30]]
    assert part.sums[0].tolist() == [6 * 11 + 6 * 12, 6 * 20 + 6 * 21, 4 * (32 + 33 + 34)]
    assert merge_measures([part, part])[0][:4] == [7, 24, 11, 12]
    assert core_sizes(labels).tolist() == [[7, 12], [9, 1]]


def test_written_blocks_are_disjoint_whole_chunks_and_match_the_assembled_labels():
    prob = balls(SHAPE, [*CELLS, NEAR_FACE])
    expected, expected_rows = segment_blockwise(prob, components, 16, 3)
    written, owners, calls = np.zeros(SHAPE, np.int32), np.zeros(SHAPE, int), []

    def write(box, labels):
        where = tuple(slice(a, b) for a, b in box)
        written[where], owners[where] = labels, owners[where] + 1
        assert all(a % 8 == 0 for a, _ in box)

    result, rows = segment_blockwise(prob, components, 20, 3, chunks=8, write=write,
                                     progress=lambda done, total: calls.append((done, total)))
    assert result is None and (owners == 1).all()
    bijection(expected, written)
    assert [r[1:] for r in rows] == [r[1:] for r in expected_rows]
    assert calls == [(n, 16) for n in range(1, 17)]  # 2 x 2 x 2 blocks of 16, two passes


def test_a_halo_of_zero_on_a_split_axis_is_refused():
    with pytest.raises(ValueError, match="halo"):
        segment_blockwise(np.zeros((8, 8, 8)), components, (4, 8, 8), (0, 1, 1))
    labels, _ = segment_blockwise(np.ones((8, 8, 8)), components, (8, 4, 4), (0, 1, 1))  # z not split: fine
    assert np.unique(labels).tolist() == [1]


def test_label_block_must_label_the_read_box_and_may_use_any_ids():
    with pytest.raises(ValueError, match="read box"):
        segment_blockwise(np.zeros((8, 8, 8)), lambda a: a[1:].astype(int), 4, 1)
    with pytest.raises(ValueError, match="negative"):
        segment_blockwise(np.zeros((8, 8, 8)), lambda a: -np.ones(a.shape, int), 4, 1)
    prob = balls(SHAPE, CELLS)
    sparse, rows = segment_blockwise(prob, lambda a: components(a).astype(np.int64) * 10**10 + (a > 0.5), 16, 3)
    bijection(components(prob), sparse)  # ids beyond int32 are renumbered within the block
    assert len(rows) == len(CELLS)


@pytest.mark.parametrize("rule", ["iou", "overlap"])
def test_a_cell_crossing_only_at_a_corner_of_four_blocks_keeps_one_id(rule):
    # a 26-connected diagonal line whose only step between blocks goes from block (0, 0, 0) straight to
    # block (0, 1, 1), past blocks (0, 0, 1) and (0, 1, 0), which see it in their halos only
    prob = np.zeros(SHAPE, np.float32)
    for i in range(8, 24):
        prob[4, i, i] = 1
    labels, rows = segment_blockwise(prob, lambda a: ndi.label(a > 0.5, np.ones((3, 3, 3)))[0], 16, 1, rule=rule)
    assert np.unique(labels).tolist() == [0, 1] and rows[0][1] == 16


@pytest.mark.parametrize("connectivity", [1, 3])
def test_blockwise_components_of_tangled_objects_are_exact_with_the_overlap_rule(connectivity):
    # Smoothed noise: objects that branch and meet again beyond a block's read box, which one block sees
    # as two pieces. Joined at any shared voxel, blocks of 8 x 24 x 24 with a halo of 1 still give the
    # whole volume's components exactly; the IoU rule may split such objects but never merges two.
    noise = ndi.gaussian_filter(np.random.default_rng(1).random((24, 64, 64)).astype(np.float32), 3)
    prob = (noise > noise.mean() + 0.8 * noise.std()).astype(np.float32)
    structure = ndi.generate_binary_structure(3, connectivity)

    def label(a):
        return ndi.label(a > 0.5, structure)[0]

    whole = label(prob)
    exact, _ = segment_blockwise(prob, label, (8, 24, 24), 1, rule="overlap")
    bijection(whole, exact)
    split, _ = segment_blockwise(prob, label, (8, 24, 24), 1)
    pairs = np.unique(np.stack([whole.ravel(), split.ravel()], axis=1), axis=0)
    assert len(np.unique(pairs[:, 1])) == len(pairs)  # no id of the blocks covers two of the whole's
    with pytest.raises(ValueError, match="rule"):
        segment_blockwise(prob, label, 8, 1, rule="touch")


def test_label_block_with_its_block_writes_what_needs_no_stitching(tmp_path):
    prob = balls(SHAPE, CELLS)
    np.save(tmp_path / "prob.npy", prob)
    written = np.zeros(SHAPE, np.float32)

    def label(array, block):
        written[tuple(slice(a, b) for a, b in block.core)] = core_of(block, array)  # e.g. probabilities
        return components(array)

    with open_volume(tmp_path / "prob.npy") as volume:
        labels, rows = segment_blockwise(volume, label, 16, 3, with_block=True)
    assert (written == prob).all()
    bijection(components(prob), labels)
    assert len(rows) == len(CELLS)
