import numpy as np
import pytest

from emunet.core.metrics import confusion, per_slice_scores, scores_from_counts, stack_scores


def test_hand_computed_3x3():
    truth = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    pred = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0]])
    assert confusion(pred, truth) == (2, 1, 1, 5)
    s = stack_scores(pred, truth)
    assert s["dice"] == pytest.approx(4 / 6)
    assert s["iou"] == pytest.approx(2 / 4)
    assert s["pixel_accuracy"] == pytest.approx(7 / 9)
    assert s["precision"] == pytest.approx(2 / 3)
    assert s["recall"] == pytest.approx(2 / 3)
    assert s["median_slice_accuracy"] == pytest.approx(7 / 9)


def test_empty_cases_follow_the_documented_conventions():
    empty = np.zeros((3, 3))
    assert scores_from_counts(*confusion(empty, empty)) == {
        "dice": 1.0, "iou": 1.0, "pixel_accuracy": 1.0, "precision": 1.0, "recall": 1.0}
    full = np.ones((3, 3))
    s = scores_from_counts(*confusion(empty, full))  # nothing found, 9 to find
    assert (s["dice"], s["recall"], s["precision"], s["pixel_accuracy"]) == (0.0, 0.0, 1.0, 0.0)


def test_median_slice_accuracy_is_median_of_slices_not_pooled():
    truth = np.zeros((3, 2, 2), int)
    pred = truth.copy()
    pred[0] = 1  # slice 0 all wrong, slices 1 and 2 perfect
    s = stack_scores(pred, truth)
    assert s["pixel_accuracy"] == pytest.approx(8 / 12)
    assert s["median_slice_accuracy"] == 1.0
    rows = per_slice_scores(pred, truth)
    assert [r["pixel_accuracy"] for r in rows] == [0.0, 1.0, 1.0]


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        confusion(np.zeros((2, 2)), np.zeros((2, 3)))
