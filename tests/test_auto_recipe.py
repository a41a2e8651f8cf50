"""The volume recipe by default (issue 23): `context_slices`, `champion_metric` and `grow_over_all` are
"auto" and follow the data, so dense instance labels of a near-isotropic volume train and segment as the
dense-tissue recipe does, and serial sections keep the 2-D recipe."""

import numpy as np
import pytest

from emunet.core.dataset import StackInfo, dense_instances, read_manifest, seen_in_3d, write_dataset
from emunet.core.errors import InputError
from emunet.inference.params import DEFAULTS, SegmentParams
from emunet.inference.segment import Segmenter, segment_volume
from emunet.registry.champion import choose_champion_metric
from emunet.training.config import TrainConfig, resolve
from emunet.training.plan import choose_context, make_plan

ISOTROPIC, SECTIONS = [10.0, 10.0, 10.0], [50.0, 4.0, 4.0]


def manifest(voxel_size, sparse=False, split="train"):
    stack = StackInfo("a", split, (10, 64, 64), "uint8", 0.0, 1.0, {"voxel_size": voxel_size} if voxel_size else {})
    return {"stacks": [stack], **({"ignore_label": 2} if sparse else {})}


def test_context_slices_take_auto_or_a_whole_number():
    assert TrainConfig().context_slices == "auto"
    assert TrainConfig(context_slices="AUTO").context_slices == "auto"
    assert TrainConfig(context_slices="2").context_slices == 2  # a flag's text
    assert TrainConfig(context_slices="1.0").context_slices == 1  # MLflow's float parameters
    for bad in ("1.5", "two", True):
        with pytest.raises(InputError, match="context_slices must be auto or a whole number"):
            TrainConfig(context_slices=bad)
    with pytest.raises(InputError, match="context_slices must be auto or between 0"):
        resolve(TrainConfig(context_slices=9))


def test_auto_context_follows_the_voxel_size():
    auto = TrainConfig()
    assert choose_context(auto, manifest(ISOTROPIC)) == 1
    assert choose_context(auto, manifest([15.0, 8.0, 8.0])) == 1  # within 2x
    assert choose_context(auto, manifest(SECTIONS)) == 0  # serial sections: the 2-D network
    assert choose_context(auto, manifest(None)) == 0  # unknown is never guessed isotropic
    assert choose_context(TrainConfig(context_slices=0), manifest(ISOTROPIC)) == 0  # the user's choice stands
    assert choose_context(TrainConfig(context_slices=2), manifest(SECTIONS)) == 2


def test_auto_champion_metric_scores_cells_in_3d_where_they_are_found_in_3d():
    assert seen_in_3d(manifest(ISOTROPIC)) and not seen_in_3d(manifest(SECTIONS)) and not seen_in_3d(manifest(None))
    assert not seen_in_3d(manifest(ISOTROPIC, sparse=True))  # annotated slices hold no 3-D objects
    assert not seen_in_3d({"stacks": []})
    assert choose_champion_metric("auto", seen_in_3d(manifest(ISOTROPIC))) == "object_f1_3d"
    assert choose_champion_metric("auto", seen_in_3d(manifest(ISOTROPIC)), dense=True) == "rand_fscore_3d"
    assert choose_champion_metric("auto", seen_in_3d(manifest(SECTIONS))) == "object_f1"
    assert choose_champion_metric("auto", seen_in_3d(manifest(SECTIONS)), dense=True) == "object_f1"
    assert choose_champion_metric("dice", True) == "dice"
    with pytest.raises(InputError, match="champion_metric must be one of auto"):
        resolve(TrainConfig(champion_metric="best"))


def cells(dense: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(image, mask, ids)` of 8 x 48 x 48: four cells tiling the field (dense), or four small blobs."""
    ids = np.zeros((8, 48, 48), np.uint32)
    if dense:
        ids[:, :24, :24], ids[:, :24, 24:], ids[:, 24:, :24], ids[:, 24:, 24:] = 1, 2, 3, 4
    else:
        for n, (y, x) in enumerate([(8, 8), (8, 36), (36, 8), (36, 36)], 1):
            ids[:, y - 4:y + 4, x - 4:x + 4] = n
    mask = (ids > 0).astype(np.uint8)
    image = (40 + 150 * mask).astype(np.uint8)
    return image, mask, ids


def dataset(folder, voxel_size, dense: bool | None):
    """A dataset artifact of one training and one validation stack; `dense` None: masks, no ids."""
    stacks = []
    for split in ("train", "val"):
        image, mask, ids = cells(bool(dense))
        stacks.append(dict(name=split, split=split, image=image, mask=mask, ids=None if dense is None else ids,
                           source={"voxel_size": voxel_size, "unit": "nm"}))
    write_dataset(folder, stacks, label_kind="mask" if dense is None else "instances")
    return folder


def test_dense_instance_labels_are_told_from_sparse_ones_and_masks(tmp_path):
    assert dense_instances(dataset(tmp_path / "dense", ISOTROPIC, True), read_manifest(tmp_path / "dense"))
    assert not dense_instances(dataset(tmp_path / "sparse", ISOTROPIC, False), read_manifest(tmp_path / "sparse"))
    assert not dense_instances(dataset(tmp_path / "mask", ISOTROPIC, None), read_manifest(tmp_path / "mask"))


@pytest.mark.parametrize("voxel_size, dense, expected", [
    (ISOTROPIC, True, (1, "rand_fscore_3d", True)),  # a FIB-SEM cube of neurons: the dense-tissue recipe
    (SECTIONS, True, (0, "object_f1", True)),  # serial sections of dense cells: slices, per-slice objects
    (ISOTROPIC, None, (1, "object_f1_3d", False)),  # an isotropic mask (mitochondria): over the foreground
])
def test_the_plan_resolves_every_auto_from_the_data(tmp_path, voxel_size, dense, expected):
    folder = dataset(tmp_path / "data", voxel_size, dense)
    cfg, plan = make_plan(resolve(TrainConfig(crop_size=32, input_scale=1)), False, folder, read_manifest(folder))
    assert (cfg.context_slices, cfg.champion_metric, plan["grow_over_all"]) == expected
    assert (plan["context_slices"], plan["champion_metric"]) == expected[:2]


def test_grow_over_all_is_auto_true_or_false():
    assert DEFAULTS.grow_over_all == "auto" and not DEFAULTS.grows_over_all  # unsettled: over the foreground
    assert DEFAULTS.settled(True).grows_over_all and not DEFAULTS.settled(False).grows_over_all
    assert not SegmentParams(grow_over_all="false").settled(True).grows_over_all  # the user's choice stands
    assert SegmentParams.from_dict({"grow_over_all": "TRUE"}).grow_over_all is True
    with pytest.raises(InputError, match="grow_over_all must be auto, true or false"):
        SegmentParams(grow_over_all="maybe")


def test_auto_grows_over_every_voxel_for_a_model_of_dense_instance_labels():
    """The one path settles `auto` with the model's record: 3-D objects then cover the membranes too."""
    image, mask, _ = cells(False)

    def forward(batch):  # the normalised image as the probability: the blobs are cells
        return np.ascontiguousarray(batch[..., :1])

    params = DEFAULTS.replace(instances="3d", output="labels", low=0.0, high=255.0)
    found = {grows: np.stack([r.ids for r in segment_volume(Segmenter(forward, grow_over_all=grows), image, params)])
             for grows in (False, True)}
    assert (found[True] > 0).all()  # every voxel in a cell
    np.testing.assert_array_equal(found[False] > 0, mask > 0)  # the foreground only
    explicit = np.stack([r.ids for r in segment_volume(Segmenter(forward, grow_over_all=True), image,
                                                       params.replace(grow_over_all=False))])
    np.testing.assert_array_equal(explicit, found[False])  # grow_over_all=false overrides the model's record


def test_the_viewer_draws_and_scores_the_objects_predict_gives_the_model():
    """The page settles `auto` with the model's record too: its objects and 3-D scores are predict's."""
    from viewer import planes, scoring

    image, mask, ids = cells(False)
    prob = mask.astype(np.float32)
    drawn = {grows: planes.object_ids(prob, 0.5, ISOTROPIC, grows=grows) for grows in (False, True)}
    assert (drawn[True] > 0).all() and ((drawn[False] > 0) == (mask > 0)).all()
    params = DEFAULTS.replace(instances="3d", output="labels", low=0.0, high=1.0)
    segmenter = Segmenter(lambda batch: np.ascontiguousarray(batch[..., :1]), grow_over_all=True)
    np.testing.assert_array_equal(drawn[True], np.stack([r.ids for r in segment_volume(segmenter, prob, params)]))
    scored = {grows: scoring.rows_and_summary(prob, ids, 0.5, ISOTROPIC, grows)[1] for grows in (False, True)}
    assert scored[False]["object_f1_3d"] == 1.0  # the blobs exactly
    assert scored[True]["object_f1_3d"] < 1.0  # grown over the background: no longer the true blobs


def test_predict_says_when_auto_grows_over_every_voxel_and_does(store, tmp_path, capsys):
    """A logged model that records dense instance labels: predict's `grow_over_all=auto` grows its 3-D
    objects over every voxel and says so in one line; `false` keeps them to the foreground, silently."""
    import tempfile
    from pathlib import Path

    import keras
    import mlflow
    import tifffile

    from emunet.inference.segmenter import log_segmenter
    from serving.predict import PredictConfig, predict

    inputs = keras.Input((None, None, 1))
    model = keras.Model(inputs, keras.layers.Conv2D(1, 1, activation="sigmoid", name="out")(inputs))
    model.get_layer("out").set_weights([np.full((1, 1, 1, 1), 12.0, np.float32), np.array([-6.0], np.float32)])
    with mlflow.start_run() as run, tempfile.TemporaryDirectory() as tmp:
        model.save(Path(tmp) / "bright.keras")
        log_segmenter(Path(tmp) / "bright.keras", {"multiple_of": 1, "grow_over_all": True})
    image, mask, _ = cells(False)
    tifffile.imwrite(tmp_path / "cube.tif", image)
    for grow, line in (("auto", True), ("false", False)):
        out = tmp_path / f"out_{grow}"
        predict(PredictConfig(model_uri=f"runs:/{run.info.run_id}/model", input=str(tmp_path / "cube.tif"),
                              output_dir=str(out), instances="3d", save_labels=True, grow_over_all=grow,
                              min_object_size=5))
        said = "3-D objects grow over every voxel" in capsys.readouterr().out
        labels = tifffile.imread(out / "cube_labels.tif")
        assert said == line and bool((labels > 0).all()) == line
        assert (labels[mask > 0] > 0).all()  # the cells are objects either way
