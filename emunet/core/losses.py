"""Segmentation losses on foreground probabilities `(batch, H, W, 1)` in [0, 1].

`y_true` is `(batch, H, W, 1)` {0, 1}, or `(batch, H, W, 2)`: the mask and per-pixel weights. Weights
scale the cross-entropy terms (BCE, focal): the border weight map of `emunet.training.weights`, and 0 for
a pixel that is not annotated (sparse labels, `ignore_label`), whose mask value is then meaningless. The
soft Dice terms are unweighted but count only pixels of non-zero weight: an ignored pixel adds to neither
the intersection nor the sums, whatever the network predicts there. Registered with Keras so that a
saved, compiled model (the `keras_model` artifact) loads with its loss once this module is imported."""

import keras
from keras import ops

SMOOTH = 1.0  # keeps soft Dice defined (and its gradient finite) on crops with no foreground


def split_weights(y_true, dtype):
    """`(mask, weights or None)` of a `y_true` with one channel or two (mask, weights)."""
    y_true = ops.cast(y_true, dtype)
    if y_true.shape[-1] == 2:
        return y_true[..., :1], y_true[..., 1:]
    return y_true, None


def _weighted_mean(values, weights):
    """Mean of per-pixel `values` `(batch, H, W)`, weighted by `(batch, H, W, 1)` weights if given."""
    if weights is None:
        return ops.mean(values)
    weights = weights[..., 0]
    return ops.sum(values * weights) / ops.maximum(ops.sum(weights), 1e-6)


def _soft_dice(mask, y_pred, weights):
    """1 - soft Dice of `mask` and `y_pred` over the pixels whose weight is not 0 (all without weights)."""
    if weights is not None:
        counted = ops.cast(weights > 0, y_pred.dtype)
        mask, y_pred = mask * counted, y_pred * counted
    intersection = ops.sum(mask * y_pred)
    total = ops.sum(mask) + ops.sum(y_pred)
    return 1.0 - (2.0 * intersection + SMOOTH) / (total + SMOOTH)


@keras.saving.register_keras_serializable(package="em_unet")
def soft_dice_loss(y_true, y_pred):
    """1 - soft Dice over the whole batch (one ratio, not a mean of per-image ratios: crops with no
    foreground would otherwise dominate), over the annotated pixels."""
    mask, weights = split_weights(y_true, y_pred.dtype)
    return _soft_dice(mask, y_pred, weights)


@keras.saving.register_keras_serializable(package="em_unet")
def bce_loss(y_true, y_pred):
    y_true, weights = split_weights(y_true, y_pred.dtype)
    return _weighted_mean(keras.losses.binary_crossentropy(y_true, y_pred), weights)


@keras.saving.register_keras_serializable(package="em_unet")
def bce_dice_loss(y_true, y_pred):
    """BCE for calibrated per-pixel probabilities plus soft Dice for overlap under class imbalance."""
    return bce_loss(y_true, y_pred) + soft_dice_loss(y_true, y_pred)


@keras.saving.register_keras_serializable(package="em_unet")
def bce_dice_both_loss(y_true, y_pred):
    """BCE plus the mean soft Dice of both classes: when the thin structure is the background (ISBI's
    membranes between cell interiors), its overlap is optimised too, not only the foreground's."""
    mask, weights = split_weights(y_true, y_pred.dtype)
    background = _soft_dice(1.0 - mask, 1.0 - y_pred, weights)
    return bce_loss(y_true, y_pred) + 0.5 * (_soft_dice(mask, y_pred, weights) + background)


FOCAL_GAMMA = 2.0  # Lin et al. 2017: down-weights the easy pixels (most of an EM slice) by (1 - p_t)**2
FOCAL_ALPHA = 0.25  # weight of the foreground term (their default); background gets 0.75


@keras.saving.register_keras_serializable(package="em_unet")
def focal_loss(y_true, y_pred):
    """Binary focal loss: BCE scaled by `(1 - p_t)**gamma`, so training concentrates on hard pixels
    (thin membranes, small organelles) instead of the easy background."""
    y_true, weights = split_weights(y_true, y_pred.dtype)
    p = ops.clip(y_pred, 1e-7, 1 - 1e-7)
    p_t = y_true * p + (1 - y_true) * (1 - p)
    alpha_t = y_true * FOCAL_ALPHA + (1 - y_true) * (1 - FOCAL_ALPHA)
    return _weighted_mean((-alpha_t * (1 - p_t) ** FOCAL_GAMMA * ops.log(p_t))[..., 0], weights)


LOSSES = {"bce": bce_loss, "dice": soft_dice_loss, "bce_dice": bce_dice_loss, "bce_dice_both": bce_dice_both_loss,
          "focal": focal_loss}


def get_loss(name: str):
    """Loss function by name; raises `ValueError` listing the known names."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; expected one of {', '.join(LOSSES)}")
    return LOSSES[name]
