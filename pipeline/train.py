"""`train` entry point: a U-Net trained on the dataset artifact's training stacks, validated every epoch on
the held-out stacks' full slices, logged to MLflow as a Keras model and as the stack-segmenting pyfunc.

    python -m pipeline.train --dataset_uri runs:/<preprocess run>/dataset --preset fast --max_minutes 5
"""

import dataclasses
import json
import sys
import tempfile
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import mlflow

from pipeline.augment import AUGMENTATIONS
from pipeline.callbacks import Schedule, Validation
from pipeline.checkpoint import Backup, backup_dir, checkpoint_key
from pipeline.cli import run_entry
from pipeline.dataset import open_stack, read_manifest, stacks_in
from pipeline.distribute import agree, cluster_config, is_chief, make_strategy
from pipeline.errors import InputError
from pipeline.loader import PatchDataset
from pipeline.losses import LOSSES, get_loss
from pipeline.model import INPUT_SCALES, UNetSpec, build_unet, multiple_of
from pipeline.scale import auto_input_scale, thinnest_structure
from pipeline.tracking import DEFAULT_EXPERIMENT, local_artifact, log_config, run_exists, step_run
from serving.segmenter import log_segmenter, model_requirements

SCHEDULES = ("cosine", "constant")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
JIT_CHOICES = {"auto": "auto", "true": True, "false": False}

# Named recipes. Fields set to 0 in TrainConfig take the preset's value.
PRESETS = {
    # CPU default: 128 x 128 crops (at the network's resolution: 256 x 256 of the image at input_scale 2) and
    # a 1.9M-parameter U-Net (16 base filters), about 9-10 images/s on 2 cores with oneDNN. In the same 10
    # minutes on VNC, 16 filters beat 8 (which trains 2.5x faster per image) on mitochondria Dice.
    "fast": dict(crop_size=128, base_filters=16, depth=4, batch_size=8, learning_rate=1e-3, steps_per_epoch=25),
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
    input_scale: int = 0  # the network works at 1/input_scale of the image resolution (1, 2 or 4); 0 = auto: the largest that keeps the thinnest labelled structure 16 px thick (pipeline.scale); preset crops grow with it
    batch_size: int = 0  # per replica; global batch = batch_size x replicas
    learning_rate: float = 0.0  # Adam; scaled linearly with the number of replicas
    steps_per_epoch: int = 0  # batches between validations
    epochs: int = 200  # upper bound; `max_minutes` usually ends training first
    max_minutes: float = 5.0  # time budget (keeps `mlflow run .` under 10 min on 2 cores): stops after the epoch that would overrun it; 0 = none
    loss: str = "bce_dice"  # bce, dice, bce_dice, bce_dice_both (Dice of both classes: thin background such as membranes) or focal
    dropout: float = 0.0  # bottleneck dropout
    ema: float = 0.0  # momentum of an exponential moving average of the weights, validated and kept instead of the last ones (e.g. 0.99); 0 = off
    batch_norm: bool = True
    bn_momentum: float = UNetSpec.bn_momentum  # BatchNorm's moving averages (0.99: over ~100 steps); 0.9 follows the weights within ~10 steps, for runs of a few dozen steps, but validates noisily
    augment: str = "em"  # em: rotation, flips, scale, elastic, intensity, blur, noise; basic: the original study's rotation and flips; none
    foreground: float = 0.33  # share of crops centred on foreground (nnU-Net's oversampling): sparse organelles get seen
    lr_schedule: str = "cosine"  # cosine: warm-up, then cosine decay to 1 % over the epochs or the time budget; constant
    warmup_epochs: int = 1  # linear warm-up from 0: a fresh BatchNorm U-Net takes large Adam steps badly
    patience: int = 20  # stop after this many epochs without a better val_dice; 0 = never
    precision: str = "auto"  # auto (mixed_float16 on GPU, float32 on CPU), float32, mixed_float16 or mixed_bfloat16
    jit_compile: str = "auto"  # XLA for the training step: auto (Keras' rule: on a GPU without tf.distribute), true, false
    global_batch: int = 0  # if set: a fixed global batch split over the replicas (must divide evenly); 0 = batch_size x replicas
    workers: int = 2  # augmentation processes; 1 = in the training process
    gpus: str = ""  # GPU indices to use, e.g. 0,1; empty = all visible
    seed: int = 0
    checkpoint_dir: str = ""  # resume backup written every epoch; "" = .em-unet-checkpoints/<hash of config and data> here, so the same command resumes
    experiment: str = DEFAULT_EXPERIMENT


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill fields left at 0 from the preset and check the result."""
    if cfg.preset not in PRESETS:
        raise InputError(f"preset must be one of {', '.join(PRESETS)}, got {cfg.preset!r}")
    choices = {"loss": LOSSES, "augment": AUGMENTATIONS, "lr_schedule": SCHEDULES, "precision": PRECISIONS,
               "jit_compile": JIT_CHOICES}
    for name, known in choices.items():
        if getattr(cfg, name) not in known:
            raise InputError(f"{name} must be one of {', '.join(known)}, got {getattr(cfg, name)!r}")
    if cfg.input_scale not in (0, *INPUT_SCALES):
        raise InputError(f"input_scale must be 0 (auto) or one of {', '.join(map(str, INPUT_SCALES))}, got {cfg.input_scale}")
    if not 0 < cfg.bn_momentum < 1:
        raise InputError(f"bn_momentum must be between 0 and 1, e.g. 0.99; got {cfg.bn_momentum}")
    if not 0 <= cfg.ema < 1:
        raise InputError(f"ema is a momentum between 0 (off) and 1, e.g. 0.99; got {cfg.ema}")
    if not 0 <= cfg.foreground <= 1:
        raise InputError(f"foreground is a share of crops, between 0 and 1; got {cfg.foreground}")
    filled = {k: v for k, v in PRESETS[cfg.preset].items() if not getattr(cfg, k)}
    cfg = dataclasses.replace(cfg, **filled)
    multiple = 2**cfg.depth
    if cfg.crop_size % multiple:
        raise InputError(f"crop_size {cfg.crop_size} must be a multiple of 2**depth = {multiple}")
    for name in ("crop_size", "base_filters", "depth", "batch_size", "steps_per_epoch", "epochs", "workers"):
        if getattr(cfg, name) < 1:
            raise InputError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    return cfg


def batch_sizes(cfg: TrainConfig, replicas: int) -> tuple[int, int]:
    """`(per-replica batch, global batch)`: `batch_size` per replica, unless `global_batch` fixes the
    global one, which must then split evenly over the replicas."""
    if not cfg.global_batch:
        return cfg.batch_size, cfg.batch_size * replicas
    if cfg.global_batch % replicas:
        raise InputError(f"global_batch {cfg.global_batch} does not divide over {replicas} replicas; use a "
                         f"multiple of {replicas}, e.g. {max(replicas, cfg.global_batch // replicas * replicas)}")
    return cfg.global_batch // replicas, cfg.global_batch


def resolve_precision(name: str) -> str:
    """Keras dtype policy for `precision`: "auto" is mixed_float16 where a GPU is visible, else float32."""
    if name != "auto":
        return name
    import tensorflow as tf

    return "mixed_float16" if tf.config.list_logical_devices("GPU") else "float32"


@contextmanager
def dtype_policy(name: str):
    """Keras' global dtype policy for the block only: what is built after training (the float32 copy that
    is logged) and later callers in the same process are not affected."""
    before = keras.config.dtype_policy().name
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(before)


def choose_scale(cfg: TrainConfig, crop_from_preset: bool, dataset_dir: Path, manifest: dict) -> tuple[TrainConfig, float]:
    """Fill `input_scale` (0 = auto, from the training masks) and grow a preset crop with it, so the
    network still sees the preset's crop at its own resolution (capped by the smallest slice). Returns the
    config and the thinnest structure measured (NaN when the scale was given)."""
    train_stacks = stacks_in(manifest, "train")
    thinnest, scale = float("nan"), cfg.input_scale
    if not scale:
        thinnest = thinnest_structure([open_stack(dataset_dir, s)[1] for s in train_stacks])
        scale = auto_input_scale(thinnest)
    crop, multiple = cfg.crop_size, multiple_of(UNetSpec(depth=cfg.depth, input_scale=scale))
    if crop_from_preset:
        smallest = min(min(s.shape[1:]) for s in train_stacks)
        crop = max(multiple, min(crop * scale, smallest // multiple * multiple))
    if crop % multiple:
        raise InputError(f"crop_size {crop} must be a multiple of 2**depth x input_scale = {multiple}")
    return dataclasses.replace(cfg, input_scale=scale, crop_size=crop), thinnest


def check_sizes(cfg: TrainConfig, manifest: dict) -> None:
    for s in stacks_in(manifest, "train"):
        if min(s.shape[1:]) < cfg.crop_size:
            raise InputError(f"crop_size {cfg.crop_size} is larger than the {s.shape[1]} x {s.shape[2]} slices of "
                             f"stack {s.name}; pass a smaller crop_size")


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
    backup to resume from (`Backup.load`, None to start afresh). Resuming continues the backup's run; a
    backup whose run this tracking store does not have is ignored, and so are backups of different epochs
    on the workers of a cluster (they must all start from the same one)."""
    resumed = backup.load()
    if resumed and chief and not run_exists(resumed["state"]["run_id"]):
        print(f"the backup in {backup.folder} belongs to run {resumed['state']['run_id']}, which the tracking "
              f"store {mlflow.get_tracking_uri()} does not have: starting afresh", flush=True)
        resumed = None
    if cluster is not None:
        start = float(resumed["state"]["next_epoch"]) if resumed else 0.0
        if agree(strategy, start) ** 2 != agree(strategy, start * start):  # not the same on every worker
            print("the workers' backups are of different epochs: starting afresh", flush=True)
            resumed = None
    run_id = resumed["state"]["run_id"] if resumed and chief else None
    with step_run("train", cfg.experiment, run_id=run_id) if chief else nullcontext(None) as run:
        yield run, resumed


def restore(resumed: dict, model, strategy, schedule: Schedule, validation: Validation, run) -> tuple[int, bool]:
    """Put a backup's state back: weights and optimizer state, the schedule's step, the best epoch, the
    time spent; log the last epoch's metrics if the kill came before they were logged. Returns
    `(first epoch to run, whether training had already decided to stop)`."""
    state = resumed["state"]
    with strategy.scope():
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        model.load_weights(resumed["weights"])
    schedule.step = state["schedule_step"]
    schedule.spent_before = validation.spent_before = state["spent_seconds"]
    validation.best_dice, validation.best_epoch = state["best_dice"], state["best_epoch"]
    validation.best_weights, validation.epochs_done = resumed["best_weights"], state["next_epoch"]
    last = state["next_epoch"] - 1
    if run is not None:
        logged = {m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_dice")}
        if last not in logged:
            mlflow.log_metrics(state["metrics"], step=last)
    print(f"resuming from the backup of epoch {last + 1} (best val_dice {state['best_dice']:.4f} at epoch "
          f"{state['best_epoch'] + 1})" + (f" in run {run.info.run_id}" if run is not None else ""), flush=True)
    return state["next_epoch"], state["stopped"]


def train(cfg: TrainConfig, devices: list[str] | None = None) -> dict:
    """Run the step: returns `{"run_id", "model_uri", "val_dice", "epochs", "model", "fit_model"}`: `model`
    is the float32 Keras model holding the best weights, `fit_model` the one trained under the distribution
    strategy with the last weights (both for in-process callers). On a worker that is not the chief, run_id
    and model_uri are None: only the chief logs.

    `devices` (tests) forces MirroredStrategy over the given devices, e.g. two logical CPUs. With
    `TF_CONFIG` set, this process is one worker of a MultiWorkerMirroredStrategy cluster.

    After every epoch the state is backed up (`pipeline.checkpoint`); run again after a kill, the same
    config on the same data continues from the last completed epoch in the same MLflow run, with the
    same batches, learning rates and best epoch as a run that was never interrupted. The time budget
    counts the completed epochs of all attempts. The backup is deleted when the run has finished.
    """
    crop_from_preset = not cfg.crop_size
    cfg = resolve(cfg)
    cluster = cluster_config()  # before anything else: a TF_CONFIG that does not parse fails here
    dataset_dir = local_artifact(cfg.dataset_uri, "dataset")
    manifest = read_manifest(dataset_dir)
    cfg, thinnest = choose_scale(cfg, crop_from_preset, dataset_dir, manifest)
    check_sizes(cfg, manifest)
    strategy = make_strategy(cfg.gpus, devices, cluster)
    replicas = strategy.num_replicas_in_sync
    per_replica, global_batch = batch_sizes(cfg, replicas)
    chief = is_chief(cluster)
    policy = resolve_precision(cfg.precision)
    spec = UNetSpec(depth=cfg.depth, base_filters=cfg.base_filters, batch_norm=cfg.batch_norm, dropout=cfg.dropout,
                    bn_momentum=cfg.bn_momentum, sync_batch_norm=replicas > 1, input_scale=cfg.input_scale)
    # Linear scaling rule (Goyal et al. 2017): the rate grows with the global batch, from the recipe's
    # rate for one replica's batch; the warm-up is what makes large multiples stable.
    peak_rate = cfg.learning_rate * global_batch / cfg.batch_size
    keras.utils.set_random_seed(cfg.seed)
    key = checkpoint_key(asdict(cfg), manifest.get("content_hash", ""), replicas)
    with Backup(backup_dir(cfg.checkpoint_dir, key, cluster), key) as backup, \
            train_run(cfg, backup, chief, strategy, cluster) as (run, resumed):
        if chief:
            # The resolved recipe too: under `mlflow run -e train` the preset placeholders (0) are logged.
            log_config(cfg, replicas=replicas, global_batch_size=global_batch, per_replica_batch=per_replica,
                       peak_learning_rate=peak_rate, dtype_policy=policy, thinnest_structure_px=round(thinnest, 1),
                       recipe=json.dumps({k: getattr(cfg, k) for k in (*PRESETS[cfg.preset], "input_scale")}))
            mlflow.set_tag("data_fingerprint", manifest["eval_fingerprint"])
        with dtype_policy(policy), strategy.scope():
            model = build_unet(spec)
            model.compile(keras.optimizers.Adam(peak_rate, use_ema=cfg.ema > 0, ema_momentum=cfg.ema or 0.99), get_loss(cfg.loss), jit_compile=JIT_CHOICES[cfg.jit_compile])
        eval_model = build_unet(spec, name="unet")  # float32, outside the strategy: validated and logged
        if chief:
            mlflow.log_param("parameters", model.count_params())
        augment = dataclasses.replace(AUGMENTATIONS[cfg.augment], foreground=cfg.foreground)
        data = PatchDataset(dataset_dir, stacks_in(manifest, "train"), global_batch, cfg.crop_size,
                            cfg.steps_per_epoch, cfg.seed, workers=cfg.workers, augment=augment)
        schedule = Schedule(cfg, peak_rate, strategy)

        def save(epoch, metrics, stop, elapsed):
            backup.save({"run_id": run.info.run_id if run else None, "next_epoch": epoch + 1,
                         "data_epoch": data.epoch, "schedule_step": schedule.step, "best_dice": validation.best_dice,
                         "best_epoch": validation.best_epoch, "spent_seconds": elapsed, "stopped": stop,
                         "metrics": metrics}, model, validation.best_weights)

        validation = Validation(dataset_dir, cfg, stacks_in(manifest, "val"), cfg.steps_per_epoch * global_batch,
                                eval_model, strategy, chief, backup=save)
        callbacks = [schedule, validation]
        if cluster is not None:
            build_before_fit(model, strategy, tuple(a[:per_replica] for a in data[0]))
        start, stopped = restore(resumed, model, strategy, schedule, validation, run) if resumed else (0, False)
        if resumed:
            # After fit's own reset of the data (which counts as an epoch end): the batches of the next epoch.
            data_epoch = resumed["state"]["data_epoch"]
            callbacks.insert(0, keras.callbacks.LambdaCallback(on_train_begin=lambda logs: setattr(data, "epoch", data_epoch)))
        if not stopped and start < cfg.epochs:
            # shuffle=False: the batches are random draws already; Keras' shuffle would order them by Python's
            # global `random` state, which a resumed process does not have (its losses differed by 1 %).
            model.fit(data, epochs=cfg.epochs, initial_epoch=start, callbacks=callbacks, shuffle=False,
                      verbose=1 if sys.stdout.isatty() else 2)
        eval_model.set_weights(validation.best_weights)
        epochs = validation.epochs_done
        with tempfile.TemporaryDirectory() as tmp:
            # Every worker saves (TensorFlow's rule for multi-worker training); only the chief's copy is logged.
            keras_path = Path(tmp) / "unet.keras"
            eval_model.save(keras_path)
            if not chief:
                backup.remove()
                return {"run_id": None, "model_uri": None, "val_dice": validation.best_dice, "epochs": epochs,
                        "model": eval_model, "fit_model": model}
            mlflow.log_metrics({"best_val_dice": validation.best_dice, "best_epoch": validation.best_epoch,
                                "epochs_trained": epochs})
            meta = {"multiple_of": multiple_of(spec), "spec": asdict(spec), "crop_size": cfg.crop_size,
                    "data_fingerprint": manifest["eval_fingerprint"]}
            log_segmenter(keras_path, meta, name="model")
            mlflow.keras.log_model(eval_model, name="keras_model", pip_requirements=model_requirements())
        backup.remove()  # inside the run: a kill before this line resumes (and finishes) the same run
        return {"run_id": run.info.run_id, "model_uri": f"runs:/{run.info.run_id}/model",
                "val_dice": validation.best_dice, "epochs": epochs, "model": eval_model, "fit_model": model}


if __name__ == "__main__":
    run_entry(train, TrainConfig)
