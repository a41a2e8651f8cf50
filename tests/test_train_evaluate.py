"""train and evaluate end to end with a tiny model against a real SQLite store, including the registry
and the rule that moves the `champion` alias."""

import dataclasses
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pytest

from emunet.core.errors import InputError
from pipeline.evaluate import EvaluateConfig, evaluate
from emunet.core.model import UNetSpec, build_unet
from pipeline.train import TrainConfig, train
from emunet.inference.segmenter import log_segmenter
from tests.conftest import TINY_TRAIN


def test_train_logs_params_per_epoch_metrics_and_models(world):
    run_id = world["trained"]["run_id"]
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["base_filters"] == "4" and run.data.params["replicas"] == "1"
    client = mlflow.MlflowClient()
    for name in ("val_dice", "val_iou", "val_pixel_accuracy", "val_median_slice_accuracy", "val_precision",
                 "val_recall", "val_loss", "loss", "images_per_sec"):
        history = client.get_metric_history(run_id, name)
        assert [m.step for m in history] == [0, 1], name
    assert 0 <= run.data.metrics["best_val_dice"] <= 1
    assert run.data.metrics["epochs_trained"] == 2


def test_logged_pyfunc_segments_any_stack_shape(world):
    model = mlflow.pyfunc.load_model(world["trained"]["model_uri"])
    stack = (np.random.default_rng(0).random((2, 50, 37)) * 255).astype(np.uint8)
    mask = model.predict(stack.astype(np.float32))
    assert mask.shape == (2, 50, 37) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    prob = model.predict(stack[0].astype(np.float32), params={"output": "probability"})
    assert prob.shape == (50, 37) and prob.dtype == np.float32
    keras_model = mlflow.keras.load_model(f"runs:/{world['trained']['run_id']}/keras_model")
    assert keras_model.get_layer("head").output.shape[-1] == 1


def test_time_budget_stops_after_the_epoch_in_progress(world):
    cfg = TrainConfig(dataset_uri=str(world["data"]), **{**TINY_TRAIN, "epochs": 50, "max_minutes": 0.001})
    result = train(cfg)
    assert result["epochs"] == 1
    assert mlflow.get_run(result["run_id"]).info.status == "FINISHED"


@pytest.mark.parametrize("change, message", [
    (dict(crop_size=128), "crop_size 128 is larger than the 64 x 64 slices"),
    (dict(crop_size=30), "multiple of 2\\*\\*depth"),
    (dict(loss="tversky"), "loss must be one of bce, dice, bce_dice, bce_dice_both, focal, got 'tversky'"),
    (dict(augment="heavy"), "augment must be one of em, basic, none"),
    (dict(precision="float8"), "precision must be one of"),
    (dict(foreground=1.5), "foreground must be a share of crops"),
    (dict(input_scale=3), "input_scale must be 0 \\(auto\\) or one of 1, 2, 4; got 3"),
    (dict(bn_momentum=1.0), "bn_momentum must be between 0 and 1"),
    (dict(ema=-0.5), "ema must be a momentum"),
    (dict(epochs=0), "epochs must be at least 1"),
    (dict(warmup_epochs=-1), "warmup_epochs must be 0 or more"),
    (dict(preset="huge"), "preset must be one of"),
    (dict(dataset_uri="no/such/folder"), "dataset folder not found"),
])
def test_bad_training_configuration_fails_before_training(world, change, message):
    cfg = dataclasses.replace(TrainConfig(dataset_uri=str(world["data"]), **TINY_TRAIN), **change)
    before = len(mlflow.search_runs(search_all_experiments=True, output_format="list"))
    with pytest.raises(InputError, match=message):
        train(cfg)
    assert len(mlflow.search_runs(search_all_experiments=True, output_format="list")) == before  # no run started


def log_untrained_model() -> str:
    """A real but untrained model, as a worse candidate for the registry."""
    spec = UNetSpec(depth=2, base_filters=4)
    model = build_unet(spec)
    model.layers[-1].set_weights([np.zeros((1, 1, 4, 1), np.float32), np.array([-5.0], np.float32)])
    with mlflow.start_run() as run, tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "unet.keras"
        model.save(path)
        log_segmenter(path, {"multiple_of": 4})
    return f"runs:/{run.info.run_id}/model"


def test_evaluate_registers_and_moves_champion_only_when_better(world):
    name = "em-unet-registry-test"
    cfg = EvaluateConfig(model_uri=world["trained"]["model_uri"], dataset_uri=str(world["data"]), registered_model=name)
    first = evaluate(cfg)
    assert (first["version"], first["promoted"]) == (1, True)
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    run = mlflow.get_run(first["run_id"])
    assert {"test_dice", "test_iou", "test_pixel_accuracy", "test_median_slice_accuracy", "test_precision",
            "test_recall", "test_object_f1", "test_object_precision", "test_object_recall", "test_mean_matched_iou",
            "test_count_error", "test_adapted_rand_error", "test_vi_split", "test_vi_merge"} <= set(run.data.metrics)
    tags = client.get_model_version(name, "1").tags
    assert tags["champion_metric"] == "test_object_f1"
    assert float(tags["test_object_f1"]) == pytest.approx(first["metrics"]["object_f1"], abs=1e-9)
    assert run.data.metrics["test_dice"] == pytest.approx(first["metrics"]["dice"])
    csv_text = mlflow.artifacts.load_text(f"runs:/{first['run_id']}/per_slice_scores.csv")
    header = csv_text.splitlines()[0].split(",")
    assert header[:3] == ["stack", "slice", "dice"] and len(csv_text.splitlines()) == 1 + 4
    assert header[-3:] == ["objects", "objects_truth", "objects_matched"]
    assert {a.path for a in client.list_artifacts(first["run_id"], "overlays")} == {"overlays/s2.png"}

    # The same model again scores the same: not better, so the alias stays.
    again = evaluate(cfg)
    assert (again["version"], again["promoted"]) == (2, False)
    # A worse model stays out too, even though it is registered.
    worse = evaluate(dataclasses.replace(cfg, model_uri=log_untrained_model()))
    assert worse["metrics"]["dice"] < first["metrics"]["dice"]
    assert (worse["version"], worse["promoted"]) == (3, False)
    # On other evaluation data the champion is re-scored there, so a worse model still cannot take over.
    elsewhere = evaluate(dataclasses.replace(cfg, model_uri=log_untrained_model(), dataset_uri=str(world["other"])))
    assert elsewhere["promoted"] is False
    champion = client.get_model_version_by_alias(name, "champion")
    assert str(champion.version) == "1" and float(champion.tags["test_dice"]) == pytest.approx(first["metrics"]["dice"], abs=1e-6)
    assert mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(np.zeros((1, 16, 16), np.float32)).shape == (1, 16, 16)


def test_evaluate_promotes_a_better_model(world):
    name = "em-unet-promotion-test"
    # The tiny test model finds no cell as its own object yet (object F1 0, as the untrained one): the
    # rule here is Dice, which it does improve.
    cfg = EvaluateConfig(model_uri=log_untrained_model(), dataset_uri=str(world["data"]), registered_model=name,
                         champion_metric="dice")
    assert evaluate(cfg)["promoted"] is True
    better = evaluate(dataclasses.replace(cfg, model_uri=world["trained"]["model_uri"]))
    assert better["promoted"] is True
    assert str(mlflow.MlflowClient().get_model_version_by_alias(name, "champion").version) == str(better["version"])


def test_bn_momentum_reaches_every_batchnorm_layer_of_the_logged_model(world):
    result = train(TrainConfig(dataset_uri=str(world["data"]), **{**TINY_TRAIN, "epochs": 1, "bn_momentum": 0.5}))
    logged = mlflow.keras.load_model(f"runs:/{result['run_id']}/keras_model")
    momenta = [layer.momentum for layer in logged.layers if layer.__class__.__name__ == "BatchNormalization"]
    assert len(momenta) == 2 * (2 * TINY_TRAIN["depth"] + 1) and set(momenta) == {0.5}
