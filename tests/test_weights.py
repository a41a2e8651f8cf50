"""The border weight map and the losses that use it."""

import keras
import numpy as np
import pytest

from emunet.core.dataset import read_manifest, stacks_in, write_dataset
from emunet.core.losses import LOSSES, bce_loss
from emunet.core.model import UNetSpec, build_unet
from emunet.core.synthetic import synthetic_stack
from emunet.training.loader import PatchDataset
from emunet.training.weights import SIGMA, border_weights


def two_cells(gap: int = 1) -> np.ndarray:
    mask = np.zeros((12, 11 + gap), np.uint8)
    mask[1:11, 1:6] = 1
    mask[1:11, 6 + gap:11 + gap] = 1
    return mask


def test_the_membrane_between_two_cells_weighs_most():
    w = border_weights(two_cells(gap=1), 10)
    # The gap pixel is 1 px from each cell: d1 + d2 = 2.
    assert w[5, 6] == pytest.approx(1 + 10 * np.exp(-(2**2) / (2 * SIGMA**2)), rel=1e-5)
    assert np.all(w[two_cells() > 0] == 1)  # cells themselves: weight 1
    assert w[5, 6] > w[5, 0] > 1  # outside the pair, far from the second cell: little extra weight
    wide = border_weights(two_cells(gap=7), 10)
    assert wide[5, 9] == pytest.approx(1 + 10 * np.exp(-(8**2) / (2 * SIGMA**2)), rel=1e-5)  # 4 + 4 away
    assert wide[5, 9] < w[5, 6]  # a wide gap needs no help


def test_one_cell_or_weight_zero_gives_ones():
    one = np.zeros((10, 10), np.uint8)
    one[2:8, 2:8] = 1
    assert np.all(border_weights(one, 10) == 1)
    assert np.all(border_weights(two_cells(), 0) == 1)
    assert border_weights(two_cells(), 10).dtype == np.float32


def test_weights_scale_the_cross_entropy_of_their_pixels_and_leave_dice_alone():
    y = np.array([[1.0, 0.0, 0.0, 1.0]], np.float32).reshape(1, 1, 4, 1)
    p = np.array([[0.9, 0.6, 0.1, 0.8]], np.float32).reshape(1, 1, 4, 1)
    w = np.array([[1.0, 5.0, 1.0, 1.0]], np.float32).reshape(1, 1, 4, 1)
    bce = -np.log(np.array([0.9, 0.4, 0.9, 0.8]))
    weighted = keras.ops.convert_to_numpy(bce_loss(np.concatenate([y, w], -1), p))
    assert weighted == pytest.approx(float((bce * w.ravel()).sum() / w.sum()), rel=1e-5)
    assert keras.ops.convert_to_numpy(bce_loss(y, p)) == pytest.approx(float(bce.mean()), rel=1e-5)
    dice = LOSSES["dice"]
    assert keras.ops.convert_to_numpy(dice(np.concatenate([y, w], -1), p)) == pytest.approx(
        float(keras.ops.convert_to_numpy(dice(y, p))))


def test_the_loader_sends_each_crop_with_its_weights_and_a_model_trains_on_them(tmp_path):
    stacks = [dict(name=f"s{i}", split="train", image=img, mask=mask)
              for i, (img, mask) in enumerate(synthetic_stack(0, i, (2, 64, 64)) for i in range(2))]
    write_dataset(tmp_path / "ds", stacks)
    train = stacks_in(read_manifest(tmp_path / "ds"), "train")
    plain = PatchDataset(tmp_path / "ds", train, batch_size=2, crop=32, steps=1, seed=3)
    weighted = PatchDataset(tmp_path / "ds", train, batch_size=2, crop=32, steps=1, seed=3, border_weight=10)
    (x, y), (xw, yw) = plain[0], weighted[0]
    assert y.shape == (2, 32, 32, 1) and yw.shape == (2, 32, 32, 2)
    np.testing.assert_array_equal(x, xw)
    np.testing.assert_array_equal(yw[..., 0], y[..., 0])  # the same crop, its weights beside it
    np.testing.assert_allclose(yw[0, ..., 1], border_weights(y[0, ..., 0], 10))
    model = build_unet(UNetSpec(depth=1, base_filters=2))
    model.compile("adam", LOSSES["bce_dice"])
    history = model.fit(np.asarray(xw), np.asarray(yw), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
