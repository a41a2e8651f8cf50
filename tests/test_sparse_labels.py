"""Sparse labels (`ignore_label`, as nnU-Net's ignore label): voxels that were not annotated count in neither
the loss nor the metrics, the patch sampler never yields a crop without an annotated voxel, preprocess
records the value in the manifest, and a tiny run trains and evaluates on such data."""

import math

import mlflow
import numpy as np
import pytest
import tifffile
from keras import ops

from emunet.core.dataset import MASK_IGNORE, encode_labels, open_stack, read_manifest, stacks_in, write_dataset
from emunet.core.errors import InputError
from emunet.core.losses import bce_dice_both_loss, bce_dice_loss, bce_loss, focal_loss, soft_dice_loss
from emunet.core.metrics import stack_scores
from emunet.core.synthetic import synthetic_stack
from emunet.training.augment import AugmentSpec
from emunet.inference.params import DEFAULTS
from emunet.inference.segment import Truth, score_volume, segment_probabilities
from emunet.training.callbacks import validation_loss
from emunet.training.loader import PatchDataset
from tests.conftest import TINY_TRAIN

IGNORE = 255


def value(loss) -> float:
    return float(ops.convert_to_numpy(loss))


def test_loss_leaves_out_ignored_pixels():
    """2 x 2: the top row is annotated (foreground, background) and predicted exactly; the bottom row is
    not annotated (weight 0) and predicted wrong. Soft Dice: intersection 1, sums 1 + 1: (2 + 1) / (2 + 1)
    = 1, loss 0 (counting the bottom row: 1 - (2 + 1) / (2 + 2 + 1) = 0.4). BCE: only exact answers: ~0."""
    mask = np.array([[1, 0], [1, 0]], np.float32)
    weights = np.array([[1, 1], [0, 0]], np.float32)
    pred = np.array([[1, 0], [0, 1]], np.float32)[None, ..., None]
    sparse = np.stack([mask, weights], axis=-1)[None]
    assert value(soft_dice_loss(sparse, pred)) == pytest.approx(0.0, abs=1e-6)
    assert value(soft_dice_loss(mask[None, ..., None], pred)) == pytest.approx(0.4, abs=1e-6)
    for loss in (bce_loss, bce_dice_loss, bce_dice_both_loss, focal_loss):
        assert value(loss(sparse, pred)) == pytest.approx(0.0, abs=1e-5), loss.__name__
        assert value(loss(mask[None, ..., None], pred)) > 1.0, loss.__name__


def test_pixel_metrics_count_annotated_voxels_only():
    """Everything predicted; only the top-left voxel (foreground) is annotated: a perfect score there."""
    pred = np.ones((1, 2, 2), bool)
    truth = np.array([[[1, 0], [0, 0]]], bool)
    annotated = np.array([[[1, 0], [0, 0]]], bool)
    scores = stack_scores(pred, truth, annotated)
    assert scores["dice"] == 1.0 and scores["precision"] == 1.0 and scores["pixel_accuracy"] == 1.0
    assert stack_scores(pred, truth)["dice"] == pytest.approx(2 / 5)


def disc(shape, centre, radius):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def test_validation_scores_objects_only_on_fully_annotated_slices():
    """Slice 0: annotated in full, one disc found. Slice 1: its right half not annotated, where the
    prediction has an extra disc (neither right nor wrong) and misses nothing annotated: object scores
    come from slice 0 alone; pixel scores see slice 1's left half."""
    truth = np.zeros((2, 32, 32), bool)
    truth[0] = disc((32, 32), (16, 10), 5)
    truth[1] = disc((32, 32), (16, 8), 5)
    prob = truth.astype(np.float32)
    prob[1] = np.maximum(prob[1], disc((32, 32), (16, 24), 5))
    annotated = np.ones_like(truth)
    annotated[1, :, 16:] = False
    def validation_scores(prob, truth, annotated):  # as training validation scores a held-out stack
        stored = np.where(annotated, truth, IGNORE).astype(np.uint8) if annotated is not None else truth
        return score_volume(segment_probabilities(prob, DEFAULTS, Truth.of_dataset(stored))).metrics()

    scores = validation_scores(prob, truth, annotated)
    assert scores["dice"] == 1.0 and scores["object_f1"] == 1.0 and scores["object_precision"] == 1.0
    assert validation_scores(prob, truth, None)["object_precision"] == pytest.approx(2 / 3)
    assert validation_loss("bce_dice", prob, truth, annotated) < validation_loss("bce_dice", prob, truth, None)
    none_full = validation_scores(prob[1:], truth[1:], annotated[1:])
    assert none_full["dice"] == 1.0 and math.isnan(none_full["object_f1"])  # not measured, not perfect


def sparse_stacks(seed: int = 0) -> list[dict]:
    """Two training stacks with only slice 1 annotated (the rest `MASK_IGNORE`), one validation stack
    whose slices have their right half not annotated; 4 x 64 x 64 synthetic cells."""
    stacks = []
    for i in range(3):
        image, mask = synthetic_stack(seed, i, (4, 64, 64))
        mask = mask.astype(np.uint8)
        if i < 2:
            mask[[0, 2, 3]] = MASK_IGNORE
        else:
            mask[:, :, 32:] = MASK_IGNORE
        stacks.append(dict(name=f"s{i}", split="val" if i == 2 else "train", image=image, mask=mask))
    return stacks


def test_sampler_never_yields_a_crop_without_an_annotated_voxel(tmp_path):
    """One 6 x 6 annotated patch in a 4 x 64 x 64 stack: random 16 px crops would miss it almost always."""
    image = np.random.default_rng(0).integers(0, 255, (4, 64, 64), np.uint8)
    mask = np.full((4, 64, 64), MASK_IGNORE, np.uint8)
    mask[2, 40:46, 10:16] = 0
    mask[2, 42:44, 12:14] = 1
    stacks = [dict(name="t", split="train", image=image, mask=mask), dict(name="v", split="val", image=image, mask=mask)]
    write_dataset(tmp_path / "ds", stacks, ignore_label=IGNORE)
    train = stacks_in(read_manifest(tmp_path / "ds"), "train")
    data = PatchDataset(tmp_path / "ds", train, batch_size=8, crop=16, steps=4, seed=1,
                        augment=AugmentSpec(foreground=0.0), sparse=True)
    for batch in range(len(data)):
        x, y = data[batch]
        assert x.shape == (8, 16, 16, 1) and y.shape == (8, 16, 16, 2)
        assert all(np.any(w > 0) for w in y[..., 1]), f"a crop of batch {batch} has no annotated voxel"
        assert set(np.unique(y[..., 0])) <= {0.0, 1.0} and not np.any(y[..., 0][y[..., 1] == 0])


def test_sampler_weights_with_border_weight_are_zero_where_ignored(tmp_path):
    write_dataset(tmp_path / "ds", sparse_stacks(), ignore_label=IGNORE)
    train = stacks_in(read_manifest(tmp_path / "ds"), "train")
    data = PatchDataset(tmp_path / "ds", train, batch_size=4, crop=32, steps=2, seed=0, border_weight=10, sparse=True)
    _, y = data[0]
    assert y.shape[-1] == 2 and (y[..., 1] >= 0).all() and np.any(y[..., 1] > 1)  # border weights kept


def test_encode_labels():
    labels = np.array([0, 1, 2, 7, 255, 255], np.uint8)
    np.testing.assert_array_equal(encode_labels(labels, 255), [0, 1, 1, 1, MASK_IGNORE, MASK_IGNORE])
    np.testing.assert_array_equal(encode_labels(labels), [0, 1, 1, 1, 1, 1])  # default: 255 is foreground


def test_preprocess_records_ignore_label_and_stores_ignored_voxels(store, tmp_path):
    from pipeline.preprocess import PreprocessConfig, preprocess

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (6, 32, 32), np.uint8)
    labels = np.zeros((6, 32, 32), np.uint8)
    labels[:, 8:20, 8:20] = 2  # an object id: foreground
    labels[3] = 255  # slice 3 not annotated
    labels[4, :, 16:] = 255  # half of slice 4 not annotated
    labels[1] = 0  # looks unannotated (no foreground while most slices have some): marked so, not dropped
    tifffile.imwrite(tmp_path / "im.tif", image, photometric="minisblack")
    tifffile.imwrite(tmp_path / "lab.tif", labels, photometric="minisblack")
    result = preprocess(PreprocessConfig(images=str(tmp_path / "im.tif"), labels=str(tmp_path / "lab.tif"),
                                         val_slices="5:6", ignore_label=IGNORE, output_dir=str(tmp_path / "ds")))
    manifest = read_manifest(tmp_path / "ds")
    assert manifest["ignore_label"] == IGNORE == result["manifest"]["ignore_label"]
    train = stacks_in(manifest, "train")[0]
    assert train.shape == (5, 32, 32)  # nothing dropped
    mask = np.asarray(open_stack(tmp_path / "ds", train)[1])
    assert (mask[3] == MASK_IGNORE).all() and (mask[1] == MASK_IGNORE).all()
    assert (mask[4, :, 16:] == MASK_IGNORE).all() and mask[4, 10, 10] == 1 and mask[4, 2, 2] == 0
    assert set(np.unique(mask[0])) == {0, 1}
    assert mlflow.get_run(result["run_id"]).data.params["ignore_label"] == str(IGNORE)
    default = preprocess(PreprocessConfig(images=str(tmp_path / "im.tif"), labels=str(tmp_path / "lab.tif"),
                                          val_slices="5:6", output_dir=str(tmp_path / "dense")))
    assert default["manifest"]["ignore_label"] == -1
    # Without ignore_label the unannotated slice 1 is left out (the block's runs z0-1, z2-5): no ignored voxel.
    dense = stacks_in(read_manifest(tmp_path / "dense"), "train")
    assert [s.name for s in dense] == ["im_z0-1", "im_z2-5"]
    assert all(set(np.unique(np.load(tmp_path / "dense" / s.name / "mask.npy"))) == {0, 1} for s in dense)
    with pytest.raises(InputError, match="ignore_label 0 would mark the background"):
        preprocess(PreprocessConfig(images=str(tmp_path / "im.tif"), labels=str(tmp_path / "lab.tif"), ignore_label=0))


def test_labels_with_no_annotated_foreground_are_refused(tmp_path):
    from pipeline.preprocess import read_labels

    labels = np.zeros((3, 8, 8), np.uint8)
    labels[1] = 255  # not annotated; the rest background
    tifffile.imwrite(tmp_path / "lab.tif", labels, photometric="minisblack")
    with pytest.raises(InputError, match="no annotated voxel is foreground"):
        read_labels(tmp_path / "lab.tif", (3, 8, 8), tmp_path / "im.tif", IGNORE)
    labels[1, 2, 2] = 3
    tifffile.imwrite(tmp_path / "lab.tif", labels, photometric="minisblack")
    mask = read_labels(tmp_path / "lab.tif", (3, 8, 8), tmp_path / "im.tif", IGNORE)
    assert mask[1, 2, 2] == 1 and mask[1, 0, 0] == MASK_IGNORE and (mask[0] == 0).all()


def everywhere():
    """A network that finds foreground everywhere (probability 1), through the real tiled path."""
    from emunet.inference.segment import Segmenter

    return Segmenter(lambda tiles: np.ones((*tiles.shape[:3], 1), np.float32), multiple=16)


def test_evaluate_scores_exclude_ignored_voxels(tmp_path):
    """Truth: a 16 x 16 square in slice 0, the rest of slice 0 not annotated; slice 1 all background,
    annotated. Foreground everywhere is right on all of slice 0's annotated voxels."""
    from pipeline.evaluate import EvaluateConfig, score

    image = np.random.default_rng(0).integers(0, 255, (2, 32, 32), np.uint8)
    mask = np.full((2, 32, 32), MASK_IGNORE, np.uint8)
    mask[0, 8:24, 8:24] = 1
    mask[1] = 0
    stacks = [dict(name="t", split="train", image=image, mask=mask), dict(name="v", split="val", image=image, mask=mask)]
    write_dataset(tmp_path / "ds", stacks, ignore_label=IGNORE)
    metrics, rows, _, _ = score(everywhere(), tmp_path / "ds", EvaluateConfig(), progress=False)
    assert metrics["recall"] == 1.0
    assert metrics["precision"] == pytest.approx(256 / (256 + 1024))  # slice 1's 1024 voxels are wrong
    assert rows[0]["tn"] + rows[0]["fp"] + rows[0]["tp"] + rows[0]["fn"] == 256
    assert rows[0]["objects"] is None and rows[1]["objects"] == 1  # objects on the full slice only


def test_tiny_run_trains_and_evaluates_on_sparse_labels(store, tmp_path):
    from pipeline.evaluate import EvaluateConfig, evaluate
    from pipeline.train import TrainConfig, train

    write_dataset(tmp_path / "ds", sparse_stacks(), ignore_label=IGNORE)
    trained = train(TrainConfig(dataset_uri=str(tmp_path / "ds"), **TINY_TRAIN))
    metrics = mlflow.get_run(trained["run_id"]).data.metrics
    assert 0 <= metrics["val_dice"] <= 1 and np.isfinite(metrics["val_loss"])
    assert math.isnan(metrics["val_object_f1"])  # the only validation slice is not fully annotated
    with pytest.raises(InputError, match="champion_metric object_f1 cannot be measured"):
        evaluate(EvaluateConfig(model_uri=trained["model_uri"], dataset_uri=str(tmp_path / "ds")))
    result = evaluate(EvaluateConfig(model_uri=trained["model_uri"], dataset_uri=str(tmp_path / "ds"),
                                     champion_metric="dice"))
    assert 0 <= result["metrics"]["dice"] <= 1 and result["version"] == 1


def test_main_refuses_an_object_champion_metric_on_sparse_labels_before_training(store, tmp_path):
    """`mlflow run . -P ignore_label=...` with no fully annotated held-out slice used to train for minutes
    and only then fail in evaluate."""
    from pipeline.main import MainConfig, main

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (6, 32, 32), np.uint8)
    labels = np.full((6, 32, 32), 9, np.uint8)  # 9: not annotated
    labels[:, 8:16, 8:16] = 1
    labels[:, 20:28, 20:28] = 0
    tifffile.imwrite(tmp_path / "im.tif", image, photometric="minisblack")
    tifffile.imwrite(tmp_path / "lab.tif", labels, photometric="minisblack")
    cfg = MainConfig(images=str(tmp_path / "im.tif"), labels=str(tmp_path / "lab.tif"), ignore_label=9,
                     val_slices="5:6", max_minutes=0.1)
    with pytest.raises(InputError, match="champion_metric object_f1 cannot be measured"):
        main(cfg)
    steps = [r.data.tags.get("step") for r in mlflow.search_runs(experiment_names=["em-unet"], output_format="list")]
    assert "preprocess" in steps and "train" not in steps
