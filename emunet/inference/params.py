"""The segmentation parameters: one frozen object, validated once, shared by every caller.

predict, Spark, evaluate, training validation, the viewer, the pyfunc (and so REST) and the benches all
build a `SegmentParams` and hand it to the one segmentation path (`emunet.inference.segment`), so what
counts as a cell cannot drift between them. The pyfunc's parameter schema is made from these fields
(`emunet.inference.segmenter.signature`), and the entry points' config fields take their defaults from
`DEFAULTS`.

    params = SegmentParams.from_dict({"threshold": 0.4, "tile_size": 512})   # InputError if bad
    params.threshold, params.with_window(low, high)
"""

import dataclasses
import math
from dataclasses import dataclass

from emunet.core.errors import InputError
from emunet.core.hardware import PRECISIONS
from emunet.inference.instances import DEFAULT_SEED_THRESHOLD, SEED_DEPTH
from emunet.inference.tiling import DEFAULT_OVERLAP, TTA_MODES

OUTPUTS = ("mask", "probability", "labels")
# How objects are found: "2d" in each slice, linked through the slices (anisotropic serial sections);
# "3d" as solid objects by a 3-D watershed (near-isotropic volumes); "auto" by the voxel size.
INSTANCE_MODES = ("auto", "2d", "3d")
# The planes the network is asked about: "xy" the slices; "ortho" the xy, xz and yz planes, averaged
# (a 2.5-D ensemble for near-isotropic volumes, emunet.inference.context); "auto" the planes the model records.
PLANE_MODES = ("auto", "xy", "ortho")
ENGINES = ("auto", "openvino", "tensorflow")  # emunet.inference.engines: what runs the network
# The MLflow param type of each field (the pyfunc's schema); None defaults are optional doubles.
PARAM_TYPES = {"output": "string", "threshold": "double", "tile_size": "long", "overlap": "double",
               "batch_size": "long", "tta": "string", "min_object_size": "long", "seed_threshold": "double", "seed_depth": "double",
               "instances": "string", "planes": "string", "grow_over_all": "string", "engine": "string", "precision": "string",
               "low": "double", "high": "double"}


# What predict and Spark print when `grow_over_all=auto` settles true for the model they run.
GROWS_OVER_ALL_LINE = ("3-D objects grow over every voxel, membranes included (the model learnt dense instance "
                       "labels; grow_over_all=false keeps them to the foreground)")


def _number(name: str, value, whole: bool = False) -> float | int:
    """`value` as a finite float (or a whole int), else an `InputError` naming the parameter."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number) or (whole and not number.is_integer()) or isinstance(value, bool):
        raise InputError(f"{name} must be a finite {'whole ' if whole else ''}number, got {value!r}")
    return int(number) if whole else number


@dataclass(frozen=True)
class SegmentParams:
    """How a volume is segmented. Constructing one checks and types every field (`InputError` names a
    bad one); an instance is always valid."""

    # "mask" (uint8 {0, 1}), "probability" (float32 in [0, 1]) or "labels" (int32, one id per 3-D object)
    output: str = "mask"
    threshold: float = 0.5  # the model is trained with BCE + Dice: 0.5 is its calibrated cut
    # Largest tile side, rounded up to a multiple of the model's down-sampling. Slices up to 1024 x 1024
    # run whole (no overlap to pay for); larger ones are tiled; memory is bounded either way.
    tile_size: int = 1024
    overlap: float = DEFAULT_OVERLAP  # a quarter: enough with Gaussian blending (emunet.inference.tiling)
    batch_size: int = 4  # most tiles per forward pass (fewer when tiles are large)
    tta: str = "none"  # "flips" (4 views) or "d4" (8 views): smoother masks for 4x or 8x the time
    # Pixels: an object in a slice smaller than this is a speck, not a cell; dropped from the labels,
    # the objects table and the object scores alike.
    min_object_size: int = 20
    # Cores the network is this sure of seed one object each, grown over the foreground (a seeded
    # watershed), so touching cells come apart; <= threshold: objects are the mask's components.
    seed_threshold: float = DEFAULT_SEED_THRESHOLD
    # Two neighbouring objects stay apart only where the probability between them dips at least this far
    # below the weaker core: a shallower dip is texture inside one cell (emunet.inference.instances).
    seed_depth: float = SEED_DEPTH
    # "auto": in 3-D where the slice spacing is within 2x of the pixel size (the voxel size says so;
    # unknown: slice by slice), else in each slice linked through the slices. See INSTANCE_MODES.
    instances: str = "auto"
    # "auto": the planes the model records (models of near-isotropic training data predict the xy, xz and
    # yz planes of a volume and average them: 3x the time); "xy": the slices only; "ortho": all three.
    planes: str = "auto"
    # Objects grow over every voxel, membranes included (3-D), as connectomics tools label dense tissue;
    # False: over the foreground only; "auto": what the model records (True for a model of dense instance
    # labels, `emunet.core.dataset.dense_instances`; `Segmenter.settle`), False for probabilities handed
    # over without a model. See `settled`.
    grow_over_all: bool | str = "auto"
    # What runs the network: "auto" is OpenVINO on a CPU (4-6x TensorFlow's speed in bfloat16 on CPUs
    # with bfloat16 units, bench/inference.py), TensorFlow + XLA on a GPU or where OpenVINO is absent.
    engine: str = "auto"
    # "auto": bfloat16 where the serving CPU has bfloat16 units (AMX-BF16, AVX512-BF16), mixed_float16
    # on a GPU, float32 elsewhere (emunet.core.hardware); on trained models Dice stays within 0.003 of
    # float32's, probabilities 0.001 apart on average (bench/precision_quality.py).
    precision: str = "auto"
    # The whole volume's intensity window (percentiles 0.5 / 99.5, as predict and Spark compute them);
    # None: the input's own. Pass both when sending part of a volume.
    low: float | None = None
    high: float | None = None

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        if self.output not in OUTPUTS:
            raise InputError(f"output must be one of {', '.join(OUTPUTS)}, got {self.output!r}")
        if self.instances not in INSTANCE_MODES:
            raise InputError(f"instances must be one of {', '.join(INSTANCE_MODES)}, got {self.instances!r}")
        if self.planes not in PLANE_MODES:
            raise InputError(f"planes must be one of {', '.join(PLANE_MODES)}, got {self.planes!r}")
        if not isinstance(self.grow_over_all, bool):
            text = str(self.grow_over_all).strip().lower()
            if text not in ("true", "false", "1", "0", "auto"):
                raise InputError(f"grow_over_all must be auto, true or false, got {self.grow_over_all!r}")
            put("grow_over_all", "auto" if text == "auto" else text in ("true", "1"))
        if self.engine not in ENGINES:
            raise InputError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.precision not in PRECISIONS:
            raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.tta not in TTA_MODES:
            raise InputError(f"tta must be one of {', '.join(TTA_MODES)}, got {self.tta!r}")
        for name in ("tile_size", "batch_size", "min_object_size"):
            put(name, _number(name, getattr(self, name), whole=True))
        for name in ("threshold", "overlap", "seed_threshold", "seed_depth"):
            put(name, _number(name, getattr(self, name)))
        if self.tile_size < 1 or self.batch_size < 1 or self.min_object_size < 0:
            raise InputError(f"need tile_size >= 1, batch_size >= 1 and min_object_size >= 0, got tile_size "
                             f"{self.tile_size}, batch_size {self.batch_size}, min_object_size {self.min_object_size}")
        if not 0 <= self.overlap < 1:
            raise InputError(f"need 0 <= overlap < 1, got {self.overlap}")
        for name in ("threshold", "seed_threshold", "seed_depth"):
            if not 0 <= getattr(self, name) <= 1:
                raise InputError(f"{name} is a probability between 0 and 1, got {getattr(self, name)}")
        if (self.low is None) != (self.high is None):
            raise InputError("pass both low and high (the volume's intensity window), or neither")
        if self.low is not None:
            put("low", _number("low", self.low))
            put("high", _number("high", self.high))
            if self.high <= self.low:
                raise InputError(f"high must be above low (the volume's intensity window), got low {self.low} "
                                 f"and high {self.high}")

    @classmethod
    def from_dict(cls, params: dict | None = None, **overrides) -> "SegmentParams":
        """From a params dict (the pyfunc's, a config's): unknown names are refused, None means default."""
        given = {**(params or {}), **overrides}
        unknown = sorted(set(given) - set(FIELDS))
        if unknown:
            raise InputError(f"unknown param(s) {', '.join(unknown)}; known: {', '.join(FIELDS)}")
        return cls(**{k: v for k, v in given.items() if v is not None})

    @classmethod
    def from_config(cls, cfg, **overrides) -> "SegmentParams":
        """From an entry point's config dataclass: the fields it shares with this one."""
        shared = {k: getattr(cfg, k) for k in FIELDS if hasattr(cfg, k)}
        return cls.from_dict({**shared, **overrides})

    def settled(self, model_grows: bool) -> "SegmentParams":
        """These params with `grow_over_all="auto"` made the model's choice `model_grows`."""
        return self.replace(grow_over_all=bool(model_grows)) if self.grow_over_all == "auto" else self

    @property
    def grows_over_all(self) -> bool:
        """Whether 3-D objects grow over every voxel: `grow_over_all` True ("auto" not settled: False)."""
        return self.grow_over_all is True

    def replace(self, **changes) -> "SegmentParams":
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = tuple(f.name for f in dataclasses.fields(SegmentParams))
DEFAULTS = SegmentParams()
