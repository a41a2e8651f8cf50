"""Interrupted training resumes: a real `python -m pipeline.train` is killed with SIGKILL in the middle of
an epoch; the same command, run again, continues from the last completed epoch in the same MLflow run and
ends as an uninterrupted run would."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest

from emunet.core.errors import InputError
from emunet.training.checkpoint import DEFAULT_ROOT, Backup, backup_dir
from emunet.training.state import TrainingState
from tests.conftest import ROOT, TINY_TRAIN, make_dataset

# Six epochs of 20 steps: long enough (a few seconds per epoch) for the kill to land inside epoch 3.
RESUME_TRAIN = {**TINY_TRAIN, "epochs": 6, "steps_per_epoch": 20, "patience": 0}
METRICS = ("val_dice", "val_iou", "val_loss", "loss", "learning_rate", "images_per_sec")


def flags(config: dict) -> list[str]:
    return [part for k, v in config.items() for part in (f"--{k}", str(v))]


def start_train(args: list[str], cwd: Path, uri: str) -> tuple[subprocess.Popen, list[str]]:
    """`python -m pipeline.train` in a new process; its output lines are collected as they come."""
    # oneDNN's multithreaded CPU kernels are not bitwise reproducible from one process to the next (epoch-1
    # losses of two fresh processes differed by 3e-5), which would hide what this test checks: TensorFlow's
    # own Eigen kernels are, so every training here uses them.
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3",
           "TF_ENABLE_ONEDNN_OPTS": "0"}
    env.pop("MLFLOW_RUN_ID", None)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.train", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return proc, lines


def wait_for(lines: list[str], text: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in line for line in lines):
        assert proc.poll() is None, f"train ended before printing {text!r}:\n{''.join(lines)}"
        assert time.monotonic() < deadline, f"no {text!r} after {timeout} s:\n{''.join(lines)}"
        time.sleep(0.05)


def history(run_id: str, name: str) -> list:
    return sorted((m.step, m.value) for m in mlflow.MlflowClient().get_metric_history(run_id, name))


@pytest.mark.slow
def test_training_killed_mid_epoch_resumes_in_the_same_run(store, tmp_path):
    data = make_dataset(tmp_path / "data", seed=0)
    args = ["--dataset_uri", str(data), *flags(RESUME_TRAIN)]

    proc, lines = start_train(args, tmp_path, store)
    wait_for(lines, "epoch 2:", proc)
    time.sleep(0.5)  # into epoch 3's training steps
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    output = "".join(lines)
    (backup,) = (tmp_path / DEFAULT_ROOT).iterdir()
    state = json.loads((backup / "state.json").read_text())
    # The last completed epoch: usually 2, but on a loaded machine the output is read late and epoch 3 may
    # have finished (its backup written, its line not yet printed) before the kill landed.
    done = state["next_epoch"]
    assert 2 <= done < 6 and f"epoch {done + 1}:" not in output, output  # killed before the end
    killed_run = state["run_id"]
    assert mlflow.get_run(killed_run).info.status == "RUNNING"  # SIGKILL: nobody closed it
    assert [s for s, _ in history(killed_run, "val_dice")] == list(range(done))

    proc, lines = start_train(args, tmp_path, store)
    assert proc.wait(600) == 0, "".join(lines)
    output = "".join(lines)
    assert f"resuming from the backup of epoch {done}" in output, output
    assert not any(f"epoch {e}:" in output for e in range(1, done + 1)), output  # completed epochs are not redone
    assert f"epoch {done + 1}:" in output and "epoch 6:" in output

    runs = mlflow.search_runs(experiment_names=["em-unet"], output_format="list")
    assert [r.info.run_id for r in runs] == [killed_run]
    run = mlflow.get_run(killed_run)
    assert run.info.status == "FINISHED" and run.data.metrics["epochs_trained"] == 6
    for name in METRICS:
        assert [s for s, _ in history(killed_run, name)] == list(range(6)), name
    assert not (tmp_path / DEFAULT_ROOT).exists()  # the backup is deleted after a successful finish

    # The same training never interrupted (another process like it; its own backup folder): same batches,
    # learning rates and optimizer state give the same per-epoch losses and scores.
    proc, lines = start_train([*args, "--checkpoint_dir", str(tmp_path / "reference")], tmp_path, store)
    assert proc.wait(600) == 0, "".join(lines)
    (reference,) = [r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
                    if r.info.run_id != killed_run]
    for name in ("learning_rate", "loss", "val_loss", "val_dice"):
        resumed, uninterrupted = history(killed_run, name), history(reference.info.run_id, name)
        np.testing.assert_allclose([v for _, v in resumed], [v for _, v in uninterrupted], rtol=1e-6, err_msg=name)
    assert run.data.metrics["best_epoch"] == reference.data.metrics["best_epoch"]


def test_worker_backups_are_apart_from_the_chief(tmp_path):
    cluster = {"cluster": {"worker": ["a:1", "b:2", "c:3"]}, "task": {"type": "worker", "index": 0}}
    chief = backup_dir(str(tmp_path / "ckpt"), "k", cluster)
    worker = backup_dir(str(tmp_path / "ckpt"), "k", {**cluster, "task": {"type": "worker", "index": 2}})
    assert chief == tmp_path / "ckpt" and worker == tmp_path / "ckpt" / "worker-2"
    assert backup_dir("", "abc", None) == Path.cwd() / DEFAULT_ROOT / "abc"


def test_a_backup_folder_serves_one_training_at_a_time(tmp_path):
    with Backup(tmp_path / "b", "key1"):
        with pytest.raises(InputError, match="another training with the same configuration is running"):
            with Backup(tmp_path / "b", "key1"):
                pass
    with Backup(tmp_path / "b", "key1"):  # released when the first one ended
        pass


def tiny_model():
    import keras

    return keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])


def test_a_backup_of_another_training_is_refused(tmp_path):
    model = tiny_model()
    with Backup(tmp_path / "b", "key1") as backup:
        backup.save(TrainingState(next_epoch=1, best_weights=model.get_weights()), model)
        state, weights = backup.load()
        assert state.next_epoch == 1 and weights.name == "model.weights.h5"
        backup.save(TrainingState(next_epoch=2, best_dice=0.5, best_weights=model.get_weights()), model)
        assert backup.load()[0].best_dice == 0.5
        assert sorted(p.name for p in backup.folder.iterdir()) == ["epoch-2", "lock", "state.json"]
    with pytest.raises(InputError, match="holds the backup of another training"):
        with Backup(tmp_path / "b", "key2") as other:
            other.load()


def test_the_weights_reach_the_disk_before_state_json_names_them(tmp_path, monkeypatch):
    """After a power cut, state.json must not name an epoch whose weights were still in the page cache:
    the weights, the best weights and their folder are fsynced before state.json is written and renamed.
    Only state.json used to be. Which files were flushed, and in what order, is read off the real calls."""
    model = tiny_model()
    flushed, real_fsync = [], os.fsync

    def recording_fsync(fd):
        flushed.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    with Backup(tmp_path / "b", "key") as backup:
        backup.save(TrainingState(next_epoch=3, best_weights=model.get_weights()), model)
    state_written = next(i for i, name in enumerate(flushed) if name.startswith("state.json"))
    before = flushed[:state_written]
    assert {"model.weights.h5", "best.npz", "epoch-3"} <= set(before), flushed
    assert flushed[-1] == "b", flushed  # and the rename itself, in the backup folder
