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
from mlflow.models import ModelSignature
from mlflow.types import ParamSchema, ParamSpec

from pipeline.errors import InputError
from pipeline.normalize import stack_stats
from serving.tiling import DEFAULT_OVERLAP, iter_probabilities

DEFAULT_PARAMS = {
    "output": "mask",  # "mask" (uint8 {0, 1}) or "probability" (float32 in [0, 1])
    "threshold": 0.5,  # the model is trained with BCE + Dice: 0.5 is its calibrated cut
    "tile_size": 512,  # large tiles: fewer seams and better throughput; 512 x 512 fits any laptop
    "overlap": DEFAULT_OVERLAP,
    "batch_size": 4,  # tiles per forward pass
}
OUTPUTS = ("mask", "probability")


def signature() -> ModelSignature:
    """Inference options as params; no input schema on purpose: the segmenter takes 2-D or 3-D input of
    any numeric dtype, which one tensor spec cannot express, and checks it itself (`as_stack`) with
    messages a user can act on."""
    kinds = {str: "string", int: "long", float: "double", bool: "boolean"}
    params = ParamSchema([ParamSpec(k, kinds[type(v)], v) for k, v in DEFAULT_PARAMS.items()])
    return ModelSignature(inputs=None, outputs=None, params=params)


def as_stack(data) -> tuple[np.ndarray, bool]:
    """Check and reshape input to `(Z, H, W)`; returns `(stack, was_2d)`."""
    stack = np.asarray(data)
    if stack.size == 0:
        raise InputError(f"input is empty (shape {stack.shape})")
    if stack.dtype == bool:
        stack = stack.astype(np.uint8)
    if stack.dtype.kind not in "uif":
        raise InputError(f"expected numeric pixels but input has dtype {stack.dtype}")
    if stack.ndim not in (2, 3):
        raise InputError(f"expected an (H, W) image or a (Z, H, W) stack but input has shape {stack.shape}")
    return (stack[None], True) if stack.ndim == 2 else (stack, False)


class StackSegmenter(mlflow.pyfunc.PythonModel):
    """Segments whole stacks with a Keras U-Net saved as the artifact `keras_model`."""

    def load_context(self, context):
        import keras  # imported here so that logging the model does not need a TensorFlow session

        self.keras_model = keras.models.load_model(context.artifacts["keras_model"], compile=False, safe_mode=True)
        self.meta = json.loads(Path(context.artifacts["meta"]).read_text())

    def segment(self, stack: np.ndarray, low: float | None = None, high: float | None = None,
                **params) -> np.ndarray:
        """Segment a raw `(Z, H, W)` stack (normalised with `low`, `high`, default: its own percentiles).

        Returns `(Z, H, W)` uint8 mask or float32 probabilities, per `params["output"]`.
        """
        options = {**DEFAULT_PARAMS, **{k: v for k, v in params.items() if v is not None}}
        if options["output"] not in OUTPUTS:
            raise InputError(f"output must be one of {', '.join(OUTPUTS)}, got {options['output']!r}")
        if low is None:
            low, high = stack_stats(stack)
        multiple = int(self.meta["multiple_of"])
        probs = iter_probabilities(lambda x: self.keras_model.predict_on_batch(x), stack, low, high,
                                   tile_size=int(options["tile_size"]), overlap=float(options["overlap"]),
                                   batch_size=int(options["batch_size"]), multiple=multiple)
        if options["output"] == "probability":
            return np.stack(list(probs))
        return np.stack([(p >= float(options["threshold"])).astype(np.uint8) for p in probs])

    def predict(self, context, model_input, params=None):
        stack, was_2d = as_stack(model_input)
        out = self.segment(stack, **(params or {}))
        return out[0] if was_2d else out


def log_segmenter(keras_path: str | Path, meta: dict, name: str = "model", input_example=None):
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
        pip_requirements=str(Path(pipeline.__file__).parent.parent / "requirements.txt"),
    )
