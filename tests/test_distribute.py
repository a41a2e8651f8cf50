"""The multi-device path without a GPU: MirroredStrategy over two logical CPU devices, in a fresh process
(logical devices must be configured before TensorFlow starts)."""

import json

import mlflow
import pytest

from emunet.training.distribute import make_strategy
from tests.conftest import TINY_TRAIN, run_python

SCRIPT = """
import json, sys
from pathlib import Path
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from pipeline.train import TrainConfig, train
from tests.conftest import make_dataset
make_dataset(Path("data"), seed=0)
result = train(TrainConfig(dataset_uri="data", **json.loads(sys.argv[1])), devices=["/cpu:0", "/cpu:1"])
model = result["fit_model"]
mirrored = [v.value for v in model.trainable_variables if hasattr(v.value, "values")]  # Keras wraps tf variables
spread = max(float(np.max(np.abs(v.values[0].numpy() - v.values[1].numpy()))) for v in mirrored)
print("RESULT " + json.dumps({"run_id": result["run_id"], "mirrored": len(mirrored),
                              "variables": len(model.trainable_variables), "spread": spread}))
"""


def test_single_device_uses_the_default_strategy():
    assert make_strategy("", devices=[]).num_replicas_in_sync == 1


@pytest.mark.slow
def test_mirrored_strategy_over_two_cpus_keeps_replicas_identical(store, tmp_path):
    proc = run_python("-c", SCRIPT, json.dumps(TINY_TRAIN), cwd=tmp_path, env_uri=store)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ")[-1])
    assert result["mirrored"] == result["variables"] > 0  # every weight is a MirroredVariable
    assert result["spread"] == 0.0  # after training, both replicas hold exactly the same weights
    params = mlflow.get_run(result["run_id"]).data.params
    assert params["replicas"] == "2" and params["global_batch_size"] == str(2 * TINY_TRAIN["batch_size"])


WORKER = """
import json, sys
from pathlib import Path
import numpy as np
from pipeline.train import TrainConfig, train
result = train(TrainConfig(dataset_uri=sys.argv[2], **json.loads(sys.argv[1])))
weights = np.concatenate([np.ravel(w) for w in result["fit_model"].get_weights()])
print("RESULT " + json.dumps({"run_id": result["run_id"], "epochs": result["epochs"],
                              "weights": [float(weights.sum()), float(np.abs(weights).sum())],
                              "replicas": result["fit_model"].distribute_strategy.num_replicas_in_sync}))
"""


@pytest.mark.slow
def test_two_worker_processes_train_one_model(store, tmp_path):
    """MultiWorkerMirroredStrategy with two real worker processes on 127.0.0.1 (TF_CONFIG, as a TFJob or
    Slurm would set it): both finish the same epochs with the same weights; only the chief logs."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT, free_ports, make_dataset

    make_dataset(tmp_path / "data", seed=0)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(2)]}
    config = json.dumps({**TINY_TRAIN, "epochs": 3})
    procs = []
    for index in range(2):
        env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3",
               "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, config, str(tmp_path / "data")], cwd=tmp_path,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=600) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    chief, worker = (json.loads(out.split("RESULT ")[-1]) for out, _ in outputs)
    assert chief["replicas"] == worker["replicas"] == 2
    assert chief["epochs"] == worker["epochs"] == 3
    assert chief["weights"] == worker["weights"]  # all-reduced gradients: identical models
    assert chief["run_id"] and worker["run_id"] is None
    runs = mlflow.search_runs(search_all_experiments=True)
    assert list(runs["run_id"]) == [chief["run_id"]]  # one run, from the chief
    params = mlflow.get_run(chief["run_id"]).data.params
    assert params["replicas"] == "2" and params["global_batch_size"] == str(2 * TINY_TRAIN["batch_size"])


def test_tf_config_that_does_not_parse_is_a_clear_error(tmp_path):
    import os

    from emunet.training.distribute import cluster_config, is_chief
    from emunet.core.errors import InputError
    from tests.conftest import ROOT

    for raw, message in [('{"cluster": ', "TF_CONFIG is not valid JSON"),
                         ('{"cluster": {"worker": ["a:1"]}}', "needs a 'cluster' and a 'task'"),
                         ('{"cluster": {"worker": ["nohost"]}, "task": {"type": "worker", "index": 0}}', "host:port"),
                         ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}}', "not in its cluster")]:
        with pytest.raises(InputError, match=message):
            cluster_config(raw)
    assert cluster_config("") is None and is_chief(None)
    two = cluster_config('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}')
    assert not is_chief(two) and is_chief({**two, "task": {"type": "worker", "index": 0}})
    # Through the real entry point: one line, exit code 2, before any training.
    env = {**os.environ, "TF_CONFIG": "{not json", "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "pipeline.train", "--dataset_uri", str(tmp_path)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: TF_CONFIG is not valid JSON")
