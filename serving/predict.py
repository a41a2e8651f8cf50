"""`predict` entry point: segment stacks with a registered (or any logged) model and write the results.

    python -m serving.predict --input stack.tif --output_dir predictions
    python -m serving.predict --model_uri models:/em-unet/3 --input a.tif,b.tif --labels a_gt.tif,b_gt.tif

For each input `<name>` it writes `<name>_mask.tif` (uint8, 0 / 255), optionally `<name>_prob.tif`
(float32), and `<name>_objects.csv` (per slice: object count and areas). Results are written slice by
slice to `.partial` files that are renamed only when complete. With `labels`, the prediction is also
scored and the scores are logged to MLflow.
"""

import csv
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import cv2
import mlflow
import numpy as np
import tifffile
from tqdm import tqdm

from pipeline.cli import run_entry
from pipeline.errors import InputError
from pipeline.evaluate import load_segmenter
from pipeline.io import TiffStack, lazy_stack, list_stack_paths, read_mask
from pipeline.metrics import per_slice_scores, scores_from_counts
from pipeline.tracking import DEFAULT_EXPERIMENT, log_config, step_run
from serving.segmenter import DEFAULT_PARAMS


@dataclass(frozen=True)
class PredictConfig:
    """Segment stacks with a logged model and write masks, probabilities and object tables."""

    model_uri: str = "models:/em-unet@champion"
    input: str = ""  # stack files or folders of slices, comma-separated
    output_dir: str = "predictions"
    labels: str = ""  # optional ground truth, same order as `input`: scores are logged to MLflow
    threshold: float = DEFAULT_PARAMS["threshold"]
    tile_size: int = DEFAULT_PARAMS["tile_size"]
    overlap: float = DEFAULT_PARAMS["overlap"]
    batch_size: int = DEFAULT_PARAMS["batch_size"]
    tta: str = DEFAULT_PARAMS["tta"]  # "flips" or "d4": averaged over 4 or 8 views, 4x or 8x the time
    save_probability: bool = False  # also write <name>_prob.tif (float32, 4x the mask's size)
    min_object_size: int = 20  # pixels; smaller connected components are not counted as objects
    experiment: str = DEFAULT_EXPERIMENT


def objects(mask: np.ndarray, min_size: int) -> list[int]:
    """Areas of the 8-connected foreground components of a `(H, W)` mask, at least `min_size` pixels."""
    _, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return [int(a) for a in stats[1:, cv2.CC_STAT_AREA] if a >= min_size]


def predict_stack(segmenter, stack: np.ndarray, name: str, cfg: PredictConfig, out_dir: Path,
                  truth: np.ndarray | None = None) -> list[dict]:
    """Segment a raw `(Z, H, W)` stack slice by slice, writing `<name>_*` files as slices come. Returns
    per-slice score rows (empty without `truth`)."""
    targets = {"mask": out_dir / f"{name}_mask.tif", "objects": out_dir / f"{name}_objects.csv"}
    if cfg.save_probability:
        targets["prob"] = out_dir / f"{name}_prob.tif"
    partial = {k: v.with_name(v.name + ".partial") for k, v in targets.items()}
    probs = segmenter.iter_probabilities(stack, threshold=cfg.threshold, tile_size=cfg.tile_size,
                                         overlap=cfg.overlap, batch_size=cfg.batch_size, tta=cfg.tta)
    rows = []
    with tifffile.TiffWriter(partial["mask"]) as mask_tif, open(partial["objects"], "w", newline="") as table, \
            (tifffile.TiffWriter(partial["prob"]) if cfg.save_probability else nullcontext()) as prob_tif:
        writer = csv.writer(table)
        writer.writerow(["slice", "objects", "total_area", "mean_area", "areas"])
        for z, prob in enumerate(tqdm(probs, total=len(stack), desc=name, unit="slice")):
            mask = prob >= cfg.threshold
            mask_tif.write(mask.astype(np.uint8) * 255, contiguous=True, photometric="minisblack")
            if cfg.save_probability:
                prob_tif.write(prob.astype(np.float32), contiguous=True, photometric="minisblack")
            areas = objects(mask, cfg.min_object_size)
            writer.writerow([z, len(areas), sum(areas), round(float(np.mean(areas)), 1) if areas else 0,
                             " ".join(map(str, areas))])
            if truth is not None:
                rows.append({"stack": name, **per_slice_scores(mask[None], truth[z][None])[0], "slice": z})
    for key, target in targets.items():
        os.replace(partial[key], target)
    return rows


def predict(cfg: PredictConfig) -> dict:
    """Run the step: returns `{"run_id", "outputs", "metrics"}` (`metrics` is empty without labels)."""
    inputs, labels = list_stack_paths(cfg.input), list_stack_paths(cfg.labels)
    if not inputs:
        raise InputError("no input given: pass input=stack.tif (or several, comma-separated)")
    if labels and len(labels) != len(inputs):
        raise InputError(f"got {len(inputs)} input stacks but {len(labels)} label stacks")
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with step_run("predict", cfg.experiment) as run:
        log_config(cfg)
        segmenter = load_segmenter(cfg.model_uri)
        rows = []
        for i, path in enumerate(inputs):
            stack = lazy_stack(path)  # read slice by slice: memory does not grow with the stack
            truth = read_mask(labels[i], stack, path) if labels else None
            try:
                rows += predict_stack(segmenter, stack, path.stem if path.is_file() else path.name, cfg, out_dir, truth)
            finally:
                if isinstance(stack, TiffStack):
                    stack.close()
        metrics = {}
        if rows:
            totals = [sum(r[k] for r in rows) for k in ("tp", "fp", "fn", "tn")]
            metrics = {**scores_from_counts(*totals),
                       "median_slice_accuracy": float(np.median([r["pixel_accuracy"] for r in rows]))}
            mlflow.log_metrics({f"test_{k}": v for k, v in metrics.items()})
            print("scores: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        print(f"wrote {len(inputs)} segmentation(s) to {out_dir.resolve()}")
        return {"run_id": run.info.run_id, "outputs": sorted(str(p) for p in out_dir.iterdir()), "metrics": metrics}


if __name__ == "__main__":
    run_entry(predict, PredictConfig)
