import numpy as np
import pytest

from emunet.core.losses import bce_dice_loss, get_loss, soft_dice_loss
from emunet.core.model import UNetSpec, build_unet, multiple_of


@pytest.mark.parametrize("depth, size", [(2, 32), (3, 48), (2, 20)])
def test_output_shape_equals_input_shape(depth, size):
    model = build_unet(UNetSpec(depth=depth, base_filters=4))
    size = size if size % 2**depth == 0 else 2**depth * 3
    x = np.random.default_rng(0).random((2, size, size + 2**depth, 1)).astype(np.float32)
    y = model.predict_on_batch(x)
    assert y.shape == x.shape and y.dtype == np.float32
    assert 0 <= y.min() and y.max() <= 1


def test_deterministic_layer_names_and_parameter_count():
    model = build_unet(UNetSpec(depth=2, base_filters=4))
    names = [layer.name for layer in model.layers]
    for name in ("enc1_conv1", "enc2_bn2", "bottleneck_conv2", "dec2_up", "dec1_concat", "head"):
        assert name in names
    # Hand count, depth 2, 4 filters; convs have no bias under batch norm, BN has 4 numbers per channel:
    # enc1 36+16+144+16, enc2 288+32+576+32, bottleneck 1152+64+2304+64,
    # dec2 (64*8+8)+1152+32+576+32, dec1 (32*4+4)+288+16+144+16, head 4+1.
    assert model.count_params() == 212 + 928 + 3584 + 2312 + 596 + 5
    assert multiple_of(UNetSpec(depth=4)) == 16


def test_paper_preset_has_the_original_31m_parameters():
    model = build_unet(UNetSpec(depth=4, base_filters=64))
    assert 30_500_000 < model.count_params() < 31_500_000


def test_losses_on_perfect_and_wrong_predictions():
    truth = np.zeros((1, 4, 4, 1), np.float32)
    truth[0, :2] = 1
    perfect = np.clip(truth, 1e-4, 1 - 1e-4)
    wrong = 1 - perfect
    assert float(soft_dice_loss(truth, perfect)) < 0.01
    assert float(soft_dice_loss(truth, wrong)) > 0.9
    assert float(bce_dice_loss(truth, perfect)) < float(bce_dice_loss(truth, wrong))
    with pytest.raises(ValueError, match="unknown loss 'tversky'; expected one of bce, dice, bce_dice, bce_dice_both, focal"):
        get_loss("tversky")


def test_focal_loss_by_hand():
    focal = get_loss("focal")
    # One foreground pixel predicted 0.9: -0.25 * 0.1**2 * ln 0.9; one background pixel predicted 0.5:
    # -0.75 * 0.5**2 * ln 0.5. The loss is their mean.
    truth = np.array([[[[1.0]], [[0.0]]]], np.float32).reshape(1, 2, 1, 1)
    pred = np.array([0.9, 0.5], np.float32).reshape(1, 2, 1, 1)
    expected = (-0.25 * 0.01 * np.log(0.9) - 0.75 * 0.25 * np.log(0.5)) / 2
    assert float(focal(truth, pred)) == pytest.approx(expected, rel=1e-5)
    # An easy pixel (0.99 for foreground) costs far less than under BCE: focal keeps only (1 - p)**2 of it.
    easy = np.full((1, 1, 1, 1), 0.99, np.float32)
    one = np.ones((1, 1, 1, 1), np.float32)
    assert float(focal(one, easy)) < 1e-3 * float(get_loss("bce")(one, easy))


def test_bce_dice_both_weighs_the_background_overlap_by_hand():
    both = get_loss("bce_dice_both")
    # Foreground 1 pixel of 4, predicted [0.5, 0.5, 0, 0]: soft Dice loss of the foreground
    # 1 - (2 * 0.5 + 1) / (1 + 1 + 1) = 1/3; of the background (truth [0, 1, 1, 1], prediction
    # [0.5, 0.5, 1, 1]): 1 - (2 * 2.5 + 1) / (3 + 3 + 1) = 1/7. BCE: mean of -ln 0.5 twice and ~0 twice.
    truth = np.array([1, 0, 0, 0], np.float32).reshape(1, 2, 2, 1)
    pred = np.array([0.5, 0.5, 0, 0], np.float32).reshape(1, 2, 2, 1)
    bce = float(get_loss("bce")(truth, pred))
    assert bce == pytest.approx(np.log(2) / 2, rel=1e-3)
    assert float(both(truth, pred)) == pytest.approx(bce + 0.5 * (1 / 3 + 1 / 7), rel=1e-4)
    # A missed thin background line costs more than under bce_dice, which only sees the foreground.
    cells = np.ones((1, 8, 8, 1), np.float32)
    cells[0, 4] = 0  # one membrane row
    no_membrane = np.clip(np.ones_like(cells), 1e-4, 1 - 1e-4)
    extra_both = float(both(cells, no_membrane)) - float(get_loss("bce")(cells, no_membrane))
    extra_fg = float(get_loss("bce_dice")(cells, no_membrane)) - float(get_loss("bce")(cells, no_membrane))
    assert extra_both > 5 * extra_fg
