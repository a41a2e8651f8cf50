"""Scores of a predicted stack for the page and for download: per-slice rows (Dice, IoU, accuracy,
objects found), whole-stack scores (pixels and objects), the per-slice CSV and the mask TIFF. The numbers
are those of `emunet.core.metrics`, and the objects those of `output="labels"` and of `predict`'s
`<name>_objects.csv`: touching cells separated by `emunet.inference.instances.slice_instances`."""

import numpy as np

from emunet.core.metrics import ObjectScorer, per_slice_scores, stack_scores
from emunet.core.objects import truth_objects
from emunet.inference.instances import slice_instances
from emunet.inference.outputs import rows_to_csv
from emunet.inference.segmenter import DEFAULT_PARAMS

MIN_OBJECT_SIZE = DEFAULT_PARAMS["min_object_size"]  # the same cut as predict's object counts
SEED_THRESHOLD = DEFAULT_PARAMS["seed_threshold"]
# Columns of the table on the page (the CSV has these and the pixel counts).
TABLE_COLUMNS = ("slice", "dice", "iou", "pixel_accuracy", "precision", "recall", "objects", "objects_truth",
                 "objects_matched")


def instances(prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """The objects of one `(H, W)` probability map (or {0, 1} mask) as `output="labels"` finds them."""
    return slice_instances(prob, threshold, SEED_THRESHOLD, MIN_OBJECT_SIZE)


def _scored(prob, truth, threshold: float):
    """`(per-slice rows, ObjectScorer)` of a `(Z, H, W)` probability (or mask) stack."""
    prob = np.asarray(prob, np.float32)
    pixels = per_slice_scores(prob >= threshold, np.asarray(truth, bool)) if truth is not None else None
    scorer, rows = ObjectScorer(), []
    for z in range(prob.shape[0]):
        found = instances(prob[z], threshold)
        row = {"slice": z}
        if truth is not None:
            row.update({k: v for k, v in pixels[z].items() if k != "slice"})
            counts = scorer.add(found, truth_objects(truth[z], MIN_OBJECT_SIZE))
            row.update(objects=counts["predicted"], objects_truth=counts["true"], objects_matched=counts["matched"])
        else:
            row["objects"] = int(found.max(initial=0))
        rows.append(row)
    return rows, scorer


def slice_rows(prob: np.ndarray, truth: np.ndarray | None = None, model: str = "", threshold: float = 0.5) -> list[dict]:
    """One row per slice of a `(Z, H, W)` probability stack (a {0, 1} mask works too): `slice`,
    `objects` (predicted) and, with a ground-truth `truth` of the same shape, `objects_truth`,
    `objects_matched` (IoU >= 0.5, one to one), `dice`, `iou`, `pixel_accuracy`, `precision`, `recall`
    and the pixel counts `tp`, `fp`, `fn`, `tn`. With `model`, each row starts with a `model` column."""
    rows = _scored(prob, truth, threshold)[0]
    return [{"model": model, **row} for row in rows] if model else rows


def summary(prob: np.ndarray, truth: np.ndarray | None = None, threshold: float = 0.5) -> dict[str, float]:
    """Whole-stack numbers: with ground truth, `stack_scores` (pixels pooled over all voxels, the median
    slice accuracy) and the object scores (object F1, precision, recall, count error...); always the
    mean number of objects per slice (predicted, and true)."""
    prob = np.asarray(prob, np.float32)
    rows, scorer = _scored(prob, truth, threshold)
    out = {}
    if truth is not None:
        out.update(stack_scores(prob >= threshold, truth))
        out.update(scorer.scores())
        out["objects_per_slice_truth"] = float(np.mean([r["objects_truth"] for r in rows]))
    out["objects_per_slice"] = float(np.mean([r["objects"] for r in rows]))
    return out


def slice_caption(z: int, total: int, row: dict) -> str:
    """The line above a slice's panels: `Slice 3 (0–11) · Dice …` from its row of `slice_rows`."""
    text = f"Slice {z} (0–{total - 1})"
    if "dice" in row:
        text += (f" · Dice {row['dice']:.3f} · IoU {row['iou']:.3f} · accuracy {row['pixel_accuracy']:.3f}"
                 f" · objects {row['objects']} predicted, {row['objects_truth']} true, {row['objects_matched']} found")
    else:
        text += f" · {row['objects']} objects predicted"
    return text


def scores_csv(rows: list[dict]) -> bytes:
    """The per-slice rows as CSV bytes (UTF-8), header first."""
    return rows_to_csv(rows).encode()
