"""Segmentation scores computed from binary masks with NumPy: the numbers logged as `val_*` and `test_*`.

Conventions for empty cases (so that a slice with nothing to find, and nothing found, scores perfectly):
Dice and IoU are 1 when both masks are empty; precision is 1 when nothing is predicted; recall is 1
when there is nothing to find.
"""

import numpy as np

METRIC_NAMES = ("dice", "iou", "pixel_accuracy", "median_slice_accuracy", "precision", "recall")


def confusion(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int, int, int]:
    """`(tp, fp, fn, tn)` pixel counts of two boolean (or 0/1) masks of the same shape."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction has shape {pred.shape} but truth has {truth.shape}")
    tp = int(np.count_nonzero(pred & truth))
    fp = int(np.count_nonzero(pred)) - tp
    fn = int(np.count_nonzero(truth)) - tp
    return tp, fp, fn, pred.size - tp - fp - fn


def _ratio(num: float, den: float) -> float:
    return 1.0 if den == 0 else num / den


def scores_from_counts(tp: int, fp: int, fn: int, tn: int) -> dict[str, float]:
    """Dice, IoU, pixel accuracy, precision and recall from pixel counts."""
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "iou": _ratio(tp, tp + fp + fn),
        "pixel_accuracy": _ratio(tp + tn, tp + fp + fn + tn),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
    }


def per_slice_scores(pred: np.ndarray, truth: np.ndarray) -> list[dict[str, float]]:
    """Scores of each slice of `(Z, H, W)` masks, each with its counts (`tp`, `fp`, `fn`, `tn`)."""
    rows = []
    for z in range(truth.shape[0]):
        counts = confusion(pred[z], truth[z])
        rows.append({"slice": z, **scores_from_counts(*counts), **dict(zip(("tp", "fp", "fn", "tn"), counts))})
    return rows


def stack_scores(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Scores of `(Z, H, W)` (or `(H, W)`) masks pooled over all pixels, plus `median_slice_accuracy`,
    the median over slices of per-slice pixel accuracy (the original study's headline figure)."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if truth.ndim == 2:
        pred, truth = pred[None], truth[None]
    rows = per_slice_scores(pred, truth)
    totals = [sum(r[k] for r in rows) for k in ("tp", "fp", "fn", "tn")]
    return {**scores_from_counts(*totals),
            "median_slice_accuracy": float(np.median([r["pixel_accuracy"] for r in rows]))}
