"""2.5-D context (`context_slices` k): the slice and its k neighbours above and below as 2k + 1 input
channels, mirrored at the stack's ends, through the model, the training crops, the tiler, the segmenter,
training and the logged pyfunc."""

import io
import json
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pytest

from emunet.core.errors import InputError
from emunet.core.model import UNetSpec, build_unet, input_channels, spec_of
from emunet.core.normalize import normalize
from emunet.inference.context import context_indices, context_stack
from emunet.inference.params import DEFAULTS
from emunet.inference.segment import Segmenter
from emunet.inference.tiling import predict_probabilities
from emunet.training.augment import AUGMENTATIONS, AugmentSpec, random_patch
from emunet.training.config import TrainConfig, resolve
from tests.conftest import TINY_TRAIN, make_dataset


class CountingVolume:
    """A lazy `(Z, H, W)` volume that counts how often each slice is read."""

    def __init__(self, array):
        self.array, self.shape, self.reads = array, array.shape, np.zeros(array.shape[0], int)

    def __getitem__(self, index):
        rows = range(self.shape[0])[index] if isinstance(index, slice) else [index]
        for z in rows:
            self.reads[z] += 1
        return self.array[index]


def channel(j):
    """A stand-in network that answers with its input's channel `j`: the output shows which slice the
    tiler put there."""
    return lambda batch: np.ascontiguousarray(batch[..., j:j + 1])


@pytest.mark.parametrize("k, tile, tta", [(1, 32, "none"), (2, 64, "d4"), (3, 32, "flips")])
def test_tiler_stacks_neighbours_in_order_mirrored_at_the_ends(rng, k, tile, tta):
    stack = (rng.random((5, 50, 37)) * 255).astype(np.uint8)  # not a multiple of 16: padded by mirroring
    for j in range(2 * k + 1):
        volume = CountingVolume(stack)
        got = predict_probabilities(channel(j), volume, 0, 255, tile_size=tile, batch_size=3, multiple=16, tta=tta,
                                    context=k)
        assert got.shape == stack.shape
        expected = np.stack([normalize(stack[context_indices(z, k, 5)[j]], 0, 255) for z in range(5)])
        np.testing.assert_allclose(got, expected, atol=1e-5)
        assert volume.reads.tolist() == [1] * 5  # each slice read once, however many contexts hold it
    # The ends by hand for k = 2: slice 0 sees 2, 1, 0, 1, 2 and slice 4 sees 2, 3, 4, 3, 2.
    first = predict_probabilities(channel(0), stack, 0, 255, tile_size=64, multiple=16, context=2)
    np.testing.assert_allclose(first[0], normalize(stack[2], 0, 255), atol=1e-6)
    np.testing.assert_allclose(first[4], normalize(stack[2], 0, 255), atol=1e-6)
    np.testing.assert_allclose(first[2], normalize(stack[0], 0, 255), atol=1e-6)


def test_a_chunk_of_a_stack_keeps_the_context_it_has_in_the_stack(rng):
    """Slices `start .. stop - 1` (a Spark task's chunk) see their true neighbours, not the chunk's mirror,
    and only the chunk and its k neighbouring slices are read, once."""
    stack = (rng.random((9, 20, 24)) * 255).astype(np.uint8)
    whole = [predict_probabilities(channel(j), stack, 0, 255, tile_size=32, multiple=16, context=2) for j in range(5)]
    for start, stop in [(0, 3), (3, 6), (6, 9), (4, 5)]:
        for j in range(5):
            volume = CountingVolume(stack)
            segmenter = Segmenter(channel(j), multiple=16, context=2)
            got = list(segmenter.probabilities(volume, DEFAULTS.replace(low=0, high=255, tile_size=32), start, stop))
            np.testing.assert_allclose(np.stack(got), whole[j][start:stop], atol=1e-6)
            needed = set(range(max(0, start - 2), min(9, stop + 2)))
            assert volume.reads.tolist() == [int(z in needed) for z in range(9)]


def test_a_single_slice_fills_every_channel(rng):
    image = (rng.random((1, 20, 20)) * 255).astype(np.uint8)
    for j in range(5):
        got = predict_probabilities(channel(j), image, 0, 255, tile_size=32, multiple=16, context=2)
        np.testing.assert_allclose(got, normalize(image, 0, 255), atol=1e-6)


def test_model_takes_2k_plus_1_channels_and_records_its_context():
    spec = UNetSpec(depth=2, base_filters=4, context_slices=2)
    model = build_unet(spec)
    assert input_channels(spec) == 5 and model.input_shape[-1] == 5
    assert model(np.zeros((1, 16, 16, 5), np.float32)).shape == (1, 16, 16, 1)
    assert spec_of(model).context_slices == 2 and spec_of(build_unet(UNetSpec(depth=2))).context_slices == 0


def test_context_slices_is_validated():
    assert resolve(TrainConfig(context_slices=4)).context_slices == 4
    for bad in (-1, 5):
        with pytest.raises(InputError, match=f"context_slices must be auto or between 0 .* and 4 .*; got {bad}"):
            resolve(TrainConfig(context_slices=bad))


def test_fine_tuning_takes_the_source_models_context():
    from emunet.training.finetune import adopt_spec

    assert adopt_spec(TrainConfig(init_model="runs:/r/model"), UNetSpec(context_slices=2)).context_slices == 2
    with pytest.raises(InputError, match="context_slices=1 contradicts init_model runs:/r/model, which has "
                                         "context_slices 0"):
        adopt_spec(TrainConfig(init_model="runs:/r/model", context_slices=1), UNetSpec())


def test_a_2_5d_model_gives_the_same_answer_tiled_and_whole(rng):
    import keras

    keras.utils.set_random_seed(3)
    model = build_unet(UNetSpec(depth=2, base_filters=4, context_slices=1))
    forward = lambda x: np.asarray(model(x, training=False))  # noqa: E731
    stack = (rng.random((3, 128, 128)) * 255).astype(np.uint8)
    # The network on each whole slice's context, built by hand.
    direct = np.stack([forward(normalize(context_stack(stack, z, 1), 0, 255)[None])[0, ..., 0] for z in range(3)])
    segmenter = Segmenter(forward, multiple=4, context=1)
    whole = np.stack(list(segmenter.probabilities(stack, DEFAULTS.replace(low=0, high=255, tile_size=256))))
    np.testing.assert_allclose(whole, direct, atol=1e-5)
    tiled = np.stack(list(segmenter.probabilities(stack, DEFAULTS.replace(low=0, high=255, tile_size=64))))
    # A U-Net's tile sees zeros beyond its border where the whole slice has pixels: close, not equal
    # (the Gaussian weights keep those borders out of the answer). Measured: mean 0.0016, 99th percentile
    # 0.025 on this untrained network and noise.
    gap = np.abs(tiled - whole)
    assert gap.mean() < 0.005 and np.percentile(gap, 99) < 0.05
    # The same slice in every channel instead of its neighbours is another answer, 25x farther off: the
    # tiler gives every tile its own slices' context.
    flat = np.stack([forward(np.repeat(normalize(stack[z], 0, 255)[None, ..., None], 3, -1))[0, ..., 0]
                     for z in range(3)])
    assert np.abs(flat - whole).mean() > 10 * gap.mean()


def test_crops_stack_the_same_place_of_neighbouring_slices(rng):
    base = (rng.random((64, 64)) * 100).astype(np.float32)
    image = np.stack([base + 20 * z for z in range(6)])  # slice z is the base raised by 20 z
    mask = np.zeros(image.shape, np.uint8)
    geometric = AugmentSpec(intensity=0.0, blur=0.0, noise=0.0, foreground=0.0)  # rotation, flips, scale, elastic
    for seed in range(6):
        at = (seed % 6, 30, 30)
        patch, target = random_patch(np.random.default_rng(seed), image, mask, 32, 0, 200, geometric, at=at,
                                     context=2)
        assert patch.shape == (32, 32, 5) and target.shape == (32, 32)
        # One warp for all channels: the channels differ by the slices' offsets, pixel for pixel.
        offsets = [20 * i / 200 for i in context_indices(at[0], 2, 6)]
        for j in range(5):
            np.testing.assert_allclose(patch[..., j] - patch[..., 2], offsets[j] - offsets[2], atol=1e-5)
    # Intensity, blur and noise once for all channels too: the mirrored ends stay identical channels.
    patch, _ = random_patch(np.random.default_rng(1), image, mask, 32, 0, 200,
                            AugmentSpec(intensity=1.0, blur=1.0, noise=0.0), at=(0, 30, 30), context=1)
    np.testing.assert_array_equal(patch[..., 0], patch[..., 2])  # slices 1, 0, 1
    assert not np.array_equal(patch[..., 0], patch[..., 1])


def test_loader_gives_2k_plus_1_channel_crops_of_one_place(tmp_path, rng):
    from emunet.core.dataset import read_manifest, stacks_in, write_dataset
    from emunet.training.loader import PatchDataset

    # Slice z of each stack is one picture raised by 20 z: a crop's channels then differ by the offsets of
    # the slices they hold, pixel for pixel, if and only if they are the same place of neighbouring slices.
    base = (rng.random((64, 64)) * 100).astype(np.float32)
    stacks = [dict(name=f"s{i}", split="val" if i == 2 else "train", image=np.stack([base + 20 * z for z in range(4)]),
                   mask=(rng.random((4, 64, 64)) > 0.5).astype(np.uint8), low=0.0, high=200.0) for i in range(3)]
    write_dataset(tmp_path / "data", stacks)
    folder = tmp_path / "data"
    train = stacks_in(read_manifest(folder), "train")
    spec = AugmentSpec(intensity=0.0, blur=0.0, noise=0.0)  # every geometric transform, elastic included
    data = PatchDataset(folder, train, batch_size=8, crop=32, steps=2, seed=1, workers=1, augment=spec, context=1)
    images, masks = data[0]
    assert images.shape == (8, 32, 32, 3) and masks.shape == (8, 32, 32, 1) and images.dtype == np.float32
    step = 20 / 200
    seen = set()
    for patch in images:
        below, above = (np.round(np.median(patch[..., c] - patch[..., 1]) / step) for c in (0, 2))
        # z = 0: slices 1, 0, 1; z = 3: slices 2, 3, 2; inside: z - 1, z, z + 1
        assert (below, above) in {(1, 1), (-1, -1), (-1, 1)}
        seen.add((below, above))
        for c, offset in ((0, below), (2, above)):
            np.testing.assert_allclose(patch[..., c] - patch[..., 1], offset * step, atol=1e-5)
    full = PatchDataset(folder, train, batch_size=4, crop=32, steps=2, seed=1, workers=1, augment=AUGMENTATIONS["em"],
                        context=1)
    images, _ = full[1]
    assert images.shape == (4, 32, 32, 3) and 0 <= images.min() and images.max() <= 1


def test_a_2_5d_training_logs_a_pyfunc_that_segments_stacks_and_slices(store, tmp_path):
    from pipeline.train import train

    data = make_dataset(tmp_path / "data", seed=0)
    trained = train(TrainConfig(dataset_uri=str(data), context_slices=1, **TINY_TRAIN))
    run = mlflow.get_run(trained["run_id"])
    assert run.data.params["context_slices"] == "1"
    assert trained["model"].input_shape[-1] == 3
    meta = json.loads(Path(mlflow.artifacts.download_artifacts(f"runs:/{trained['run_id']}/model/artifacts/unet.json"))
                      .read_text())
    assert meta["context_slices"] == 1 and meta["spec"]["context_slices"] == 1
    model = mlflow.pyfunc.load_model(trained["model_uri"])
    assert model.unwrap_python_model().context == 1
    from emunet.core.synthetic import synthetic_stack

    stack, _ = synthetic_stack(1, 0, (4, 48, 40))
    low, high = float(stack.min()), float(stack.max())
    params = {"output": "probability", "low": low, "high": high}
    prob = model.predict(stack, params=params)
    assert prob.shape == stack.shape and prob.dtype == np.float32
    assert set(np.unique(model.predict(stack))) <= {0, 1}
    # A single slice is its own context in every channel: as in a stack of three copies of it.
    alone = model.predict(stack[1], params=params)
    assert alone.shape == stack.shape[1:]
    np.testing.assert_allclose(alone, model.predict(np.stack([stack[1]] * 3), params=params)[1], atol=1e-5)
    # Inside the stack, slice 1 sees slices 0 and 2: another answer than alone.
    assert np.abs(alone - prob[1]).max() > 1e-4


@pytest.mark.slow
def test_a_2_5d_model_exports_a_package_with_2k_plus_1_input_channels(tmp_path, monkeypatch, rng):
    """The BioImage.IO package declares the 2k + 1 channels, bioimageio.core's own test passes on it, and
    its graphs (ONNX too) answer as the Keras model does on the stack of context slices."""
    import keras
    import onnxruntime
    import yaml
    from bioimageio.core import create_prediction_pipeline, predict, test_model
    from bioimageio.spec import load_model_description

    from emunet.inference.export import probabilities, write_onnx, write_package

    monkeypatch.chdir(tmp_path)  # bioimageio.core unzips the SavedModel weights into the current folder
    monkeypatch.setenv("BIOIMAGEIO_CACHE_PATH", str(tmp_path / "bioimageio-cache"))
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")
    keras.utils.set_random_seed(0)
    model = build_unet(UNetSpec(depth=2, base_filters=4, context_slices=1))
    stack = (rng.random((5, 40, 48)) * 200 + 20).astype(np.uint8)
    image = context_stack(stack, 2, 1)
    path, formats = write_package(tmp_path / "m.zip", model, image, multiple=4, name="em-unet", description="test",
                                  documentation="# test", authors=["a"], license="CC-BY-4.0",
                                  cite=[("U-Net", "10.1007/978-3-319-24574-4_28")])
    summary = test_model(path)
    assert summary.status == "passed", summary.format()
    with zipfile.ZipFile(path) as archive:
        rdf = yaml.safe_load(archive.read("rdf.yaml"))
        test_input = np.load(io.BytesIO(archive.read("test_input.npy")))
    assert rdf["inputs"][0]["axes"][1]["channel_names"] == ["z_minus_1", "z", "z_plus_1"]
    assert test_input.shape == (1, 3, 40, 48)
    np.testing.assert_array_equal(test_input[0, 0], stack[1])
    expected = probabilities(model, image)
    descr = load_model_description(path)
    for wf in formats:
        got = predict(model=create_prediction_pipeline(descr, weight_format=wf),
                      inputs=image.transpose(2, 0, 1)[None].astype(np.float32))
        assert np.abs(got.members["probability"].data.to_numpy()[0, 0] - expected).max() < 1e-5, wf
    with pytest.raises(ValueError, match=r"takes 3 channels: pass \(H, W, 3\)"):
        write_package(tmp_path / "n.zip", model, stack[2], multiple=4, name="em-unet", description="test",
                      documentation="# test", authors=["a"], license="CC-BY-4.0", cite=[])
    session = onnxruntime.InferenceSession(str(write_onnx(model, tmp_path / "m.onnx")),
                                           providers=["CPUExecutionProvider"])
    batch = rng.random((2, 3, 16, 24), dtype=np.float32)
    keras_out = np.asarray(model(batch.transpose(0, 2, 3, 1), training=False)).transpose(0, 3, 1, 2)
    (got,) = session.run(None, {"raw": batch})
    assert got.shape == (2, 1, 16, 24) and np.abs(got - keras_out).max() < 1e-5
