"""Segmentation scores computed from binary masks with NumPy: the numbers logged as `val_*` and `test_*`.

Conventions for empty cases (so that a slice with nothing to find, and nothing found, scores perfectly):
Dice and IoU are 1 when both masks are empty; precision is 1 when nothing is predicted; recall is 1
when there is nothing to find.

Sparse labels: pixel scores take an optional `annotated` mask of the same shape; pixels outside it are
not counted at all (neither right nor wrong), and a slice without any annotated pixel is left out of
`median_slice_accuracy`.
"""

import numpy as np

METRIC_NAMES = ("dice", "iou", "pixel_accuracy", "median_slice_accuracy", "precision", "recall")


def confusion(pred: np.ndarray, truth: np.ndarray, annotated: np.ndarray | None = None) -> tuple[int, int, int, int]:
    """`(tp, fp, fn, tn)` pixel counts of two boolean (or 0/1) masks of the same shape, over the
    `annotated` pixels only if given (a boolean mask of that shape)."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction has shape {pred.shape} but truth has {truth.shape}")
    size = pred.size
    if annotated is not None:
        annotated = np.asarray(annotated, bool)
        pred, truth, size = pred & annotated, truth & annotated, int(np.count_nonzero(annotated))
    tp = int(np.count_nonzero(pred & truth))
    fp = int(np.count_nonzero(pred)) - tp
    fn = int(np.count_nonzero(truth)) - tp
    return tp, fp, fn, size - tp - fp - fn


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


def per_slice_scores(pred: np.ndarray, truth: np.ndarray,
                     annotated: np.ndarray | None = None) -> list[dict[str, float]]:
    """Scores of each slice of `(Z, H, W)` masks, each with its counts (`tp`, `fp`, `fn`, `tn`; over the
    `annotated` pixels if given: a slice with none has all four 0)."""
    rows = []
    for z in range(truth.shape[0]):
        counts = confusion(pred[z], truth[z], None if annotated is None else annotated[z])
        rows.append({"slice": z, **scores_from_counts(*counts), **dict(zip(("tp", "fp", "fn", "tn"), counts))})
    return rows


def median_slice_accuracy(rows: list[dict[str, float]]) -> float:
    """Median pixel accuracy of `per_slice_scores` rows, over the slices with an annotated pixel (1 if none)."""
    counted = [r["pixel_accuracy"] for r in rows if r["tp"] + r["fp"] + r["fn"] + r["tn"]]
    return float(np.median(counted)) if counted else 1.0


def stack_scores(pred: np.ndarray, truth: np.ndarray, annotated: np.ndarray | None = None) -> dict[str, float]:
    """Scores of `(Z, H, W)` (or `(H, W)`) masks pooled over all pixels (the `annotated` ones if given),
    plus `median_slice_accuracy`, the median over slices of per-slice pixel accuracy (the original
    study's headline figure)."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if truth.ndim == 2:
        pred, truth = pred[None], truth[None]
        annotated = None if annotated is None else np.asarray(annotated)[None]
    rows = per_slice_scores(pred, truth, annotated)
    totals = [sum(r[k] for r in rows) for k in ("tp", "fp", "fn", "tn")]
    return {**scores_from_counts(*totals), "median_slice_accuracy": median_slice_accuracy(rows)}


# --- objects -------------------------------------------------------------------------------------------

OBJECT_METRIC_NAMES = ("object_precision", "object_recall", "object_f1", "mean_matched_iou", "count_error")
SEGMENTATION_METRIC_NAMES = ("adapted_rand_error", "vi_split", "vi_merge")
MATCH_IOU = 0.5  # an object is found when a predicted object covers it with IoU >= 0.5, one to one
# Object scores of a set with no fully annotated slice: not measured (objects are scored only on slices
# annotated in full, see `emunet.core.dataset.fully_annotated`), rather than a perfect score for nothing.
UNMEASURED_OBJECTS = {name: float("nan") for name in (*OBJECT_METRIC_NAMES, *SEGMENTATION_METRIC_NAMES)}


def match(pred: np.ndarray, truth: np.ndarray, threshold: float = MATCH_IOU) -> dict[str, float]:
    """One-to-one matches between the objects of two label images of the same shape (0 = background).

    Pairs with IoU >= `threshold` are matched greedily by decreasing IoU (above 0.5 a pair is unique
    anyway). Returns counts: `matched`, `predicted`, `true` objects and `iou_sum` of the matches."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction has shape {pred.shape} but truth has {truth.shape}")
    p_ids, p = np.unique(pred, return_inverse=True)
    t_ids, t = np.unique(truth, return_inverse=True)
    p, t = p.reshape(-1), t.reshape(-1)
    counts = {"matched": 0, "predicted": int(np.count_nonzero(p_ids)), "true": int(np.count_nonzero(t_ids)),
              "iou_sum": 0.0}
    if not counts["predicted"] or not counts["true"]:
        return counts
    both = (pred.reshape(-1) != 0) & (truth.reshape(-1) != 0)
    pairs, inter = np.unique(t[both].astype(np.int64) * len(p_ids) + p[both], return_counts=True)
    ti, pi = np.divmod(pairs, len(p_ids))
    area_t, area_p = np.bincount(t, minlength=len(t_ids)), np.bincount(p, minlength=len(p_ids))
    iou = inter / (area_t[ti] + area_p[pi] - inter)
    used_t, used_p = set(), set()
    for k in np.argsort(-iou, kind="stable"):
        if iou[k] < threshold:
            break
        if ti[k] in used_t or pi[k] in used_p:
            continue
        used_t.add(ti[k])
        used_p.add(pi[k])
        counts["matched"] += 1
        counts["iou_sum"] += float(iou[k])
    return counts


def object_scores(counts: dict[str, float]) -> dict[str, float]:
    """Object precision, recall, F1 (matches at IoU >= 0.5), the mean IoU of the matches and the count
    error |predicted - true| / true, from `match` counts (summed over slices or stacks). Nothing to find
    and nothing found scores perfectly."""
    matched, predicted, true = counts["matched"], counts["predicted"], counts["true"]
    precision, recall = _ratio(matched, predicted), _ratio(matched, true)
    return {"object_precision": precision, "object_recall": recall,
            "object_f1": _ratio(2 * matched, predicted + true),
            "mean_matched_iou": counts["iou_sum"] / matched if matched else float(predicted == true == 0),
            "count_error": abs(predicted - true) / max(true, 1)}


def add_counts(total: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
    return {k: total.get(k, 0) + v for k, v in counts.items()}


class ObjectScorer:
    """Object scores of a stack, accumulated slice by slice (so a stack never has to be held): `add`
    each slice's predicted and true label images, then `scores()`.

    - `object_precision`, `object_recall`, `object_f1`, `mean_matched_iou`, `count_error`: objects of
      each slice matched one to one at IoU >= 0.5 (`match`), pooled over slices.
    - `adapted_rand_error`, `vi_split`, `vi_merge`: the ISBI 2012 challenge's measures, restricted to the
      true foreground (true background pixels are ignored, as the challenge did), pooled over the stack
      with every slice's objects distinct; a true-foreground pixel in no predicted object is a segment of
      its own (missed pixels are splits, never a merge of the cells they belong to). `vi_split` is
      H(pred | truth), over-segmentation; `vi_merge` is H(truth | pred), under-segmentation: touching
      cells merged. Lower is better; 0 is perfect.
    """

    def __init__(self):
        self.counts = {"matched": 0, "predicted": 0, "true": 0, "iou_sum": 0.0}
        self._pairs: list[np.ndarray] = []  # (true id, predicted id, pixels) of the stack-wide table
        self._lone: list[np.ndarray] = []  # (true id, pixels in no predicted object)
        self._offsets = [0, 0]

    def add(self, pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
        """Count one slice; returns its own `match` counts."""
        pred, truth = np.asarray(pred, np.int64), np.asarray(truth, np.int64)
        counts = match(pred, truth)
        self.counts = add_counts(self.counts, counts)
        inside = truth.ravel() > 0
        t = truth.ravel()[inside] + self._offsets[0]
        p = pred.ravel()[inside] + self._offsets[1]
        found = pred.ravel()[inside] > 0
        if found.any():  # the contingency table of (true object, predicted object) pixel counts
            width = int(p.max()) + 1
            pairs, pixels = np.unique(t[found] * width + p[found], return_counts=True)
            self._pairs.append(np.stack([pairs // width, pairs % width, pixels]))
        if (~found).any():  # missed pixels: counted per true object, each its own segment (see `scores`)
            ids, pixels = np.unique(t[~found], return_counts=True)
            self._lone.append(np.stack([ids, pixels]))
        self._offsets[0] += int(truth.max(initial=0))
        self._offsets[1] += int(pred.max(initial=0))
        return counts

    def segmentation_errors(self) -> dict[str, float]:
        """Adapted Rand error and VI split / merge of everything added (the formulas of scikit-image's
        `adapted_rand_error` and `variation_of_information`, in bits), computed from the table kept
        by `add` plus the missed pixels as singletons, so that memory stays with the number of objects,
        not of pixels."""
        pairs = np.concatenate(self._pairs, axis=1) if self._pairs else np.zeros((3, 0), np.int64)
        lone = np.concatenate(self._lone, axis=1) if self._lone else np.zeros((2, 0), np.int64)
        rows, cols, n = pairs[0], pairs[1], pairs[2].astype(np.float64)
        lone_ids, lone_n = lone[0], lone[1].astype(np.float64)
        total = n.sum() + lone_n.sum()
        if not total:
            return {"adapted_rand_error": 0.0, "vi_split": 0.0, "vi_merge": 0.0}
        true_ids, where = np.unique(np.concatenate([rows, lone_ids]), return_inverse=True)
        a = np.bincount(where, weights=np.concatenate([n, lone_n]), minlength=len(true_ids))
        a_row, a_lone = a[where[:len(rows)]], a[where[len(rows):]]
        b = np.bincount(np.unique(cols, return_inverse=True)[1], weights=n) if len(cols) else np.zeros(0)
        b_col = b[np.unique(cols, return_inverse=True)[1]] if len(cols) else np.zeros(0)
        same_both = n @ n + lone_n.sum() - total  # ordered pairs of pixels together in truth and prediction
        same_true, same_pred = a @ a - total, b @ b + lone_n.sum() - total
        denominator = 0.5 * (same_true + same_pred)
        error = 1.0 - same_both / denominator if denominator else 0.0
        split = -(n / total) @ np.log2(n / a_row) + (lone_n / total) @ np.log2(a_lone)
        merge = -(n / total) @ np.log2(n / b_col) if len(n) else 0.0
        return {"adapted_rand_error": float(error), "vi_split": float(max(split, 0.0)),
                "vi_merge": float(max(merge, 0.0))}

    def scores(self) -> dict[str, float]:
        return {**object_scores(self.counts), **self.segmentation_errors()}
