"""Inference engines: the U-Net as a function of a batch of tiles, run by OpenVINO or TensorFlow.

On a CPU OpenVINO is the fast engine: on the 2-core Xeon test machine (AMX-BF16) the default network at
512 x 512 ran 91 ms a slice in float32 and 22 ms in bfloat16 (every layer), against 118 ms for TensorFlow +
XLA float32 (issue 24; bench/inference.py). On trained models, with the encoder's first blocks in float32
(below), bfloat16 gave the same Dice and object F1 within 0.003 on ISBI and VNC, probabilities at most
0.016 apart (bench/precision_quality.py). TensorFlow stays the engine on a GPU, and the fallback where
OpenVINO is absent.

How the Keras model reaches OpenVINO: it is traced once as a `tf.function` of a `(None, None, None, c)`
float32 batch and handed to `openvino.convert_model`, in this process, with no file in between.
`convert_model(keras_model)` itself is meant for tf.keras 2 models; ONNX would add tf2onnx and a second
converter for nothing. Bilinear up-sampling (the `input_scale` > 1 models) cannot be traced at unknown
height and width in Keras 3.15, so it is traced as the same `tf.image.resize` that `emunet.inference.export`
uses for ONNX. OpenVINO then compiles once per input shape (static shapes run faster than one dynamic
compilation) with the precision hint, and keeps the compilations.

Precision: "bfloat16" is OpenVINO's `INFERENCE_PRECISION_HINT` bf16 (weights and activations in
bfloat16, accumulation in float32) for all but the encoder's first blocks, or for TensorFlow a copy of the
model under Keras' mixed_bfloat16 policy (same float32 weights, bfloat16 compute). The output is float32
probabilities either way. In OpenVINO the encoder's blocks but the deepest stay in float32
(`encoder_in_float32`): bfloat16's rounding there is what moves the probabilities most, as every later
layer and the skip connections carry it. Measured on the default network trained on VNC (8 min) and
ISBI (5 min), largest |probability difference| to float32 over held-out slices: all in bfloat16 0.095 and
0.037; with those blocks in float32 0.017 and 0.016, at 0.5-0.76x the all-bfloat16 speed (the whole
tiled path still 4.7x TensorFlow float32 at 512 and 1024: bench/inference.py). Keeping the decoder in
float32 too gained nothing (0.018); the first block alone left 0.08.

BatchNorm is not folded into the convolutions here: OpenVINO does it when it compiles (its compiled graph
of the default network is the same 19 convolutions with or without a fold in the Keras graph), and with
TensorFlow + XLA a folded copy ran 0.94x and 1.12x as fast at 512 and 1024 (bench/inference.py): noise.
"""

import importlib.util
import logging
import threading
from typing import Protocol

import numpy as np

from emunet.core.errors import InputError
from emunet.core.hardware import cpu_count, resolve_precision

log = logging.getLogger(__name__)

ENGINES = ("auto", "openvino", "tensorflow")
OPENVINO_HINTS = {"float32": "f32", "bfloat16": "bf16", "mixed_float16": "f16"}
KERAS_POLICIES = {"bfloat16": "mixed_bfloat16", "mixed_float16": "mixed_float16"}


class Forward(Protocol):
    """A `(n, h, w, c)` float32 batch in [0, 1] -> `(n, h, w, 1)` float32 probabilities (numpy)."""

    engine: str  # "openvino" or "tensorflow": what runs
    precision: str  # "float32", "bfloat16" or "mixed_float16": what it runs in

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


def gpu_visible() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_logical_devices("GPU"))


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def resolve_engine(engine: str = "auto", gpu: bool | None = None) -> str:
    """"auto" is tensorflow where a GPU is visible, openvino on a CPU when it is installed, else tensorflow.
    Raises `InputError` for an unknown engine, or openvino asked for and not installed."""
    if engine not in ENGINES:
        raise InputError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "openvino" and not openvino_available():
        raise InputError("engine openvino asked for, but the openvino package is not installed "
                         "(pip install openvino), or use engine tensorflow")
    if engine != "auto":
        return engine
    gpu = gpu_visible() if gpu is None else gpu
    return "openvino" if not gpu and openvino_available() else "tensorflow"


def _traceable(keras_model):
    """`keras_model` with bilinear up-sampling as `tf.image.resize` of the runtime shape (see the module
    docstring); the model itself when it has none."""
    from emunet.inference.export import traceable_copy

    return traceable_copy(keras_model)


def with_policy(keras_model, policy: str):
    """A copy of `keras_model` computing under the Keras dtype `policy` (e.g. mixed_bfloat16) with the same
    (float32) weights; its output layer stays float32, as `build_unet` makes it under any policy."""
    import keras

    output_layers = {id(t._keras_history[0]) for t in keras_model.outputs}

    def clone(layer):
        config = layer.get_config()
        if id(layer) not in output_layers:
            config["dtype"] = policy
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(keras_model, clone_function=clone)
    copy.set_weights(keras_model.get_weights())
    return copy


class TensorFlowForward:
    """The network as an XLA-compiled `tf.function` (one trace and compilation per batch shape, about 2 s;
    1.2-1.3x the speed of `predict_on_batch` on CPU): a trace at unknown height and width cannot run the
    bilinear up-sampling of an `input_scale` 2 or 4 model in Keras 3.15, and XLA compiles each shape anyway."""

    engine = "tensorflow"

    def __init__(self, keras_model, precision: str = "float32"):
        import tensorflow as tf

        self.precision = precision
        model = keras_model if precision == "float32" else with_policy(keras_model, KERAS_POLICIES[precision])
        self.keras_model = model
        self._graph = tf.function(lambda x: tf.cast(model(x, training=False), tf.float32), jit_compile=True)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self._graph(np.asarray(batch, np.float32)).numpy()


def _upstream(node) -> list:
    """The ops `node` reads from, directly or not (not `node` itself), each once (by its unique name)."""
    seen, todo = {}, [value.get_node() for value in node.input_values()]
    while todo:
        op = todo.pop()
        if op.get_name() not in seen:
            seen[op.get_name()] = op
            todo += [value.get_node() for value in op.input_values()]
    return list(seen.values())


def encoder_in_float32(model, core):
    """The OpenVINO `model` of a U-Net with its encoder's blocks but the deepest (every op upstream of the
    next-to-last down-sampling: 3 of a depth-4 network's 4 levels; the first of a shallower one) marked to
    run in float32 whatever the precision hint (OpenVINO's "precise" runtime attribute, which the CPU
    plugin keeps in float32 under a bf16 hint; its Python API cannot set it, so it is written into the
    model's IR by the ops' names and read back). The model itself where it has no down-sampling."""
    import html
    import re
    import tempfile
    from pathlib import Path

    import openvino as ov

    ops = model.get_ordered_ops()
    pools = [op for op in ops if op.get_type_name() == "MaxPool"]
    if not pools:
        return model
    level = {pool.get_name(): sum(op.get_type_name() == "MaxPool" for op in _upstream(pool)) for pool in pools}
    last = next(pool for pool in pools if level[pool.get_name()] == max(0, len(pools) - 2))
    names = {op.get_friendly_name() for op in _upstream(last) if op.get_type_name() not in ("Constant", "Parameter")}
    if len({op.get_friendly_name() for op in ops}) < len(ops):  # the IR is marked by these names
        raise ValueError("the converted network has ops of the same name: its encoder cannot be marked by name")
    with tempfile.TemporaryDirectory() as tmp:
        ov.save_model(model, Path(tmp) / "model.xml", compress_to_fp16=False)
        xml = (Path(tmp) / "model.xml").read_text()
        weights = np.fromfile(Path(tmp) / "model.bin", np.uint8)
    precise = '<rt_info><attribute name="precise" version="0" /></rt_info>'
    layer = re.compile(r'(<layer id="\d+" name="([^"]*)" type="[^"]+" version="[^"]+">)')
    xml = layer.sub(lambda match: match.group(1) + (precise if html.unescape(match.group(2)) in names else ""), xml)
    marked = core.read_model(xml, ov.Tensor(weights))
    marked.weights = weights  # the tensor reads the array's memory: kept alive with the model
    return marked


class OpenVINOForward:
    """The network converted to OpenVINO once, compiled once per input shape (`compiles` counts them) with
    `INFERENCE_PRECISION_HINT` from `precision` and one stream on all of the process's CPUs; in bfloat16
    the encoder's first blocks stay in float32 (`encoder_in_float32`) unless `float32_encoder` is False."""

    engine = "openvino"

    def __init__(self, keras_model, precision: str = "float32", threads: int = 0, float32_encoder: bool = True):
        import openvino as ov
        import tensorflow as tf

        self.precision = precision
        self.channels = int(keras_model.input_shape[-1])
        traceable = _traceable(keras_model)
        signature = [tf.TensorSpec((None, None, None, self.channels), tf.float32)]
        graph = tf.function(lambda x: tf.cast(traceable(x, training=False), tf.float32), input_signature=signature)
        self._core = ov.Core()
        self._model = ov.convert_model(graph)
        if precision == "bfloat16" and float32_encoder:  # False: every layer in bfloat16 (bench/inference.py)
            self._model = encoder_in_float32(self._model, self._core)
        self._config = {"INFERENCE_PRECISION_HINT": OPENVINO_HINTS[precision], "PERFORMANCE_HINT": "LATENCY",
                        "INFERENCE_NUM_THREADS": threads or cpu_count()}
        self._compiled = {}
        self._lock = threading.Lock()
        self.compiles = 0

    def _compiled_for(self, shape: tuple):
        with self._lock:
            if shape not in self._compiled:
                model = self._model.clone()
                model.reshape(list(shape))
                self._compiled[shape] = (self._core.compile_model(model, "CPU", self._config), threading.Lock())
                self.compiles += 1
                log.info("OpenVINO compiled the network for %s in %s", shape, self.precision)
            return self._compiled[shape]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, np.float32)
        if batch.ndim != 4 or batch.shape[-1] != self.channels:
            raise ValueError(f"expected a (n, h, w, {self.channels}) batch, got shape {batch.shape}")
        compiled, lock = self._compiled_for(batch.shape)
        with lock:  # one infer request per compiled model; its output buffer is reused by the next call
            return np.array(compiled(batch)[0], np.float32, copy=True)


def make_forward(keras_model, engine: str = "auto", precision: str = "auto") -> Forward:
    """The Keras U-Net (`(n, h, w, c)` -> `(n, h, w, 1)`, c = `keras_model.input_shape[-1]`) as a `Forward`
    on `engine` (one of `ENGINES`; "auto": `resolve_engine`) in `precision` ("auto", "float32", "bfloat16",
    "mixed_bfloat16" or "mixed_float16"; "auto": `emunet.core.hardware.resolve_precision`). Returns a
    callable from a float32 batch in [0, 1] to float32 probabilities, with `.engine` and `.precision` set to
    what was chosen (to log). mixed_float16 runs on a GPU only: on a CPU it falls back to float32.
    Raises `InputError` for an unknown engine or precision."""
    gpu = gpu_visible()
    engine = resolve_engine(engine, gpu)
    precision = resolve_precision(precision, gpu=gpu)
    if precision == "mixed_float16" and not gpu:
        log.info("mixed_float16 needs a GPU; running in float32")
        precision = "float32"
    if engine == "openvino":
        return OpenVINOForward(keras_model, precision)
    return TensorFlowForward(keras_model, precision)
