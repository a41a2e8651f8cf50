"""Instances: touching cells separated in a slice and followed through the slices."""

import numpy as np

from emunet.core.metrics import ObjectScorer
from emunet.inference.instances import SliceLinker, iter_slice_instances, label_instances, slice_instances
from emunet.inference.params import DEFAULTS
from emunet.inference.segment import Truth, score_volume, segment_probabilities


def touching_discs(size: int = 40, radius: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Two discs that share a one-pixel border (a membrane): `(truth ids, probability)`. The probability is
    what a U-Net gives there: sure in the middle of each cell, unsure (0.6, still foreground at 0.5) on
    the thin membrane and near the rim."""
    yy, xx = np.mgrid[:size, :size]
    truth = np.zeros((size, size), np.int32)
    centres = [(size // 2, size // 2 - radius), (size // 2, size // 2 + radius)]
    distance = np.full((size, size), np.inf)
    for i, (cy, cx) in enumerate(centres, start=1):
        d = np.hypot(yy - cy, xx - cx)
        truth[(d <= radius) & (truth == 0)] = i
        distance = np.minimum(distance, d)
    prob = np.where(truth > 0, np.clip(1.0 - 0.05 * distance, 0.6, 0.99), 0.02).astype(np.float32)
    border = (truth > 0) & (xx == size // 2)  # the shared one-pixel column
    prob[border] = 0.6
    return truth, prob


def test_two_touching_discs_that_share_a_one_pixel_border_are_two_objects():
    truth, prob = touching_discs()
    assert np.all((prob >= 0.5) == (truth > 0))  # the mask alone is one blob
    assert slice_instances(prob, seed_threshold=0.5).max() == 1  # splitting off: the components, merged
    labels = slice_instances(prob)
    assert labels.max() == 2
    scorer = ObjectScorer()
    scorer.add(labels, truth)
    s = scorer.scores()
    assert s["object_f1"] == 1.0 and s["mean_matched_iou"] > 0.95


def test_output_labels_separates_touching_discs_through_the_pyfunc(world):
    """The same through a logged model's `segment(output="labels")`: the probabilities replaced by the
    discs' map at the step where the network's output enters, so the labelling is the served one."""
    from emunet.registry.tracking import load_segmenter

    segmenter = load_segmenter(world["trained"]["model_uri"])
    truth, prob = touching_discs()
    probs = np.stack([prob, prob])
    segmenter.probabilities = lambda stack, params: iter(probs)
    labels = segmenter.segment(np.zeros((2, 40, 40), np.uint8), 0.0, 1.0, output="labels")
    assert labels.dtype == np.int32 and labels.max() == 2  # two cells, each one id through both slices
    assert np.array_equal(labels[0], labels[1]) and set(np.unique(labels[0][truth == 1])) == {labels[0][20, 10]}


def test_a_foreground_piece_without_a_confident_core_is_still_an_object():
    prob = np.zeros((20, 20), np.float32)
    prob[2:8, 2:8] = 0.7  # foreground, never above 0.9
    prob[12:18, 12:18] = 0.95
    labels = slice_instances(prob, min_size=4)
    assert labels.max() == 2 and sorted(np.bincount(labels.ravel())[1:].tolist()) == [36, 36]


def test_linking_follows_a_cell_and_never_fuses_two():
    a = np.zeros((10, 10), np.int32)
    a[1:5, 1:5] = 1
    a[6:9, 6:9] = 2
    linker = SliceLinker()
    first = linker.ids(a)
    shifted = np.roll(a, 1, axis=1)  # both move by one pixel: overlap 12 / 16 and 6 / 9
    second = linker.ids(shifted)
    assert second[2, 3] == first[2, 3] and second[7, 8] == first[7, 7]
    # Two objects meet in the next slice: the piece continues the one it overlaps most (16 px against 9),
    # one id for the whole piece; the other cell's id ends there and is never given again.
    merged = np.zeros((10, 10), np.int32)
    merged[1:9, 1:9] = 1
    third = linker.ids(merged)
    assert np.unique(third[third > 0]).tolist() == [first[2, 3]]
    # A new cell that overlaps nothing starts a new id.
    new = np.zeros((10, 10), np.int32)
    new[0, 9] = 1
    assert linker.ids(new)[0, 9] == 3


def test_label_instances_and_the_scorer_agree_with_the_slice_objects():
    truth, prob = touching_discs()
    stack = label_instances(np.stack([prob, prob, np.zeros_like(prob)]))
    assert stack.shape == (3, 40, 40) and stack[2].max() == 0 and len(np.unique(stack)) == 3
    ids = np.stack([truth, truth])
    s = score_volume(segment_probabilities([prob, prob], DEFAULTS.replace(min_object_size=0),
                                           Truth.of_labels(ids, "instances"))).metrics()
    assert s["object_f1"] == 1.0 and s["count_error"] == 0.0
    merged = score_volume(segment_probabilities([prob], DEFAULTS.replace(min_object_size=0, seed_threshold=0.5),
                                                Truth.of_labels(ids[:1], "instances"))).metrics()
    assert merged["object_recall"] <= 0.5 and merged["count_error"] == 0.5 and merged["vi_merge"] > 0.9


def test_a_shallow_dip_between_two_cores_is_texture_inside_one_cell():
    """Two sure cores (0.97) inside one cell, with an organelle between them where the network is a little
    less sure (0.89, below the seed threshold 0.9): one cell. The same cores across a membrane it is
    unsure of (0.6): two cells. The dip must be SEED_DEPTH (0.1) below the lower core."""
    from emunet.inference.instances import SEED_DEPTH

    prob = np.full((20, 41), 0.02, np.float32)
    prob[2:18, 2:39] = 0.97
    for dip, cells in ((0.89, 1), (0.6, 2), (0.97 - SEED_DEPTH + 0.01, 1), (0.97 - SEED_DEPTH - 0.01, 2)):
        prob[2:18, 20] = dip
        assert slice_instances(prob).max() == cells, dip
    assert slice_instances(prob, depth=0).max() == 2  # without the rule every core is its own object


def plain_components(mask, min_size=0):
    """4-connected components written plainly (cv2's areas, every id looked up), as `components` was."""
    import cv2

    count, labels, stats, _ = cv2.connectedComponentsWithStats(np.asarray(mask, np.uint8), connectivity=4,
                                                               ltype=cv2.CV_32S)
    keep = np.zeros(count, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_size
    new_ids = np.zeros(count, np.int32)
    new_ids[keep] = np.arange(1, int(keep.sum()) + 1)
    return new_ids[labels]


def plain_drop_small(labels, min_size):
    """Objects under `min_size` pixels dropped, the others numbered 1..N in the order of their ids."""
    ids = [i for i in np.unique(labels) if i > 0 and (labels == i).sum() >= max(min_size, 1)]
    out = np.zeros(labels.shape, np.int32)
    for new, i in enumerate(ids, start=1):
        out[labels == i] = new
    return out


def plain_merge_shallow(labels, prob, depth):
    """The shallow-dip rule written plainly: every face-neighbouring pair of voxels of two regions looked
    at (the pass of two regions: the highest of the lower probabilities), each region's peak taken on its
    own, passes merged highest first (ties: the lower pair of ids first), a merged region keeping the
    higher peak, under the root of the pair's lower id."""
    passes = {}
    for axis in range(labels.ndim):
        head = (slice(None),) * axis
        a, b = labels[head + (slice(None, -1),)], labels[head + (slice(1, None),)]
        pa, pb = prob[head + (slice(None, -1),)], prob[head + (slice(1, None),)]
        where = (a != b) & (a > 0) & (b > 0)
        for la, lb, h in zip(a[where].tolist(), b[where].tolist(), np.minimum(pa, pb)[where]):
            pair = (min(la, lb), max(la, lb))
            passes[pair] = max(passes.get(pair, h), h)
    peak = {i: prob[labels == i].max() for i in np.unique(labels).tolist() if i > 0}
    root = {i: i for i in range(int(labels.max(initial=0)) + 1)}

    def find(i):
        while root[i] != i:
            i = root[i]
        return i

    for (low, high), h in sorted(passes.items(), key=lambda item: (-item[1], item[0])):
        a, b = find(low), find(high)
        if a != b and min(peak[a], peak[b]) - h < depth:
            root[b], peak[a] = a, max(peak[a], peak[b])
    return np.array([find(i) for i in range(len(root))])[labels]


def plain_slice_instances(prob, threshold, seed_threshold, min_size, depth):
    """The instance step written plainly, as a reference: every piece of foreground checked one at a time,
    the pieces with several cores flooded over the whole slice, merged and renumbered by the plain
    helpers above (none of the module's own)."""
    from skimage.segmentation import watershed

    pieces, seeds = plain_components(prob >= threshold), plain_components(prob >= seed_threshold)
    if seed_threshold <= threshold:
        return plain_components(prob >= threshold, min_size)
    several = np.zeros(prob.shape, bool)
    for piece in range(1, pieces.max() + 1):
        inside = pieces == piece
        if len(np.unique(seeds[inside & (seeds > 0)])) > 1:
            several |= inside
    labels = pieces.copy()
    if several.any():
        depth_map = (255 - np.round(prob * 255)).astype(np.uint8)
        grown = watershed(depth_map, markers=np.where(several, seeds, 0), mask=several, connectivity=1)
        grown = plain_merge_shallow(grown, prob, depth) if depth > 0 else grown
        labels[several] = grown[several] + pieces.max() + 1
    return plain_drop_small(labels, min_size)


def plain_links(slices):
    """3-D ids by the linking rule written plainly, object by object: a new object takes the id of the
    previous slice's object it overlaps most (ties: the one whose first pixel in raster order comes first)
    when that one overlaps it most too (ties: likewise) and they share at least half of the smaller; else
    the next new id, in label order."""
    from emunet.inference.instances import LINK_OVERLAP

    def largest(labels, inside):  # the label overlapping `inside` most; ties: the first pixel first
        found, shared = np.unique(labels[inside & (labels > 0)], return_counts=True)
        tied = found[shared == shared.max()]
        return min(tied, key=lambda t: np.flatnonzero((labels == t).ravel())[0]), shared.max()

    out, previous, next_id = [], None, 1
    for labels in slices:
        ids = np.zeros(labels.shape, np.int64)
        present = [n for n in range(1, labels.max() + 1) if (labels == n).any()]
        for n in present:
            if previous is None:
                break
            if not ((labels == n) & (previous > 0)).any():
                continue
            o, s = largest(previous, labels == n)
            back, _ = largest(labels, previous == o)
            if back == n and s >= LINK_OVERLAP * min((labels == n).sum(), (previous == o).sum()):
                ids[labels == n] = o
        for n in present:
            if not ids[labels == n].any():
                ids[labels == n], next_id = next_id, next_id + 1
        out.append(ids)
        previous = ids
    return np.stack(out)


def blurred_probabilities(truth: np.ndarray, seed: int = 0) -> np.ndarray:
    """Labels (objects > 0) as a trained network's probabilities look: blurred (sure in the middle of an
    object, unsure at its border), with smooth texture that makes cores and shallow dips."""
    import cv2

    rng = np.random.default_rng(seed)
    probs = []
    for t in truth > 0:
        prob = cv2.GaussianBlur(t.astype(np.float32), (0, 0), 2.0) + rng.normal(0, 0.08, t.shape).astype(np.float32)
        probs.append(np.clip(cv2.blur(prob, (3, 3)), 0, 1))
    return np.stack(probs)


def isbi_like_probabilities(slices: slice, seed: int = 0) -> np.ndarray:
    """ISBI's own labels (cell interiors, most of each slice) blurred: see `blurred_probabilities`."""
    import tifffile

    from tests.conftest import needs_shared

    return blurred_probabilities(tifffile.imread(needs_shared("isbi2012", "train-labels.tif"))[slices], seed)


def vnc_like_probabilities(slices: slice, seed: int = 0) -> np.ndarray:
    """VNC's mitochondria (a few % of 1024 x 1024 slices: sparse foreground) blurred likewise."""
    import tifffile

    from tests.conftest import needs_shared

    return blurred_probabilities(tifffile.imread(needs_shared("vnc", "stack1-mitochondria.tif"))[slices], seed)


PARAMETERS = ((0.5, 0.9, 20, 0.1), (0.5, 0.7, 0, 0.1), (0.4, 0.95, 5, 0.0), (0.5, 0.5, 20, 0.1))


def fast_and_plain_agree(probs):
    """For each of `PARAMETERS`: the step's labels of each of `probs` and their ids through the slices,
    after checking both against the plain reference; yields `(labels, ids)`."""
    for threshold, seeds, min_size, depth in PARAMETERS:
        fast = [slice_instances(p, threshold, seeds, min_size, depth) for p in probs]
        plain = [plain_slice_instances(p, threshold, seeds, min_size, depth) for p in probs]
        for got, expected in zip(fast, plain):
            assert got.dtype == np.int32 and np.array_equal(got, expected)
        linker = SliceLinker()
        linked = np.stack([linker.ids(labels) for labels in fast])
        assert np.array_equal(linked, plain_links(fast))
        for workers in (1, 2, 3):  # the served order: slices labelled and their links counted in threads
            served, linker = [], SliceLinker()
            for prob, objects, counts in iter_slice_instances(iter(probs), threshold, seeds, min_size, depth,
                                                              workers=workers):
                served.append((prob, objects, linker.ids(objects, counts)))
            assert all(np.array_equal(p, q) for (p, _, _), q in zip(served, probs))
            assert np.array_equal(np.stack([o for _, o, _ in served]), np.stack(fast))
            assert np.array_equal(np.stack([i for _, _, i in served]), linked)
        yield fast, linked


def test_slices_labelled_in_threads_hand_over_a_failure_and_stop_when_the_caller_stops(monkeypatch):
    """A slice that fails fails the iteration with its own error (the next slice's job, which waits for
    its objects, does not hang); a caller that stops early leaves the slices it did not ask for
    unlabelled; slices too large to label several at once, or a single slice, are labelled in the
    caller's thread; the threads are made once per process."""
    import threading
    import time

    from emunet.inference import instances

    good = np.zeros((8, 8), np.float32)
    good[2:6, 2:6] = 0.95
    maps = iter([good, good, np.zeros((2, 8, 8), np.float32), good, good])  # the third is not a slice
    found = []
    try:
        for _, objects, _ in iter_slice_instances(maps, workers=2):
            found.append(objects)
        raise AssertionError("a 3-D map went through")
    except Exception as error:  # noqa: BLE001 (whatever OpenCV says of a 3-D map, it is its own error)
        assert not isinstance(error, AssertionError), error
    assert len(found) == 2
    threads, calls = set(), []
    plain = instances.slice_instances
    monkeypatch.setattr(instances, "slice_instances",
                        lambda *a: threads.add(threading.current_thread().name) or calls.append(1) or plain(*a))
    stream = iter_slice_instances(iter([good] * 50), workers=2)
    next(stream)
    stream.close()  # the slices not asked for are not labelled: at most the first and the two after it
    time.sleep(0.5)
    assert len(calls) <= 3
    threads.clear()
    large = np.zeros((1, instances.PARALLEL_PIXELS // 2 + 1), np.float32)
    assert len(list(iter_slice_instances([large, large], workers=2))) == 2
    assert len(list(iter_slice_instances(np.stack([good]), workers=2))) == 1  # one slice: no thread either
    assert threads == {threading.current_thread().name}
    threads.clear()
    list(iter_slice_instances([good] * 4, workers=2))
    assert threads and all(name.startswith("slice-instances") for name in threads)
    before = {t for t in threading.enumerate() if t.name.startswith("slice-instances")}
    list(iter_slice_instances([good] * 4, workers=2))  # the same threads again, none made anew
    assert {t for t in threading.enumerate() if t.name.startswith("slice-instances")} == before


def test_the_instance_step_gives_the_labels_of_the_plain_reference_on_real_isbi_slices():
    """The fast step (flood within the box of the crowded pieces, the merge as a lookup table, objects
    numbered from their sizes in one pass, overlaps and areas counted in one table) against the plain
    one: the same labels, numbered alike, on four consecutive ISBI slices (about 50 cells each, most of
    them in one crowded piece of foreground), for the default parameters and others (splitting off)."""
    for fast, linked in fast_and_plain_agree(isbi_like_probabilities(slice(0, 4))):
        assert fast[0].max() > 30  # real cells, not an empty slice
        assert len(np.unique(linked)) - 1 < sum(int(f.max()) for f in fast)  # cells did continue through slices


def test_the_instance_step_gives_the_plain_labels_on_sparse_real_vnc_slices():
    """The same on VNC's mitochondria, where the foreground is a few % of a 1024 x 1024 slice (sizes and
    overlaps are then counted over the objects' pixels only), with splitting on and off; some touching
    mitochondria are split (the step is not just the mask's components); the first slice is empty (the
    dataset has no mitochondria annotated there)."""
    probs = vnc_like_probabilities(slice(1, 5))
    for fast, _ in fast_and_plain_agree(probs):
        assert fast[0].max() == 0 and all(0 < np.count_nonzero(f) < f.size / 4 and f.max() > 5 for f in fast[1:])
    split = [slice_instances(p) for p in probs]
    assert sum(int(s.max()) for s in split) > sum(int(plain_components(p >= 0.5, 0).max()) for p in probs)


def test_components_drop_small_and_the_merge_equal_their_plain_versions_on_real_slices():
    """`components` (areas without cv2's statistics, nothing renumbered when nothing is dropped),
    `drop_small` (ids looked up with np.take) and `merge_shallow` (the merge as a lookup table) against
    plain versions: real ISBI and VNC masks, instance ids with gaps in other integer types, and the merge
    in 2-D and 3-D."""
    from skimage.segmentation import watershed

    from emunet.core.objects import components, drop_small
    from emunet.inference.dips import merge_shallow

    probs = [*isbi_like_probabilities(slice(0, 2)), *vnc_like_probabilities(slice(0, 1))]
    for prob in probs:
        for mask in (prob >= 0.5, (prob >= 0.5).astype(np.uint8) * 255):
            for min_size in (0, 1, 20, 10**9):
                got = components(mask, min_size)
                assert got.dtype == np.int32 and np.array_equal(got, plain_components(mask, min_size))
        ids = (plain_components(prob >= 0.5) * 3).astype(np.uint16)  # gaps between the ids
        for min_size in (0, 20, 500):
            got = drop_small(ids, min_size)
            assert got.dtype == np.int32 and np.array_equal(got, plain_drop_small(ids, min_size))
    isbi = probs[0]
    grown = watershed(-isbi, markers=plain_components(isbi >= 0.9), mask=isbi >= 0.5, connectivity=1)
    volume = np.stack([isbi[:96, :96], isbi[1:97, :96], isbi[2:98, :96]])  # a small 3-D volume
    grown3d = watershed(-volume, markers=np.stack([plain_components(v >= 0.9) for v in volume]) * [[[1]], [[0]], [[0]]],
                        mask=volume >= 0.5, connectivity=1)
    for labels, prob in ((grown, isbi), (grown3d, volume)):
        for depth in (0.05, 0.1, 0.3, 1.0):
            got = merge_shallow(labels, prob, depth)
            assert np.array_equal(got, plain_merge_shallow(labels, prob, depth))
        assert len(np.unique(got)) < len(np.unique(labels))  # something was merged (depth 1: every touching pair)


def test_linking_thousands_of_objects_counts_overlaps_by_sorting_and_agrees():
    """More objects than the table of overlaps may hold (1024 x 1024 cells for a 64 x 64 slice): the
    sorted count gives the same links as the plain rule."""
    a = np.zeros((64, 64), np.int32)
    a[::2, ::2] = np.arange(1, 1025).reshape(32, 32)  # 1024 one-pixel objects
    b = a.copy()
    b[:2] = 0  # the first two rows end
    c = np.roll(a, 1, axis=1)  # none overlaps any of the slice before
    d = a.copy()
    d[::2, 1::2] = d[::2, ::2]  # each grows to two pixels: half its pixels on the object before
    slices = [a, b, c, d]
    linker = SliceLinker()
    linked = np.stack([linker.ids(s) for s in slices])
    assert np.array_equal(linked, plain_links(slices))
    assert np.array_equal(linked[1][b > 0], linked[0][b > 0]) and linked[2].max() == 1024 + 1024


def test_a_tie_between_two_cells_goes_to_the_first_in_raster_order_whatever_their_ids_and_labels():
    """Ties are broken by where the objects lie, not how they are numbered, so that blocks, which number
    them otherwise, link alike (`stitch.link_tables`). Here the cell on the right has the lower id."""
    first = np.zeros((2, 6), np.int32)
    first[:, 4:], first[:, :2] = 1, 2  # ids 1 (right) and 2 (left)
    second = np.zeros((2, 6), np.int32)
    second[:, :2], second[:, 4:] = 1, 2  # the same cells, numbered the other way round in this slice
    third = np.ones((2, 6), np.int32)  # one cell over both: 4 pixels of each
    linker = SliceLinker()
    ids = [linker.ids(s) for s in (first, second, third)]
    assert ids[1][0, 0] == ids[0][0, 0] == 2 and ids[1][0, 5] == 1
    assert np.unique(ids[2]).tolist() == [2]  # the left cell, whose first pixel comes first
    assert np.array_equal(np.stack(ids), plain_links([first, second, third]))
    # Two objects of the next slice tie for one cell: the first in raster order continues it.
    fourth = np.zeros((2, 6), np.int32)
    fourth[1, 1:3], fourth[0, 3:5] = 1, 2  # (1, 1) comes after (0, 3): label 2 is first
    assert np.unique(linker.ids(fourth)[0, 3:5]).tolist() == [2]
