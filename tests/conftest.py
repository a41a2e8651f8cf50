"""Shared fixtures: a real MLflow tracking store (SQLite in a temp folder) and tiny real datasets."""

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "datasets"
# A model small enough to train in seconds on a CI core: what matters here is the plumbing, not accuracy.
TINY_TRAIN = dict(crop_size=32, base_filters=4, depth=2, batch_size=4, steps_per_epoch=3, epochs=2,
                  max_minutes=0.0, workers=1, learning_rate=1e-2)


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh SQLite tracking + registry store; the test runs inside `tmp_path` so artifacts land there."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    while mlflow.active_run():
        mlflow.end_run()
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


def run_python(*args: str, cwd: Path, env_uri: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python <args>` in a fresh process, as a user would, against the tracking store `env_uri`."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": env_uri, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("MLFLOW_RUN_ID", None)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def run_module(module: str, *args: str, cwd: Path, env_uri: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m <module> <args>`."""
    return run_python("-m", module, *args, cwd=cwd, env_uri=env_uri, timeout=timeout)


def needs_shared(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared EM datasets are not beside this checkout)")
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(0)
