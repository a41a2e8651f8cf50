"""The learning-rate schedule (warm-up, then cosine to 1 %) and early stopping on validation Dice, checked on
the rates and epochs a real training logs to a real MLflow store."""

import math

import mlflow
import numpy as np
import pytest

from pipeline.callbacks import MIN_LR_RATIO, schedule_rate
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

