"""Scores of a predicted stack for the page and for download: per-slice rows (Dice, IoU, accuracy,
objects found), whole-stack scores (pixels and objects), the per-slice CSV. The numbers come from the one
segmentation path (`emunet.inference.segment`) that predict, evaluate and training validation use, on
the page's cached probabilities: the objects are those of `output="labels"` and of predict's
`<name>_objects.csv`."""

import numpy as np

from emunet.inference.outputs import rows_to_csv
from emunet.inference.params import DEFAULTS
from emunet.inference.segment import Truth, VolumeScores, fits_3d, instance_mode, segment_probabilities

MIN_OBJECT_SIZE = DEFAULTS.min_object_size  # the same cut as predict's object counts
# Columns of the table on the page (the CSV has these and the pixel counts).
TABLE_COLUMNS = ("slice", "dice", "iou", "pixel_accuracy", "precision", "recall", "objects", "objects_truth",
                 "objects_matched")


def _results(prob, truth, threshold: float, voxel_size=None, grows: bool = False):
    """The path's results; objects in 3-D where the voxel size says near-isotropic and they fit in memory
    (else slice by slice, as the page's planes fall back too), grown over every voxel where the model
    records so (`grows`: its `grow_over_all`, what predict's `grow_over_all=auto` gives)."""
    params = DEFAULTS.replace(threshold=threshold).settled(grows)
    if instance_mode(params, voxel_size) == "3d" and not fits_3d(np.shape(prob)):
        params = params.replace(instances="2d")
    return segment_probabilities(np.asarray(prob, np.float32), params,
                                 Truth.of_labels(truth) if truth is not None else None, voxel_size=voxel_size)


def instances(prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """The objects of one `(H, W)` probability map (or {0, 1} mask) as `output="labels"` finds them."""
    return next(_results(np.asarray(prob)[None], None, threshold)).objects


def _scored(prob, truth, threshold: float, voxel_size=None, grows: bool = False
            ) -> tuple[list[dict], VolumeScores | None]:
    """`(per-slice rows, VolumeScores or None without truth)` of a `(Z, H, W)` probability (or mask) stack."""
    if truth is None:
        return [{"slice": r.z, "objects": int(r.objects.max(initial=0))}
                for r in _results(prob, None, threshold, voxel_size, grows)], None
    scores = VolumeScores()
    for result in _results(prob, truth, threshold, voxel_size, grows):
        scores.add(result)
    return scores.rows, scores


def slice_rows(prob: np.ndarray, truth: np.ndarray | None = None, model: str = "", threshold: float = 0.5,
               voxel_size=None) -> list[dict]:
    """One row per slice of a `(Z, H, W)` probability stack (a {0, 1} mask works too): `slice`,
    `objects` (predicted) and, with a ground-truth `truth` of the same shape, `objects_truth`,
    `objects_matched` (IoU >= 0.5, one to one), `dice`, `iou`, `pixel_accuracy`, `precision`, `recall`
    and the pixel counts `tp`, `fp`, `fn`, `tn`. With `model`, each row starts with a `model` column."""
    rows = _scored(prob, truth, threshold, voxel_size)[0]
    return [{"model": model, **row} for row in rows] if model else rows


def summary(prob: np.ndarray, truth: np.ndarray | None = None, threshold: float = 0.5, voxel_size=None,
            scored: tuple | None = None) -> dict[str, float]:
    """Whole-stack numbers: with ground truth, the pooled pixel and object scores of the one path
    (`VolumeScores.metrics`); always the mean number of objects per slice (predicted, and true)."""
    rows, scores = scored or _scored(prob, truth, threshold, voxel_size)
    out = {}
    if scores is not None:
        out.update(scores.metrics())
        out["objects_per_slice_truth"] = float(np.mean([r["objects_truth"] for r in rows]))
    out["objects_per_slice"] = float(np.mean([r["objects"] for r in rows]))
    return out


def rows_and_summary(prob: np.ndarray, truth: np.ndarray | None, threshold: float, voxel_size=None,
                     grows: bool = False) -> tuple:
    """`(slice_rows, summary)` from one pass through the path (`grows`: the model's `grow_over_all`)."""
    scored = _scored(prob, truth, threshold, voxel_size, grows)
    return scored[0], summary(prob, truth, threshold, scored=scored)


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
