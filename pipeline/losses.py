"""Segmentation losses on foreground probabilities `(batch, H, W, 1)` in [0, 1].

Registered with Keras so that a saved, compiled model (the `keras_model` artifact) loads with its loss
once this module is imported."""

import keras
from keras import ops

SMOOTH = 1.0  # keeps soft Dice defined (and its gradient finite) on crops with no foreground


@keras.saving.register_keras_serializable(package="em_unet")
def soft_dice_loss(y_true, y_pred):
    """1 - soft Dice over the whole batch (one ratio, not a mean of per-image ratios: crops with no
    foreground would otherwise dominate)."""
    y_true = ops.cast(y_true, y_pred.dtype)
    intersection = ops.sum(y_true * y_pred)
    total = ops.sum(y_true) + ops.sum(y_pred)
    return 1.0 - (2.0 * intersection + SMOOTH) / (total + SMOOTH)


@keras.saving.register_keras_serializable(package="em_unet")
def bce_loss(y_true, y_pred):
    return ops.mean(keras.losses.binary_crossentropy(ops.cast(y_true, y_pred.dtype), y_pred))


@keras.saving.register_keras_serializable(package="em_unet")
def bce_dice_loss(y_true, y_pred):
    """BCE for calibrated per-pixel probabilities plus soft Dice for overlap under class imbalance."""
    return bce_loss(y_true, y_pred) + soft_dice_loss(y_true, y_pred)


LOSSES = {"bce": bce_loss, "dice": soft_dice_loss, "bce_dice": bce_dice_loss}


def get_loss(name: str):
    """Loss function by name; raises `ValueError` listing the known names."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; expected one of {', '.join(LOSSES)}")
    return LOSSES[name]
