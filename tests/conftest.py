"""Shared fixtures: a real MLflow tracking store (SQLite in a temp folder) and tiny real datasets."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "datasets"
# A model small enough to train in seconds on a CI core: what matters here is the plumbing, not accuracy.
# BatchNorm statistics that follow the weights within a few steps: these runs make six.
TINY_TRAIN = dict(crop_size=32, base_filters=4, depth=2, batch_size=4, steps_per_epoch=3, epochs=2,
                  max_minutes=0.0, workers=1, learning_rate=1e-2, bn_momentum=0.9)


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh SQLite tracking + registry store; the test runs inside `tmp_path` so artifacts land there."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    _point_mlflow_at(uri)
    while mlflow.active_run():
        mlflow.end_run()
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    _point_mlflow_at(None)


def make_dataset(folder: Path, seed: int) -> Path:
    """A tiny synthetic dataset artifact: two training stacks and one validation stack of 4 x 64 x 64."""
    from emunet.core.dataset import write_dataset
    from emunet.core.synthetic import synthetic_stack

    stacks = [dict(name=f"s{i}", split="val" if i == 2 else "train", image=image, mask=mask)
              for i, (image, mask) in enumerate(synthetic_stack(seed, i, (4, 64, 64)) for i in range(3))]
    write_dataset(folder, stacks)
    return folder


def _point_mlflow_at(uri: str | None) -> None:
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    # `mlflow.set_experiment` remembers the experiment in this process and in MLFLOW_EXPERIMENT_ID, an id of
    # another test's store: forget both, so a test that starts a run without naming an experiment uses this
    # store's default one. There is no public way to unset it.
    mlflow.tracking.fluent._active_experiment_id = None
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


@pytest.fixture(scope="session")
def world_state(tmp_path_factory):
    """Built once per session: a SQLite store, two tiny datasets and one tiny model trained into it."""
    from pipeline.train import TrainConfig, train

    root = tmp_path_factory.mktemp("world")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # the store's artifact root (./mlruns) resolves here, once, at creation
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        _point_mlflow_at(uri)
        data = make_dataset(root / "data", seed=0)
        other = make_dataset(root / "other", seed=5)
        trained = train(TrainConfig(dataset_uri=str(data), **TINY_TRAIN))
        _point_mlflow_at(None)
    return {"root": root, "uri": uri, "data": data, "other": other, "trained": trained}


@pytest.fixture
def world(world_state, monkeypatch):
    """The session's store with its trained model, made current for one test."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", world_state["uri"])
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    _point_mlflow_at(world_state["uri"])
    yield world_state
    while mlflow.active_run():
        mlflow.end_run()
    _point_mlflow_at(None)


def run_python(*args: str, cwd: Path, env_uri: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python <args>` in a fresh process, as a user would, against the tracking store `env_uri`."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": env_uri, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("MLFLOW_RUN_ID", None)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def run_module(module: str, *args: str, cwd: Path, env_uri: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m <module> <args>`."""
    return run_python("-m", module, *args, cwd=cwd, env_uri=env_uri, timeout=timeout)


def free_ports(count: int = 1) -> list[int]:
    """`count` distinct local TCP ports that nobody listens on (bound together, then released)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def free_port() -> int:
    return free_ports(1)[0]


def needs_shared(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared EM datasets are not beside this checkout)")
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(0)
