"""`mlflow run` end to end, as a user types it: the MLproject, parent and child runs, the registry, the
summary, and a bad input that fails the run."""

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import tifffile

from tests.conftest import ROOT, TINY_TRAIN

pytestmark = pytest.mark.slow


def mlflow_run(tmp_path: Path, store: str, *params: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local", "--experiment-name", "em-unet"]
    for p in params:
        args += ["-P", p]
    # `python` in the MLproject command must be this interpreter, as it is in an activated venv.
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("MLFLOW_RUN_ID", None)
    return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)


def test_mlflow_run_chains_the_steps_and_registers_a_champion(store, tmp_path):
    tiny = [f"{k}={v}" for k, v in TINY_TRAIN.items()] + ["synthetic_stacks=3", "synthetic_shape=4,64,64"]
    proc = mlflow_run(tmp_path, store, *tiny)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "test metrics (held-out stacks): dice" in proc.stdout
    assert "models:/em-unet@champion" in proc.stdout and "mlflow ui" in proc.stdout

    runs = mlflow.search_runs(experiment_names=["em-unet"], output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = {r.data.tags["step"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"preprocess", "train", "evaluate"}
    assert all(r.info.status == "FINISHED" for r in children.values())
    assert children["train"].data.params["crop_size"] == "32"
    assert parent.data.metrics["test_dice"] == children["evaluate"].data.metrics["test_dice"]

    champion = mlflow.MlflowClient().get_model_version_by_alias("em-unet", "champion")
    assert champion.tags["data_fingerprint"] == children["preprocess"].data.tags["data_fingerprint"]
    model = mlflow.pyfunc.load_model("models:/em-unet@champion")
    assert model.predict(np.zeros((2, 40, 40), np.float32)).shape == (2, 40, 40)


def test_mlflow_run_with_bad_input_fails_the_run_with_one_line(store, tmp_path):
    tifffile.imwrite(tmp_path / "img.tif", np.zeros((5, 32, 32), np.uint8))
    tifffile.imwrite(tmp_path / "lab.tif", np.zeros((5, 32, 32), np.uint8))
    proc = mlflow_run(tmp_path, store, f"images={tmp_path / 'img.tif'}", f"labels={tmp_path / 'lab.tif'}")
    assert proc.returncode != 0
    assert "error: " in proc.stderr and "lab.tif: the label stack is all background" in proc.stderr
    assert "Traceback" not in proc.stderr
    runs = mlflow.search_runs(experiment_names=["em-unet"], output_format="list")
    assert runs and all(r.info.status == "FAILED" for r in runs)
