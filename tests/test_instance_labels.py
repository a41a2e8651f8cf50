"""Instance labels in (issue 23): touching cells with different ids train on their interiors and are
scored as themselves; given as a mask, they are flagged."""

import numpy as np
import tifffile

from emunet.core.dataset import open_ids, open_stack, read_manifest, stacks_in
from emunet.registry.tracking import local_artifact
from pipeline.preprocess import PreprocessConfig, preprocess


def touching_ids(depth: int = 6, size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """An image and ids of four cells filling the field, touching along x = 24 and y = 24 (no membrane
    voxel between them: every voxel belongs to a cell, as in connectomics ground truth)."""
    ids = np.zeros((depth, size, size), np.uint16)
    ids[:, :24, :24], ids[:, :24, 24:], ids[:, 24:, :24], ids[:, 24:, 24:] = 1, 2, 3, 4
    image = (60 + 40 * (ids % 2)).astype(np.uint8)
    image[:, 23:25, :] = image[:, :, 23:25] = 10  # a dark membrane where the ids change
    return image, ids


def test_instance_labels_train_on_interiors_and_keep_the_ids(store, tmp_path):
    image, ids = touching_ids()
    tifffile.imwrite(tmp_path / "em.tif", image)
    tifffile.imwrite(tmp_path / "cells.tif", ids)
    result = preprocess(PreprocessConfig(images=str(tmp_path / "em.tif"), labels=str(tmp_path / "cells.tif"),
                                         label_kind="instances", val_slices="4:6"))
    folder = local_artifact(result["dataset_uri"], "dataset")
    manifest = read_manifest(folder)
    assert manifest["label_kind"] == "instances"
    [val] = stacks_in(manifest, "val")
    _, mask = open_stack(folder, val)
    kept = open_ids(folder, val)
    np.testing.assert_array_equal(kept, ids[4:6])  # the ids, for scoring
    # The target: each cell's interior, with a gap of background where two ids meet (in-plane: unknown z).
    assert mask[0, 10, 10] == 1 and mask[0, 23, 10] == 0 and mask[0, 24, 10] == 0 and mask[0, 10, 23] == 0
    assert mask.mean() < 0.95


def test_touching_ids_given_as_a_mask_warn(store, tmp_path, capsys):
    image, ids = touching_ids()
    ids = ids * 0 + (np.arange(ids.size).reshape(ids.shape) // 97 % 9 + 1).astype(np.uint16)  # many ids
    tifffile.imwrite(tmp_path / "em.tif", image)
    tifffile.imwrite(tmp_path / "cells.tif", ids)
    preprocess(PreprocessConfig(images=str(tmp_path / "em.tif"), labels=str(tmp_path / "cells.tif"), val_slices="4:6"))
    out = capsys.readouterr().out
    assert "warning" in out and "label_kind=instances" in out
    mask = np.where(touching_ids()[1] > 0, 255, 0).astype(np.uint8)
    mask[:, 23:25, :] = mask[:, :, 23:25] = 0  # an ordinary binary mask: no warning
    tifffile.imwrite(tmp_path / "mask.tif", mask)
    preprocess(PreprocessConfig(images=str(tmp_path / "em.tif"), labels=str(tmp_path / "mask.tif"), val_slices="4:6"))
    assert "label_kind=instances" not in capsys.readouterr().out


def test_the_default_data_carries_instance_ids(store):
    result = preprocess(PreprocessConfig(synthetic_stacks=2, synthetic_shape="3,64,64"))
    folder = local_artifact(result["dataset_uri"], "dataset")
    manifest = read_manifest(folder)
    assert manifest["label_kind"] == "instances"
    for info in manifest["stacks"]:
        ids, (_, mask) = open_ids(folder, info), open_stack(folder, info)
        assert ids.max() > 1 and ((ids > 0) == (np.asarray(mask) == 1)).all()
