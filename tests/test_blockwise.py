"""Blockwise segmentation (blocks in z, y and x with a halo) against the whole-volume path on the same
volume: the same probabilities, the same mask, the same cells up to a renumbering."""

import numpy as np
import pytest
from scipy import ndimage

from emunet.core.errors import InputError
from emunet.inference.blockplan import block_bytes, largest_block_bytes, plan_for, smallest_block_bytes
from emunet.inference.blocks import plan_blocks
from emunet.inference.blockwise import segment_in_blocks
from emunet.inference.params import SegmentParams
from emunet.inference.segment import Segmenter, Truth, VolumeScores, segment_volume

SHAPE = (8, 96, 96)  # split 4 x 48 x 48: 2 x 2 x 2 blocks
BLOCK, HALO = (4, 48, 48), (1, 24, 24)
BIG = ((48, 48), 22)  # across all eight blocks
NEIGHBOUR = ((48, 88), 15)  # touches BIG across a thin membrane: apart only where the labelling sees both
NEAR_FACE = ((15, 38), 6)  # in the first blocks' cores; the blocks across x = 48 see it in their halo only
SMALL = ((80, 15), 7)


def disc(center, radius) -> np.ndarray:
    yy, xx = np.indices(SHAPE[1:])
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius ** 2


def cells_volume() -> np.ndarray:
    """Bright cells on a dark background, BIG and NEIGHBOUR parted by a two-pixel membrane; cells shift
    a little from slice to slice, as sections do."""
    out = np.full(SHAPE, 30, np.uint8)
    for z in range(SHAPE[0]):
        plane = np.zeros(SHAPE[1:], bool)
        for (y, x), r in (BIG, NEIGHBOUR, NEAR_FACE, SMALL):
            plane |= disc((y + z % 3 - 1, x), r)
        membrane = np.zeros(SHAPE[1:], bool)
        membrane[:, 68:70] = True
        out[z][plane & ~membrane] = 220
    return out


def smooth_forward(batches: list | None = None):
    """A deterministic stand-in for a network: a blur of each tile (so tiles and their borders matter),
    plus a term that depends on the batch size (as a compiled network's rounding may)."""

    def forward(tiles: np.ndarray) -> np.ndarray:
        if batches is not None:
            batches.append(len(tiles))
        blurred = ndimage.gaussian_filter(tiles[..., 0], sigma=(0, 1.5, 1.5), mode="reflect")
        return (np.clip(blurred * 1.1 - 0.02, 0, 1) - 1e-4 * len(tiles))[..., None].astype(np.float32)

    return forward


PARAMS = SegmentParams(tile_size=16, batch_size=3, min_object_size=5, instances="2d")


def bijection(first: np.ndarray, second: np.ndarray) -> dict[int, int]:
    """`{id in first: id in second}` when the two labellings are the same up to renumbering, else an
    AssertionError naming what is split or merged."""
    pairs = np.unique(np.stack([np.ravel(first), np.ravel(second)], axis=1).astype(np.int64), axis=0)
    assert len(np.unique(pairs[:, 0])) == len(pairs), f"an id of the first is split: {pairs.tolist()}"
    assert len(np.unique(pairs[:, 1])) == len(pairs), f"ids of the first are merged: {pairs.tolist()}"
    mapping = {int(a): int(b) for a, b in pairs}
    assert mapping.get(0, 0) == 0
    return mapping


def both_ways(params=PARAMS, volume=None, **options):
    volume = cells_volume() if volume is None else volume
    whole_batches, block_batches = [], []
    whole = list(segment_volume(Segmenter(smooth_forward(whole_batches), 4), volume, params))
    blocked = list(segment_in_blocks(Segmenter(smooth_forward(block_batches), 4), volume, params, **options))
    return whole, blocked, whole_batches, block_batches


def test_blocks_give_the_whole_volumes_probabilities_mask_and_cells():
    progress = []
    whole, blocked, whole_batches, block_batches = both_ways(block=BLOCK, halo=HALO,
                                                             progress=lambda *a: progress.append(a))
    assert progress == [(n, 8) for n in range(1, 9)]
    assert [r.z for r in blocked] == list(range(SHAPE[0]))
    # Every tile ran in a batch of the size the whole slice gives it (the term of the batch size shows it).
    assert set(block_batches) == set(whole_batches) == {3, 1}
    prob = np.stack([r.prob for r in blocked])
    np.testing.assert_array_equal(prob, np.stack([r.prob for r in whole]))
    np.testing.assert_array_equal(np.stack([r.mask for r in blocked]), np.stack([r.mask for r in whole]))
    ids, truth = np.stack([r.ids for r in blocked]), np.stack([r.ids for r in whole])
    mapping = bijection(truth, ids)
    assert len(mapping) == 5  # background and the four cells, each one id through the slices
    # BIG lies across all eight blocks: one id in the whole volume, one id here.
    inside = np.stack([disc((y + z % 3 - 1, x), r - 2) for z in range(SHAPE[0]) for (y, x), r in [BIG]]) & (np.arange(96) < 66)
    assert len(np.unique(ids[inside])) == 1 and len(np.unique(truth[inside])) == 1
    # A cell the neighbouring blocks see in their halo only is written once, not duplicated.
    near = np.stack([disc((y + z % 3 - 1, x), r - 2) for z in range(SHAPE[0]) for (y, x), r in [NEAR_FACE]])
    assert len(np.unique(ids[near])) == 1
    # Per slice, the objects are the whole slice's objects, and their areas those counted on the slice.
    for mine, theirs in zip(blocked, whole):
        bijection(theirs.objects, mine.objects)
        assert sorted(mine.areas) == sorted(theirs.areas)


def test_a_halo_too_thin_for_the_cell_across_the_face_is_seen_in_the_result():
    """The test above can fail: with no label halo in y and x, neighbouring blocks share no pixels and
    BIG is cut into one cell per block."""
    _, blocked, _, _ = both_ways(block=BLOCK, halo=(1, 0, 0))
    ids = np.stack([r.ids for r in blocked])
    inside = np.stack([disc((y + z % 3 - 1, x), r - 2) for z in range(SHAPE[0]) for (y, x), r in [BIG]]) & (np.arange(96) < 66)
    assert len(np.unique(ids[inside])) == 4


def test_scores_with_a_truth_equal_the_whole_volumes():
    volume = cells_volume()
    labels = (volume > 100).astype(np.uint8)
    whole, blocked = VolumeScores(PARAMS.min_object_size), VolumeScores(PARAMS.min_object_size)
    for r in segment_volume(Segmenter(smooth_forward(), 4), volume, PARAMS, Truth.of_labels(labels)):
        whole.add(r)
    for r in segment_in_blocks(Segmenter(smooth_forward(), 4), volume, PARAMS, block=BLOCK, halo=HALO,
                               truth=Truth.of_labels(labels)):
        blocked.add(r)
    assert blocked.metrics() == pytest.approx(whole.metrics(), nan_ok=True)


CROSSING_SHAPE = (12, 96, 96)  # 3 x 2 x 2 blocks of BLOCK


def crossing_volume() -> np.ndarray:
    """Cells whose links through the slices a block cannot see whole (blocks of `BLOCK`, halo `HALO`: the
    left blocks read x < 72). TUBE runs through slices 0-6 (more than a block and its halo), drifting
    right to the face x = 48; FAR lies beyond the left blocks' read box but for a strip x 60-71. In slice
    7 one object, WIDE, covers both: 14 columns of TUBE, 31 of FAR, so it continues FAR and TUBE ends.
    The left blocks see FAR's strip only (12 columns): linked in a block, WIDE would continue TUBE there.
    LOW grows across the face slice by slice."""
    out = np.full(CROSSING_SHAPE, 30, np.uint8)
    for z, plane in enumerate(out):
        if z <= 6:
            plane[22:39, 6 + 4 * z:26 + 4 * z] = 220  # TUBE
            plane[22:39, 60:91] = 220  # FAR
        else:
            plane[22:39, 36:91] = 220  # WIDE
        plane[60:80, 20:30 + 3 * z] = 220  # LOW
    return out


def test_cells_linked_through_more_slices_than_a_block_get_the_whole_volumes_ids():
    """The blocks link each slice's objects from their counts added up (`stitch.link_tables`), not each
    block through its own slices: WIDE continues FAR as in the whole volume, not TUBE as the left blocks
    alone would link it (which split WIDE at the face and merged it with TUBE)."""
    whole, blocked, _, _ = both_ways(volume=crossing_volume(), block=BLOCK, halo=HALO)
    ids, truth = np.stack([r.ids for r in blocked]), np.stack([r.ids for r in whole])
    assert len(bijection(truth, ids)) == 4  # background, TUBE, FAR and WIDE, LOW
    tube, far, wide = ids[6, 30, 40], ids[6, 30, 80], ids[7, 30, 40]
    assert wide == far != tube and wide == ids[7, 30, 80]
    assert [len(np.unique(plane)) for plane in ids] == [4] * 7 + [3] * 5


def test_3d_objects_across_the_blocks_are_one_cell_each():
    zz, yy, xx = np.indices((24, 48, 48))
    volume = np.full((24, 48, 48), 30, np.uint8)
    for (z, y, x), r in (((12, 24, 24), 9), ((4, 8, 40), 4), ((19, 40, 8), 4)):
        volume[(zz - z) ** 2 + (yy - y) ** 2 + (xx - x) ** 2 <= r * r] = 220
    params = SegmentParams(tile_size=32, batch_size=2, min_object_size=5, instances="3d")
    whole, blocked, _, _ = both_ways(params, volume, block=(12, 24, 24), halo=12)
    np.testing.assert_array_equal(np.stack([r.mask for r in blocked]), np.stack([r.mask for r in whole]))
    mapping = bijection(np.stack([r.ids for r in whole]), np.stack([r.ids for r in blocked]))
    assert len(mapping) == 4


def test_blocks_of_a_16384_slice_fit_a_budget_of_one_and_a_half_gigabytes():
    budget = 1.5e9
    blocks, tiles = plan_for((1, 16384, 16384), SegmentParams(), multiple=16, budget=budget)
    assert 4 <= len(blocks) <= 64
    assert max(block_bytes(b, tiles) for b in blocks) <= budget
    # The whole slice would not: that is why it goes by blocks.
    whole, _ = plan_for((1, 16384, 16384), SegmentParams(), multiple=16, block=(1, 16384, 16384))
    assert block_bytes(whole[0], tiles) > budget


def test_a_2_5d_networks_channels_make_its_blocks_smaller_within_the_same_budget():
    shape, budget = (16, 2048, 2048), 1e9
    plain, tiles = plan_for(shape, SegmentParams(), multiple=16, budget=budget)
    wide, _ = plan_for(shape, SegmentParams(), multiple=16, budget=budget, channels=9)
    assert max(block_bytes(b, tiles, channels=9) for b in wide) <= budget
    assert max(block_bytes(b, tiles, channels=9) for b in plain) > budget  # planned for one channel: too large
    assert len(wide) > len(plain)
    # The plan is checked by its largest block, counted per axis: the one that crosses the tiles' edges.
    for blocks in (plain, wide):
        assert largest_block_bytes(blocks, tiles, channels=9) == max(block_bytes(b, tiles, channels=9) for b in blocks)
    small = plan_blocks(shape, (1, 64, 64), (1, 1, 1))
    assert smallest_block_bytes(shape, tiles, (1, 1, 1)) == max(block_bytes(b, tiles) for b in small)


def test_only_slices_or_3d_volumes_beyond_the_budget_go_by_blocks():
    from emunet.inference.blockplan import needs_blocks

    params = SegmentParams(instances="2d")
    assert needs_blocks((1, 16384, 16384), params, 16, 1.5e9)
    assert not needs_blocks((500, 2048, 2048), params, 16, 1.5e9)  # slice by slice: the depth costs nothing
    assert needs_blocks((500, 2048, 2048), params.replace(instances="3d"), 16, 1.5e9)
    assert not needs_blocks((64, 256, 256), params.replace(instances="3d"), 16, 1.5e9)


def test_predict_by_blocks_writes_what_predict_by_slices_writes(world, tmp_path, monkeypatch):
    """A memory budget below one slice's working memory sends predict through the blocks; its files
    hold the same probabilities and mask, the same cells (renumbered) and the same objects table."""
    import csv

    import tifffile

    from emunet.core.synthetic import synthetic_stack
    import serving.predict
    from serving.predict import PredictConfig, predict

    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs["budget"])
        return segment_in_blocks(*args, **kwargs)

    monkeypatch.setattr(serving.predict, "segment_in_blocks", counted)

    image, _ = synthetic_stack(0, 3, (2, 600, 500))
    tifffile.imwrite(tmp_path / "big.tif", image, photometric="minisblack")
    base = dict(model_uri=world["trained"]["model_uri"], input=str(tmp_path / "big.tif"), tile_size=64,
                save_probability=True, save_labels=True)
    predict(PredictConfig(**base, output_dir=str(tmp_path / "slices")))
    assert calls == []  # the default budget holds a slice: slice by slice, as before
    predict(PredictConfig(**base, output_dir=str(tmp_path / "blocks"), memory_gb=0.015))
    assert calls == [0.015 * 2**30]
    read = {kind: [tifffile.imread(tmp_path / out / f"big_{kind}.tif") for out in ("slices", "blocks")]
            for kind in ("prob", "mask", "labels")}
    np.testing.assert_array_equal(*read["prob"])  # the same tiles in batches of the same sizes
    np.testing.assert_array_equal(*read["mask"])
    mapping = bijection(*read["labels"])
    assert len(mapping) > 10
    tables = [list(csv.DictReader(open(tmp_path / out / "big_objects.csv"))) for out in ("slices", "blocks")]
    assert [(r["slice"], r["objects"], r["total_area"], sorted(r["areas"].split())) for r in tables[0]] == \
        [(r["slice"], r["objects"], r["total_area"], sorted(r["areas"].split())) for r in tables[1]]
    # The instances table, from the blocks' counts: the same rows but for the ids' numbering.
    cells = [sorted(row[1:] for row in list(csv.reader(open(tmp_path / out / "big_instances.csv")))[1:])
             for out in ("slices", "blocks")]
    assert cells[0] == cells[1] and len(cells[0]) == len(mapping) - 1


def test_planes_ortho_by_blocks_is_refused_in_one_line(world, tmp_path):
    """Blocks see their slices only: asking for the three planes of a volume whose slices go by blocks is
    a user error that names the way out, before anything is written."""
    import tifffile

    from emunet.core.synthetic import synthetic_stack
    from serving.predict import PredictConfig, predict

    image, _ = synthetic_stack(0, 3, (8, 600, 500))
    tifffile.imwrite(tmp_path / "big.tif", image, photometric="minisblack")
    config = PredictConfig(model_uri=world["trained"]["model_uri"], input=str(tmp_path / "big.tif"), tile_size=64,
                           planes="ortho", memory_gb=0.015, output_dir=str(tmp_path / "out"))
    with pytest.raises(InputError, match="planes=ortho needs whole slices .* use planes=xy or a larger memory_gb"):
        predict(config)
    assert not list((tmp_path / "out").glob("big_*"))


def test_a_budget_below_the_smallest_block_names_both():
    with pytest.raises(ValueError, match=r"need at least \d+ MiB .* but the memory budget is 1 MiB"):
        plan_for((1, 2048, 2048), SegmentParams(), multiple=16, budget=2**20)


def test_a_25d_networks_channels_are_each_slice_with_its_mirrored_neighbours():
    """A 2.5-D network (context k) takes slice z with z-k..z+k as channels, mirrored at the ends, as the
    whole-volume path gives them (`emunet.inference.context`)."""
    from emunet.inference.blocktask import block_probabilities
    from emunet.inference.context import context_stack
    from emunet.inference.tiling import plan_tiles

    volume = np.random.default_rng(0).integers(0, 255, (5, 40, 40)).astype(np.uint8)
    seen = []

    def forward(tiles):
        seen.append(tiles.copy())
        return tiles[..., :1]

    plan = plan_tiles(40, 40, 64, 4)  # one tile: the whole slice
    block_probabilities(forward, volume, plan, 0.0, 255.0, ((0, 2), (0, 40), (0, 40)), context=2)
    tiles = np.concatenate(seen)
    assert tiles.shape == (4, 40, 40, 5)  # slices 0-3 make one batch in the whole volume: filled with copies
    for z in (0, 1):
        np.testing.assert_allclose(tiles[z], context_stack(volume, z, 2) / 255.0, atol=1e-6)


@pytest.mark.parametrize("context", [0, 2])
def test_a_block_holds_no_more_than_its_planned_bytes_and_its_tiles_for_one_pass_only(context):
    """The first pass on a block (probabilities by the whole slices' tiles, objects of each slice, their
    tables) measured by tracemalloc, which counts NumPy's arrays: its peak stays within `block_bytes`, and
    a block eight times deeper holds its tile region (here many times its read box: large tiles, a small
    block) for one forward pass's slices still (one slice a pass here), so its peak grows by what each
    slice keeps (`KEPT_BYTES_PER_VOXEL`), not by its tiles."""
    import tracemalloc

    from emunet.inference.blockplan import KEPT_BYTES_PER_VOXEL
    from emunet.inference.blocks import overlaps_by_block, plan_overlaps
    from emunet.inference.blocktask import label_in_block

    shape, params = (40, 256, 256), SegmentParams(tile_size=128, batch_size=4, min_object_size=5, instances="2d")
    rng = np.random.default_rng(0)
    volume = (ndimage.gaussian_filter(rng.random(shape), (0, 4, 4)) * 255 * 4).clip(0, 255).astype(np.uint8)
    peaks = {}
    for depth in (4, 32):
        blocks, tiles = plan_for(shape, params, multiple=16, block=(depth, 32, 32), halo=(1, 8, 8))
        overlaps = plan_overlaps(blocks)
        n = next(i for i, b in enumerate(blocks) if b.core == ((0, depth), (96, 128), (96, 128)))  # inner in y, x
        block = blocks[n]
        assert tiles.slices_per_pass == 1
        tracemalloc.start()
        # The image itself as the probabilities: a network whose own memory (the engine's) is nil.
        part = label_in_block(lambda batch: batch[..., :1], volume, tiles, 0.0, 255.0, block, params, "2d", overlaps,
                              overlaps_by_block(overlaps).get(n, []), context)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert part.labels.max() > 0
        planned = block_bytes(block, tiles, channels=2 * context + 1)
        assert peak <= planned, (depth, peak, planned)
        peaks[depth] = (peak, int(np.prod([b - a for a, b in block.read])))
    (small, small_read), (large, large_read) = peaks[4], peaks[32]
    assert large - small <= KEPT_BYTES_PER_VOXEL * (large_read - small_read), peaks
