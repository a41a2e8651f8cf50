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

from emunet.core.dataset import StackInfo, open_stack, read_manifest
from emunet.core.errors import InputError
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

    from emunet.inference.segmenter import log_segmenter

    inputs = keras.Input((None, None, 1))
    model = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 0 + 1, name="payload")(inputs))
    model.save(tmp_path / "unsafe.keras")
    with mlflow.start_run():
        info = log_segmenter(tmp_path / "unsafe.keras", {"multiple_of": 1})
    with pytest.raises(Exception, match="safe_mode"):
        mlflow.pyfunc.load_model(info.model_uri)


def popen_module(module, *args, cwd, env_uri):
    env = {**os.environ, "MLFLOW_TRACKING_URI": env_uri, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("MLFLOW_RUN_ID", None)
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_predict_killed_mid_stack_leaves_only_partial_files(world, tmp_path):
    stack = np.random.default_rng(0).integers(0, 255, (200, 256, 256), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "long.tif", stack, photometric="minisblack")
    out = tmp_path / "out"
    proc = popen_module("serving.predict", "--model_uri", world["trained"]["model_uri"], "--input",
                        str(tmp_path / "long.tif"), "--output_dir", str(out), cwd=tmp_path, env_uri=world["uri"])
    def partial():
        return next(out.glob("long_mask.tif.*.partial"), None) if out.exists() else None

    deadline = time.monotonic() + 120
    while not (partial() and partial().stat().st_size > 3 * 256 * 256) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # a few slices written, the rest not: mid-stack
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 2 and names[0].startswith("long_mask.tif.") and names[1].startswith("long_objects.csv."), names
    assert all(n.endswith(".partial") for n in names)
    assert 3 * 256 * 256 < partial().stat().st_size < 200 * 256 * 256


def start_two_trainings(store, tmp_path):
    """Two tiny trainings started together on one store, with different seeds: the same config on the same
    data would share one flock-ed backup folder (emunet.training.checkpoint) and the second would be refused."""
    data = make_dataset(tmp_path / "data", seed=0)
    flags = [arg for k, v in TINY_TRAIN.items() for arg in (f"--{k}", str(v))]
    procs = [popen_module("pipeline.train", "--dataset_uri", str(data), "--seed", str(seed), *flags,
                          cwd=tmp_path, env_uri=store) for seed in (1, 2)]
    return procs, [p.communicate(timeout=600) for p in procs]


@pytest.mark.slow
def test_two_trainings_at_once_on_one_sqlite_store_both_finish_intact(store, tmp_path):
    mlflow.search_experiments()  # the store exists before they start (see the next test for a fresh one)
    procs, results = start_two_trainings(store, tmp_path)
    assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in results]
    client = mlflow.MlflowClient()
    runs = [r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")]
    assert len(runs) == 2 and {r.data.params["seed"] for r in runs} == {"1", "2"}
    for run in runs:
        assert run.info.status == "FINISHED"
        for name in ("val_dice", "val_loss", "loss"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [0, 1], name
        model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
        assert model.predict(np.zeros((1, 16, 16), np.float32)).shape == (1, 16, 16)


@pytest.mark.slow
def test_two_trainings_creating_a_fresh_sqlite_store_at_once_both_finish(store, tmp_path):
    """MLflow creates a new SQLite store's tables on first use; two processes doing so at once used to
    leave it half-migrated for good (`table _alembic_tmp_latest_metrics already exists`, CI saw it). The
    tracking check now opens a SQLite store under a file lock, so both create-or-find it in turn."""
    procs, results = start_two_trainings(store, tmp_path)
    assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in results]
    finished = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert sorted(r.info.status for r in finished) == ["FINISHED", "FINISHED"]


def test_unusual_ranges_segment_like_8_bit_and_constant_images_do_not_crash(world):
    """Normalisation is percentile scaling of the whole stack, so an affine change of intensities (16-bit
    using only 45..300, float in [-1e6, 1e6]) gives the same segmentation as the 8-bit stack."""
    from emunet.core.synthetic import synthetic_stack

    image, _ = synthetic_stack(0, 3, (2, 64, 64))
    model = mlflow.pyfunc.load_model(world["trained"]["model_uri"])
    prob = model.predict(image, params={"output": "probability"})
    narrow = image.astype(np.uint16) + 45  # a 16-bit detector using 45..300 of its 0..65535
    wide = image.astype(np.float32) * np.float32(2e6 / 255) - np.float32(1e6)
    for variant in (narrow, wide):
        assert np.abs(model.predict(variant, params={"output": "probability"}) - prob).max() < 1e-3
    # A constant stack has no contrast to scale: every value maps to 0.5, whatever the dtype and level,
    # so it is segmented (not a division by zero) and all constant stacks give the same answer.
    constants = [np.zeros((2, 32, 32), np.uint8), np.full((2, 32, 32), 65535, np.uint16),
                 np.full((2, 32, 32), -3.5e5, np.float32)]
    probs = [model.predict(c, params={"output": "probability"}) for c in constants]
    assert all(p.shape == (2, 32, 32) and np.isfinite(p).all() for p in probs)
    assert np.array_equal(probs[0], probs[1]) and np.array_equal(probs[0], probs[2])


def test_preprocess_killed_mid_write_leaves_no_finished_looking_artifact(store, tmp_path):
    """The dataset artifact is written to `<output_dir>.<attempt>.partial` and renamed only when complete: a
    kill while it is written leaves the `.partial` folder, never an `output_dir` that looks finished."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "big.npy", rng.integers(0, 255, (160, 1024, 1024), dtype=np.uint8))  # writing takes a while
    np.save(tmp_path / "big_gt.npy", (rng.random((160, 1024, 1024)) > 0.5).astype(np.uint8))
    out = tmp_path / "dataset"
    proc = popen_module("pipeline.preprocess", "--images", str(tmp_path / "big.npy"), "--labels",
                        str(tmp_path / "big_gt.npy"), "--output_dir", str(out), cwd=tmp_path, env_uri=store)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("dataset.*.partial")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert [p.is_dir() for p in tmp_path.glob("dataset.*.partial")] == [True] and not out.exists()


def test_a_model_uri_that_does_not_load_is_one_error_line(store, tmp_path):
    tifffile.imwrite(tmp_path / "x.tif", np.zeros((2, 32, 32), np.uint8), photometric="minisblack")
    for uri in ("models:/no-such-model@champion", "runs:/0123456789abcdef0123456789abcdef/model"):
        proc = run_module("serving.predict", "--model_uri", uri, "--input", str(tmp_path / "x.tif"), cwd=tmp_path,
                          env_uri=store)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and last.startswith(f"error: {uri}: cannot load the model"), proc.stderr[-2000:]
