"""Scores of a predicted stack for the page and for download: per-slice rows (Dice, IoU, accuracy,
object counts), whole-stack scores, the per-slice CSV and the mask TIFF. The numbers are those of
`emunet.core.metrics` and the object counts those of `predict`'s `<name>_objects.csv`."""

import numpy as np

from emunet.core.metrics import per_slice_scores, stack_scores
from emunet.inference.instances import object_areas
from emunet.inference.outputs import rows_to_csv
from emunet.inference.segmenter import DEFAULT_PARAMS

MIN_OBJECT_SIZE = DEFAULT_PARAMS["min_object_size"]  # the same cut as predict's object counts
# Columns of the table on the page (the CSV has these and the pixel counts).
TABLE_COLUMNS = ("slice", "dice", "iou", "pixel_accuracy", "precision", "recall", "objects", "objects_truth")


def count_objects(mask: np.ndarray, min_size: int = MIN_OBJECT_SIZE) -> int:
    """Number of 8-connected foreground components of a `(H, W)` mask with at least `min_size` pixels."""
    return len(object_areas(mask, min_size))


def slice_rows(pred: np.ndarray, truth: np.ndarray | None = None, model: str = "") -> list[dict]:
    """One row per slice of a `(Z, H, W)` {0, 1} prediction: `slice`, `objects` (predicted) and, with a
    ground-truth `truth` of the same shape, `objects_truth`, `dice`, `iou`, `pixel_accuracy`,
    `precision`, `recall` and the pixel counts `tp`, `fp`, `fn`, `tn`. With `model`, each row starts
    with a `model` column (to tell two models apart in one CSV)."""
    pred = np.asarray(pred, bool)
    scored = per_slice_scores(pred, np.asarray(truth, bool)) if truth is not None else None
    rows = []
    for z in range(pred.shape[0]):
        row = {"model": model} if model else {}
        row["slice"] = z
        if scored is not None:
            row.update({k: v for k, v in scored[z].items() if k != "slice"})
            row["objects_truth"] = count_objects(truth[z])
        row["objects"] = count_objects(pred[z])
        rows.append(row)
    return rows


def summary(pred: np.ndarray, truth: np.ndarray | None = None) -> dict[str, float]:
    """Whole-stack numbers: `stack_scores` (pooled over all voxels, plus the median slice accuracy) when
    there is ground truth, and the mean number of objects per slice (predicted, and true)."""
    pred = np.asarray(pred, bool)
    out = dict(stack_scores(pred, truth)) if truth is not None else {}
    out["objects_per_slice"] = float(np.mean([count_objects(p) for p in pred]))
    if truth is not None:
        out["objects_per_slice_truth"] = float(np.mean([count_objects(t) for t in np.asarray(truth, bool)]))
    return out


def scores_csv(rows: list[dict]) -> bytes:
    """The per-slice rows as CSV bytes (UTF-8), header first."""
    return rows_to_csv(rows).encode()

