"""The MLflow pyfunc model logged with every trained U-Net: give it a stack, get its segmentation.

`predict` takes `(H, W)` or `(Z, H, W)` raw intensities (uint8, uint16 or float; normalised here with the
same function as in training) and returns an array of the same spatial shape: a {0, 1} uint8 mask, or
float32 probabilities with `params={"output": "probability"}`. Slices of any size are segmented with
overlapping Gaussian-blended tiles (`serving.tiling`).
"""

import json
from pathlib import Path

import mlflow
import numpy as np
from scipy import ndimage
from mlflow.models import ModelSignature
from mlflow.types import ParamSchema, ParamSpec

from pipeline.errors import InputError
from pipeline.normalize import stack_stats
from serving.tiling import DEFAULT_OVERLAP, TTA_MODES, iter_probabilities, round_up

DEFAULT_PARAMS = {
    # "mask" (uint8 {0, 1}), "probability" (float32 in [0, 1]) or "labels" (int32, one id per object)
    "output": "mask",
    "threshold": 0.5,  # the model is trained with BCE + Dice: 0.5 is its calibrated cut
    # Largest tile side. Slices up to 1024 x 1024 run whole (no overlap to pay for); larger ones are
    # tiled; memory is bounded by serving.tiling.MAX_BATCH_PIXELS either way.
    "tile_size": 1024,
    "overlap": DEFAULT_OVERLAP,
    "batch_size": 4,  # most tiles per forward pass (fewer when tiles are large)
    "tta": "none",  # "flips" (4 views) or "d4" (8 views): smoother masks for 4x or 8x the time
    "min_object_size": 20,  # voxels; smaller components are dropped from "labels" (noise, not cells)
}
OUTPUTS = ("mask", "probability", "labels")
# What a logged model needs to run (pinned as in requirements.txt); the viewer's and Spark's packages stay
# out, so `mlflow models serve` does not install a browser UI and a JVM bridge to answer requests.
MODEL_PACKAGES = ("tensorflow", "keras", "mlflow", "numpy", "tifffile", "opencv-python-headless", "tqdm", "scipy")


def signature() -> ModelSignature:
    """Inference options as params; no input schema on purpose: the segmenter takes 2-D or 3-D input of
    any numeric dtype, which one tensor spec cannot express, and checks it itself (`as_stack`) with
    messages a user can act on."""
    kinds = {str: "string", int: "long", float: "double", bool: "boolean"}
    params = ParamSchema([ParamSpec(k, kinds[type(v)], v) for k, v in DEFAULT_PARAMS.items()])
    return ModelSignature(inputs=None, outputs=None, params=params)


def label_objects(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Instance labels of a `(Z, H, W)` mask: 3-D face-connected components (a cell continues through
    consecutive slices), components under `min_size` voxels removed, ids 1..N. Returns int32."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return labels.astype(np.int32)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_size
    keep[0] = False
    new_ids = np.zeros(count + 1, np.int32)
    new_ids[keep] = np.arange(1, int(keep.sum()) + 1)
    return new_ids[labels]


def resolve_options(params: dict) -> dict:
    """`DEFAULT_PARAMS` overridden by the given params (None means default), checked."""
    options = {**DEFAULT_PARAMS, **{k: v for k, v in params.items() if v is not None}}
    if options["output"] not in OUTPUTS:
        raise InputError(f"output must be one of {', '.join(OUTPUTS)}, got {options['output']!r}")
    if options["tta"] not in TTA_MODES:
        raise InputError(f"tta must be one of {', '.join(TTA_MODES)}, got {options['tta']!r}")
    if int(options["tile_size"]) < 1 or not 0 <= float(options["overlap"]) < 1 or int(options["batch_size"]) < 1:
        raise InputError(f"need tile_size >= 1, 0 <= overlap < 1 and batch_size >= 1, got tile_size "
                         f"{options['tile_size']}, overlap {options['overlap']}, batch_size {options['batch_size']}")
    return options


def check_tile_size(tile_size: int, multiple: int) -> None:
    """A U-Net of depth d halves a tile d times: its side must divide by `multiple` = 2**d."""
    if tile_size % multiple:
        raise InputError(f"tile_size {tile_size} is not a multiple of {multiple} (2**depth of this model); "
                         f"use {round_up(tile_size, multiple)} or {max(multiple, tile_size // multiple * multiple)}")


def as_stack(data) -> tuple[np.ndarray, bool]:
    """Check and reshape input to `(Z, H, W)`; returns `(stack, was_2d)`."""
    stack = np.asarray(data)
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
    of `predict_on_batch` on CPU (bench/inference.py), at one compilation (about 2 s) per batch shape."""
    import tensorflow as tf

    graph = tf.function(lambda x: keras_model(x, training=False), jit_compile=True, reduce_retracing=True)
    return lambda tiles: graph(tiles).numpy()


def model_requirements() -> list[str]:
    """The pinned lines of requirements.txt for `MODEL_PACKAGES`."""
    import pipeline

    lines = (Path(pipeline.__file__).parent.parent / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.split("==")[0].strip() in MODEL_PACKAGES]


class StackSegmenter(mlflow.pyfunc.PythonModel):
    """Segments whole stacks with a Keras U-Net saved as the artifact `keras_model`."""

    def load_context(self, context):
        import keras  # only when serving: importing this module (to log a model) stays light

        self.keras_model = keras.models.load_model(context.artifacts["keras_model"], compile=False, safe_mode=True)
        self.meta = json.loads(Path(context.artifacts["meta"]).read_text())
        self.forward = compiled_forward(self.keras_model)

    def iter_probabilities(self, stack: np.ndarray, low: float | None = None, high: float | None = None,
                           **params):
        """Yield the `(H, W)` float32 probability of each slice of a raw `(Z, H, W)` stack, normalised with
        `low`, `high` (default: the stack's own percentiles). `params`: see `DEFAULT_PARAMS`."""
        options = resolve_options(params)
        multiple = int(self.meta["multiple_of"])
        check_tile_size(int(options["tile_size"]), multiple)
        if low is None:
            low, high = stack_stats(stack)
        return iter_probabilities(self.forward, stack, low, high, tile_size=int(options["tile_size"]),
                                  overlap=float(options["overlap"]), batch_size=int(options["batch_size"]),
                                  multiple=multiple, tta=options["tta"])

    def segment(self, stack: np.ndarray, low: float | None = None, high: float | None = None,
                **params) -> np.ndarray:
        """Segment a raw `(Z, H, W)` stack. Returns `(Z, H, W)` uint8 {0, 1} mask, or float32
        probabilities with `output="probability"`, or int32 object ids with `output="labels"`."""
        options = resolve_options(params)
        probs = self.iter_probabilities(stack, low, high, **options)
        if options["output"] == "probability":
            return np.stack(list(probs))
        mask = np.stack([(p >= float(options["threshold"])).astype(np.uint8) for p in probs])
        if options["output"] == "labels":
            return label_objects(mask, int(options["min_object_size"]))
        return mask

    def predict(self, context, model_input, params=None):
        stack, was_2d = as_stack(model_input)
        out = self.segment(stack, **(params or {}))
        return out[0] if was_2d else out


def log_segmenter(keras_path: str | Path, meta: dict, name: str = "model"):
    """Log the pyfunc segmenter for a saved `.keras` file, with the project code it needs to run anywhere."""
    import pipeline
    import serving

    meta_path = Path(keras_path).with_suffix(".json")
    meta_path.write_text(json.dumps(meta, indent=2))
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=StackSegmenter(),
        artifacts={"keras_model": str(keras_path), "meta": str(meta_path)},
        code_paths=[str(Path(pipeline.__file__).parent), str(Path(serving.__file__).parent)],
        signature=signature(),
        pip_requirements=model_requirements(),
    )
