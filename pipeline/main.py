"""`main` entry point (`mlflow run .`): preprocess -> train -> evaluate as child runs of one parent run,
then a short summary: test metrics, the model URI and how to look at the runs.

    python -m pipeline.main                                   # embedded synthetic data
    python -m pipeline.main --images stack.tif --labels stack_labels.tif --val_slices 24:30
"""

import dataclasses
from dataclasses import asdict, dataclass

import mlflow

from emunet.registry.cli import run_entry
from pipeline.evaluate import DEFAULT_ALIAS, DEFAULT_MODEL_NAME, EvaluateConfig, check_champion_measurable, evaluate
from pipeline.preprocess import PreprocessConfig, preprocess
from emunet.registry.tracking import DEFAULT_EXPERIMENT, local_artifact, log_config, step_run
from pipeline.train import TrainConfig, train


@dataclass(frozen=True)
class MainConfig:
    """The whole path: data in, registered model out. Fields mirror the steps' own (same defaults)."""

    images: str = PreprocessConfig.images
    labels: str = PreprocessConfig.labels
    label_kind: str = PreprocessConfig.label_kind
    dataset: str = PreprocessConfig.dataset
    val_slices: str = PreprocessConfig.val_slices
    unlabelled: str = PreprocessConfig.unlabelled
    ignore_label: int = PreprocessConfig.ignore_label
    level: str = PreprocessConfig.level
    region: str = PreprocessConfig.region
    allow_missing_chunks: bool = PreprocessConfig.allow_missing_chunks
    voxel_size: str = PreprocessConfig.voxel_size
    unit: str = PreprocessConfig.unit
    allow_voxel_mismatch: bool = PreprocessConfig.allow_voxel_mismatch
    synthetic_stacks: int = PreprocessConfig.synthetic_stacks
    synthetic_shape: str = PreprocessConfig.synthetic_shape
    preset: str = TrainConfig.preset
    crop_size: int = TrainConfig.crop_size
    base_filters: int = TrainConfig.base_filters
    depth: int = TrainConfig.depth
    input_scale: int = TrainConfig.input_scale
    batch_size: int = TrainConfig.batch_size
    learning_rate: float = TrainConfig.learning_rate
    steps_per_epoch: int = TrainConfig.steps_per_epoch
    epochs: int = TrainConfig.epochs
    max_minutes: float = TrainConfig.max_minutes
    loss: str = TrainConfig.loss
    border_weight: float = TrainConfig.border_weight
    augment: str = TrainConfig.augment
    foreground: float = TrainConfig.foreground
    lr_schedule: str = TrainConfig.lr_schedule
    bn_momentum: float = TrainConfig.bn_momentum
    ema: float = TrainConfig.ema
    patience: int = TrainConfig.patience
    context_slices: str = TrainConfig.context_slices
    planes: str = TrainConfig.planes
    precision: str = TrainConfig.precision
    workers: int = TrainConfig.workers
    gpus: str = TrainConfig.gpus
    seed: int = TrainConfig.seed
    init_model: str = TrainConfig.init_model
    freeze_encoder_epochs: int = TrainConfig.freeze_encoder_epochs
    registered_model: str = DEFAULT_MODEL_NAME
    alias: str = DEFAULT_ALIAS
    champion_metric: str = EvaluateConfig.champion_metric
    experiment: str = DEFAULT_EXPERIMENT


def pick(cls, cfg: MainConfig, **extra):
    """The step config `cls` with every field it shares with `cfg`."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in asdict(cfg).items() if k in names}, **extra)


def summary(result: dict, cfg: MainConfig) -> str:
    metrics = "  ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items())
    champion = f"models:/{cfg.registered_model}@{cfg.alias}"
    version = result["version"]
    status = (f"registered as {cfg.registered_model} v{version}"
              + (f", now {champion}" if result["promoted"] else f"; {champion} is unchanged (it scores better)"))
    return "\n".join([
        "",
        "== em-unet run complete ==",
        f"test metrics (held-out stacks): {metrics}",
        f"model: {result['model_uri']}  ({status})",
        f"look at the runs:   mlflow ui --backend-store-uri {mlflow.get_tracking_uri()}",
        f"segment a stack:    mlflow run . --env-manager local -e predict -P model_uri={champion} -P input=stack.tif",
    ])


def main(cfg: MainConfig) -> dict:
    """Run preprocess, train and evaluate as child runs; returns the evaluate result plus run ids."""
    with step_run("main", cfg.experiment):
        log_config(cfg)
        data = preprocess(pick(PreprocessConfig, cfg))
        # Sparse labels with no fully annotated held-out slice cannot rank by objects: say so before training.
        check_champion_measurable(local_artifact(data["dataset_uri"], "dataset"), pick(EvaluateConfig, cfg))
        trained = train(pick(TrainConfig, cfg, dataset_uri=data["dataset_uri"]))
        result = evaluate(pick(EvaluateConfig, cfg, model_uri=trained["model_uri"], dataset_uri=data["dataset_uri"]))
        mlflow.log_metrics({f"test_{k}": v for k, v in result["metrics"].items()})
        result = {**result, "model_uri": trained["model_uri"], "train_run_id": trained["run_id"],
                  "preprocess_run_id": data["run_id"]}
        print(summary(result, cfg))
        return result


if __name__ == "__main__":
    run_entry(main, MainConfig)
