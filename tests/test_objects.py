"""Objects and object scores on hand-made label images, every figure computed by hand."""

import numpy as np
import pytest

from emunet.core.metrics import ObjectScorer, match, object_scores
from emunet.core.objects import components, drop_small, sizes, truth_objects


def test_components_are_4_connected_and_drop_specks():
    mask = np.zeros((8, 8), np.uint8)
    mask[0:3, 0:3] = 1  # 9 px
    mask[3, 3] = 1  # touches it at a corner only: its own object, 1 px, a speck
    mask[5:8, 4:8] = 1  # 12 px
    labels = components(mask, min_size=2)
    assert labels.dtype == np.int32 and labels.max() == 2 and labels[3, 3] == 0
    assert sorted(sizes(labels)) == [9, 12]
    assert components(mask).max() == 3


def test_truth_given_as_ids_keeps_touching_cells_apart():
    truth = np.zeros((4, 6), np.uint16)
    truth[:, 0:3], truth[:, 3:6] = 7, 9  # two cells that touch along a whole column
    assert truth_objects(truth).max() == 1  # as a mask: one component
    ids = truth_objects(truth, instances=True)
    assert ids.max() == 2 and sizes(ids) == [12, 12]
    assert drop_small(np.array([[0, 5, 5, 3]]), 2).tolist() == [[0, 1, 1, 0]]


def test_matching_is_one_to_one_at_iou_one_half():
    truth = np.zeros((10, 10), int)
    truth[0:4, 0:4] = 1  # 16 px
    truth[0:4, 6:10] = 2  # 16 px
    truth[6:10, 0:2] = 3  # 8 px, missed
    pred = np.zeros((10, 10), int)
    pred[0:4, 0:3] = 5  # 12 px inside truth 1: IoU 12 / 16 = 0.75, matched
    pred[0:2, 6:10] = 6  # 8 px inside truth 2: IoU 8 / 16 = 0.5, matched (>= 0.5)
    pred[2:4, 6:10] = 8  # the other half of truth 2: truth 2 is taken, so a false positive
    pred[6:10, 6:10] = 9  # nothing there: a false positive
    counts = match(pred, truth)
    assert counts == {"matched": 2, "predicted": 4, "true": 3, "iou_sum": pytest.approx(1.25)}
    s = object_scores(counts)
    assert s["object_precision"] == pytest.approx(2 / 4) and s["object_recall"] == pytest.approx(2 / 3)
    assert s["object_f1"] == pytest.approx(2 * 2 / (4 + 3))
    assert s["mean_matched_iou"] == pytest.approx(0.625) and s["count_error"] == pytest.approx(1 / 3)


def test_a_merge_finds_neither_cell_and_counts_one_too_few():
    truth = np.zeros((4, 9), int)
    truth[:, 0:4], truth[:, 5:9] = 1, 2  # two cells, a one-pixel membrane between them
    merged = (truth > 0).astype(int)
    merged[:, 4] = 1  # the membrane predicted as cell: one object of 36 px, IoU 16 / 36 with each
    s = object_scores(match(merged, truth))
    assert (s["object_precision"], s["object_recall"], s["object_f1"]) == (0.0, 0.0, 0.0)
    assert s["count_error"] == 0.5
    assert object_scores(match(np.zeros_like(truth), np.zeros_like(truth)))["object_f1"] == 1.0  # nothing to find


def test_rand_error_and_vi_tell_a_split_from_a_merge():
    """One true object of 4 px split into two halves: pairs of pixels in the same true object 4 * 3 = 12,
    in the same predicted one 2 * (2 * 1) = 4, in both 4: adapted Rand error = 1 - 4 / ((12 + 4) / 2) = 0.5.
    VI split = H(pred | truth) = 1 bit, VI merge = 0; the mirror case swaps them."""
    whole, halves = np.array([[1, 1, 1, 1]]), np.array([[1, 1, 2, 2]])
    split = ObjectScorer()
    split.add(halves, whole)
    s = split.scores()
    assert s["adapted_rand_error"] == pytest.approx(0.5)
    assert s["vi_split"] == pytest.approx(1.0) and s["vi_merge"] == pytest.approx(0.0, abs=1e-12)
    merge = ObjectScorer()
    merge.add(whole, halves)
    m = merge.scores()
    assert m["vi_merge"] == pytest.approx(1.0) and m["vi_split"] == pytest.approx(0.0, abs=1e-12)
    perfect = ObjectScorer()
    perfect.add(halves, halves)
    assert perfect.scores()["adapted_rand_error"] == pytest.approx(0.0)


def test_rand_error_ignores_the_true_background_and_slices_stay_apart():
    """The ISBI convention: true background pixels do not count, whatever is predicted there. Two slices
    whose objects carry the same id are still different objects: pooled, the stack scores as each slice."""
    truth = np.array([[0, 0, 1, 1]])
    pred = np.array([[3, 4, 1, 1]])  # extra objects on the true background: ignored by ARE / VI
    scorer = ObjectScorer()
    scorer.add(pred, truth)
    scorer.add(pred, truth)
    s = scorer.scores()
    assert s["adapted_rand_error"] == pytest.approx(0.0) and s["vi_split"] == pytest.approx(0.0, abs=1e-12)
    assert scorer.counts["predicted"] == 6 and scorer.counts["true"] == 2 and scorer.counts["matched"] == 2


def test_pixels_missed_by_every_object_are_not_a_merge_of_their_cells():
    """Two cells, each with half its pixels outside any predicted object (a model with thick membranes):
    nothing is merged. Lumping the missed pixels into one 'background segment' made them one object
    spanning both cells, a merge error as large as a real merge's."""
    truth = np.array([[1, 1, 1, 1, 0, 2, 2, 2, 2]])
    pred = np.array([[1, 1, 0, 0, 0, 2, 2, 0, 0]])
    scorer = ObjectScorer()
    scorer.add(pred, truth)
    s = scorer.scores()
    assert s["vi_merge"] == pytest.approx(0.0, abs=1e-12)
    # 8 pixels; each cell: 2 kept together, 2 alone. H(pred | truth) = 1.5 bits per pixel of a cell.
    assert s["vi_split"] == pytest.approx(1.5)
    # Same-segment pairs (ordered, i != j): truth 2 * 4 * 3 = 24, pred 2 * 2 * 1 = 4, both 4.
    assert s["adapted_rand_error"] == pytest.approx(1 - 4 / ((24 + 4) / 2))


def test_rand_error_and_vi_equal_scikit_images_on_whole_images():
    """The scorer keeps a table, not pixels; its figures must be scikit-image's own, computed on the
    pixels, with the true background ignored and every missed pixel given a label of its own."""
    from skimage.metrics import adapted_rand_error, variation_of_information

    rng = np.random.default_rng(4)
    truth = rng.integers(0, 6, (3, 20, 20))
    pred = rng.integers(0, 5, (3, 20, 20))
    scorer = ObjectScorer()
    for p, t in zip(pred, truth):
        scorer.add(p, t)
    s = scorer.scores()
    # The same on the pixels: slices' ids made distinct, missed pixels numbered one by one.
    t_all = np.concatenate([t.ravel() + 10 * z for z, t in enumerate(truth)])
    p_all = np.concatenate([p.ravel() + 10 * z for z, p in enumerate(pred)])
    keep = np.concatenate([t.ravel() > 0 for t in truth])
    missed = np.concatenate([p.ravel() == 0 for p in pred])[keep]
    t_fg, p_fg = t_all[keep], p_all[keep]
    p_fg[missed] = 1000 + np.arange(missed.sum())
    assert s["adapted_rand_error"] == pytest.approx(adapted_rand_error(t_fg, p_fg)[0])
    split, merge = variation_of_information(t_fg, p_fg)  # H(pred | truth), H(truth | pred), in bits
    assert s["vi_split"] == pytest.approx(split) and s["vi_merge"] == pytest.approx(merge)


def test_object_measures_and_sizes_equal_a_plain_count_on_real_slices():
    """`ObjectMeasures` (sums over the objects' pixels by flat index on a sparse slice, over every pixel a
    band of rows at a time on a dense one) and `sizes` against a plain count, object by object: ISBI's
    cells (most of each slice) and VNC's mitochondria (a few % of it, an empty slice among them)."""
    from emunet.core.objects import ObjectMeasures
    from emunet.inference.instances import label_instances
    from tests.test_instances import isbi_like_probabilities, vnc_like_probabilities

    for probs in (isbi_like_probabilities(slice(0, 3)), vnc_like_probabilities(slice(0, 3))):
        ids = label_instances(probs, 0.5, 0.9, 20).astype(np.int64)
        measures = ObjectMeasures((50, 4, 4), "nm")
        for z, plane in enumerate(ids):
            measures.add(z, plane)
            assert sizes(plane) == [int((plane == i).sum()) for i in np.unique(plane) if i > 0]
        rows = measures.rows()
        assert [r[0] for r in rows] == [int(i) for i in np.unique(ids) if i > 0] and len(rows) > 20
        for row in rows:
            zs, ys, xs = np.nonzero(ids == row[0])
            centre = [int(c.sum()) / len(zs) for c in (zs, ys, xs)]
            assert row[1:7] == [len(zs), zs.min(), zs.max(), *(round(c, 2) for c in centre)]
            assert row[7] == float(f"{len(zs) * 50 * 4 * 4:.6g}") and row[8:] == [
                float(f"{c * s:.6g}") for c, s in zip(centre, (50, 4, 4))] + ["nm"]
