"""Ortho-plane training and inference (issue 23): crops of xz and yz planes, the three planes' answers
averaged chunk by chunk, `planes=auto` from the voxel size, and a trained ortho model that predicts so."""

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest

from emunet.core.errors import InputError
from emunet.core.normalize import normalize
from emunet.inference.context import fuse_ortho, ortho_views
from emunet.inference.ortho import ortho_chunk, ortho_probabilities
from emunet.inference.params import DEFAULTS
from emunet.inference.segment import Segmenter
from emunet.inference.tiling import predict_probabilities
from emunet.training.augment import AUGMENTATIONS, random_patch
from emunet.training.config import TrainConfig
from emunet.training.plan import choose_planes
from tests.conftest import TINY_TRAIN


def down_a_row(batch):
    """A stand-in network that is not the same in every direction: each pixel answers with the
    (normalised) pixel one row above it, the first row with itself. Its xy, xz and yz answers differ, so
    a plane put back in the wrong orientation shows."""
    out = np.concatenate([batch[:, :1], batch[:, :-1]], axis=1)
    return np.ascontiguousarray(out[..., out.shape[-1] // 2:out.shape[-1] // 2 + 1])


def by_hand(volume, **options):
    """The three planes predicted whole and averaged, as `emunet.inference.context.fuse_ortho` does."""
    return fuse_ortho(*(predict_probabilities(down_a_row, np.ascontiguousarray(view), 0, 255, **options)
                        for view in ortho_views(volume)))


@pytest.mark.parametrize("context", [0, 1])
def test_ortho_prediction_is_the_mean_of_the_three_planes_by_hand(rng, context):
    volume = (rng.random((20, 24, 28)) * 255).astype(np.uint8)
    options = dict(tile_size=64, multiple=16, context=context)
    expected = by_hand(volume, **options)
    whole = np.stack(list(ortho_probabilities(down_a_row, volume, 0, 255, **options)))
    np.testing.assert_allclose(whole, expected, atol=1e-6)
    # Each plane really is put back where it came from: the answer differs from the xy one alone.
    xy = predict_probabilities(down_a_row, volume, 0, 255, **options)
    assert np.abs(whole - xy).mean() > 0.05
    # Chunks of 3 slices, each read with a halo of 2: every slice still sees its rows above in xz and yz.
    chunked = np.stack(list(ortho_probabilities(down_a_row, volume, 0, 255, chunk=3, halo=2, **options)))
    np.testing.assert_allclose(chunked, expected, atol=1e-6)
    # A part of the volume (a Spark task's slices) with the context it has in the whole volume.
    part = np.stack(list(ortho_probabilities(down_a_row, volume, 0, 255, start=5, stop=11, chunk=4, halo=2, **options)))
    np.testing.assert_allclose(part, expected[5:11], atol=1e-6)


def test_the_segmenter_asks_about_the_planes_the_model_was_trained_on(rng):
    volume = (rng.random((12, 24, 28)) * 255).astype(np.uint8)
    params = DEFAULTS.replace(low=0, high=255, tile_size=64)
    ortho = Segmenter(down_a_row, multiple=16, planes="ortho")
    expected = by_hand(volume, tile_size=64, multiple=16)
    np.testing.assert_allclose(np.stack(list(ortho.probabilities(volume, params))), expected, atol=1e-6)
    xy_only = np.stack(list(ortho.probabilities(volume, params.replace(planes="xy"))))
    np.testing.assert_allclose(xy_only, predict_probabilities(down_a_row, volume, 0, 255, tile_size=64, multiple=16),
                               atol=1e-6)
    plain = Segmenter(down_a_row, multiple=16)  # an xy model asked for ortho planes gets them
    np.testing.assert_allclose(np.stack(list(plain.probabilities(volume, params.replace(planes="ortho")))), expected,
                               atol=1e-6)
    # A few slices have no xz or yz planes to speak of: auto falls back to xy, an explicit ortho is refused.
    thin = volume[:4]
    np.testing.assert_allclose(np.stack(list(ortho.probabilities(thin, params))),
                               predict_probabilities(down_a_row, thin, 0, 255, tile_size=64, multiple=16), atol=1e-6)
    with pytest.raises(InputError, match="planes=ortho needs a volume of at least 8 slices .* got 4"):
        list(ortho.probabilities(thin, params.replace(planes="ortho")))
    with pytest.raises(InputError, match="planes must be one of auto, xy, ortho"):
        params.replace(planes="xz")


def test_chunks_follow_the_memory_budget():
    assert ortho_chunk((250, 250, 250), halo=32, budget=10**12) == 250  # fits: one chunk
    assert ortho_chunk((500, 1000, 1000), halo=32, budget=16 * 10**6 * 100) == 100 - 64
    assert ortho_chunk((500, 1000, 1000), halo=32, budget=1) == 1


@pytest.mark.parametrize("axis", [1, 2])
def test_crops_of_xz_and_yz_planes_are_those_planes(axis):
    z, y, x = np.meshgrid(np.arange(40), np.arange(48), np.arange(56), indexing="ij")
    image = (z * 3 + y * 2 + x).astype(np.float32)  # every voxel tells where it is
    mask = (z > 20).astype(np.uint8)
    at = (19, 22, 27)
    patch, target = random_patch(np.random.default_rng(0), image, mask, 8, 0, 300, AUGMENTATIONS["none"], at=at,
                                 axis=axis)
    # An unrotated crop centred on `at` of the plane through it: rows run along z, columns along x (xz)
    # or y (yz), as `ortho_views` lays the planes out.
    rows = np.arange(8) - 3.5 + at[0]
    cols = np.arange(8) - 3.5 + (at[2] if axis == 1 else at[1])
    fixed = at[1] if axis == 1 else at[2]
    expected = rows[:, None] * 3 + (cols[None, :] * 2 + fixed if axis == 2 else cols[None, :] + fixed * 2)
    np.testing.assert_allclose(patch, normalize(expected.astype(np.float32), 0, 300), atol=1e-4)
    assert target.shape == (8, 8) and (target[rows.astype(int) - 15 > 20 - 15].all())  # the mask's z rule, in rows
    np.testing.assert_array_equal(target, np.repeat((np.round(rows) > 20)[:, None], 8, 1).astype(np.uint8))


def manifest(voxel_size, sparse=False):
    from emunet.core.dataset import StackInfo

    stack = StackInfo("a", "train", (10, 64, 64), "uint8", 0.0, 1.0, {"voxel_size": voxel_size} if voxel_size else {})
    return {"stacks": [stack], **({"ignore_label": 2} if sparse else {})}


def test_auto_planes_follow_the_voxel_size():
    """(crop planes, asked planes): `auto` trains on the slices and asks near-isotropic models about all
    three planes; the user's choice is both."""
    auto = TrainConfig()
    assert choose_planes(auto, manifest([10, 10, 10])) == ("xy", "ortho")
    assert choose_planes(auto, manifest([15, 8, 8])) == ("xy", "ortho")  # within 2x
    assert choose_planes(auto, manifest([50, 4, 4])) == ("xy", "xy")  # serial sections
    assert choose_planes(auto, manifest(None)) == ("xy", "xy")  # unknown is not isotropic
    assert choose_planes(auto, manifest([10, 10, 10], sparse=True)) == ("xy", "ortho")  # slices are annotated
    assert choose_planes(TrainConfig(planes="ortho"), manifest(None)) == ("ortho", "ortho")  # the user's choice stands
    assert choose_planes(TrainConfig(planes="xy"), manifest([10, 10, 10])) == ("xy", "xy")
    with pytest.raises(InputError, match="planes=ortho needs fully annotated stacks"):
        choose_planes(TrainConfig(planes="ortho"), manifest([10, 10, 10], sparse=True))


def test_the_plan_records_the_planes_asked_apart_from_the_crops(tmp_path):
    """The model's recorded planes (`plan["planes"]`, its meta) are those it will be asked about; the
    resolved config holds the crops' planes."""
    from emunet.core.dataset import read_manifest, write_dataset
    from emunet.core.synthetic import synthetic_stack
    from emunet.training.config import resolve
    from emunet.training.plan import make_plan

    image, mask = synthetic_stack(0, 0, (8, 64, 64))
    write_dataset(tmp_path / "data", [dict(name=n, split=n, image=image, mask=mask,
                                           source={"voxel_size": [8.0, 8.0, 8.0], "unit": "nm"})
                                      for n in ("train", "val")])
    manifest = read_manifest(tmp_path / "data")
    for planes, crops, asked in (("auto", "xy", "ortho"), ("ortho", "ortho", "ortho"), ("xy", "xy", "xy")):
        cfg, plan = make_plan(resolve(TrainConfig(planes=planes, crop_size=32, input_scale=1)), False,
                              tmp_path / "data", manifest)
        assert (cfg.planes, plan["crop_planes"], plan["planes"]) == (crops, crops, asked)


@pytest.mark.slow
def test_an_ortho_trained_model_predicts_the_three_planes(store, tmp_path, capsys):
    from emunet.core.dataset import write_dataset
    from emunet.core.synthetic import synthetic_stack
    from pipeline.train import train

    stacks = []
    for i in range(3):
        image, mask = synthetic_stack(0, i, (16, 48, 48))
        stacks.append(dict(name=f"s{i}", split="val" if i == 2 else "train", image=image, mask=mask,
                           source={"voxel_size": [8.0, 8.0, 8.0], "unit": "nm"}))
    write_dataset(tmp_path / "data", stacks)
    trained = train(TrainConfig(dataset_uri=str(tmp_path / "data"), planes="ortho", context_slices=0, **TINY_TRAIN))
    params = mlflow.get_run(trained["run_id"]).data.params
    assert (params["planes"], params["crop_planes"], params["predict_planes"]) == ("ortho", "ortho", "ortho")
    meta = json.loads(Path(mlflow.artifacts.download_artifacts(f"runs:/{trained['run_id']}/model/artifacts/unet.json"))
                      .read_text())
    assert meta["planes"] == "ortho" and meta["grow_over_all"] is False  # masks: objects over the foreground
    # The autos as resolved (mlflow run logs "auto" under the parameters' own names).
    assert (params["chosen_context_slices"], params["chosen_champion_metric"], params["predict_grow_over_all"]) == (
        "0", "object_f1_3d", "False")
    segmenter = mlflow.pyfunc.load_model(trained["model_uri"]).unwrap_python_model()
    assert segmenter.planes == "ortho"
    volume = stacks[2]["image"]
    params = DEFAULTS.replace(precision="float32", engine="tensorflow")
    forward = segmenter.forward_for(params)
    low, high = float(np.percentile(volume, 0.5)), float(np.percentile(volume, 99.5))
    expected = fuse_ortho(*(predict_probabilities(forward, np.ascontiguousarray(view), low, high, multiple=segmenter.multiple)
                            for view in ortho_views(volume)))
    got = segmenter.segment(volume, output="probability", precision="float32", engine="tensorflow")
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # Slices too large for the memory budget go by blocks, which see the xy planes only: said, then done so.
    import tifffile

    from serving.predict import PredictConfig, predict

    big, _ = synthetic_stack(0, 3, (8, 600, 500))
    tifffile.imwrite(tmp_path / "big.tif", big, photometric="minisblack")
    predict(PredictConfig(model_uri=trained["model_uri"], input=str(tmp_path / "big.tif"), tile_size=64,
                          memory_gb=0.015, output_dir=str(tmp_path / "out")))
    assert "which see the xy planes only" in capsys.readouterr().out
    assert tifffile.imread(tmp_path / "out" / "big_mask.tif").shape == big.shape
