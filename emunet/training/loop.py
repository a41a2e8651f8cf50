"""The training loop: build and compile the U-Net under a distribution strategy, make the batches, put a
resume backup back, fit with the schedule and validation callbacks, and hand back the best weights.

`fit` knows nothing of MLflow runs beyond logging through the active one (the chief's): opening the run,
logging the config and the models is the `train` entry point's work.
"""

import dataclasses
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import keras
import mlflow

from emunet.core.dataset import is_sparse, stacks_in
from emunet.core.losses import get_loss
from emunet.core.model import UNetSpec, build_unet
from emunet.registry.tracking import run_exists, step_run
from emunet.training.augment import AUGMENTATIONS
from emunet.training.callbacks import Schedule, Validation
from emunet.training.checkpoint import Backup
from emunet.training.config import JIT_CHOICES, TrainConfig, dtype_policy
from emunet.training.distribute import agree
from emunet.training.finetune import FreezeEncoder, InitModel, load_weights
from emunet.training.loader import PatchDataset
from emunet.training.state import TrainingState


def build_before_fit(model, strategy, sample) -> None:
    """Work around two Keras 3.15 bugs with MultiWorkerMirroredStrategy; call before `fit`.

    Keras 3.15's `fit` first builds them from a distributed batch by `strategy.reduce` of the `(x, y)`
    tuple, which the multi-worker strategy cannot reduce (it fails before training starts). Building
    here, from plain arrays of the right shapes, leaves Keras nothing to do there."""
    with strategy.scope():
        model._symbolic_build(data_batch=sample)
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None
    # Its mean of the step's logs across workers reduces along axis 0, which scalars do not have: give it
    # shape-(1,) logs, which it averages back to scalars.
    step = model.train_step
    model.train_step = lambda data: {k: keras.ops.reshape(v, (1,)) for k, v in step(data).items()}


@contextmanager
def train_run(cfg: TrainConfig, backup: Backup, chief: bool, strategy, cluster):
    """Yield `(run, resumed)`: the MLflow run to log to (None on a worker that is not the chief) and the
    backup to resume from (`(state, weights path)`, or None to start afresh). Resuming continues the
    backup's run; a backup whose run this tracking store does not have is ignored, and so are backups of
    different epochs on the workers of a cluster (they must all start from the same one)."""
    resumed = backup.load()
    if resumed and chief and not run_exists(resumed[0].run_id):
        print(f"the backup in {backup.folder} belongs to run {resumed[0].run_id}, which the tracking "
              f"store {mlflow.get_tracking_uri()} does not have: starting afresh", flush=True)
        resumed = None
    if cluster is not None:
        start = float(resumed[0].next_epoch) if resumed else 0.0
        if agree(strategy, start) ** 2 != agree(strategy, start * start):  # not the same on every worker
            print("the workers' backups are of different epochs: starting afresh", flush=True)
            resumed = None
    run_id = resumed[0].run_id if resumed and chief else None
    with step_run("train", cfg.experiment, run_id=run_id) if chief else nullcontext(None) as run:
        yield run, resumed


def restore(state: TrainingState, weights: Path, model, strategy, run) -> None:
    """Put a backup's weights and optimizer state back into `model`; log the last epoch's metrics if the
    kill came before they were logged."""
    with strategy.scope():
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        model.load_weights(weights)
    last = state.next_epoch - 1
    if run is not None:
        logged = {m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_dice")}
        if last not in logged:
            mlflow.log_metrics(state.metrics, step=last)
    print(f"resuming from the backup of epoch {last + 1} (best validation score {state.best_score:.4f} at epoch "
          f"{state.best_epoch + 1})" + (f" in run {run.info.run_id}" if run is not None else ""), flush=True)


def fit(cfg: TrainConfig, spec: UNetSpec, dataset_dir: Path, manifest: dict, strategy, batches: tuple[int, int],
        peak_rate: float, policy: str, backup: Backup, run, resumed, chief: bool, cluster,
        source: InitModel | None = None, grow_over_all: bool = False) -> tuple[keras.Model, keras.Model, TrainingState]:
    """Train `spec` on the dataset's training stacks, validating on its held-out ones every epoch.

    `batches` is `(per-replica, global)` batch size; `resumed` a loaded backup or None; `source` the model
    to start from (`emunet.training.finetune`; a resumed run starts from its backup instead);
    `grow_over_all` how the model will find 3-D objects (the plan's), which validation follows. Returns
    `(eval_model, fit_model, state)`: the float32 model holding the best weights, the model trained
    under the strategy with the last weights, and the final training state."""
    per_replica, global_batch = batches
    with dtype_policy(policy), strategy.scope():
        model = build_unet(spec)
        optimizer = keras.optimizers.Adam(peak_rate, use_ema=cfg.ema > 0, ema_momentum=cfg.ema or 0.99)
        model.compile(optimizer, get_loss(cfg.loss), jit_compile=JIT_CHOICES[cfg.jit_compile])
        if source is not None and not resumed:
            load_weights(model, source)
        if cfg.freeze_encoder_epochs:
            # Adam's moments for every variable before the encoder is frozen, so unfreezing finds them.
            model.optimizer.build(model.trainable_variables)
    eval_model = build_unet(spec, name="unet")  # float32, outside the strategy: validated and logged
    if chief:
        mlflow.log_param("parameters", model.count_params())
    augment = dataclasses.replace(AUGMENTATIONS[cfg.augment], foreground=cfg.foreground)
    data = PatchDataset(dataset_dir, stacks_in(manifest, "train"), global_batch, cfg.crop_size,
                        cfg.steps_per_epoch, cfg.seed, workers=cfg.workers, augment=augment,
                        border_weight=cfg.border_weight, sparse=is_sparse(manifest), context=cfg.context_slices,
                        ortho=cfg.planes == "ortho")
    state = resumed[0] if resumed else TrainingState(run_id=run.info.run_id if run else None)

    def save(state: TrainingState) -> None:
        state.data_epoch = data.epoch
        backup.save(state, model)

    schedule = Schedule(cfg, peak_rate, strategy, state)
    validation = Validation(dataset_dir, cfg, stacks_in(manifest, "val"), cfg.steps_per_epoch * global_batch,
                            eval_model, strategy, state, chief, backup=save,
                            grow_over_all=grow_over_all)
    callbacks = [schedule, validation]
    if cfg.freeze_encoder_epochs:
        callbacks.insert(0, FreezeEncoder(cfg.freeze_encoder_epochs))
    if cluster is not None:
        build_before_fit(model, strategy, tuple(a[:per_replica] for a in data[0]))
    if resumed:
        restore(state, resumed[1], model, strategy, run)
        # After fit's own reset of the data (which counts as an epoch end): the batches of the next epoch.
        callbacks.insert(0, keras.callbacks.LambdaCallback(
            on_train_begin=lambda logs: setattr(data, "epoch", state.data_epoch)))
    if not state.stopped and state.next_epoch < cfg.epochs:
        # shuffle=False: the batches are random draws already; Keras' shuffle would order them by Python's
        # global `random` state, which a resumed process does not have (its losses differed by 1 %).
        model.fit(data, epochs=cfg.epochs, initial_epoch=state.next_epoch, callbacks=callbacks, shuffle=False,
                  verbose=1 if sys.stdout.isatty() else 2)
    eval_model.set_weights(state.best_weights)
    return eval_model, model, state
