"""The U-Net outside MLflow: an ONNX model and a BioImage.IO model package (spec 0.5) that Fiji (deepImageJ),
ilastik, napari and QuPath run without this project.

Every exported graph takes `(batch, 1, y, x)` float32 intensities already scaled to [0, 1] by
`emunet.core.normalize` (percentiles 0.5 / 99.5 of the image, clipped) and returns `(batch, 1, y, x)`
float32 foreground probabilities (the sigmoid is inside). y and x must be multiples of the model's
`multiple_of` (2**depth x input_scale). A 2.5-D model (`context_slices` k) takes `(batch, 2k + 1, y, x)`:
slices z-k .. z+k of the stack as channels, mirrored at its ends, normalised together (one window for
all channels, as in training); its output is slice z's. Channels come first because ONNX consumers (QuPath's OpenCV,
ilastik) expect it; the Keras model itself is channels-last, so the graphs transpose in and out.

Keras 3.15 cannot trace a bilinear `UpSampling2D` (the `input_scale` > 1 models) with unknown height and
width: `keras.ops.image.resize` tests `size[0] <= 0` in Python, which a symbolic size cannot answer
(OperatorNotAllowedInGraphError). The graphs exported here (ONNX, SavedModel) therefore replace that
layer by the same `tf.image.resize` call on the runtime shape; a `.keras` copy cannot (it would need a
Lambda layer, which safe loading refuses), so such models ship without Keras weights.
"""

import json
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from emunet.core.errors import InputError
from emunet.core.normalize import HIGH_PERCENTILE, LOW_PERCENTILE, normalize, stack_stats

# ONNX opset 17: read by onnxruntime >= 1.11, OpenCV >= 4.7 (QuPath) and ilastik's runtime alike.
OPSET = 17
INPUT_NAME, OUTPUT_NAME = "raw", "probability"
# Largest side of the test slice kept in a package: enough to show the model at work, small to download.
TEST_SIDE = 256
PREPROCESSING = (f"per image: subtract the {LOW_PERCENTILE} percentile, divide by the {HIGH_PERCENTILE} minus the "
                 f"{LOW_PERCENTILE} percentile, clip to [0, 1]")


def channels_of(keras_model) -> int:
    """Input channels of a U-Net: 1, or 2k + 1 for a 2.5-D model with context k."""
    return int(keras_model.input_shape[-1])


def channel_names(channels: int) -> list[str]:
    """Names of the input's channels: `raw` for one slice; `z_minus_1`, `z`, `z_plus_1`... for context."""
    if channels == 1:
        return [INPUT_NAME]
    k = channels // 2
    return [f"z_minus_{k - j}" if j < k else "z" if j == k else f"z_plus_{j - k}" for j in range(channels)]


def _needs_graph_resize(keras_model) -> bool:
    import keras

    return any(isinstance(layer, keras.layers.UpSampling2D) and layer.interpolation != "nearest"
               for layer in keras_model.layers)


def traceable_copy(keras_model):
    """`keras_model` itself, or where it has bilinear up-sampling (which Keras 3.15 cannot trace at unknown
    height and width) a copy with the same weights whose up-sampling is `tf.image.resize`."""
    import keras

    if not _needs_graph_resize(keras_model):
        return keras_model

    def clone(layer):
        if isinstance(layer, keras.layers.UpSampling2D) and layer.interpolation != "nearest":
            return _graph_resize(layer)
        return layer.__class__.from_config(layer.get_config())

    copy = keras.models.clone_model(keras_model, clone_function=clone)
    copy.set_weights(keras_model.get_weights())
    return copy


def _graph_resize(layer):
    """A layer computing what a bilinear `UpSampling2D` computes, traceable with unknown H and W."""
    import keras
    import tensorflow as tf

    fy, fx = layer.size
    method = layer.interpolation

    def resize(x):
        size = tf.shape(x)[1:3] * tf.constant([fy, fx])
        return tf.cast(tf.image.resize(x, size, method=method, antialias=False), x.dtype)

    return keras.layers.Lambda(resize, name=layer.name, dtype=layer.dtype_policy)


def channels_first(keras_model, traceable: bool = False):
    """`keras_model` (`(n, H, W, C)` -> `(n, H, W, 1)`) as a model of `(n, C, H, W)` -> `(n, 1, H, W)`, made of
    built-in layers only. `traceable`: bilinear up-sampling replaced by `tf.image.resize` (see the module
    docstring), for graph exports only."""
    import keras

    inner = traceable_copy(keras_model) if traceable else keras_model
    image = keras.Input((channels_of(keras_model), None, None), name=INPUT_NAME)
    x = keras.layers.Permute((2, 3, 1), name="to_channels_last")(image)
    x = inner(x)
    probability = keras.layers.Permute((3, 1, 2), name=OUTPUT_NAME, dtype="float32")(x)
    return keras.Model(image, probability, name="em_unet_bcyx")


def keras_weights_portable(keras_model) -> bool:
    """Whether a `.keras` copy runs at any size once loaded (see the module docstring)."""
    return not _needs_graph_resize(keras_model)


def package_formats(keras_model) -> tuple[str, ...]:
    """The BioImage.IO weight formats this model can ship, each of which bioimageio.core 0.11 runs."""
    keras_v3 = ("keras_v3",) if keras_weights_portable(keras_model) else ()
    return (*keras_v3, "tensorflow_saved_model_bundle", "onnx")


def write_onnx(keras_model, path: str | Path, metadata: dict | None = None) -> Path:
    """Write `keras_model` as a channels-first ONNX graph (opset `OPSET`, dynamic batch, y and x), with
    `metadata` (str -> str) in the model's properties, where QuPath and Netron show it."""
    import onnx
    import tensorflow as tf

    path = Path(path)
    graph = channels_first(keras_model, traceable=True)
    spec = [tf.TensorSpec((None, channels_of(keras_model), None, None), tf.float32, name=INPUT_NAME)]
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "model.onnx"
        graph.export(str(raw), format="onnx", verbose=False, input_signature=spec, opset_version=OPSET)
        model = onnx.load(str(raw))
    model.graph.output[0].name = _rename_output(model, OUTPUT_NAME)
    for value in (model.graph.input[0], model.graph.output[0]):  # readable dynamic sizes for viewers
        for dim, label in zip(value.type.tensor_type.shape.dim, ("batch", None, "y", "x")):
            if label:
                dim.dim_param = label
    onnx.helper.set_model_props(model, {k: str(v) for k, v in (metadata or {}).items()})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _rename_output(model, name: str) -> str:
    """Give the graph's single output a stable name (tf2onnx names it after the last op)."""
    old = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [name if out == old else out for out in node.output]
    return name


def write_saved_model_zip(keras_model, path: str | Path) -> Path:
    """Write `keras_model` channels-first as a zipped TensorFlow SavedModel (endpoint `serve`), the form the
    BioImage.IO `tensorflow_saved_model_bundle` weights take."""
    import keras
    import tensorflow as tf

    path = Path(path)
    graph = channels_first(keras_model, traceable=True)
    archive = keras.export.ExportArchive()
    archive.track(graph)
    # A dict of named outputs: what TensorFlow serving and bioimageio.core's TFSMLayer adapter expect.
    archive.add_endpoint("serve", lambda x: {OUTPUT_NAME: graph(x, training=False)},
                         input_signature=[tf.TensorSpec((None, channels_of(keras_model), None, None), tf.float32,
                                                        name=INPUT_NAME)])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "saved_model"
        archive.write_out(str(folder), verbose=False)
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            for file in sorted(folder.rglob("*")):
                if file.is_file():
                    archive.write(file, file.relative_to(folder))
    return path


def test_slice(image: np.ndarray, multiple: int, side: int = TEST_SIDE) -> np.ndarray:
    """The centre of a `(H, W)` slice (or `(H, W, C)`: its context slices alike), each side the largest
    multiple of `multiple` up to `side` (at least `multiple`). Raises `InputError` for a slice smaller than
    `multiple` (the user's sample stack)."""
    height, width = image.shape[:2]
    keep = [min(n, max(side, multiple)) // multiple * multiple for n in (height, width)]
    if min(keep) < multiple:
        raise InputError(f"a test slice needs at least {multiple} x {multiple} pixels (this model's multiple), "
                         f"got {height} x {width}")
    top, left = (height - keep[0]) // 2, (width - keep[1]) // 2
    return np.ascontiguousarray(image[top:top + keep[0], left:left + keep[1]])


def probabilities(keras_model, image: np.ndarray) -> np.ndarray:
    """`(H, W)` float32 probabilities of a raw `(H, W)` slice (`(H, W, C)` with its context slices for a
    2.5-D model) whose sides are multiples of the model's multiple, normalised by its own percentiles
    (all channels together), as every exported graph computes them."""
    x = normalize(image, *stack_stats(image))
    x = x[None, :, :, None] if x.ndim == 2 else x[None]
    return np.asarray(keras_model(x, training=False))[0, :, :, 0].astype(np.float32)


def cover_image(image: np.ndarray, probability: np.ndarray, truth: np.ndarray | None = None,
                threshold: float = 0.5) -> np.ndarray:
    """`(H, 2W + gap, 3)` uint8: the normalised slice beside it with the prediction coloured (against
    `truth` where given: true positives green, false positives magenta, misses yellow)."""
    from emunet.core.overlay import montage, overlay

    gray = normalize(image, *stack_stats(image))
    pred = probability >= threshold
    return montage([overlay(gray), overlay(gray, pred) if truth is None else overlay(gray, truth != 0, pred)],
                   columns=2)


def _weights(keras_model, folder: Path, formats: tuple[str, ...], run_id: str) -> dict:
    """Write the weight files and return their `bioimageio.spec` entries, keyed by format."""
    import keras
    import tensorflow as tf
    from bioimageio.spec.model.v0_5 import (KerasV3WeightsDescr, OnnxWeightsDescr,
                                            TensorflowSavedModelBundleWeightsDescr, Version)

    origin = f"the Keras 3 model of MLflow run {run_id}" if run_id else "the Keras 3 model logged in MLflow"
    root = "keras_v3" if "keras_v3" in formats else "tensorflow_saved_model_bundle"
    tf_version = Version(tf.__version__)
    entries = {}
    if "keras_v3" in formats:
        path = folder / "weights.keras"
        channels_first(keras_model).save(path)
        entries["keras_v3"] = KerasV3WeightsDescr(source=path, keras_version=Version(keras.__version__),
                                                  backend=("tensorflow", tf_version),
                                                  comment=f"{origin}, wrapped to take channels first")
    if "tensorflow_saved_model_bundle" in formats:
        path = write_saved_model_zip(keras_model, folder / "tf_saved_model.zip")
        entries["tensorflow_saved_model_bundle"] = TensorflowSavedModelBundleWeightsDescr(
            source=path, tensorflow_version=tf_version, parent=None if root == "tensorflow_saved_model_bundle" else root,
            comment=f"{origin}, exported by keras.export.ExportArchive (endpoint 'serve')")
    if "onnx" in formats:
        path = write_onnx(keras_model, folder / "weights.onnx")
        entries["onnx"] = OnnxWeightsDescr(source=path, opset_version=OPSET, parent=root,
                                           comment=f"{origin}, converted by tf2onnx (keras.Model.export)")
    return entries


def write_package(output: str | Path, keras_model, image: np.ndarray, *, multiple: int, name: str, description: str,
                  documentation: str, authors: list[str], license: str, cite: list[tuple[str, str]],
                  run_id: str = "", voxel_size_nm: tuple[float, float] | None = None, config: dict | None = None,
                  formats: tuple[str, ...] | None = None, truth: np.ndarray | None = None
                  ) -> tuple[Path, tuple[str, ...]]:
    """Write a BioImage.IO model package (spec 0.5 `rdf.yaml` + weights + test tensors + cover + docs) as the
    zip `output`. `image`: a raw `(H, W)` slice (cropped by `test_slice`); its probabilities are the test
    output; `truth` (same shape, optional) colours the cover. For a 2.5-D model (`C = 2k + 1` input
    channels) `image` is `(H, W, C)`: the slice with its context (`emunet.inference.context.context_stack`). `cite`: (text, DOI or URL) pairs. `formats`:
    default `package_formats` (Keras weights only where they run at every size). Returns the path and the
    weight formats written."""
    import cv2
    from bioimageio.spec import save_bioimageio_package
    from bioimageio.spec.model import v0_5 as spec

    formats = package_formats(keras_model) if formats is None else formats
    channels = channels_of(keras_model)
    image = np.asarray(image)
    if (image.shape[2] if image.ndim == 3 else 1) != channels:
        raise ValueError(f"the test image has shape {image.shape}, this model takes {channels} channels: pass "
                         f"{'(H, W)' if channels == 1 else f'(H, W, {channels}), the slice and its context'}")
    image = test_slice(image, multiple)
    truth = None if truth is None else test_slice(np.asarray(truth), multiple)
    prob = probabilities(keras_model, image)
    planes = image[None, None] if image.ndim == 2 else image.transpose(2, 0, 1)[None]  # (1, C, y, x)
    middle = image if image.ndim == 2 else image[..., channels // 2]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        np.save(folder / "test_input.npy", planes.astype(np.float32))
        np.save(folder / "test_output.npy", prob[None, None])
        cv2.imwrite(str(folder / "cover.png"), cv2.cvtColor(cover_image(middle, prob, truth), cv2.COLOR_RGB2BGR))
        (folder / "README.md").write_text(documentation)
        (folder / "export.json").write_text(json.dumps(config or {}, indent=2, default=str))
        space = dict(unit="nanometer", scale=1.0)
        scales = voxel_size_nm or (None, None)
        names = [spec.Identifier(n) for n in channel_names(channels)]
        in_axes = [spec.BatchAxis(), spec.ChannelAxis(channel_names=names)] + [
            spec.SpaceInputAxis(id=spec.AxisId(a), size=spec.ParameterizedSize(min=multiple, step=multiple),
                                **({**space, "scale": s} if s else {})) for a, s in zip("yx", scales)]
        out_axes = [spec.BatchAxis(), spec.ChannelAxis(channel_names=[spec.Identifier(OUTPUT_NAME)])] + [
            spec.SpaceOutputAxis(id=spec.AxisId(a), size=spec.SizeReference(tensor_id=spec.TensorId(INPUT_NAME),
                                                                            axis_id=spec.AxisId(a)),
                                 **({**space, "scale": s} if s else {})) for a, s in zip("yx", scales)]
        window_axes = (("channel",) if channels > 1 else ()) + ("y", "x")
        pre = [spec.EnsureDtypeDescr(kwargs=spec.EnsureDtypeKwargs(dtype="float32")),
               # one window for all channels (the stack's, as in training): percentiles over channel, y and x
               spec.ScaleRangeDescr(kwargs=spec.ScaleRangeKwargs(axes=[spec.AxisId(a) for a in window_axes],
                                                                min_percentile=LOW_PERCENTILE,
                                                                max_percentile=HIGH_PERCENTILE)),
               spec.ClipDescr(kwargs=spec.ClipKwargs(min=0.0, max=1.0))]
        descr = spec.ModelDescr(
            name=name, description=description, authors=[spec.Author(name=a) for a in authors],
            cite=[spec.CiteEntry(text=text, **({"url": ref} if ref.startswith("http") else {"doi": ref}))
                  for text, ref in cite],
            license=license, documentation=spec.FileDescr(source=folder / "README.md"),
            covers=[spec.FileDescr(source=folder / "cover.png")],
            attachments=[spec.FileDescr(source=folder / "export.json")],
            tags=["unet", "segmentation", "electron-microscopy", "2d" if channels == 1 else "2.5d",
                  "semantic-segmentation"],
            inputs=[spec.InputTensorDescr(id=spec.TensorId(INPUT_NAME), axes=in_axes,
                                          description="one grayscale EM slice, any intensity range" if channels == 1 else
                                          f"grayscale EM slices z-{channels // 2} .. z+{channels // 2} as channels "
                                          f"(mirrored at the stack's ends), any intensity range",
                                          test_tensor=spec.FileDescr(source=folder / "test_input.npy"),
                                          data=spec.IntervalOrRatioDataDescr(type="float32"), preprocessing=pre)],
            outputs=[spec.OutputTensorDescr(id=spec.TensorId(OUTPUT_NAME), axes=out_axes,
                                            description="foreground probability (sigmoid), threshold 0.5",
                                            test_tensor=spec.FileDescr(source=folder / "test_output.npy"),
                                            data=spec.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)))],
            weights=spec.WeightsDescr(**_weights(keras_model, folder, formats, run_id)),
            config=spec.Config(emunet=config or {}),
        )
        path = save_bioimageio_package(descr, output_path=Path(output).resolve())
    return Path(path), tuple(formats)
