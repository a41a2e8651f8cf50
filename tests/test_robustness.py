"""Bad input and hostile or unlucky conditions not covered next to their modules: manifests that point
outside the dataset, unsafe Keras files, unusual intensity ranges, kills mid-write, and two trainings
sharing one SQLite store. Each case is a row of docs/robustness.md."""

import json
import os
import signal
import subprocess
import sys
import time

import mlflow
import numpy as np
import pytest
import tifffile

from pipeline.dataset import StackInfo, open_stack, read_manifest
from pipeline.errors import InputError
from tests.conftest import ROOT, TINY_TRAIN, make_dataset, run_module


def with_stack_name(dataset, name):
    """Rewrite the first stack's name in a real dataset's manifest, as a hostile manifest would."""
    path = dataset / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["stacks"][0]["name"] = name
    path.write_text(json.dumps(manifest))
    return dataset


@pytest.mark.parametrize("name", ["../outside", "/etc", "s0/../../outside", "..", "s0\n"])
def test_a_manifest_naming_a_folder_outside_the_dataset_is_refused(tmp_path, name):
    dataset = with_stack_name(make_dataset(tmp_path / "data", seed=0), name)
    (tmp_path / "outside").mkdir()  # something to read there, were the name followed
    np.save(tmp_path / "outside" / "image.npy", np.zeros((4, 64, 64), np.uint8))
    np.save(tmp_path / "outside" / "mask.npy", np.ones((4, 64, 64), np.uint8))
    with pytest.raises(InputError, match="bad stack entry name=.*never a path"):
        read_manifest(dataset)
    info = StackInfo(name, "train", (4, 64, 64), "uint8", 0.0, 255.0)
    with pytest.raises(InputError, match="is not a folder inside .*refusing to read it"):
        open_stack(dataset, info)


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ('{"format_version": 1, "stacks": [{"name": "s0"}]}', "malformed stack entry"),
    ("[1, 2]", "format version None"),
])
def test_a_corrupt_manifest_is_a_clear_error(tmp_path, text, message):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(InputError, match=message):
        read_manifest(tmp_path)


def test_train_on_a_manifest_pointing_outside_gives_one_error_line_and_exit_2(store, tmp_path):
    dataset = with_stack_name(make_dataset(tmp_path / "data", seed=0), "../../etc")
    proc = run_module("pipeline.train", "--dataset_uri", str(dataset), cwd=tmp_path, env_uri=store, timeout=300)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "bad stack entry name='../../etc'" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_keras_file_with_a_lambda_layer_is_refused_by_the_segmenter(store, tmp_path):
    """A .keras file can carry Python code in a Lambda layer; the logged model loads with safe_mode=True,
    so such a file is refused rather than run."""
    import keras

    from serving.segmenter import log_segmenter

    inputs = keras.Input((None, None, 1))
    model = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 0 + 1, name="payload")(inputs))
    model.save(tmp_path / "unsafe.keras")
    with mlflow.start_run():
        info = log_segmenter(tmp_path / "unsafe.keras", {"multiple_of": 1})
    with pytest.raises(Exception, match="safe_mode"):
        mlflow.pyfunc.load_model(info.model_uri)
