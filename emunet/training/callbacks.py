"""The training loop's callbacks: the learning-rate schedule (warm-up, then cosine) and the per-epoch
validation on full held-out slices, which keeps the best weights, logs to MLflow and decides when to stop.

Both read and update one `TrainingState`, which the resume backup saves after every epoch. `cfg` is a
resolved `emunet.training.config.TrainConfig`.

Why not `keras.optimizers.schedules.CosineDecay`: its progress is the optimizer step, whereas here it
is the larger of the share of epochs and the share of the time budget spent, so that the decay ends when
a `max_minutes` run ends; a step-based schedule cannot know when that will be.
"""

import math
import time

import keras
import mlflow
import numpy as np

from emunet.core.dataset import mask_parts, open_ids, open_stack
from emunet.core.losses import get_loss
from emunet.core.model import UNetSpec, multiple_of
from emunet.core.normalize import normalize
from emunet.core.overlay import montage, overlay
from emunet.inference.params import DEFAULTS
from emunet.inference.segment import Segmenter, Truth, VolumeScores, segment_volume
from emunet.inference.segmenter import compiled_forward
from emunet.training.config import TrainConfig
from emunet.training.distribute import agree
from emunet.training.state import TrainingState

MIN_LR_RATIO = 0.01  # the cosine ends at 1 % of the peak rate, not 0: the last epochs still learn


def validation_loss(name: str, prob: np.ndarray, truth: np.ndarray, annotated: np.ndarray | None = None) -> float:
    """The training loss `name` on the validation probabilities, the whole held-out set as one batch,
    computed from the probabilities validation already has (no second forward pass); over the
    `annotated` voxels only if given (weight 0 elsewhere, as in training)."""
    y_true = np.asarray(truth, np.float32)[..., None]
    if annotated is not None:
        y_true = np.concatenate([y_true, np.asarray(annotated, np.float32)[..., None]], axis=-1)
    loss = get_loss(name)(y_true, np.asarray(prob, np.float32)[..., None])
    return float(keras.ops.convert_to_numpy(loss))


def is_better(scores: dict, best: tuple[float, float], metric: str) -> bool:
    """Whether an epoch's validation `scores` beat the best so far, `(metric, dice)` of the best epoch:
    on `metric` first (higher is better; the champion rule's metric, so that the epoch kept is the model
    the registry would choose), on pixel Dice when they tie (object scores of a few objects often do). A
    metric that was not measured (NaN) never improves."""
    value = scores[metric]
    return bool(np.isfinite(value) and (value, scores["dice"]) > tuple(best))


def schedule_rate(peak: float, step: int, warmup_steps: int, progress: float, kind: str) -> float:
    """Learning rate at optimizer `step`: linear warm-up over `warmup_steps`, then (cosine) a half cosine
    from `peak` down to `MIN_LR_RATIO * peak` as `progress` goes from 0 to 1."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if kind == "constant":
        return peak
    progress = min(max(progress, 0.0), 1.0)
    return peak * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))


class Schedule(keras.callbacks.Callback):
    """Sets the learning rate (see `schedule_rate`). Progress is the larger of the share of `epochs` done
    and the share of the time budget spent, so the decay ends when training ends, whichever limit ends
    it; all workers of a cluster agree on it (`emunet.training.distribute.agree`)."""

    def __init__(self, cfg: TrainConfig, peak: float, strategy, state: TrainingState):
        super().__init__()
        self.cfg, self.peak, self.strategy, self.state = cfg, peak, strategy, state
        self.warmup_steps = cfg.warmup_epochs * cfg.steps_per_epoch
        self.progress = 0.0

    def _set(self):
        rate = schedule_rate(self.peak, self.state.schedule_step, self.warmup_steps, self.progress, self.cfg.lr_schedule)
        self.model.optimizer.learning_rate.assign(rate)

    def on_epoch_begin(self, epoch, logs=None):
        budget = self.cfg.max_minutes * 60
        spent = self.state.spent_seconds / budget if budget else 0.0
        warm_epochs = max(0, epoch - self.cfg.warmup_epochs)
        by_epochs = warm_epochs / max(1, self.cfg.epochs - self.cfg.warmup_epochs)
        self.progress = agree(self.strategy, max(by_epochs, spent))
        self._set()

    def on_train_batch_begin(self, batch, logs=None):
        if self.state.schedule_step < self.warmup_steps:
            self._set()
        self.state.schedule_step += 1


class Validation(keras.callbacks.Callback):
    """Each epoch: segment the held-out stacks at full size, log `val_*` metrics (pixels and objects), the training loss on
    them (`val_loss`, the configured `loss`), learning rate, throughput and an overlay to MLflow (the
    chief only), keep the best weights by `champion_metric`, and stop early after `patience` epochs without
    progress or when the time budget would overrun.

    Validation runs on `eval_model`, a plain float32 copy of the network outside any distribution
    strategy, compiled with XLA like the served model, through the one segmentation path with the
    served defaults (`emunet.inference.segment`): what is measured is what will be served and what
    evaluate will score. The best epoch is the best on `cfg.champion_metric` (the registry's rule).
    One exception: a network to be asked about three planes (`planes`) is validated on the xy planes only. Its epochs
    are ranked by the same network's answers at a third of the cost (asking all three planes made an
    epoch on the medulla cube 2.4x as long as the slices' recipe's, against the issue's 2x); evaluate
    and every later caller average the three planes.

    `backup(state)` is called after each epoch's decisions and before its metrics are logged: a run
    killed in between re-logs them from the backup when it resumes, never twice."""

    def __init__(self, dataset_dir, cfg: TrainConfig, val_stacks, images_per_epoch: int, eval_model,
                 strategy, state: TrainingState, chief: bool = True, backup=None, grow_over_all: bool = False):
        super().__init__()
        self.cfg, self.images_per_epoch, self.strategy, self.chief = cfg, images_per_epoch, strategy, chief
        self.state, self.backup = state, backup
        self.val = [(s, *open_stack(dataset_dir, s)) for s in val_stacks]
        self.ids = {s.name: open_ids(dataset_dir, s) for s in val_stacks}  # instance labels, when given
        self.eval_model = eval_model
        self.segmenter = Segmenter(compiled_forward(eval_model), multiple_of(UNetSpec(depth=cfg.depth,
                                                                                     input_scale=cfg.input_scale)),
                                   context=cfg.context_slices,  # xy planes: see above
                                   grow_over_all=grow_over_all)  # objects as the model will find them (plan.json)
        self.metric = cfg.champion_metric
        self.began = self.epoch_began = time.monotonic()
        self.spent_before = 0.0

    def on_train_begin(self, logs=None):
        self.began, self.spent_before = time.monotonic(), self.state.spent_seconds

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_began = time.monotonic()

    def weights(self) -> list:
        """The weights to validate and keep: the trained ones, or with `ema` their moving average (the
        optimizer's, for the trainable variables; BatchNorm statistics are already averages)."""
        optimizer = self.model.optimizer
        if not getattr(optimizer, "use_ema", False):
            return self.model.get_weights()
        average = {v.path: a for v, a in zip(self.model.trainable_variables, optimizer._model_variables_moving_average)}
        return [keras.ops.convert_to_numpy(average.get(v.path, v)) for v in self.model.weights]

    def evaluate(self) -> tuple[dict, list]:
        """Validation scores (pixels, objects, and the training `loss` on the held-out probabilities) and
        the probabilities of each held-out stack."""
        self.eval_model.set_weights(self.weights())
        scores, probs = VolumeScores(), []
        for info, image, mask in self.val:
            stack = []
            for result in segment_volume(self.segmenter, image, DEFAULTS.replace(low=info.low, high=info.high),
                                         Truth.of_dataset(mask, self.ids[info.name]),
                                         voxel_size=info.source.get("voxel_size")):
                scores.add(result, info.name)
                stack.append(result.prob)
            probs.append(np.stack(stack))
        metrics = scores.metrics()
        truth, annotated = mask_parts(np.concatenate([np.asarray(m) for _, _, m in self.val]))
        metrics["loss"] = validation_loss(self.cfg.loss, np.concatenate(probs), truth, annotated)
        return metrics, probs

    def picture(self, probs) -> np.ndarray:
        info, image, mask = self.val[0]
        zs = np.linspace(0, image.shape[0] - 1, min(3, image.shape[0])).astype(int)
        tiles = [overlay(normalize(image[z], info.low, info.high), mask_parts(mask[z])[0], probs[0][z] >= 0.5)
                 for z in zs]
        return montage(tiles, columns=len(tiles))

    def on_epoch_end(self, epoch, logs=None):
        state = self.state
        train_seconds = time.monotonic() - self.epoch_began
        scores, probs = self.evaluate()
        if not np.isfinite(scores[self.metric]) and self.metric != "dice":
            # Sparse labels with no fully annotated held-out slice: objects cannot be scored at all.
            print(f"val_{self.metric} cannot be measured on these held-out slices (none is fully annotated): "
                  f"the best epoch follows val_dice", flush=True)
            self.metric = "dice"
        metrics = {f"val_{k}": v for k, v in scores.items()}
        metrics.update(loss=float(logs["loss"]), images_per_sec=self.images_per_epoch / train_seconds,
                       learning_rate=float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))
        improved = is_better(scores, (state.best_score, state.best_dice), self.metric)
        if improved:
            state.best_score, state.best_dice, state.best_epoch = scores[self.metric], scores["dice"], epoch
            state.best_weights = self.eval_model.get_weights()
        if self.chief and improved:
            mlflow.log_image(self.picture(probs), "val_overlay.png")  # rewritten, not doubled, if redone
        elapsed = self.spent_before + time.monotonic() - self.began
        epoch_seconds = time.monotonic() - self.epoch_began
        over_budget = bool(self.cfg.max_minutes and elapsed + epoch_seconds > self.cfg.max_minutes * 60)
        stalled = bool(self.cfg.patience and epoch - state.best_epoch >= self.cfg.patience)
        # Every worker must stop after the same epoch, or the others would wait for it forever.
        over_budget, stalled = (agree(self.strategy, float(flag)) > 0 for flag in (over_budget, stalled))
        state.next_epoch, state.spent_seconds, state.stopped = epoch + 1, elapsed, over_budget or stalled
        state.metrics = metrics
        if self.backup is not None:
            self.backup(state)
        if self.chief:
            mlflow.log_metrics(metrics, step=epoch)
        print(f"epoch {epoch + 1}: loss {metrics['loss']:.4f}  val_dice {scores['dice']:.4f}  "
              f"val_iou {scores['iou']:.4f}  (precision {scores['precision']:.3f}, recall {scores['recall']:.3f})  "
              f"val_object_f1 {scores['object_f1']:.3f}  "
              f"{metrics['images_per_sec']:.1f} images/s", flush=True)
        if over_budget:
            print(f"time budget of {self.cfg.max_minutes} min reached after epoch {epoch + 1}", flush=True)
        elif stalled:
            print(f"no better val_{self.metric} for {self.cfg.patience} epochs: stopping after epoch {epoch + 1}",
                  flush=True)
        self.model.stop_training = self.model.stop_training or state.stopped
