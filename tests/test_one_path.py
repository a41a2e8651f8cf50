"""One segmentation path (issue 22): predict, evaluate, training validation and the viewer score the same
model on the same stack with the same numbers; training keeps the epoch the registry would choose; a
registered version describes itself."""

import numpy as np
import pytest
from mlflow import MlflowClient

from emunet.core.dataset import open_stack, read_manifest, stacks_in
from emunet.registry.tracking import load_segmenter
from emunet.training.callbacks import is_better

SCORES = ("dice", "iou", "pixel_accuracy", "precision", "recall", "median_slice_accuracy", "object_precision",
          "object_recall", "object_f1", "count_error", "adapted_rand_error", "vi_split", "vi_merge")


def best_epoch(history: list[dict], metric: str) -> int:
    """The epoch `Validation` keeps, deciding epoch by epoch as it does."""
    best, kept = (-1.0, -1.0), -1
    for epoch, scores in enumerate(history):
        if is_better(scores, best, metric):
            best, kept = (scores[metric], scores["dice"]), epoch
    return kept


def test_best_epoch_follows_object_f1_when_dice_disagrees():
    history = [{"dice": 0.80, "object_f1": 0.50}, {"dice": 0.90, "object_f1": 0.40},
               {"dice": 0.70, "object_f1": 0.60}, {"dice": 0.95, "object_f1": 0.60}]
    assert best_epoch(history, "dice") == 3
    assert best_epoch(history[:3], "dice") == 1
    assert best_epoch(history[:3], "object_f1") == 2  # the better cells, though the Dice is the worst
    assert best_epoch(history, "object_f1") == 3  # a tie on object F1: the better Dice
    assert best_epoch([{"dice": 0.9, "object_f1": float("nan")}], "object_f1") == -1  # not measured: never


def test_predict_evaluate_validation_and_viewer_give_the_same_scores(world, tmp_path):
    """The world's model on its held-out stack: evaluate's test_* scores, predict's (the stack's own files
    as input and labels) and the viewer's summary of the page's probabilities (all on the served engine)
    are one set of numbers; the train run's val_* of the best epoch (the logged model is that epoch's
    weights, validated by TensorFlow in float32) are evaluate's on that engine and precision."""
    import mlflow

    from pipeline.evaluate import EvaluateConfig, evaluate
    from serving.predict import PredictConfig, predict
    from viewer.inference import probabilities
    from viewer.scoring import summary

    data, model_uri = world["data"], world["trained"]["model_uri"]
    evaluated = evaluate(EvaluateConfig(model_uri=model_uri, dataset_uri=str(data), register=False))["metrics"]
    as_validated = evaluate(EvaluateConfig(model_uri=model_uri, dataset_uri=str(data), register=False,
                                           engine="tensorflow", precision="float32"))["metrics"]
    [info] = stacks_in(read_manifest(data), "val")
    predicted = predict(PredictConfig(model_uri=model_uri, input=str(data / info.name / "image.npy"),
                                      labels=str(data / info.name / "mask.npy"), output_dir=str(tmp_path / "out")))
    image, mask = open_stack(data, info)
    viewer = summary(probabilities(mlflow.pyfunc.load_model(model_uri), np.asarray(image)), np.asarray(mask))
    run = mlflow.get_run(world["trained"]["run_id"])
    best = int(run.data.metrics["best_epoch"])
    history = MlflowClient().get_metric_history
    validation = {k: {m.step: m.value for m in history(run.info.run_id, f"val_{k}")}[best] for k in SCORES}
    assert evaluated["dice"] > 0.3  # a model that finds something, so the comparison says something
    for name in SCORES:
        expected = evaluated[name]
        assert predicted["metrics"][name] == pytest.approx(expected, abs=1e-6), name
        assert viewer[name] == pytest.approx(expected, abs=1e-6), name
        assert validation[name] == pytest.approx(as_validated[name], abs=1e-6), name


def test_a_registered_version_describes_itself(world):
    """Read back through MlflowClient: the description (data, recipe, scores, champion rule) and the
    signature's input, output and params."""
    import mlflow

    from pipeline.evaluate import EvaluateConfig, evaluate

    name = "described"
    result = evaluate(EvaluateConfig(model_uri=world["trained"]["model_uri"], dataset_uri=str(world["data"]),
                                     registered_model=name))
    version = MlflowClient().get_model_version(name, str(result["version"]))
    text = version.description
    assert read_manifest(world["data"])["eval_fingerprint"] in text
    assert "Recipe: preset" in text and "base_filters 4" in text and "chosen_context_slices 0" in text
    assert f"object_f1 {result['metrics']['object_f1']:.4f}" in text and "test_object_f1 beats" in text
    signature = mlflow.models.get_model_info(f"models:/{name}/{version.version}").signature
    [stack] = signature.inputs.inputs
    assert stack.shape == (-1, -1, -1) and signature.outputs.inputs[0].shape == (-1, -1, -1)
    assert {"threshold", "seed_threshold", "min_object_size", "tile_size", "low", "high"} <= \
        {p.name for p in signature.params.params}
    # The declared (Z, H, W) float32 does not narrow what the segmenter takes: an (H, W) uint8 image.
    segmented = mlflow.pyfunc.load_model(f"models:/{name}/{version.version}").predict(
        np.zeros((32, 32), np.uint8), params={"output": "probability"})
    assert segmented.shape == (32, 32)
    assert load_segmenter(f"models:/{name}/{version.version}").meta["multiple_of"] >= 1


def two_touching_balls(shape=(24, 24, 40)) -> tuple[np.ndarray, np.ndarray]:
    """True ids of two balls touching at x = 20, and probabilities with a membrane dip between them."""
    zz, yy, xx = np.indices(shape)
    truth = np.zeros(shape, np.int32)
    for i, cx in enumerate((11, 28), start=1):
        truth[(zz - 12) ** 2 + (yy - 12) ** 2 + (xx - cx) ** 2 <= 81] = i
    prob = np.where(truth > 0, 0.97, 0.05).astype(np.float32)
    prob[:, :, 19:21] = np.minimum(prob[:, :, 19:21], 0.6)  # the membrane: the network is unsure there
    return truth, prob


def test_the_path_finds_cells_in_3d_where_voxels_are_near_isotropic():
    from emunet.inference.params import DEFAULTS
    from emunet.inference.segment import Truth, instance_mode, score_volume, segment_probabilities

    truth, prob = two_touching_balls()
    params = DEFAULTS.replace(min_object_size=0)
    assert instance_mode(params, (10.0, 10.0, 10.0)) == "3d" and instance_mode(params, (50.0, 4.0, 4.0)) == "2d"
    assert instance_mode(params, (None, 4.0, 4.0)) == "2d"  # z unknown: never guessed isotropic
    results = list(segment_probabilities(prob, params, Truth.of_labels(truth, "instances"), voxel_size=(10, 10, 10)))
    ids = np.stack([r.ids for r in results])
    assert len(np.unique(ids[ids > 0])) == 2
    scores = score_volume(results, scores=None).metrics()
    assert scores["object_f1_3d"] == 1.0 and scores["ap50_3d"] == 1.0 and scores["vi_merge_3d"] < 0.05
    # Per-slice scores keep their own names: each slice's pieces of the two balls.
    assert scores["object_f1"] == pytest.approx(1.0) and "object_f1" != "object_f1_3d"
    # Without the membrane dip (one blob), 3-D finds one object: the scores say the cells merged.
    merged = np.where(truth > 0, 0.97, 0.05).astype(np.float32)
    one = score_volume(segment_probabilities(merged, params.replace(instances="3d"),
                                             Truth.of_labels(truth, "instances"))).metrics()
    assert one["object_recall_3d"] <= 0.5 and one["vi_merge_3d"] > 0.9
