"""The learning-rate schedule (warm-up, then cosine to 1 %) and early stopping on validation Dice, checked on
the rates and epochs a real training logs to a real MLflow store."""

import math

import mlflow
import numpy as np
import pytest

from emunet.training.callbacks import MIN_LR_RATIO, schedule_rate
from pipeline.train import TrainConfig, train
from tests.conftest import TINY_TRAIN, make_dataset


def test_warm_up_is_linear_then_the_cosine_runs_from_the_peak_down_to_one_percent():
    peak = 0.2
    assert [schedule_rate(peak, s, 4, 0.0, "cosine") for s in range(4)] == pytest.approx([0.05, 0.1, 0.15, 0.2])
    assert schedule_rate(peak, 4, 4, 0.0, "cosine") == pytest.approx(peak)
    assert schedule_rate(peak, 9, 4, 0.5, "cosine") == pytest.approx(peak * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) / 2))
    assert schedule_rate(peak, 9, 4, 1.0, "cosine") == pytest.approx(peak * MIN_LR_RATIO)
    assert schedule_rate(peak, 9, 4, 3.0, "cosine") == pytest.approx(peak * MIN_LR_RATIO)  # clamped past the end
    assert schedule_rate(peak, 2, 4, 0.7, "constant") == pytest.approx(0.15)  # warm-up applies to both
    assert schedule_rate(peak, 9, 4, 0.7, "constant") == pytest.approx(peak)


def test_training_logs_the_scheduled_rate_of_each_epoch(store, tmp_path):
    data = make_dataset(tmp_path / "data", seed=1)
    epochs = 5
    result = train(TrainConfig(dataset_uri=str(data), **{**TINY_TRAIN, "epochs": epochs, "patience": 0}))
    history = mlflow.MlflowClient().get_metric_history(result["run_id"], "learning_rate")
    logged = [m.value for m in sorted(history, key=lambda m: m.step)]
    peak = TINY_TRAIN["learning_rate"]
    # Epoch 0 warms up to the peak; epoch e > 0 runs at the cosine's value for (e - 1) / (epochs - 1).
    expected = [peak] + [peak * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * (e - 1) / (epochs - 1))))
                         for e in range(1, epochs)]
    assert logged == pytest.approx(expected, rel=1e-5)


def test_training_stops_after_patience_epochs_without_a_better_val_dice(store, tmp_path):
    data = make_dataset(tmp_path / "data", seed=2)
    # A rate of 1e-12 without BatchNorm leaves the weights as they are: val_dice never improves on epoch 1.
    cfg = TrainConfig(dataset_uri=str(data), **{**TINY_TRAIN, "epochs": 10, "patience": 2, "learning_rate": 1e-12,
                                                "batch_norm": False})
    result = train(cfg)
    assert result["epochs"] == 3
    run = mlflow.get_run(result["run_id"])
    assert run.data.metrics["best_epoch"] == 0 and run.data.metrics["epochs_trained"] == 3
    assert len(mlflow.MlflowClient().get_metric_history(result["run_id"], "val_dice")) == 3


def test_ema_validates_and_keeps_the_moving_average_of_the_weights(store, tmp_path):
    data = make_dataset(tmp_path / "data", seed=3)
    recipe = {**TINY_TRAIN, "epochs": 1, "patience": 0, "warmup_epochs": 0, "batch_norm": False}
    # A momentum this close to 1 keeps the average at the weights of the first step: the model kept after
    # three steps is the one a single step makes, not the last one.
    averaged = train(TrainConfig(dataset_uri=str(data), **{**recipe, "steps_per_epoch": 3, "ema": 0.9999999}))
    last = train(TrainConfig(dataset_uri=str(data), **{**recipe, "steps_per_epoch": 3}))
    one_step = train(TrainConfig(dataset_uri=str(data), **{**recipe, "steps_per_epoch": 1}))
    for a, b, c in zip(averaged["model"].get_weights(), one_step["model"].get_weights(), last["model"].get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert any(np.abs(b - c).max() > 1e-3 for b, c in zip(one_step["model"].get_weights(), last["model"].get_weights()))



def test_val_loss_is_the_loss_the_run_trains_with(store, tmp_path):
    """`val_loss` used to be BCE + Dice whatever `loss` said. With `loss=focal` it must be the focal loss of
    the validation probabilities, computed here by hand from the logged (best-epoch) model's own answer."""
    from emunet.core.dataset import open_stack, read_manifest, stacks_in

    data = make_dataset(tmp_path / "data", seed=4)
    result = train(TrainConfig(dataset_uri=str(data), **{**TINY_TRAIN, "loss": "focal", "patience": 0}))
    segmenter = mlflow.pyfunc.load_model(result["model_uri"]).unwrap_python_model()
    probs, truths = [], []
    for info in stacks_in(read_manifest(data), "val"):
        image, mask = open_stack(data, info)
        probs.append(segmenter.segment(image, info.low, info.high, output="probability"))
        truths.append(np.asarray(mask, np.float64))
    p, y = np.clip(np.concatenate(probs).astype(np.float64), 1e-7, 1 - 1e-7), np.concatenate(truths)
    p_t = y * p + (1 - y) * (1 - p)
    focal = np.mean(-(y * 0.25 + (1 - y) * 0.75) * (1 - p_t) ** 2 * np.log(p_t))
    bce_dice = np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p))) + 1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)
    best = int(mlflow.get_run(result["run_id"]).data.metrics["best_epoch"])
    logged = {m.step: m.value for m in mlflow.MlflowClient().get_metric_history(result["run_id"], "val_loss")}[best]
    assert logged == pytest.approx(focal, rel=1e-3, abs=1e-6)
    assert abs(logged - bce_dice) > 0.1  # what was logged before, whatever the loss
