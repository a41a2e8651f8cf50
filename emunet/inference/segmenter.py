"""The MLflow pyfunc model logged with every trained U-Net: give it a stack, get its segmentation.

`predict` takes `(H, W)` or `(Z, H, W)` raw intensities (uint8, uint16 or float; normalised here with the
same function as in training) and returns an array of the same spatial shape: a {0, 1} uint8 mask,
float32 probabilities with `params={"output": "probability"}`, or int32 object ids with `"labels"`.
Slices of any size are segmented with overlapping Gaussian-blended tiles (`emunet.inference.tiling`).

Normalisation uses the intensity window `low`, `high` of the whole stack. A client that sends part of a
stack (one slice over REST) passes the stack's window as params, so the slice is segmented exactly as
it is inside the stack; without them the input's own percentiles are used.

A bad request raises `MlflowException` with `INVALID_PARAMETER_VALUE` and our one-line message:
`mlflow models serve` answers it with HTTP 400 and that message, without a stack trace.
"""

import json
import logging
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

from emunet.core.errors import InputError
from emunet.inference.params import DEFAULTS, FIELDS, PARAM_TYPES, SegmentParams
from emunet.inference.segment import Segmenter, segment_volume

# The params as a dict (old name, kept for callers that read one default).
DEFAULT_PARAMS = DEFAULTS.as_dict()
# What a logged model needs to run (pinned as in requirements.txt); the viewer's and Spark's packages stay
# out, so `mlflow models serve` does not install a browser UI and a JVM bridge to answer requests.
MODEL_PACKAGES = ("tensorflow", "keras", "mlflow", "numpy", "tifffile", "opencv-python-headless", "tqdm", "scipy",
                  "psutil", "scikit-image", "openvino", "filelock")
# The models-from-code file MLflow runs to build the pyfunc when it loads a logged model.
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")

log = logging.getLogger(__name__)


def signature() -> ModelSignature:
    """What the pyfunc takes and gives, as the MLflow UI shows it: a `(Z, H, W)` stack in (uint8, uint16,
    int16 or float; an `(H, W)` image too), the same shape out (a {0, 1} mask, float32 probabilities or
    int ids, by `output`), and every `SegmentParams` field as a param with its default.

    MLflow checks a tensor input schema strictly (its rank and dtype), which would refuse the `(H, W)`
    images and integer stacks the segmenter takes; the segmenter checks its input itself (`as_stack`)
    with messages a user can act on. So the signature is marked as one that MLflow shows but whose
    params only it checks, as it does for signatures made from type hints (`mlflow` is pinned; the
    attribute is checked to exist)."""
    params = ParamSchema([ParamSpec(k, PARAM_TYPES[k], getattr(DEFAULTS, k)) for k in FIELDS])
    stack = Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1))])
    result = ModelSignature(inputs=stack, outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1))]),
                            params=params)
    if not hasattr(result, "_is_signature_from_type_hint"):
        raise RuntimeError(f"mlflow {mlflow.__version__}: ModelSignature no longer marks type-hint signatures")
    result._is_signature_from_type_hint = True
    return result


def as_stack(data) -> tuple[np.ndarray, bool]:
    """Check and reshape input to `(Z, H, W)`; returns `(stack, was_2d)`."""
    try:
        stack = np.asarray(data)
    except (ValueError, TypeError) as exc:  # ragged nested lists
        raise InputError(f"input is not a rectangular array of numbers ({exc})") from None
    if stack.dtype == object:
        raise InputError("input is not a rectangular array of numbers (rows of different lengths, or mixed types)")
    if stack.size == 0:
        raise InputError(f"input is empty (shape {stack.shape})")
    if stack.dtype == bool:
        raise InputError("input is boolean, which looks like a mask; pass the raw image intensities "
                         "(uint8, uint16 or float)")
    if stack.dtype.kind not in "uif":
        raise InputError(f"expected numeric pixels but input has dtype {stack.dtype}")
    if stack.ndim not in (2, 3):
        raise InputError(f"expected an (H, W) image or a (Z, H, W) stack but input has shape {stack.shape}")
    if stack.ndim == 3 and stack.shape[-1] in (3, 4) and min(stack.shape[:2]) > 4:
        raise InputError(f"input of shape {stack.shape} looks like a colour (H, W, {stack.shape[-1]}) image; "
                         f"pass one grayscale channel as (H, W) or a (Z, H, W) stack")
    if stack.dtype.kind == "f" and not np.isfinite(stack).any():
        raise InputError("input has no finite values (all NaN or infinite)")
    return (stack[None], True) if stack.ndim == 2 else (stack, False)


def compiled_forward(keras_model):
    """The network as a function of a `(n, h, w, 1)` float32 batch, compiled with XLA: 1.2-1.3x the speed
    of `predict_on_batch` on CPU (bench/inference.py), at one compilation (about 2 s) per batch shape.
    One trace per shape too (no `reduce_retracing`): a trace at unknown height and width cannot run the
    bilinear up-sampling of an `input_scale` 2 or 4 model in Keras 3.15, so such a model failed on the
    second slice size a process saw; XLA compiles each shape anyway."""
    import tensorflow as tf

    graph = tf.function(lambda x: keras_model(x, training=False), jit_compile=True)
    return lambda tiles: graph(tiles).numpy()


def model_requirements() -> list[str]:
    """The pinned lines of requirements.txt for `MODEL_PACKAGES`."""
    lines = (Path(__file__).resolve().parents[2] / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.split("==")[0].strip() in MODEL_PACKAGES]


class StackSegmenter(mlflow.pyfunc.PythonModel, Segmenter):
    """Segments whole stacks with a Keras U-Net saved as the artifact `keras_model`, through the one
    segmentation path (`emunet.inference.segment`)."""

    def load_context(self, context):
        import keras  # only when serving: importing this module (to log a model) stays light

        self.keras_model = keras.models.load_model(context.artifacts["keras_model"], compile=False, safe_mode=True)
        self.meta = json.loads(Path(context.artifacts["meta"]).read_text())
        Segmenter.__init__(self, None, int(self.meta["multiple_of"]),  # models logged before 2.5-D have no
                           int(self.meta.get("context_slices", 0)), self.meta.get("planes", "xy"),  # context, planes,
                           bool(self.meta.get("grow_over_all", False)))  # nor a choice of grow_over_all
        self.forwards = {}  # (engine, precision) -> forward, made on first use on the machine that serves

    def forward_for(self, params: SegmentParams):
        """The network on `params.engine` in `params.precision`, chosen on this machine ("auto": OpenVINO in
        bfloat16 on a CPU with bfloat16 units; `emunet.inference.engines`), made once per process."""
        from emunet.inference.engines import make_forward

        key = (params.engine, params.precision)
        if key not in self.forwards:
            forward = make_forward(self.keras_model, *key)
            log.info("segmenting with %s in %s", forward.engine, forward.precision)
            self.forwards[key] = forward
        return self.forwards[key]

    def segment(self, stack, low: float | None = None, high: float | None = None, **params) -> np.ndarray:
        """Segment a raw `(Z, H, W)` stack. Returns `(Z, H, W)` uint8 {0, 1} mask, or float32
        probabilities with `output="probability"`, or int32 object ids with `output="labels"` (touching
        cells separated, each followed through the slices: `emunet.inference.instances`). `params` are
        `SegmentParams` fields; `low`, `high` the stack's intensity window (both, or neither)."""
        options = SegmentParams.from_dict(params, low=low, high=high)
        if options.output == "probability":
            return np.stack(list(self.probabilities(stack, options)))
        results = segment_volume(self, stack, options)
        if options.output == "labels":
            return np.stack([r.ids for r in results], dtype=np.int32)  # (no int64 stack first)
        return np.stack([r.mask.astype(np.uint8) for r in results])

    def predict(self, context, model_input: np.ndarray, params: dict | None = None):
        # The hint is np.ndarray (one 2-D or 3-D array; MLflow infers no schema from it and converts
        # nothing): `as_stack` checks the input itself, with messages a user can act on.
        try:
            stack, was_2d = as_stack(model_input)
            out = self.segment(stack, **(params or {}))
        except InputError as exc:  # the scoring server passes this type through as HTTP 400, without a trace
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        return out[0] if was_2d else out


def log_segmenter(keras_path: str | Path, meta: dict, name: str = "model"):
    """Log the pyfunc segmenter for a saved `.keras` file as a model from code (MLflow 3's way for
    custom models: the model is rebuilt from `pyfunc_model.py` on load, nothing is unpickled), with the
    `emunet` package it runs on."""
    meta_path = Path(keras_path).with_suffix(".json")
    meta_path.write_text(json.dumps(meta, indent=2))
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(MODEL_CODE),
        artifacts={"keras_model": str(keras_path), "meta": str(meta_path)},
        code_paths=[str(Path(__file__).resolve().parents[1])],
        signature=signature(),
        pip_requirements=model_requirements(),
    )
