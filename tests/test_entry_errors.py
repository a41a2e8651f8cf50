"""Every entry point turns every error about the user's data or parameters into one line `error: ...` and
exit code 2, whichever function deep inside raised it; never a traceback. Run in-process through the
entry points' own `run_entry` (what `python -m <step>` runs), on a real SQLite store. (Bugs are the
opposite: a traceback and exit code 1, tests/test_bug_vs_user_error.py.)"""

import numpy as np
import pytest
import tifffile

from emunet.registry.cli import run_entry
from pipeline.evaluate import EvaluateConfig, evaluate
from pipeline.main import MainConfig, main
from pipeline.preprocess import PreprocessConfig, preprocess
from pipeline.train import TrainConfig, train
from serving.predict import PredictConfig, predict
from serving.predict_spark import PredictSparkConfig, predict_spark
from tests.conftest import make_dataset

STEPS = {"preprocess": (preprocess, PreprocessConfig), "train": (train, TrainConfig),
         "evaluate": (evaluate, EvaluateConfig), "predict": (predict, PredictConfig),
         "predict_spark": (predict_spark, PredictSparkConfig), "main": (main, MainConfig)}


@pytest.fixture
def files(tmp_path):
    """Inputs of every kind the cases below need, in the working folder."""
    tifffile.imwrite(tmp_path / "nan.tif", np.full((3, 16, 16), np.nan, np.float32), photometric="minisblack")
    tifffile.imwrite(tmp_path / "ok.tif", np.arange(3 * 16 * 16, dtype=np.uint16).reshape(3, 16, 16), photometric="minisblack")
    tifffile.imwrite(tmp_path / "ok_gt.tif", np.ones((3, 16, 16), np.uint8), photometric="minisblack")
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "empty_folder").mkdir()
    make_dataset(tmp_path / "data", seed=0)
    truncated = make_dataset(tmp_path / "truncated", seed=0) / "s0" / "image.npy"  # a copy cut short
    truncated.write_bytes(truncated.read_bytes()[:5000])
    np.save(make_dataset(tmp_path / "reshaped", seed=0) / "s1" / "mask.npy", np.zeros((4, 64, 63), np.uint8))
    return tmp_path


CASES = [
    # (step, flags, what the one line says)
    ("preprocess", ["--images", "nan.tif", "--labels", "ok_gt.tif"], "nan.tif: the stack has no usable intensity values"),
    ("preprocess", ["--output_dir", "afile"], "output_dir afile exists and is a file"),
    ("preprocess", ["--synthetic_shape", "a,b"], "synthetic_shape must be Z,H,W"),
    ("preprocess", ["--synthetic_stacks", "1"], "synthetic_stacks must be at least 2"),
    ("preprocess", ["--images", "empty_folder", "--labels", "ok_gt.tif"], "empty_folder: the folder holds no"),
    ("preprocess", ["--synthetic_stacks", "2.5"], "argument --synthetic_stacks: expected a whole number, got '2.5'"),
    ("train", ["--dataset_uri", "afile"], "afile: a file, not a dataset folder"),
    ("train", ["--dataset_uri", "truncated"], "s0/image.npy: not a readable .npy array"),
    ("train", ["--dataset_uri", "reshaped"], "s1/mask.npy has shape (4, 64, 63) but the manifest says (4, 64, 64)"),
    ("train", ["--dataset_uri", "data", "--epochs", "0"], "epochs must be at least 1"),
    ("train", ["--dataset_uri", "data", "--learning_rate", "-1"], "learning_rate must be positive"),
    ("train", ["--dataset_uri", "data", "--dropout", "1.5"], "dropout must be a rate between 0 and 1"),
    ("train", ["--dataset_uri", "data", "--max_minutes", "-2"], "max_minutes must be 0 (no budget) or more"),
    ("train", ["--dataset_uri", "data", "--crop_size", "100"], "crop_size 100 must be a multiple of 2**depth = 16"),
    ("train", ["--dataset_uri", "data", "--gpus", "x"], "gpus must be GPU indices like 0,1"),
    ("train", ["--dataset_uri", "data", "--learning_rate", "nan"], "expected a finite number, got 'nan'"),
    ("evaluate", ["--dataset_uri", "data"], "no model given"),
    ("evaluate", ["--model_uri", "runs:/x/model", "--dataset_uri", "data", "--threshold", "2"], "threshold is a probability"),
    ("evaluate", ["--model_uri", "runs:/x/model", "--dataset_uri", "data", "--tile_size", "0"], "tile_size >= 1"),
    ("predict", ["--input", "ok.tif", "--output_dir", "afile"], "output_dir afile exists and is a file"),
    ("predict", ["--input", "ok.tif", "--threshold", "-0.5"], "threshold is a probability"),
    ("predict", ["--input", "ok.tif", "--tta", "rot"], "tta must be one of none, flips, d4"),
    ("predict", ["--input", "ok.tif", "--batch_size", "0"], "batch_size >= 1"),
    ("predict", ["--input", "ok.tif", "--labels", "ok_gt.tif,ok_gt.tif"], "got 1 input stacks but 2 label stacks"),
    ("predict", ["--input", "nothere.tif"], "nothere.tif: file not found"),
    ("predict_spark", ["--input", "ok.tif", "--chunk_slices", "0"], "chunk_slices must be at least 1"),
    ("predict_spark", ["--input", "ok.tif", "--memory_gb", "-1"], "memory_gb must be 0"),
    ("predict_spark", ["--input", "ok.tif", "--region", "0:5"], "region"),
    ("predict_spark", ["--input", "ok.tif", "--output_dir", "afile"], "output_dir"),
    ("train", ["--dataset_uri", "data", "--context_slices", "two"], "context_slices must be auto or a whole number"),
    ("main", ["--context_slices", "1.5"], "context_slices must be auto or a whole number"),
    ("main", ["--champion_metric", "best"], "champion_metric must be one of auto"),
    ("predict", ["--input", "ok.tif", "--grow_over_all", "maybe"], "grow_over_all must be auto, true or false"),
    ("main", ["--epochs", "0"], "epochs must be at least 1"),
    ("main", ["--synthetic_shape", "8,0,8"], "synthetic_shape must be Z,H,W"),
]


@pytest.mark.parametrize("step, flags, message", CASES, ids=[f"{c[0]}-{'-'.join(c[1])[:40]}" for c in CASES])
def test_bad_input_is_one_error_line_and_exit_2(store, files, capsys, step, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        run_entry(*STEPS[step], flags)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and message in lines[-1], err
    assert len([line for line in lines if line.startswith("error:")]) == 1 and "Traceback" not in err


def test_a_predict_input_with_no_usable_values_names_the_file(world, files, capsys):
    with pytest.raises(SystemExit):
        run_entry(predict, PredictConfig, ["--model_uri", world["trained"]["model_uri"], "--input",
                                           str(files / "nan.tif"), "--output_dir", str(files / "out")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"error: {files / 'nan.tif'}: the stack has no usable intensity values (all NaN or infinite)"
    assert not list((files / "out").iterdir())  # nothing half-written left behind
