"""Inference engines: OpenVINO (float32 and bfloat16) agrees with TensorFlow float32 on a real EM slice,
through the tiler too; compiles once per batch shape; takes several input channels and `input_scale` 2."""

import numpy as np
import pytest

from emunet.core.errors import InputError
from tests.conftest import needs_shared

pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny U-Net saved in float32 and loaded back, as a logged model is."""
    import keras

    from emunet.core.model import UNetSpec, build_unet

    keras.utils.set_random_seed(3)
    path = tmp_path_factory.mktemp("engines") / "tiny.keras"
    build_unet(UNetSpec(depth=2, base_filters=4)).save(path)
    return keras.models.load_model(path, compile=False, safe_mode=True)


@pytest.fixture(scope="module")
def isbi_slices():
    import tifffile

    from emunet.core.normalize import stack_stats

    stack = tifffile.imread(needs_shared("isbi2012", "train-volume.tif"))[:2]
    low, high = stack_stats(stack)
    return stack, low, high


def test_openvino_bfloat16_matches_tensorflow_float32_on_an_isbi_slice(tiny, isbi_slices):
    from emunet.core.normalize import normalize
    from emunet.inference.engines import make_forward
    from emunet.inference.tiling import predict_probabilities

    stack, low, high = isbi_slices
    batch = normalize(stack[:1], low, high)[..., None]
    reference = make_forward(tiny, engine="tensorflow", precision="float32")
    expected = reference(batch)
    f32 = make_forward(tiny, engine="openvino", precision="float32")
    bf16 = make_forward(tiny, engine="openvino", precision="bfloat16")
    assert (f32.engine, f32.precision, bf16.engine, bf16.precision) == ("openvino", "float32", "openvino", "bfloat16")
    got = bf16(batch)
    assert got.dtype == np.float32 and got.shape == (1, 512, 512, 1)
    assert np.abs(f32(batch) - expected).max() < 1e-4
    assert np.abs(got - expected).max() < 0.02
    assert np.abs(got - expected).mean() > 0  # it did run in bfloat16, not float32 under another name
    # the whole tiled path (tiles, blending) with the engine as its forward
    options = dict(tile_size=256, multiple=4, batch_size=4)
    tiled = predict_probabilities(bf16, stack, low, high, **options)
    assert np.abs(tiled - predict_probabilities(reference, stack, low, high, **options)).max() < 0.02


def test_openvino_compiles_once_per_shape(tiny, rng):
    from emunet.inference.engines import make_forward

    forward = make_forward(tiny, engine="openvino", precision="float32")
    a, b = rng.random((2, 32, 48, 1), np.float32), rng.random((2, 32, 48, 1), np.float32)
    first = forward(a)
    forward(b)
    assert forward.compiles == 1
    np.testing.assert_array_equal(forward(a), first)  # the output is a copy, not the request's buffer
    forward(a[:1])
    forward(b[:1])
    assert forward.compiles == 2
    forward(a)
    assert forward.compiles == 2


def test_several_input_channels_and_input_scale_2(rng):
    import keras

    from emunet.core.model import UNetSpec, build_unet
    from emunet.inference.engines import make_forward

    keras.utils.set_random_seed(4)
    image = keras.Input((None, None, 3), name="image")  # 2.5-D: a slice and its two neighbours
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="enc1_conv1")(image)
    x = keras.layers.MaxPooling2D(2, name="enc1_pool")(x)
    x = keras.layers.UpSampling2D(2, name="dec1_up")(x)
    out = keras.layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name="head")(x)
    context = keras.Model(image, out)
    scaled = build_unet(UNetSpec(depth=2, base_filters=4, input_scale=2))
    for model, channels in ((context, 3), (scaled, 1)):
        batch = rng.random((2, 64, 32, channels), np.float32)
        expected = np.asarray(model.predict(batch, verbose=0))
        forward = make_forward(model, engine="openvino", precision="float32")
        np.testing.assert_allclose(forward(batch), expected, atol=1e-4)
        with pytest.raises(ValueError, match=f"expected a \\(n, h, w, {channels}\\) batch"):
            forward(batch[..., :1] if channels > 1 else np.repeat(batch, 2, axis=-1))
    tf_bf16 = make_forward(context, engine="tensorflow", precision="bfloat16")
    batch = rng.random((1, 32, 32, 3), np.float32)
    assert np.abs(tf_bf16(batch) - context.predict(batch, verbose=0)).max() < 0.02


def test_engine_choice():
    from emunet.core.hardware import has_bf16_units
    from emunet.inference.engines import make_forward, resolve_engine

    assert resolve_engine("auto", gpu=True) == "tensorflow"
    assert resolve_engine("auto", gpu=False) == "openvino"
    assert resolve_engine("tensorflow", gpu=False) == "tensorflow"
    with pytest.raises(InputError, match="engine must be one of auto, openvino, tensorflow, got 'onnx'"):
        resolve_engine("onnx")
    with pytest.raises(InputError, match="precision must be one of"):
        make_forward(None, precision="half")
    from emunet.inference.engines import gpu_visible

    if not gpu_visible():  # this machine: what `auto` picks is what its CPU is good at
        import keras

        model = keras.Sequential([keras.Input((None, None, 1)), keras.layers.Conv2D(1, 1, activation="sigmoid")])
        forward = make_forward(model)
        assert forward.engine == "openvino"
        assert forward.precision == ("bfloat16" if has_bf16_units() else "float32")
