"""The predict entry point: masks, probabilities and object tables written for real stacks, scores logged
when labels are given, clear errors otherwise."""

import csv

import mlflow
import numpy as np
import pytest
import tifffile

from emunet.core.metrics import ObjectScorer
from emunet.core.objects import sizes, truth_objects
from emunet.inference.instances import slice_instances
from serving.predict import PredictConfig, predict
from tests.conftest import run_module


def test_two_inputs_with_the_same_name_are_refused_before_any_work(world, tmp_path):
    """a/cells.tif and b/cells.tif would both write cells_mask.tif: the second silently won."""
    for folder, value in (("a", 10), ("b", 200)):
        (tmp_path / folder).mkdir()
        tifffile.imwrite(tmp_path / folder / "cells.tif", np.full((2, 32, 32), value, np.uint8), photometric="minisblack")
    out = tmp_path / "out"
    proc = run_module("serving.predict", "--model_uri", world["trained"]["model_uri"], "--output_dir", str(out),
                      "--input", f"{tmp_path / 'a' / 'cells.tif'},{tmp_path / 'b' / 'cells.tif'}", cwd=tmp_path,
                      env_uri=world["uri"])
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines[-1].startswith("error: several inputs would write the same output name cells"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not out.exists()  # refused before anything was written


def traced_peak(run) -> int:
    """Peak bytes allocated through Python and NumPy (NumPy reports its arrays to tracemalloc) by `run()`."""
    import tracemalloc

    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_labels_are_streamed_slice_by_slice_like_the_images(world, tmp_path):
    """The README promises that predict's memory does not grow with the stack; with labels the whole label
    stack used to be read (and binarised: twice its size again). Predicting with labels must cost about
    what predicting without them costs, far less than one label stack more."""
    rng = np.random.default_rng(3)
    shape = (64, 256, 256)  # 4 MiB of uint8 labels; a slice is 64 KiB
    tifffile.imwrite(tmp_path / "big.tif", rng.integers(0, 255, shape, dtype=np.uint8), photometric="minisblack")
    tifffile.imwrite(tmp_path / "big_gt.tif", (rng.random(shape) > 0.5).astype(np.uint8) * 255, photometric="minisblack")
    base = PredictConfig(model_uri=world["trained"]["model_uri"], input=str(tmp_path / "big.tif"),
                         output_dir=str(tmp_path / "out"))
    with_labels = PredictConfig(**{**base.__dict__, "labels": str(tmp_path / "big_gt.tif")})
    predict(base)  # the network compiled once: the runs measured below allocate what predict needs
    without = traced_peak(lambda: predict(base))
    scored = traced_peak(lambda: predict(with_labels))
    stack_bytes = int(np.prod(shape))
    assert scored - without < stack_bytes / 4, (f"labels added {(scored - without) / 2**20:.1f} MiB to the peak "
                                                f"({without / 2**20:.1f} MiB without) for a {stack_bytes / 2**20:.0f} MiB stack")


def test_predict_writes_results_and_scores_with_labels(world, tmp_path):
    rng = np.random.default_rng(1)
    stack = rng.integers(0, 4000, (3, 40, 57), dtype=np.uint16)
    truth = (rng.random((3, 40, 57)) > 0.5).astype(np.uint8)
    tifffile.imwrite(tmp_path / "cells.tif", stack, photometric="minisblack")
    tifffile.imwrite(tmp_path / "cells_gt.tif", truth, photometric="minisblack")
    cfg = PredictConfig(model_uri=world["trained"]["model_uri"], input=str(tmp_path / "cells.tif"),
                        labels=str(tmp_path / "cells_gt.tif"), output_dir=str(tmp_path / "out"),
                        save_probability=True, save_labels=True, min_object_size=1)
    result = predict(cfg)
    mask = tifffile.imread(tmp_path / "out" / "cells_mask.tif")
    prob = tifffile.imread(tmp_path / "out" / "cells_prob.tif")
    assert mask.shape == prob.shape == (3, 40, 57)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255} and prob.dtype == np.float32
    np.testing.assert_array_equal(mask == 255, prob >= 0.5)
    # Instances: the separated objects of each slice, with ids carried through the slices; the objects
    # table counts them.
    ids = tifffile.imread(tmp_path / "out" / "cells_labels.tif")
    assert ids.shape == (3, 40, 57) and ids.dtype == np.uint32
    np.testing.assert_array_equal(ids > 0, slice_instances_stack(prob, 1) > 0)
    rows = list(csv.DictReader(open(tmp_path / "out" / "cells_objects.csv")))
    assert [int(r["slice"]) for r in rows] == [0, 1, 2]
    for z, row in enumerate(rows):
        instances = slice_instances(prob[z], 0.5, 0.9, 1)
        assert int(row["objects"]) == len(np.unique(ids[z][ids[z] > 0])) == instances.max()
        assert sorted(map(int, row["areas"].split())) == sorted(sizes(instances))
    assert not list((tmp_path / "out").glob("*.partial"))
    # Object scores: those of the written instances against the truth's components.
    scorer = ObjectScorer()
    for z in range(3):
        scorer.add(ids[z].astype(np.int64), truth_objects(truth[z], 1))
    for key, value in scorer.scores().items():
        assert result["metrics"][key] == pytest.approx(value)
    assert mlflow.get_run(result["run_id"]).data.metrics["test_object_f1"] == pytest.approx(scorer.scores()["object_f1"])
    # Scores equal those computed from the written mask.
    tp = int(((mask > 0) & (truth > 0)).sum())
    dice = 2 * tp / ((mask > 0).sum() + truth.sum())
    assert result["metrics"]["dice"] == pytest.approx(dice)
    assert mlflow.get_run(result["run_id"]).data.metrics["test_dice"] == pytest.approx(dice)


def slice_instances_stack(prob, min_size):
    return np.stack([slice_instances(p, 0.5, 0.9, min_size) for p in prob])


def test_predict_without_input_is_a_clear_error(world, tmp_path):
    proc = run_module("serving.predict", "--model_uri", world["trained"]["model_uri"], cwd=tmp_path,
                      env_uri=world["uri"])
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: no input given")


def test_tiled_prediction_agrees_with_whole_slice_prediction(world):
    from emunet.core.synthetic import synthetic_stack

    image, _ = synthetic_stack(0, 0, (1, 1024, 1024))
    model = mlflow.pyfunc.load_model(world["trained"]["model_uri"])
    whole = model.predict(image)  # the default 1024 tile: the slice in one piece
    tiled = model.predict(image, params={"tile_size": 512})  # 3 x 3 tiles, a quarter overlap, Gaussian blending
    assert whole.shape == tiled.shape == (1, 1024, 1024)
    assert np.mean(whole == tiled) >= 0.999
    odd = model.predict(image[0, :1000, :777])
    assert odd.shape == (1000, 777)


def test_tta_and_bad_tile_size_through_the_pyfunc(world):
    from emunet.core.synthetic import synthetic_stack

    image, _ = synthetic_stack(0, 1, (2, 96, 80))
    model = mlflow.pyfunc.load_model(world["trained"]["model_uri"])
    plain = model.predict(image, params={"output": "probability"})
    d4 = model.predict(image, params={"output": "probability", "tta": "d4"})
    assert d4.shape == plain.shape == (2, 96, 80)
    # An average of views of the same image: close to the plain prediction, but not the same numbers.
    assert 0 < np.abs(d4 - plain).mean() < 0.1
    # A tile size that does not divide by the model's 2**depth (4 here) is rounded up, as the tiler does.
    np.testing.assert_array_equal(model.predict(image, params={"tile_size": 31}), model.predict(image, params={"tile_size": 32}))


def test_one_slice_sent_with_the_stacks_window_equals_that_slice_of_the_whole_stack(world):
    """A REST client sends one slice at a time; normalised by that slice's own percentiles it came out
    differently from the same slice inside the stack, which training and predict normalise as a whole."""
    from emunet.core.normalize import stack_stats
    from emunet.core.synthetic import synthetic_stack

    image, _ = synthetic_stack(0, 2, (6, 64, 64))
    image = (image.astype(np.float32) * np.linspace(0.4, 1.6, 6)[:, None, None]).astype(np.float32)  # brighter with depth
    model = mlflow.pyfunc.load_model(world["trained"]["model_uri"])
    whole = model.predict(image, params={"output": "probability"})
    low, high = stack_stats(image)
    for z in (0, 5):
        alone = model.predict(image[z], params={"output": "probability", "low": low, "high": high})
        np.testing.assert_allclose(alone, whole[z], atol=1e-5)
    own_window = model.predict(image[0], params={"output": "probability"})
    assert np.abs(own_window - whole[0]).max() > 1e-3  # without the window it is a different answer


def test_results_carry_the_inputs_voxel_size_as_fiji_reads_it(world, tmp_path):
    """A Fiji stack (ImageJ hyperstack, 4 nm pixels, 50 nm sections) gives masks, probabilities and
    instance labels that open in Fiji with the same calibration, not as 1-pixel units."""
    from emunet.core.io import open_volume

    stack = np.random.default_rng(2).integers(0, 255, (3, 32, 48), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "tomo.tif", stack, imagej=True, resolution=(1 / 0.004, 1 / 0.004),
                     metadata={"spacing": 0.05, "unit": "um", "axes": "ZYX"})
    tifffile.imwrite(tmp_path / "plain.tif", stack, photometric="minisblack")
    predict(PredictConfig(model_uri=world["trained"]["model_uri"], input=f"{tmp_path / 'tomo.tif'},{tmp_path / 'plain.tif'}",
                          output_dir=str(tmp_path / "out"), save_probability=True, save_labels=True))
    for suffix in ("mask", "prob", "labels"):
        path = tmp_path / "out" / f"tomo_{suffix}.tif"
        with tifffile.TiffFile(path) as tif:
            assert tif.is_imagej and tif.imagej_metadata["slices"] == 3
            assert tif.imagej_metadata["unit"] == "micron" and tif.imagej_metadata["spacing"] == pytest.approx(0.05)
            x_resolution = tif.pages[0].tags["XResolution"].value
            assert x_resolution[1] / x_resolution[0] == pytest.approx(0.004)
        with open_volume(path) as back:
            assert back.shape == (3, 32, 48) and back.unit == "µm"
            assert back.voxel_size == pytest.approx((0.05, 0.004, 0.004))
    # Without calibration in the input, none is invented.
    with open_volume(tmp_path / "out" / "plain_mask.tif") as back:
        assert back.voxel_size is None and back.shape == (3, 32, 48)
