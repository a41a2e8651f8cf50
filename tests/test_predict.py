"""The predict entry point: masks, probabilities and object tables written for real stacks, scores logged
when labels are given, clear errors otherwise."""

import csv

import mlflow
import numpy as np
import pytest
import tifffile

from serving.predict import PredictConfig, objects, predict
from tests.conftest import run_module


def test_objects_counts_components_above_the_minimum_size():
    mask = np.zeros((20, 20), np.uint8)
    mask[1:4, 1:4] = 1  # 9 px
    mask[10:15, 10:16] = 1  # 30 px
    mask[18, 18] = 1  # 1 px: noise
    assert objects(mask, min_size=5) == [9, 30]


def test_predict_writes_results_and_scores_with_labels(world, tmp_path):
    rng = np.random.default_rng(1)
    stack = rng.integers(0, 4000, (3, 40, 57), dtype=np.uint16)
    truth = (rng.random((3, 40, 57)) > 0.5).astype(np.uint8)
    tifffile.imwrite(tmp_path / "cells.tif", stack, photometric="minisblack")
    tifffile.imwrite(tmp_path / "cells_gt.tif", truth, photometric="minisblack")
    cfg = PredictConfig(model_uri=world["trained"]["model_uri"], input=str(tmp_path / "cells.tif"),
                        labels=str(tmp_path / "cells_gt.tif"), output_dir=str(tmp_path / "out"),
                        save_probability=True, min_object_size=1)
    result = predict(cfg)
    mask = tifffile.imread(tmp_path / "out" / "cells_mask.tif")
    prob = tifffile.imread(tmp_path / "out" / "cells_prob.tif")
    assert mask.shape == prob.shape == (3, 40, 57)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255} and prob.dtype == np.float32
    np.testing.assert_array_equal(mask == 255, prob >= 0.5)
    rows = list(csv.DictReader(open(tmp_path / "out" / "cells_objects.csv")))
    assert [int(r["slice"]) for r in rows] == [0, 1, 2]
    assert int(rows[0]["objects"]) == len(objects(mask[0] > 0, 1))
    assert not list((tmp_path / "out").glob("*.partial"))
    # Scores equal those computed from the written mask.
    tp = int(((mask > 0) & (truth > 0)).sum())
    dice = 2 * tp / ((mask > 0).sum() + truth.sum())
    assert result["metrics"]["dice"] == pytest.approx(dice)
    assert mlflow.get_run(result["run_id"]).data.metrics["test_dice"] == pytest.approx(dice)


def test_predict_without_input_is_a_clear_error(world, tmp_path):
    proc = run_module("serving.predict", "--model_uri", world["trained"]["model_uri"], cwd=tmp_path,
                      env_uri=world["uri"])
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: no input given")


def test_tiled_prediction_agrees_with_whole_slice_prediction(world):
    from pipeline.synthetic import synthetic_stack

    image, _ = synthetic_stack(0, 0, (1, 1024, 1024))
    model = mlflow.pyfunc.load_model(world["trained"]["model_uri"])
    whole = model.predict(image)  # the default 1024 tile: the slice in one piece
    tiled = model.predict(image, params={"tile_size": 512})  # 3 x 3 tiles, a quarter overlap, Gaussian blending
    assert whole.shape == tiled.shape == (1, 1024, 1024)
    assert np.mean(whole == tiled) >= 0.999
    odd = model.predict(image[0, :1000, :777])
    assert odd.shape == (1000, 777)


def test_tta_and_bad_tile_size_through_the_pyfunc(world):
    from pipeline.synthetic import synthetic_stack

    image, _ = synthetic_stack(0, 1, (2, 96, 80))
    model = mlflow.pyfunc.load_model(world["trained"]["model_uri"])
    plain = model.predict(image, params={"output": "probability"})
    d4 = model.predict(image, params={"output": "probability", "tta": "d4"})
    assert d4.shape == plain.shape == (2, 96, 80)
    # An average of views of the same image: close to the plain prediction, but not the same numbers.
    assert 0 < np.abs(d4 - plain).mean() < 0.1
    with pytest.raises(Exception, match="tile_size 99 is not a multiple of 4"):
        model.predict(image, params={"tile_size": 99})
