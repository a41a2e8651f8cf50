"""3-D instance scores: Rand and VI against scikit-image, AP and object F1 by hand, blocks add up."""

import numpy as np
import pytest
from skimage.metrics import adapted_rand_error, variation_of_information

from emunet.core.metrics3d import (METRIC_NAMES_3D, VolumeScorer, average_precision, contingency,
                                   merge_tables, volume_scores)


def _random_case(seed: int = 0):
    """Truth: blocks of cells with some unlabelled voxels; prediction: the truth with a cell split, two
    merged, and holes (voxels in no predicted object) inside the true foreground."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.repeat(np.repeat(rng.integers(1, 9, (3, 4, 4)), 2, 0), 3, 1), 3, 2).astype(np.int32)
    truth[rng.random(truth.shape) < 0.05] = 0
    pred = truth.copy() * 10
    pred[pred == 20] = 30  # merge
    pred[(pred == 40) & (np.arange(12)[None, None, :] < 6)] = 45  # split
    pred[rng.random(truth.shape) < 0.1] = 0  # misses
    return truth, pred


def test_rand_and_vi_equal_scikit_image_with_missed_voxels_as_singletons():
    truth, pred = _random_case()
    # scikit-image counts predicted id 0 as one segment; ours makes each missed true voxel its own
    # segment: give them unique ids for the reference. Its `ignore_labels` drops true 0, as ours does.
    reference = pred.copy()
    holes = (pred == 0) & (truth > 0)
    reference[holes] = 1000 + np.arange(int(holes.sum()))
    are, _, _ = adapted_rand_error(truth, reference, ignore_labels=(0,))
    split, merge = variation_of_information(truth, reference, ignore_labels=(0,))  # H(pred|truth), H(truth|pred)
    s = volume_scores(truth, pred)
    assert s["adapted_rand_error_3d"] == pytest.approx(are, abs=1e-12)
    assert s["vi_split_3d"] == pytest.approx(split, abs=1e-12)
    assert s["vi_merge_3d"] == pytest.approx(merge, abs=1e-12)
    assert s["vi_split_3d"] > 0 and s["vi_merge_3d"] > 0  # the case has both errors: the test can fail


def _three_true_four_predicted():
    """Along x of a (1, 1, 40) volume: true T1 = 0:10, T2 = 10:20, T3 = 30:36; predicted P1 = 0:10 (IoU 1
    with T1), P2 = 10:16 (0.6 with T2), P3 = 20:28 (nothing), P4 = 31:35 (4/6 with T3)."""
    truth, pred = np.zeros((1, 1, 40), np.int32), np.zeros((1, 1, 40), np.int32)
    for i, (a, b) in enumerate([(0, 10), (10, 20), (30, 36)], start=1):
        truth[..., a:b] = i
    for i, (a, b) in enumerate([(0, 10), (10, 16), (20, 28), (31, 35)], start=1):
        pred[..., a:b] = i
    return truth, pred


def test_ap_at_50_and_75_by_hand():
    truth, pred = _three_true_four_predicted()
    table = contingency(truth, pred)
    # Ranked by size: P1 (10) hit, P3 (8) miss, P2 (6) hit, P4 (4) hit at IoU 0.5: recall 1/3, 1/3, 2/3, 1
    # with precision 1, 1/2, 2/3, 3/4, whose envelope is 1, 3/4, 3/4, 3/4. Of the 101 recall points,
    # 0.00..0.33 (34) read 1 and 0.34..1.00 (67) read 3/4.
    assert average_precision(table, 0.5) == pytest.approx((34 * 1 + 67 * 0.75) / 101)
    # At 0.75 only P1 is a hit: recall stays 1/3, so the 34 points up to 0.33 read 1, the rest 0.
    assert average_precision(table, 0.75) == pytest.approx(34 / 101)
    s = volume_scores(truth, pred)
    assert s["ap50_3d"] == pytest.approx(0.8341584158) and s["ap75_3d"] == pytest.approx(0.3366336634)
    assert s["object_precision_3d"] == 0.75 and s["object_recall_3d"] == 1.0
    assert s["object_f1_3d"] == pytest.approx(6 / 7)
    assert s["rand_fscore_3d"] == pytest.approx(1 - s["adapted_rand_error_3d"]) and 0 < s["rand_fscore_3d"] < 1
    assert tuple(s) == tuple(sorted(s, key=METRIC_NAMES_3D.index))  # every name, in the listed order
    assert set(s) == set(METRIC_NAMES_3D)


def test_ap_matches_each_true_object_once_in_rank_order():
    truth = np.zeros((1, 1, 20), np.int32)
    truth[..., :10] = 1
    pred = np.zeros_like(truth)
    pred[..., :8], pred[..., 8:10] = 1, 2  # P1 covers T1 (0.8); P2 (0.2) is a miss
    pred2 = pred.copy()
    pred2[..., :10] = 1
    pred2[..., 10:12] = 2  # a second prediction of nothing
    assert average_precision(contingency(truth, pred), 0.5) == 1.0  # the miss ranks after full recall
    assert average_precision(contingency(truth, truth), 0.75) == 1.0
    assert average_precision(contingency(np.zeros_like(truth), np.zeros_like(truth)), 0.5) == 1.0
    assert average_precision(contingency(np.zeros_like(truth), pred), 0.5) == 0.0
    assert average_precision(contingency(truth, np.zeros_like(truth)), 0.5) == 0.0


def test_scores_of_blocks_add_up_to_the_whole_volume():
    truth, pred = _random_case(1)
    scorer = VolumeScorer()
    for z in range(0, truth.shape[0], 2):
        for y in (slice(0, 5), slice(5, None)):  # uneven blocks in z and y
            scorer.add(truth[z:z + 2, y], pred[z:z + 2, y])
    assert scorer.scores() == pytest.approx(volume_scores(truth, pred))
    assert np.array_equal(scorer.table(), merge_tables(contingency(truth, pred)))


def test_perfect_and_large_id_predictions():
    truth, _ = _random_case(2)
    big = np.where(truth > 0, truth.astype(np.int64) + 3_000_000_000, 0)  # ids past the dense table
    s = volume_scores(truth, big)
    assert s["adapted_rand_error_3d"] == 0 and s["vi_split_3d"] == 0 and s["vi_merge_3d"] == 0
    assert s["object_f1_3d"] == 1 and s["ap50_3d"] == 1 and s["ap75_3d"] == 1
    with pytest.raises(ValueError, match="shape"):
        contingency(truth, truth[:1])


def test_true_specks_are_left_out_over_the_whole_table_not_per_block():
    truth, pred = _three_true_four_predicted()
    truth[..., 38:40] = 9  # a 2-voxel true fragment, cut in two by the blocks below
    scorer = VolumeScorer()
    scorer.add(truth[..., :39], pred[..., :39])
    scorer.add(truth[..., 39:], pred[..., 39:])
    assert scorer.scores()["object_recall_3d"] == 0.75  # the fragment is a true object nobody found
    assert scorer.scores(min_size=2)["object_recall_3d"] == 0.75  # 2 voxels in all: kept
    assert scorer.scores(min_size=3) == pytest.approx(volume_scores(np.where(truth == 9, 0, truth), pred))
