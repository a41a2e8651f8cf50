"""The multi-device path without a GPU: MirroredStrategy over two logical CPU devices, in a fresh process
(logical devices must be configured before TensorFlow starts)."""

import json

import mlflow

from pipeline.distribute import make_strategy
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
model = result["model"]
mirrored = [v.value for v in model.trainable_variables if hasattr(v.value, "values")]  # Keras wraps tf variables
spread = max(float(np.max(np.abs(v.values[0].numpy() - v.values[1].numpy()))) for v in mirrored)
print("RESULT " + json.dumps({"run_id": result["run_id"], "mirrored": len(mirrored),
                              "variables": len(model.trainable_variables), "spread": spread}))
"""


def test_single_device_uses_the_default_strategy():
    assert make_strategy("", devices=[]).num_replicas_in_sync == 1


def test_mirrored_strategy_over_two_cpus_keeps_replicas_identical(store, tmp_path):
    proc = run_python("-c", SCRIPT, json.dumps(TINY_TRAIN), cwd=tmp_path, env_uri=store)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ")[-1])
    assert result["mirrored"] == result["variables"] > 0  # every weight is a MirroredVariable
    assert result["spread"] == 0.0  # after training, both replicas hold exactly the same weights
    params = mlflow.get_run(result["run_id"]).data.params
    assert params["replicas"] == "2" and params["global_batch"] == str(2 * TINY_TRAIN["batch_size"])
