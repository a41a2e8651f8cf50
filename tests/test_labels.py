"""Instance label images: interiors as the training target, the mask-or-instances check, isotropy."""

from pathlib import Path

import numpy as np
import pytest
import tifffile

from emunet.core.labels import interiors, is_near_isotropic, looks_like_instances
from emunet.core.objects import components

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets"


def test_two_touching_cells_in_a_slice_come_out_with_a_two_pixel_gap():
    ids = np.zeros((5, 6), np.int32)
    ids[1:4, 0:3] = 1
    ids[1:4, 3:6] = 2
    expected = np.zeros((5, 6), np.uint8)
    expected[1:4, 0:2] = 1  # column 2 touches id 2, column 3 touches id 1: both go
    expected[1:4, 4:6] = 1  # background above and below is no change: rows 1 and 3 stay
    assert np.array_equal(interiors(ids, isotropic=False), expected)
    assert components(interiors(ids, isotropic=False)).max() == 2


def test_in_plane_only_for_anisotropic_data_and_in_3d_for_isotropic():
    ids = np.zeros((4, 3, 3), np.int32)
    ids[:2] = 1  # cell 1 below cell 2: they touch across z only
    ids[2:] = 2
    flat = interiors(ids, isotropic=False)
    assert flat.all()  # slice by slice there is no id change: each slice is one whole cell
    solid = interiors(ids, isotropic=True)
    assert np.array_equal(solid.any(axis=(1, 2)), [True, False, False, True])  # slices 1 and 2 are the gap
    assert solid.dtype == np.uint8 and set(np.unique(solid)) <= {0, 1}


def test_background_stays_background_and_lone_cells_keep_their_border():
    ids = np.zeros((1, 6, 6), np.uint32)
    ids[0, 1:5, 1:5] = 7
    out = interiors(ids, isotropic=True)
    assert np.array_equal(out, (ids != 0).astype(np.uint8))


def test_touching_ids_warn_and_name_label_kind():
    rng = np.random.default_rng(0)
    ids = np.repeat(np.repeat(rng.integers(1, 50, (3, 8, 8)), 8, axis=1), 8, axis=2)  # blocks of cells
    text = looks_like_instances(ids)
    assert text is not None and "label_kind=instances" in text and "\n" not in text


def test_separated_objects_with_ids_and_a_binary_mask_do_not_warn():
    mask = np.zeros((4, 64, 64), np.uint8)
    for i in range(6):  # six separate squares, ids 1..6, on a mostly empty field
        mask[:, 4 + 10 * i: 10 + 10 * i, 10:20] = i + 1
    assert looks_like_instances(mask) is None
    assert looks_like_instances((mask > 0).astype(np.uint8) * 255) is None
    assert looks_like_instances(np.full((2, 8, 8), 255, np.uint8)) is None  # all foreground, one value


@pytest.mark.skipif(not (SHARED / "isbi2012").is_dir(), reason="shared datasets absent")
def test_isbi_mask_does_not_warn():
    assert looks_like_instances(tifffile.imread(SHARED / "isbi2012" / "train-labels.tif")) is None


@pytest.mark.skipif(not (SHARED / "medulla").is_dir(), reason="shared datasets absent")
def test_medulla_neurons_warn_and_their_interiors_are_foreground_with_membranes():
    ids = tifffile.imread(SHARED / "medulla" / "neurons.tif")
    assert looks_like_instances(ids) is not None
    target = interiors(ids, isotropic=True)
    assert 0.3 < target.mean() < 0.95  # cells with gaps, not one blob and not nothing


def test_isotropy_from_the_voxel_size():
    assert is_near_isotropic((10, 10, 10)) is True
    assert is_near_isotropic((20, 10, 10)) is True
    assert is_near_isotropic((50, 4, 4)) is False
    assert is_near_isotropic((2, 10, 10)) is False
    assert is_near_isotropic((None, 4, 4)) is None
    assert is_near_isotropic((10, None, None)) is None
    assert is_near_isotropic(None) is None
    assert is_near_isotropic((10, None, 8)) is True


# --- the dataset artifact keeps the ids -----------------------------------------------------------------

def _stack(name, split, with_ids):
    from emunet.core.dataset import encode_labels

    ids = np.zeros((2, 8, 8), np.int64)
    ids[:, :, :4], ids[:, :, 4:] = 3, 70000  # an id past uint16
    stack = dict(name=name, split=split, image=np.arange(128, dtype=np.uint8).reshape(2, 8, 8),
                 mask=encode_labels(interiors(ids, isotropic=False)))
    return {**stack, "ids": ids} if with_ids else stack


def test_dataset_keeps_instance_ids_and_replaces_its_own_artifact(tmp_path):
    from emunet.core.dataset import is_artifact, label_kind_of, open_ids, open_stack, read_manifest, write_dataset

    out = tmp_path / "dataset"
    write_dataset(out, [_stack("a", "train", True), _stack("b", "val", True)], label_kind="instances")
    manifest = read_manifest(out)
    assert label_kind_of(manifest) == "instances" and is_artifact(out)
    info = manifest["stacks"][0]
    ids = open_ids(out, info)
    assert ids.dtype == np.uint32 and ids.shape == (2, 8, 8) and set(np.unique(ids)) == {3, 70000}
    assert open_stack(out, info)[1][0, 0, 3] == 0  # the mask is the interiors: the border column is a gap
    write_dataset(out, [_stack("a", "train", False)])  # a previous artifact with ids may be replaced
    manifest = read_manifest(out)
    assert label_kind_of(manifest) == "mask" and open_ids(out, manifest["stacks"][0]) is None


def test_old_artifacts_without_label_kind_read_as_masks(tmp_path):
    import json

    from emunet.core.dataset import MANIFEST, is_artifact, label_kind_of, open_ids, read_manifest, write_dataset

    out = tmp_path / "dataset"
    write_dataset(out, [_stack("a", "train", False)])
    manifest = json.loads((out / MANIFEST).read_text())
    del manifest["label_kind"]
    (out / MANIFEST).write_text(json.dumps(manifest))
    assert label_kind_of(read_manifest(out)) == "mask" and is_artifact(out)
    assert open_ids(out, read_manifest(out)["stacks"][0]) is None


def test_ids_are_refused_with_the_wrong_kind_or_shape(tmp_path):
    from emunet.core.dataset import write_dataset
    from emunet.core.errors import InputError

    with pytest.raises(InputError, match="label_kind='instances'"):
        write_dataset(tmp_path / "d1", [_stack("a", "train", True)])
    bad = {**_stack("a", "train", True), "ids": np.ones((2, 8, 7), np.int32)}
    with pytest.raises(InputError, match=r"shape \(2, 8, 7\)"):
        write_dataset(tmp_path / "d2", [bad], label_kind="instances")
    with pytest.raises(InputError, match="label_kind is 'cells'"):
        write_dataset(tmp_path / "d3", [_stack("a", "train", False)], label_kind="cells")
