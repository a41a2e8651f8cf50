"""The working resolution: structure thickness from masks, the automatic scale, and a U-Net that runs at
half resolution but answers at full resolution."""

import numpy as np
import pytest

from emunet.core.model import UNetSpec, build_unet, multiple_of
from emunet.training.plan import auto_input_scale, thickness, thinnest_structure


def disks(size: int, diameter: int, spacing: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    centres = range(spacing // 2, size, spacing)
    mask = np.zeros((size, size), bool)
    for cy in centres:
        for cx in centres:
            mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= (diameter / 2) ** 2
    return mask


def membranes(size: int, width: int, cell: int) -> np.ndarray:
    """Cell interiors (True) separated by a grid of `width`-pixel membranes (False)."""
    grid = np.zeros((size, size), bool)
    for start in range(0, size, cell):
        grid[start:start + width] = True
        grid[:, start:start + width] = True
    return ~grid


@pytest.mark.parametrize("width", [4, 10, 30])
def test_thickness_of_a_strip_is_its_width(width):
    mask = np.zeros((100, 100), bool)
    mask[20:20 + width] = True
    assert thickness(mask) == pytest.approx(width, abs=1)


def test_thickness_of_disks_is_their_diameter():
    assert thickness(disks(256, 40, 64)) == pytest.approx(40, abs=2)
    assert np.isnan(thickness(np.zeros((8, 8), bool)))


def test_thin_membranes_keep_full_resolution():
    stack = np.stack([membranes(256, 5, 40)] * 3)
    assert thinnest_structure([stack]) == pytest.approx(5, abs=1)  # the background (membranes) is the thin class
    assert auto_input_scale(thinnest_structure([stack])) == 1


@pytest.mark.parametrize("diameter, scale", [(20, 1), (40, 2), (100, 4)])
def test_thick_organelles_are_learnt_at_lower_resolution(diameter, scale):
    stack = np.stack([disks(512, diameter, 2 * diameter)] * 2)
    assert auto_input_scale(thinnest_structure([stack])) == scale


def test_a_mask_without_foreground_keeps_full_resolution():
    # Its background is 64 px thick, but with nothing labelled it is no structure: no reason to downscale.
    assert np.isnan(thinnest_structure([np.zeros((2, 64, 64), np.uint8)]))
    assert auto_input_scale(thinnest_structure([np.zeros((2, 64, 64), np.uint8)])) == 1
    assert auto_input_scale(float("nan")) == 1
    # Empty slices among labelled ones do not count either: thick organelles still go to half resolution.
    stack = np.stack([disks(512, 40, 80), np.zeros((512, 512), bool), disks(512, 40, 80)])
    assert auto_input_scale(thinnest_structure([stack])) == 2


def test_half_resolution_unet_answers_at_full_resolution():
    spec = UNetSpec(depth=2, base_filters=4, input_scale=2)
    model = build_unet(spec)
    assert multiple_of(spec) == 8
    x = np.random.default_rng(0).random((1, 24, 40, 1), np.float32)
    out = model.predict(x, verbose=0)
    assert out.shape == x.shape and out.dtype == np.float32
    assert 0 <= out.min() and out.max() <= 1
    # The network sees 2 x 2 block means: an image replaced by its block means gives the same answer.
    blocks = x.reshape(1, 12, 2, 20, 2, 1).mean(axis=(2, 4), keepdims=True)
    flattened = np.broadcast_to(blocks, (1, 12, 2, 20, 2, 1)).reshape(x.shape)
    np.testing.assert_allclose(model.predict(flattened, verbose=0), out, atol=1e-5)
    full = build_unet(UNetSpec(depth=2, base_filters=4))  # at full resolution the two images differ
    assert not np.allclose(full.predict(flattened, verbose=0), full.predict(x, verbose=0), atol=1e-5)
    with pytest.raises(ValueError, match="input_scale"):
        build_unet(UNetSpec(input_scale=3))


def organelle_dataset(folder, side: int):
    from emunet.core.dataset import read_manifest, write_dataset

    mask = np.stack([disks(side, 40, 80)] * 2).astype(np.uint8)
    image = (mask * 200 + 20).astype(np.uint8)
    write_dataset(folder, [dict(name=f"s{i}", split=split, image=image, mask=mask)
                           for i, split in enumerate(("train", "val"))])
    return read_manifest(folder)


def test_train_picks_the_scale_and_grows_the_preset_crop(tmp_path):
    from emunet.core.errors import InputError
    from emunet.training.config import TrainConfig, resolve
    from emunet.training.plan import choose_scale

    manifest = organelle_dataset(tmp_path / "big", 320)
    cfg, thinnest = choose_scale(resolve(TrainConfig()), True, tmp_path / "big", manifest)
    assert (cfg.input_scale, cfg.crop_size) == (2, 256) and thinnest == pytest.approx(40, abs=2)
    # A crop the user chose is kept; a given scale is not measured.
    cfg, thinnest = choose_scale(resolve(TrainConfig(crop_size=160)), False, tmp_path / "big", manifest)
    assert (cfg.input_scale, cfg.crop_size) == (2, 160)
    cfg, thinnest = choose_scale(resolve(TrainConfig(input_scale=1)), True, tmp_path / "big", manifest)
    assert (cfg.input_scale, cfg.crop_size, np.isnan(thinnest)) == (1, 128, True)
    with pytest.raises(InputError, match="multiple of 2\\*\\*depth x input_scale = 32"):
        choose_scale(resolve(TrainConfig(crop_size=144, input_scale=2)), False, tmp_path / "big", manifest)
    # Slices smaller than the grown crop cap it.
    small = organelle_dataset(tmp_path / "small", 200)
    cfg, _ = choose_scale(resolve(TrainConfig()), True, tmp_path / "small", small)
    assert (cfg.input_scale, cfg.crop_size) == (2, 192)
