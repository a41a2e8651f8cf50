"""What a training run is asked to do: `TrainConfig` (every field a `--flag` of `python -m pipeline.train`
and an MLproject parameter, with the same default) and the named presets that fill its zero fields."""

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass

import keras

from emunet.core import hardware
from emunet.core.errors import InputError
from emunet.core.losses import LOSSES
from emunet.core.model import INPUT_SCALES, UNetSpec
from emunet.registry.champion import AUTO, CHAMPION_METRICS
from emunet.registry.tracking import DEFAULT_EXPERIMENT
from emunet.training.augment import AUGMENTATIONS

SCHEDULES = ("cosine", "constant")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
# 2.5-D context beyond 4 slices on each side (9 channels): slices that far apart in serial sections
# share little, and each channel is read and augmented for every crop.
MAX_CONTEXT_SLICES = 4
JIT_CHOICES = {"auto": "auto", "true": True, "false": False}
PLANE_CHOICES = ("auto", "xy", "ortho")

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
    input_scale: int = 0  # the network works at 1/input_scale of the image resolution (1, 2 or 4); 0 = auto: the largest that keeps the thinnest labelled structure 16 px thick (emunet.training.plan); preset crops grow with it
    context_slices: str = "auto"  # 2.5-D: the k slices above and below each slice are extra input channels (2k + 1, mirrored at the stack's ends); helps where structures continue across slices (near-isotropic FIB-SEM); 0 = the 2-D network; at most 4; auto: 1 where every training stack's voxel size is near-isotropic, else 0 (emunet.training.plan.choose_context). Resolved, it holds the number
    planes: str = "auto"  # xy: train on the slices and predict them; ortho: train on the xy, xz and yz planes alike and predict all three, averaged (near-isotropic volumes: FIB-SEM); auto: train on the slices, and predict all three planes where every training stack's voxel size is near-isotropic (slice spacing within 2x of the pixel size), else the slices (emunet.training.plan.choose_planes). Resolved, it holds the crops' planes
    batch_size: int = 0  # per replica; global batch = batch_size x replicas
    learning_rate: float = 0.0  # Adam; scaled linearly with the number of replicas
    steps_per_epoch: int = 0  # batches between validations
    epochs: int = 200  # upper bound; `max_minutes` usually ends training first
    max_minutes: float = 5.0  # time budget (keeps `mlflow run .` under 10 min on 2 cores): stops after the epoch that would overrun it; 0 = none
    loss: str = "bce_dice"  # bce, dice, bce_dice, bce_dice_both (Dice of both classes: thin background such as membranes) or focal
    border_weight: float = 0.0  # w0 of the U-Net paper's border weight map on the cross-entropy: background between two nearby cells weighs up to 1 + w0 (e.g. 10); 0 = off (emunet.training.weights)
    dropout: float = 0.0  # bottleneck dropout
    ema: float = 0.0  # momentum of an exponential moving average of the weights, validated and kept instead of the last ones (e.g. 0.99); 0 = off
    batch_norm: bool = True
    bn_momentum: float = UNetSpec.bn_momentum  # BatchNorm's moving averages (0.99: over ~100 steps); 0.9 follows the weights within ~10 steps, for runs of a few dozen steps, but validates noisily
    augment: str = "em"  # em: rotation, flips, scale, elastic, intensity, blur, noise; basic: the original study's rotation and flips; none
    foreground: float = 0.33  # share of crops centred on foreground (nnU-Net's oversampling): sparse organelles get seen
    lr_schedule: str = "cosine"  # cosine: warm-up, then cosine decay to 1 % over the epochs or the time budget; constant
    warmup_epochs: int = 1  # linear warm-up from 0: a fresh BatchNorm U-Net takes large Adam steps badly
    patience: int = 20  # stop after this many epochs without a better val_<champion_metric>; 0 = never
    # The best epoch (the weights kept) and early stopping follow the metric the registry chooses the
    # champion by, computed by the same code as evaluate: training and the registry agree on "better".
    # auto: object_f1_3d where cells are found in 3-D (every stack near-isotropic and fully annotated),
    # else object_f1 (emunet.registry.champion.choose_champion_metric).
    champion_metric: str = AUTO
    precision: str = "auto"  # auto (mixed_float16 on GPU, mixed_bfloat16 on a CPU with AMX/AVX512 bfloat16 units, float32 on other CPUs), float32, mixed_float16 or mixed_bfloat16
    jit_compile: str = "auto"  # XLA for the training step: auto (Keras' rule: on a GPU without tf.distribute), true, false
    global_batch: int = 0  # if set: a fixed global batch split over the replicas (must divide evenly); 0 = batch_size x replicas
    workers: int = 2  # augmentation processes; 1 = in the training process
    gpus: str = ""  # GPU indices to use, e.g. 0,1; empty = all visible
    seed: int = 0
    checkpoint_dir: str = ""  # resume backup written every epoch; "" = .em-unet-checkpoints/<hash of config and data> here, so the same command resumes
    init_model: str = ""  # start from this model's weights (models:/em-unet@champion, runs:/<id>/model): a few annotated slices of a new sample then need minutes, not hours; its architecture is taken, contradicting fields are refused; "" = random initialisation
    freeze_encoder_epochs: int = 0  # with init_model: the encoder (contracting path and bottleneck) stays fixed for this many first epochs, so a few new slices adapt the decoder without wrecking the features learnt on the large data; 0 = everything trains from the start
    experiment: str = DEFAULT_EXPERIMENT

    def __post_init__(self):
        object.__setattr__(self, "context_slices", context_value(self.context_slices))


def context_value(value) -> int | str:
    """`context_slices` as given (a flag's text, an MLflow param, a number): "auto" or a whole number."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"context_slices must be auto or a whole number of slices, got {value!r}") from None
    if not number.is_integer() or isinstance(value, bool):
        raise InputError(f"context_slices must be auto or a whole number of slices, got {value!r}")
    return int(number)


def _check_ranges(cfg: TrainConfig) -> None:
    """Refuse values that cannot mean anything, naming the field, the value and what it may be."""
    rules = [
        ("input_scale", cfg.input_scale in (0, *INPUT_SCALES), f"0 (auto) or one of {', '.join(map(str, INPUT_SCALES))}"),
        ("context_slices", cfg.context_slices == AUTO or 0 <= cfg.context_slices <= MAX_CONTEXT_SLICES,
         f"auto or between 0 (one slice, 2-D) and {MAX_CONTEXT_SLICES} slices on each side"),
        ("bn_momentum", 0 < cfg.bn_momentum < 1, "between 0 and 1, e.g. 0.99"),
        ("ema", 0 <= cfg.ema < 1, "a momentum between 0 (off) and 1, e.g. 0.99"),
        ("foreground", 0 <= cfg.foreground <= 1, "a share of crops, between 0 and 1"),
        ("dropout", 0 <= cfg.dropout < 1, "a rate between 0 and 1"),
        ("border_weight", 0 <= cfg.border_weight <= 100, "0 (off) or a weight up to 100, e.g. 10"),
        ("learning_rate", cfg.learning_rate >= 0, "positive (0 = the preset's)"),
        ("max_minutes", cfg.max_minutes >= 0, "0 (no budget) or more"),
        ("warmup_epochs", cfg.warmup_epochs >= 0, "0 or more"),
        ("patience", cfg.patience >= 0, "0 (never stop early) or more"),
        ("global_batch", cfg.global_batch >= 0, "0 (batch_size x replicas) or more"),
        ("freeze_encoder_epochs", cfg.freeze_encoder_epochs >= 0, "0 (off) or a number of epochs"),
    ]
    for name, ok, expected in rules:
        if not ok:
            raise InputError(f"{name} must be {expected}; got {getattr(cfg, name)}")
    if cfg.freeze_encoder_epochs and not cfg.init_model:
        raise InputError(f"freeze_encoder_epochs={cfg.freeze_encoder_epochs} needs init_model: freezing a randomly "
                         f"initialised encoder would only stop it from learning")


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill fields left at 0 from the preset and check the result."""
    if cfg.preset not in PRESETS:
        raise InputError(f"preset must be one of {', '.join(PRESETS)}, got {cfg.preset!r}")
    choices = {"champion_metric": (AUTO, *CHAMPION_METRICS), "loss": LOSSES, "augment": AUGMENTATIONS, "lr_schedule": SCHEDULES, "precision": PRECISIONS,
               "jit_compile": JIT_CHOICES, "planes": PLANE_CHOICES}
    for name, known in choices.items():
        if getattr(cfg, name) not in known:
            raise InputError(f"{name} must be one of {', '.join(known)}, got {getattr(cfg, name)!r}")
    _check_ranges(cfg)
    filled = {k: v for k, v in PRESETS[cfg.preset].items() if not getattr(cfg, k)}
    cfg = dataclasses.replace(cfg, **filled)
    for name in ("crop_size", "base_filters", "depth", "batch_size", "steps_per_epoch", "epochs", "workers"):
        if getattr(cfg, name) < 1:
            raise InputError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    multiple = 2**cfg.depth
    if cfg.crop_size % multiple:
        raise InputError(f"crop_size {cfg.crop_size} must be a multiple of 2**depth = {multiple}")
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


def resolve_precision(name: str, features=None) -> str:
    """Keras dtype policy for `precision`: "auto" is mixed_float16 where a GPU is visible, mixed_bfloat16 on
    a CPU with bfloat16 units (`features`: its flags, default this machine's; `emunet.core.hardware`), where
    the `fast` preset's training step ran 3.05x as fast (bench/train_throughput.py --compare_precision), else
    float32. The policy is logged as the `dtype_policy` param."""
    if name != "auto":
        return name
    import tensorflow as tf

    precision = hardware.resolve_precision(name, features, gpu=bool(tf.config.list_logical_devices("GPU")))
    return "mixed_bfloat16" if precision == "bfloat16" else precision


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
