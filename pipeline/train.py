"""`train` entry point: a U-Net trained on the dataset artifact's training stacks, validated every epoch on
the held-out stacks' full slices, logged to MLflow as a Keras model and as the stack-segmenting pyfunc.

    python -m pipeline.train --dataset_uri runs:/<preprocess run>/dataset --preset fast --max_minutes 5
"""

import dataclasses
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import mlflow
import numpy as np

from pipeline.cli import run_entry
from pipeline.dataset import open_stack, read_manifest, stacks_in
from pipeline.distribute import make_strategy
from pipeline.errors import InputError
from pipeline.loader import PatchDataset
from pipeline.losses import LOSSES, get_loss
from pipeline.metrics import stack_scores
from pipeline.model import UNetSpec, build_unet, multiple_of
from pipeline.normalize import normalize
from pipeline.overlay import montage, overlay
from pipeline.tracking import DEFAULT_EXPERIMENT, local_artifact, log_config, step_run
from serving.segmenter import log_segmenter
from serving.tiling import predict_probabilities

REQUIREMENTS = str(Path(__file__).resolve().parent.parent / "requirements.txt")

# Named recipes. Fields set to 0 in TrainConfig take the preset's value.
PRESETS = {
    # CPU default: 128 x 128 crops and a 0.5M-parameter U-Net (8 base filters) learn the synthetic cells
    # to validation Dice > 0.9 in about 3 minutes on 2 cores; 16 filters trains 2.5x slower per image.
    "fast": dict(crop_size=128, base_filters=8, depth=4, batch_size=8, learning_rate=1e-3, steps_per_epoch=25),
    # The original study: 464 x 464 crops, 64 base filters, depth 4 (31M parameters), Adam 1e-4.
    "paper": dict(crop_size=464, base_filters=64, depth=4, batch_size=4, learning_rate=1e-4, steps_per_epoch=250),
}


@dataclass(frozen=True)
class TrainConfig:
    """Train a U-Net on a dataset artifact."""

    dataset_uri: str = ""  # dataset artifact: a folder or runs:/<preprocess run id>/dataset
    preset: str = "fast"  # named recipe filling the fields left at 0 below (see PRESETS)
    crop_size: int = 0  # training patch size; multiple of 2**depth
    base_filters: int = 0  # filters of the first level, doubled at each level
    depth: int = 0  # number of poolings
    batch_size: int = 0  # per replica; global batch = batch_size x replicas
    learning_rate: float = 0.0  # Adam; scaled linearly with the number of replicas
    steps_per_epoch: int = 0  # batches between validations
    epochs: int = 200  # upper bound; `max_minutes` usually ends training first
    max_minutes: float = 5.0  # time budget (keeps `mlflow run .` under 10 min on 2 cores): stops after the epoch that would overrun it; 0 = none
    loss: str = "bce_dice"  # bce, dice or bce_dice
    dropout: float = 0.0  # bottleneck dropout
    batch_norm: bool = True
    workers: int = 2  # augmentation processes; 1 = in the training process
    gpus: str = ""  # GPU indices to use, e.g. 0,1; empty = all visible
    seed: int = 0
    experiment: str = DEFAULT_EXPERIMENT


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill fields left at 0 from the preset and check the result."""
    if cfg.preset not in PRESETS:
        raise InputError(f"preset must be one of {', '.join(PRESETS)}, got {cfg.preset!r}")
    if cfg.loss not in LOSSES:
        raise InputError(f"loss must be one of {', '.join(LOSSES)}, got {cfg.loss!r}")
    filled = {k: v for k, v in PRESETS[cfg.preset].items() if not getattr(cfg, k)}
    cfg = dataclasses.replace(cfg, **filled)
    multiple = 2**cfg.depth
    if cfg.crop_size % multiple:
        raise InputError(f"crop_size {cfg.crop_size} must be a multiple of 2**depth = {multiple}")
    for name in ("crop_size", "base_filters", "depth", "batch_size", "steps_per_epoch", "epochs", "workers"):
        if getattr(cfg, name) < 1:
            raise InputError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    return cfg


def check_sizes(cfg: TrainConfig, manifest: dict) -> None:
    for s in stacks_in(manifest, "train"):
        if min(s.shape[1:]) < cfg.crop_size:
            raise InputError(f"crop_size {cfg.crop_size} is larger than the {s.shape[1]} x {s.shape[2]} slices of "
                             f"stack {s.name}; pass a smaller crop_size")


def bce_dice_numpy(prob: np.ndarray, truth: np.ndarray) -> float:
    """The training loss on validation probabilities, computed on the host (no second forward pass)."""
    p = np.clip(prob, 1e-7, 1 - 1e-7)
    bce = -np.mean(truth * np.log(p) + (1 - truth) * np.log(1 - p))
    dice = 1 - (2 * np.sum(prob * truth) + 1) / (np.sum(prob) + np.sum(truth) + 1)
    return float(bce + dice)


class Validation(keras.callbacks.Callback):
    """Each epoch: segment the held-out stacks at full size, log `val_*` metrics, loss, throughput and an
    overlay to MLflow, keep the best weights by `val_dice`, and stop when the time budget would overrun."""

    def __init__(self, dataset_dir, cfg: TrainConfig, val_stacks, images_per_epoch: int):
        super().__init__()
        self.cfg, self.images_per_epoch = cfg, images_per_epoch
        self.val = [(s, *open_stack(dataset_dir, s)) for s in val_stacks]
        self.best_dice, self.best_weights, self.best_epoch = -1.0, None, -1
        self.started = self.epoch_started = time.monotonic()

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_started = time.monotonic()

    def evaluate(self) -> tuple[dict, list]:
        probs, truths = [], []
        for info, image, mask in self.val:
            probs.append(predict_probabilities(self.model.predict_on_batch, image, info.low, info.high,
                                               multiple=2**self.cfg.depth))
            truths.append(np.asarray(mask))
        prob, truth = np.concatenate(probs), np.concatenate(truths)
        scores = stack_scores(prob >= 0.5, truth)
        scores["loss"] = bce_dice_numpy(prob, truth)
        return scores, probs

    def picture(self, probs) -> np.ndarray:
        info, image, mask = self.val[0]
        zs = np.linspace(0, image.shape[0] - 1, min(3, image.shape[0])).astype(int)
        tiles = [overlay(normalize(image[z], info.low, info.high), mask[z], probs[0][z] >= 0.5) for z in zs]
        return montage(tiles, columns=len(tiles))

    def on_epoch_end(self, epoch, logs=None):
        train_seconds = time.monotonic() - self.epoch_started
        scores, probs = self.evaluate()
        metrics = {f"val_{k}": v for k, v in scores.items()}
        metrics.update(loss=float(logs["loss"]), images_per_sec=self.images_per_epoch / train_seconds)
        mlflow.log_metrics(metrics, step=epoch)
        if scores["dice"] > self.best_dice:
            self.best_dice, self.best_epoch = scores["dice"], epoch
            self.best_weights = self.model.get_weights()
            mlflow.log_image(self.picture(probs), "val_overlay.png")
        print(f"epoch {epoch + 1}: loss {metrics['loss']:.4f}  val_dice {scores['dice']:.4f}  "
              f"val_iou {scores['iou']:.4f}  {metrics['images_per_sec']:.1f} images/s", flush=True)
        elapsed = time.monotonic() - self.started
        epoch_seconds = time.monotonic() - self.epoch_started
        if self.cfg.max_minutes and elapsed + epoch_seconds > self.cfg.max_minutes * 60:
            print(f"time budget of {self.cfg.max_minutes} min reached after epoch {epoch + 1}", flush=True)
            self.model.stop_training = True


def train(cfg: TrainConfig, devices: list[str] | None = None) -> dict:
    """Run the step: returns `{"run_id", "model_uri", "val_dice", "epochs", "model"}` (the Keras model,
    holding the best weights, for in-process callers).

    `devices` (tests) forces MirroredStrategy over the given devices, e.g. two logical CPUs.
    """
    cfg = resolve(cfg)
    dataset_dir = local_artifact(cfg.dataset_uri, "dataset")
    manifest = read_manifest(dataset_dir)
    check_sizes(cfg, manifest)
    strategy = make_strategy(cfg.gpus, devices)
    replicas = strategy.num_replicas_in_sync
    global_batch = cfg.batch_size * replicas
    spec = UNetSpec(depth=cfg.depth, base_filters=cfg.base_filters, batch_norm=cfg.batch_norm, dropout=cfg.dropout)
    keras.utils.set_random_seed(cfg.seed)
    with step_run("train", cfg.experiment) as run:
        # The resolved recipe too: under `mlflow run -e train` the preset placeholders (0) are already logged.
        log_config(cfg, replicas=replicas, global_batch=global_batch,
                   recipe=json.dumps({k: getattr(cfg, k) for k in PRESETS[cfg.preset]}))
        mlflow.set_tag("data_fingerprint", manifest["eval_fingerprint"])
        with strategy.scope():
            model = build_unet(spec)
            # Linear scaling rule (Goyal et al. 2017): the global batch grows with replicas, so does the rate.
            model.compile(keras.optimizers.Adam(cfg.learning_rate * replicas), get_loss(cfg.loss))
        mlflow.log_param("parameters", model.count_params())
        data = PatchDataset(dataset_dir, stacks_in(manifest, "train"), global_batch, cfg.crop_size,
                            cfg.steps_per_epoch, cfg.seed, workers=cfg.workers)
        validation = Validation(dataset_dir, cfg, stacks_in(manifest, "val"), cfg.steps_per_epoch * global_batch)
        model.fit(data, epochs=cfg.epochs, callbacks=[validation], verbose=1 if sys.stdout.isatty() else 2)
        model.set_weights(validation.best_weights)
        mlflow.log_metrics({"best_val_dice": validation.best_dice, "best_epoch": validation.best_epoch,
                            "epochs_trained": len(model.history.epoch)})
        with tempfile.TemporaryDirectory() as tmp:
            keras_path = Path(tmp) / "unet.keras"
            model.save(keras_path)
            meta = {"multiple_of": multiple_of(spec), "spec": asdict(spec), "crop_size": cfg.crop_size,
                    "data_fingerprint": manifest["eval_fingerprint"]}
            log_segmenter(keras_path, meta, name="model")
            mlflow.keras.log_model(model, name="keras_model", pip_requirements=REQUIREMENTS)
        return {"run_id": run.info.run_id, "model_uri": f"runs:/{run.info.run_id}/model",
                "val_dice": validation.best_dice, "epochs": len(model.history.epoch), "model": model}


if __name__ == "__main__":
    run_entry(train, TrainConfig)
