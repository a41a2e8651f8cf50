"""Fine-tuning from a logged model (`init_model`): training starts from its weights with its architecture,
contradicting parameters are refused before any run, the encoder can be frozen for the first epochs, and
the new version's lineage reaches the registry and the viewer. Real SQLite store, tiny models."""

import dataclasses
import json

import keras
import mlflow
import numpy as np
import pytest

from emunet.core.errors import InputError
from emunet.core.model import UNetSpec, build_unet, spec_of
from emunet.training.checkpoint import checkpoint_key
from emunet.training.finetune import ENCODER, FreezeEncoder
from pipeline.evaluate import EvaluateConfig, evaluate
from pipeline.train import TrainConfig, train
from tests.conftest import TINY_TRAIN, run_python
from viewer import registry

# The tiny recipe without its architecture fields: those come from the source model (depth 2, 4 filters).
FROM_MODEL = {k: v for k, v in TINY_TRAIN.items() if k not in ("base_filters", "depth", "bn_momentum")}


def weights_of(model, encoder: bool) -> dict:
    return {layer.name: [np.array(w) for w in layer.get_weights()] for layer in model.layers
            if layer.weights and bool(ENCODER.match(layer.name)) == encoder}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(x, y) for k in a for x, y in zip(a[k], b[k]))


def test_training_starts_from_the_source_weights_and_architecture(world):
    source = world["trained"]["model"]  # the float32 model that was logged
    cfg = TrainConfig(dataset_uri=str(world["other"]), init_model=world["trained"]["model_uri"],
                      freeze_encoder_epochs=1, **{**FROM_MODEL, "epochs": 1})
    result = train(cfg)
    model = result["fit_model"]
    assert spec_of(model) == spec_of(source) and spec_of(source).depth == 2 and spec_of(source).base_filters == 4
    params = mlflow.get_run(result["run_id"]).data.params
    assert (params["depth"], params["base_filters"], params["bn_momentum"]) == ("2", "4", "0.9")  # not the preset's
    # Frozen for its only epoch: the encoder is the source's, moving statistics included.
    assert same(weights_of(model, encoder=True), weights_of(source, encoder=True))
    # The decoder trained, from the source's weights: a few small steps away, not a fresh network's distance.
    ours, theirs = weights_of(model, encoder=False), weights_of(source, encoder=False)
    fresh = weights_of(build_unet(spec_of(source)), encoder=False)
    moved = sum(np.linalg.norm(o - t) for k in ours for o, t in zip(ours[k], theirs[k]))
    apart = sum(np.linalg.norm(f - t) for k in fresh for f, t in zip(fresh[k], theirs[k]))
    assert 0 < moved < 0.25 * apart
    tags = mlflow.get_run(result["run_id"]).data.tags
    assert tags["init_model"] == world["trained"]["model_uri"] and tags["init_run_id"] == world["trained"]["run_id"]


def test_frozen_encoder_keeps_its_weights_during_the_frozen_epochs_only():
    keras.utils.set_random_seed(0)
    model = build_unet(UNetSpec(depth=2, base_filters=4, bn_momentum=0.5))
    model.compile(keras.optimizers.Adam(1e-2), "binary_crossentropy")
    model.optimizer.build(model.trainable_variables)  # as fit does: moments for the encoder too
    rng = np.random.default_rng(0)
    x = rng.random((8, 16, 16, 1)).astype(np.float32)
    y = (x > 0.5).astype(np.float32)
    start = {True: weights_of(model, True), False: weights_of(model, False)}
    after = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: after.append({True: weights_of(model, True), False: weights_of(model, False)}))
    model.fit(x, y, batch_size=4, epochs=3, callbacks=[FreezeEncoder(2), record], verbose=0)
    for epoch in (0, 1):  # frozen: encoder unchanged (BatchNorm statistics too), decoder training
        assert same(after[epoch][True], start[True]), epoch
        assert not same(after[epoch][False], after[epoch - 1][False] if epoch else start[False]), epoch
    assert not same(after[2][True], start[True])  # unfrozen: the encoder trains
    assert model.get_layer("enc1_conv1").trainable and model.get_layer("bottleneck_conv2").trainable


@pytest.mark.parametrize("change, message", [
    (dict(depth=3), "depth=3 contradicts init_model runs:/.*/model, which has depth 2; leave depth at its default"),
    (dict(base_filters=16), "base_filters=16 contradicts init_model .*, which has base_filters 4"),
    (dict(batch_norm=False), "batch_norm=False contradicts init_model .*, which has batch_norm True"),
    (dict(input_scale=2), "input_scale=2 contradicts init_model .*, which has input_scale 1"),
    (dict(init_model="runs:/0123456789abcdef/model"), "init_model runs:/0123456789abcdef/model: cannot fetch the model"),
    (dict(init_model="models:/no-such-model@champion"), "init_model models:/no-such-model@champion: no such registered"),
    (dict(init_model="", freeze_encoder_epochs=2), "freeze_encoder_epochs=2 needs init_model"),
    (dict(freeze_encoder_epochs=-1), "freeze_encoder_epochs must be 0 \\(off\\) or a number of epochs; got -1"),
])
def test_a_contradicting_parameter_is_refused_before_training(world, change, message):
    cfg = dataclasses.replace(TrainConfig(dataset_uri=str(world["data"]), init_model=world["trained"]["model_uri"],
                                          **FROM_MODEL), **change)
    before = len(mlflow.search_runs(search_all_experiments=True, output_format="list"))
    with pytest.raises(InputError, match=message) as caught:
        train(cfg)
    assert "\n" not in str(caught.value)
    assert len(mlflow.search_runs(search_all_experiments=True, output_format="list")) == before  # no run started


def test_lineage_is_a_tag_of_the_registered_version_and_shown_by_the_viewer(world):
    name = "em-unet-lineage-test"
    first = evaluate(EvaluateConfig(model_uri=world["trained"]["model_uri"], dataset_uri=str(world["data"]),
                                    registered_model=name, champion_metric="dice"))
    tuned = train(TrainConfig(dataset_uri=str(world["data"]), init_model=f"models:/{name}@champion",
                              **{**FROM_MODEL, "epochs": 1}))
    assert mlflow.get_run(tuned["run_id"]).data.tags["init_model"] == f"{name} v{first['version']}"
    second = evaluate(EvaluateConfig(model_uri=tuned["model_uri"], dataset_uri=str(world["data"]),
                                     registered_model=name, champion_metric="dice"))
    client = mlflow.MlflowClient()
    tags = client.get_model_version(name, str(second["version"])).tags
    assert tags["init_model"] == f"{name} v{first['version']}" and tags["init_run_id"] == world["trained"]["run_id"]
    assert "init_model" not in client.get_model_version(name, str(first["version"])).tags  # trained from scratch
    viewer_client = registry.client_for(world["uri"])
    assert registry.describe(viewer_client, world["uri"], name, str(second["version"])).lineage == f"{name} v1"
    assert registry.describe(viewer_client, world["uri"], name, str(first["version"])).lineage == ""
    # The logged model carries its lineage too (exports read this file).
    meta = json.loads(mlflow.artifacts.load_text(f"runs:/{tuned['run_id']}/model/artifacts/unet.json"))
    assert meta["init_model"] == f"{name} v1"


def test_the_resume_key_depends_on_the_source_model():
    keys = {checkpoint_key(dataclasses.asdict(TrainConfig(init_model=uri)), "data", 1)
            for uri in ("", "models:/em-unet/1", "models:/em-unet/2")}
    assert len(keys) == 3


MIRRORED = """
import json, sys
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from pipeline.train import TrainConfig, train
from emunet.training.finetune import ENCODER
args = json.loads(sys.argv[1])
source = np.load(args.pop("source"))
result = train(TrainConfig(**args), devices=["/cpu:0", "/cpu:1"])
model = result["fit_model"]
mirrored = [v.value for v in model.trainable_variables if hasattr(v.value, "values")]
spread = max(float(np.max(np.abs(v.values[0].numpy() - v.values[1].numpy()))) for v in mirrored)
changed = [layer.name for layer in model.layers if ENCODER.match(layer.name) and layer.weights and not all(
    np.array_equal(w, source[f"{layer.name}.{i}"]) for i, w in enumerate(layer.get_weights()))]
print("RESULT " + json.dumps({"spread": spread, "variables": len(model.trainable_variables), "mirrored": len(mirrored),
                              "changed": changed, "replicas": model.distribute_strategy.num_replicas_in_sync}))
"""


@pytest.mark.slow
def test_frozen_then_trainable_encoder_under_mirrored_strategy(world, tmp_path):
    args = {"dataset_uri": str(world["data"]), "init_model": world["trained"]["model_uri"], "freeze_encoder_epochs": 1,
            **{**FROM_MODEL, "epochs": 2}, "source": str(tmp_path / "source.npz")}
    np.savez(args["source"], **{f"{name}.{i}": w for name, ws in weights_of(world["trained"]["model"], True).items()
                                for i, w in enumerate(ws)})
    proc = run_python("-c", MIRRORED, json.dumps(args), cwd=tmp_path, env_uri=world["uri"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ")[-1])
    assert result["replicas"] == 2 and result["mirrored"] == result["variables"] > 0
    assert result["spread"] == 0.0  # both replicas hold the same weights after the re-traced step
    assert "enc1_conv1" in result["changed"] and "bottleneck_conv2" in result["changed"]  # trained in epoch 2
    assert "encoder frozen" in proc.stdout and "encoder trainable" in proc.stdout
