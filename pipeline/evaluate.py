"""`evaluate` entry point: segment the held-out stacks at full size with the logged pyfunc, log `test_*`
metrics (pixels: Dice, IoU...; objects: object F1, count error, adapted Rand error, VI...), a per-slice
CSV and overlays, register the model and move the `champion` alias if it is better on `champion_metric`.

    python -m pipeline.evaluate --model_uri runs:/<train run>/model --dataset_uri runs:/<preprocess run>/dataset
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient
from tqdm import tqdm

from emunet.registry.champion import (AUTO, CHAMPION_METRICS, PIXEL_CHAMPION_METRICS, choose_champion_metric,
                                       promote_if_better)
from emunet.registry.cli import run_entry
from emunet.core.dataset import (dense_instances, fully_annotated, is_sparse, mask_parts, open_ids, open_stack,
                                 read_manifest, seen_in_3d, stacks_in)
from emunet.core.errors import InputError
from emunet.core.normalize import normalize
from emunet.core.overlay import montage, overlay
from emunet.registry.tracking import DEFAULT_EXPERIMENT, load_segmenter, local_artifact, log_config, step_run
from emunet.inference.outputs import rows_to_csv
from emunet.inference.params import DEFAULTS, SegmentParams
from emunet.inference.segment import Truth, VolumeScores, segment_volume

DEFAULT_MODEL_NAME = "em-unet"
DEFAULT_ALIAS = "champion"
LINEAGE_TAGS = ("init_model", "init_run_id")  # train run tags of a fine-tuned model, copied to its version


@dataclass(frozen=True)
class EvaluateConfig:
    """Score a trained model on the held-out stacks and register it."""

    model_uri: str = ""  # pyfunc segmenter: runs:/<train run id>/model or models:/em-unet/3
    dataset_uri: str = ""  # dataset artifact whose `val` stacks are scored
    registered_model: str = DEFAULT_MODEL_NAME
    alias: str = DEFAULT_ALIAS  # moved to the new version only if its test_<champion_metric> is the best
    champion_metric: str = AUTO  # auto: object_f1_3d where cells are found in 3-D (near-isotropic, fully annotated data), else object_f1; or dice, iou, mean_matched_iou, pixel_accuracy, ... (see CHAMPION_METRICS)
    threshold: float = DEFAULTS.threshold
    tile_size: int = DEFAULTS.tile_size
    min_object_size: int = DEFAULTS.min_object_size  # true and predicted objects: at least this many pixels
    seed_threshold: float = DEFAULTS.seed_threshold  # as output="labels" separates touching cells
    instances: str = DEFAULTS.instances  # auto: 3-D objects where the voxel size is near-isotropic, else per slice; 2d; 3d
    planes: str = DEFAULTS.planes  # auto: the planes the model records (near-isotropic training data: the xy, xz and yz planes, averaged); xy; ortho
    grow_over_all: str = DEFAULTS.grow_over_all  # 3-D objects cover membranes too (dense tissue, connectomics style): auto = what the model records (true for dense instance labels); true; false
    engine: str = DEFAULTS.engine  # auto: OpenVINO on a CPU, TensorFlow on a GPU; openvino; tensorflow
    precision: str = DEFAULTS.precision  # auto: bfloat16 where the CPU has bfloat16 units; float32; bfloat16
    register: bool = True  # false: score only
    experiment: str = DEFAULT_EXPERIMENT


def score(segmenter, dataset_dir: Path, cfg: EvaluateConfig, progress: bool = True):
    """Segment every validation stack through the one segmentation path. Returns `(metrics, per-slice
    rows, overlay images by name, manifest)`: pixel scores pooled over all voxels and object scores pooled
    over all slices (the instances that `output="labels"` gives, against the true objects).

    Sparse labels (the dataset's `ignore_label`): pixel scores count only annotated voxels; objects are
    scored on the fully annotated slices only (a slice annotated in part cannot say whether an object in
    its unannotated part is right; its row has empty object columns), NaN when there are none."""
    manifest = read_manifest(dataset_dir)
    params = SegmentParams.from_config(cfg)
    scores, pictures = VolumeScores(params.min_object_size), {}
    for info in tqdm(stacks_in(manifest, "val"), desc="evaluate", unit="stack", disable=not progress):
        image, stored = open_stack(dataset_dir, info)
        zs = set(np.linspace(0, image.shape[0] - 1, min(4, image.shape[0])).astype(int).tolist())
        tiles = []
        truth = Truth.of_dataset(stored, open_ids(dataset_dir, info))
        for result in segment_volume(segmenter, image, params.replace(low=info.low, high=info.high), truth,
                                     voxel_size=info.source.get("voxel_size")):
            scores.add(result, stack=info.name)
            if result.z in zs:
                tiles.append(overlay(normalize(image[result.z], info.low, info.high), mask_parts(stored[result.z])[0],
                                     result.mask))
        pictures[info.name] = montage(tiles, columns=len(tiles))
    return scores.metrics(), scores.rows, pictures, manifest


def champion_for(name: str, dataset_dir: Path, manifest: dict) -> str:
    """The champion metric `name` stands for on this dataset ("auto" decided as training decides it)."""
    if name != AUTO:
        return name
    return choose_champion_metric(name, seen_in_3d(manifest), dense_instances(dataset_dir, manifest))


def check_champion_measurable(dataset_dir: Path, cfg: EvaluateConfig) -> None:
    """Object metrics are scored on fully annotated held-out slices only (sparse labels): refuse, before
    any work, to register by one when the dataset has no such slice."""
    manifest = read_manifest(dataset_dir)
    metric = champion_for(cfg.champion_metric, dataset_dir, manifest)
    if not cfg.register or metric in PIXEL_CHAMPION_METRICS or not is_sparse(manifest):
        return
    for info in stacks_in(manifest, "val"):
        annotated = mask_parts(open_stack(dataset_dir, info)[1])[1]
        if fully_annotated(annotated, info.shape[0]):
            return
    raise InputError(f"champion_metric {metric} cannot be measured on this dataset: objects are scored "
                     f"on fully annotated held-out slices only, and every held-out slice has voxels of the "
                     f"ignore_label; pass champion_metric=dice (or annotate one held-out slice in full)")


RECIPE_PARAMS = ("preset", "crop_size", "base_filters", "depth", "input_scale", "batch_size", "learning_rate", "loss",
                 "augment", "max_minutes", "champion_metric", "dtype_policy", "chosen_context_slices",
                 "chosen_champion_metric", "predict_planes", "predict_grow_over_all")  # (chosen_*: what auto picked)


def describe(cfg: EvaluateConfig, manifest: dict, metrics: dict[str, float], train_run) -> str:
    """The registered version's description, shown in the MLflow UI: the data it was tested on, the recipe
    that made it, its test scores, the champion rule and, for a fine-tuned model, where it started."""
    val = [s for s in manifest["stacks"] if s.split == "val"]
    sizes = sorted({f"{s.source.get('voxel_size')} {s.source.get('unit') or ''}".strip() for s in manifest["stacks"]
                    if s.source.get("voxel_size")}) or ["not given by the files"]
    params = train_run.data.params if train_run else {}
    recipe = ", ".join(f"{k} {params[k]}" for k in RECIPE_PARAMS if k in params) or "unknown (not an em-unet train run)"
    lines = [
        f"em-unet segmenter. Tested on {len(val)} held-out stack(s) ({sum(s.shape[0] for s in val)} slices), data "
        f"fingerprint {manifest['eval_fingerprint']}; voxel size {'; '.join(sizes)}.",
        f"Recipe: {recipe}.",
        "Test scores: " + ", ".join(f"{k} {metrics[k]:.4f}" for k in ("object_f1", "dice", "iou", "adapted_rand_error")
                                   if k in metrics) + ".",
        f"Champion rule: the alias '{cfg.alias}' moves to a version only if its test_{cfg.champion_metric} beats the "
        f"champion's on the same evaluation data (the same fingerprint; a champion tested elsewhere is re-scored).",
    ]
    if train_run and train_run.data.tags.get("init_model"):
        lines.append(f"Fine-tuned from {train_run.data.tags['init_model']} (run {train_run.data.tags.get('init_run_id')}).")
    return "\n\n".join(lines)


def register(cfg: EvaluateConfig, dataset_dir: Path, fingerprint: str, metrics: dict[str, float],
             manifest: dict | None = None) -> dict:
    """Register a new version with its scores; move the alias to it if there is no champion or it beats
    the champion on `champion_metric` on this evaluation data (`emunet.registry.champion`: atomic against
    concurrent evaluations)."""
    client = MlflowClient()
    version = mlflow.register_model(cfg.model_uri, cfg.registered_model)
    tag = f"test_{cfg.champion_metric}"
    # Full precision in the tags (repr round-trips): a rounded tag made the same model look better than itself.
    tags = {f"test_{k}": repr(float(metrics[k])) for k in ("dice", "object_f1", cfg.champion_metric)}
    # Lineage of a fine-tuned model (`init_model`: "em-unet v3"), as its train run recorded it.
    train_run = client.get_run(version.run_id) if version.run_id else None
    trained = train_run.data.tags if train_run else {}
    tags.update({k: trained[k] for k in LINEAGE_TAGS if trained.get(k)})
    client.update_model_version(cfg.registered_model, version.version,
                                description=describe(cfg, manifest or read_manifest(dataset_dir), metrics, train_run))
    for key, value in {**tags, "data_fingerprint": fingerprint, "champion_metric": tag,
                       "eval_run_id": mlflow.active_run().info.run_id}.items():
        client.set_model_version_tag(cfg.registered_model, version.version, key, value)

    def rescore(number: str) -> float:
        segmenter = load_segmenter(f"models:/{cfg.registered_model}/{number}")
        return score(segmenter, dataset_dir, cfg, progress=False)[0][cfg.champion_metric]

    value = metrics[cfg.champion_metric]
    promoted, champion, best = promote_if_better(client, mlflow.get_registry_uri(), cfg.registered_model, cfg.alias,
                                                 version.version, value, fingerprint, rescore, metric=tag)
    verdict = ("new champion" if promoted else f"champion stays v{champion}") + (
        "" if champion is None else f" ({tag} {value:.4f} vs {best:.4f})")
    print(f"registered {cfg.registered_model} v{version.version}: {verdict}")
    mlflow.set_tags({"registered_version": version.version, "promoted": str(promoted).lower()})
    return {"version": int(version.version), "promoted": promoted}


def evaluate(cfg: EvaluateConfig) -> dict:
    """Run the step: returns `{"run_id", "metrics", "version", "promoted"}`."""
    SegmentParams.from_config(cfg)  # checked before any work
    if cfg.champion_metric not in (AUTO, *CHAMPION_METRICS):
        raise InputError(f"champion_metric must be one of auto, {', '.join(CHAMPION_METRICS)}, got {cfg.champion_metric!r}")
    if not cfg.model_uri:
        raise InputError("no model given: pass model_uri=runs:/<train run id>/model or models:/em-unet/<version>")
    dataset_dir = local_artifact(cfg.dataset_uri, "dataset")
    cfg = dataclasses.replace(cfg, champion_metric=champion_for(cfg.champion_metric, dataset_dir,
                                                               read_manifest(dataset_dir)))
    check_champion_measurable(dataset_dir, cfg)
    with step_run("evaluate", cfg.experiment) as run:
        log_config(cfg, chosen_champion_metric=cfg.champion_metric)
        segmenter = load_segmenter(cfg.model_uri)
        forward = segmenter.forward_for(SegmentParams.from_config(cfg))  # chosen on this machine: say which
        print(f"network on {forward.engine} in {forward.precision}", flush=True)
        mlflow.set_tags({"engine": forward.engine, "precision": forward.precision})
        metrics, rows, pictures, manifest = score(segmenter, dataset_dir, cfg)
        fingerprint = manifest["eval_fingerprint"]
        mlflow.set_tag("data_fingerprint", fingerprint)
        mlflow.log_metrics({f"test_{k}": v for k, v in metrics.items()})
        mlflow.log_text(rows_to_csv(rows), "per_slice_scores.csv")
        for name, picture in pictures.items():
            mlflow.log_image(picture, f"overlays/{name}.png")
        result = {"run_id": run.info.run_id, "metrics": metrics, "version": None, "promoted": False}
        if cfg.register:
            result.update(register(cfg, dataset_dir, fingerprint, metrics, manifest))
        print("test: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return result


if __name__ == "__main__":
    run_entry(evaluate, EvaluateConfig)
