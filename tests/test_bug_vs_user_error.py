"""What the user can fix is one line `error: ...` and exit code 2; anything else is a bug and keeps Python's
traceback and exit code 1, so that a NumPy or Keras `ValueError` deep inside is never passed off as the
user's mistake. The entry points run as a user runs them (`python -m ...`, a real SQLite store)."""

import errno
import re
from dataclasses import dataclass

import mlflow
import numpy as np
import pytest
import tifffile
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST

from emunet.core.errors import InputError
from emunet.registry.cli import run_entry, user_error
from tests.conftest import make_dataset, run_module

# TensorFlow's C++ start-up lines (absl logging before InitializeLog ignores TF_CPP_MIN_LOG_LEVEL): printed
# at import, before any of our code runs, so they are not what an entry point says.
TF_NATIVE_LOG = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\)|[IWEF]\d{4} [\d:.]+ +\d+ \S+:\d+\] )")


@pytest.mark.parametrize("exc, message", [
    (InputError("labels.tif has shape (3, 8, 8) but images.tif has (3, 8, 9)"),
     "labels.tif has shape (3, 8, 8) but images.tif has (3, 8, 9)"),
    (InputError("threshold is a probability\n   between 0 and 1, got 2.0\n"),
     "threshold is a probability between 0 and 1, got 2.0"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "in/stack.tif"),
     "in/stack.tif: No such file or directory"),
    (PermissionError(errno.EACCES, "Permission denied", "/results"), "/results: Permission denied"),
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),  # a write names no file
    (MlflowException("Registered Model with name=em-unet not found", error_code=RESOURCE_DOES_NOT_EXIST),
     "Registered Model with name=em-unet not found"),
    (MlflowException("Invalid experiment name: ''", error_code=INVALID_PARAMETER_VALUE), "Invalid experiment name: ''"),
])
def test_what_the_user_can_fix_is_one_line(exc, message):
    assert user_error(exc) == message


@pytest.mark.parametrize("exc", [
    ValueError("shapes (3,) and (4,) not aligned: 3 (dim 0) != 4 (dim 0)"),  # NumPy, Keras or our own assertion
    KeyError("multiple_of"),
    TypeError("unsupported operand type(s) for +: 'int' and 'str'"),
    IndexError("index 4 is out of bounds for axis 0 with size 4"),
    RuntimeError("unexpected state"),
    ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),  # no path of the user's
    OSError(errno.EBADF, "Bad file descriptor"),
    MlflowException("database is locked", error_code=INTERNAL_ERROR),
])
def test_anything_else_is_a_bug(exc):
    assert user_error(exc) is None


@dataclass(frozen=True)
class _Config:
    """A step with no parameters."""


def test_run_entry_lets_a_bug_propagate_and_turns_an_input_error_into_exit_2(store, capsys):
    bug = ValueError("operands could not be broadcast together with shapes (4,64,64) (4,64,63)")

    def buggy(cfg):
        raise bug

    with pytest.raises(ValueError) as caught:
        run_entry(buggy, _Config, [])
    assert caught.value is bug and "error:" not in capsys.readouterr().err

    def refused(cfg):
        raise InputError("crop_size 100 must be a multiple of 2**depth = 16")

    with pytest.raises(SystemExit) as exit_info:
        run_entry(refused, _Config, [])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: crop_size 100 must be a multiple of 2**depth = 16\n"


def own_lines(stderr: str) -> list[str]:
    """The non-empty stderr lines that are not TensorFlow's native start-up log."""
    return [line for line in stderr.splitlines() if line.strip() and not TF_NATIVE_LOG.match(line)]


def log_model_with_a_three_channel_network(tmp_path) -> str:
    """A model in our own pyfunc format whose Keras network takes RGB tiles: the segmenter feeds it
    grayscale ones and Keras raises `ValueError` inside the compiled forward pass. No check of ours makes
    such a model (train logs the U-Net it built), so when this happens it is a bug to report with its
    traceback, not a value the user typed."""
    import keras

    from emunet.inference.segmenter import log_segmenter

    inputs = keras.Input((None, None, 3), name="image")
    network = keras.Model(inputs, keras.layers.Conv2D(1, 1, activation="sigmoid", name="head")(inputs))
    network.save(tmp_path / "rgb.keras")
    with mlflow.start_run() as run:
        log_segmenter(tmp_path / "rgb.keras", {"multiple_of": 1})
    return f"runs:/{run.info.run_id}/model"


def test_a_value_error_inside_the_model_is_a_traceback_and_exit_1(store, tmp_path):
    model_uri = log_model_with_a_three_channel_network(tmp_path)
    tifffile.imwrite(tmp_path / "x.tif", np.arange(2 * 32 * 32, dtype=np.uint16).reshape(2, 32, 32),
                     photometric="minisblack")
    proc = run_module("serving.predict", "--model_uri", model_uri, "--input", "x.tif", "--output_dir", "out",
                      cwd=tmp_path, env_uri=store, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback (most recent call last)" in proc.stderr, proc.stderr[-3000:]
    assert re.search(r"^ValueError: ", proc.stderr, re.MULTILINE), proc.stderr[-3000:]
    # The engine's own check of the network's input (OpenVINO), or Keras' words (TensorFlow): a bug either way.
    assert "is incompatible with the layer" in proc.stderr or "batch, got shape" in proc.stderr, proc.stderr[-3000:]
    assert not [line for line in proc.stderr.splitlines() if line.startswith("error:")], proc.stderr[-3000:]
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.step = 'predict'", output_format="list")
    assert [r.info.status for r in runs] == ["FAILED"]  # the run the bug broke says so in the MLflow UI
    assert not list((tmp_path / "out").glob("x_mask*"))  # nothing half-written passes for a result


@pytest.mark.parametrize("module, flags, message", [
    ("pipeline.train", ["--dataset_uri", "data", "--loss", "nonsense"],
     "error: loss must be one of bce, dice, bce_dice, bce_dice_both, focal, got 'nonsense'"),
    ("pipeline.train", ["--dataset_uri", "data", "--preset", "huge"], "error: preset must be one of fast, paper, got 'huge'"),
    ("pipeline.train", ["--dataset_uri", "data", "--lr_schedule", "linear"],
     "error: lr_schedule must be one of cosine, constant, got 'linear'"),
    ("serving.predict", ["--input", "x.tif", "--threshold", "2"], "error: threshold is a probability between 0 and 1, got 2.0"),
])
def test_a_bad_parameter_is_one_error_line_and_exit_2(store, tmp_path, module, flags, message):
    mlflow.search_experiments()  # the store's tables exist: MLflow's "creating tables" lines are not the step's
    make_dataset(tmp_path / "data", seed=0)
    tifffile.imwrite(tmp_path / "x.tif", np.zeros((2, 32, 32), np.uint8), photometric="minisblack")
    proc = run_module(module, *flags, cwd=tmp_path, env_uri=store, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert own_lines(proc.stderr) == [message], proc.stderr[-3000:]


@pytest.mark.parametrize("text, message", [
    ("{not json", "state.json: not a training backup"),
    ("[1, 2]", "holds the backup of another training \\(key None"),
])
def test_a_checkpoint_dir_holding_something_else_is_the_users_to_fix(tmp_path, text, message):
    from emunet.training.checkpoint import STATE, Backup

    (tmp_path / STATE).write_text(text)
    with Backup(tmp_path, "abc") as backup, pytest.raises(InputError, match=message):
        backup.load()


def test_a_foreign_model_and_a_too_small_sample_are_the_users_to_fix():
    import keras

    from emunet.core.model import spec_of
    from emunet.inference.export import test_slice

    inputs = keras.Input((None, None, 1))
    with pytest.raises(InputError, match="is not an em-unet U-Net"):
        spec_of(keras.Model(inputs, keras.layers.Conv2D(1, 1, name="head")(inputs), name="foreign"))
    with pytest.raises(InputError, match="a test slice needs at least 16 x 16 pixels"):
        test_slice(np.zeros((8, 40), np.uint8), 16)
