"""The U-Net (Ronneberger et al. 2015) as a Keras 3 functional model, fully convolutional.

Layer names are deterministic (`enc2_conv1`, `bottleneck_conv2`, `dec3_up`, `head`) so that summaries,
checkpoints and tests stay stable. Any input whose height and width are multiples of `multiple_of(spec)`
runs.

With `input_scale` s > 1 the network sees the image averaged down s times and its logits are brought back
up to full size (bilinear) before the sigmoid: structures that are many pixels thick (mitochondria in
5 nm images) are learnt s**2 times faster per image, with s times the context, and the output, loss and
served masks stay at full resolution.
"""

from dataclasses import dataclass

import keras
from keras import layers

from emunet.core.errors import InputError


INPUT_SCALES = (1, 2, 4)


@dataclass(frozen=True)
class UNetSpec:
    depth: int = 4  # 4 poolings: 16x down-sampling, the original U-Net
    base_filters: int = 16  # doubled at each level; 64 gives the original study's ~31M parameters
    batch_norm: bool = True  # faster, steadier convergence at small batch sizes than the original
    dropout: float = 0.0  # dropout in the bottleneck; the original used 0.5 there
    # Keras' 0.99: statistics averaged over ~100 steps. 0.9 follows the weights faster (runs of a few
    # dozen steps) but its statistics swing from batch to batch: on VNC, validation Dice swung twice as
    # much between late epochs and ended 0.02 lower in the same 10 minutes.
    bn_momentum: float = 0.99
    # Under a distribution strategy, batch statistics over the global batch (all replicas): every replica
    # then normalises alike and holds the same moving averages; a no-op on one device.
    sync_batch_norm: bool = False
    input_scale: int = 1  # 1, 2 or 4: the network runs at 1/input_scale of the image's resolution
    # k neighbouring slices above and below as extra input channels (2.5-D): 2k + 1 channels, z-k .. z+k
    # (emunet.inference.context); 0 = one slice, the 2-D network.
    context_slices: int = 0


def input_channels(spec: UNetSpec) -> int:
    """Channels of the network's input: the slice and its `context_slices` neighbours on each side."""
    return 2 * spec.context_slices + 1


def _conv_block(x, filters: int, name: str, spec: UNetSpec):
    for i in (1, 2):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=not spec.batch_norm,
                          kernel_initializer="he_normal", name=f"{name}_conv{i}")(x)
        if spec.batch_norm:
            x = layers.BatchNormalization(momentum=spec.bn_momentum, synchronized=spec.sync_batch_norm,
                                          name=f"{name}_bn{i}")(x)
        x = layers.Activation("relu", name=f"{name}_relu{i}")(x)
    return x


def multiple_of(spec: UNetSpec) -> int:
    """Height and width of every input must be a multiple of this."""
    return 2**spec.depth * spec.input_scale


def spec_of(model: keras.Model) -> UNetSpec:
    """The `UNetSpec` a model made by `build_unet` was built from, read from its layers (their names are
    deterministic), not from metadata: what a saved model holds is what fine-tuning must rebuild.
    `sync_batch_norm` is left at its default: it depends on the devices, not on the weights. Raises
    `InputError` for a model that is not such a U-Net (the user's `init_model`)."""
    layers_by_name = {layer.name: layer for layer in model.layers}
    if "enc1_conv1" not in layers_by_name:
        raise InputError(f"model {model.name!r} is not an em-unet U-Net (it has no layer enc1_conv1)")
    depth = sum(1 for n in layers_by_name if n.startswith("enc") and n.endswith("_pool"))
    bn = layers_by_name.get("enc1_bn1")
    dropout = layers_by_name.get("bottleneck_dropout")
    downscale = layers_by_name.get("downscale")
    channels = int(model.input_shape[-1])
    if channels % 2 == 0:
        raise ValueError(f"model {model.name!r} takes {channels} input channels; an em-unet U-Net takes 2k + 1")
    return UNetSpec(depth=depth, base_filters=int(layers_by_name["enc1_conv1"].filters), batch_norm=bn is not None,
                    dropout=float(dropout.rate) if dropout is not None else 0.0,
                    bn_momentum=float(bn.momentum) if bn is not None else UNetSpec.bn_momentum,
                    input_scale=int(downscale.pool_size[0]) if downscale is not None else 1,
                    context_slices=(channels - 1) // 2)


def build_unet(spec: UNetSpec = UNetSpec(), name: str = "unet") -> keras.Model:
    """U-Net mapping `(batch, H, W, C)` float32 in [0, 1] to `(batch, H, W, 1)` foreground probability of
    the middle channel's slice; `C = input_channels(spec)` (1, or 2k + 1 with `context_slices` k).

    H and W are free (None) but must be multiples of `multiple_of(spec)`. The output layer is float32 even
    under a mixed-precision policy, so losses and thresholds see full-precision probabilities.
    """
    if spec.depth < 1 or spec.base_filters < 1:
        raise ValueError(f"U-Net needs depth >= 1 and base_filters >= 1, got {spec}")
    if spec.input_scale not in INPUT_SCALES:
        raise ValueError(f"input_scale must be one of {INPUT_SCALES}, got {spec.input_scale}")
    if spec.context_slices < 0:
        raise ValueError(f"context_slices must be 0 or more, got {spec.context_slices}")
    inputs = keras.Input((None, None, input_channels(spec)), name="image")
    x, skips = inputs, []
    if spec.input_scale > 1:
        x = layers.AveragePooling2D(spec.input_scale, name="downscale")(x)
    for level in range(spec.depth):
        x = _conv_block(x, spec.base_filters * 2**level, f"enc{level + 1}", spec)
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"enc{level + 1}_pool")(x)
    x = _conv_block(x, spec.base_filters * 2**spec.depth, "bottleneck", spec)
    if spec.dropout > 0:
        x = layers.Dropout(spec.dropout, name="bottleneck_dropout")(x)
    for level in reversed(range(spec.depth)):
        filters = spec.base_filters * 2**level
        x = layers.Conv2DTranspose(filters, 2, strides=2, padding="same", name=f"dec{level + 1}_up")(x)
        x = layers.Concatenate(name=f"dec{level + 1}_concat")([x, skips[level]])
        x = _conv_block(x, filters, f"dec{level + 1}", spec)
    if spec.input_scale == 1:
        outputs = layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name="head")(x)
    else:
        x = layers.Conv2D(1, 1, dtype="float32", name="head")(x)
        x = layers.UpSampling2D(spec.input_scale, interpolation="bilinear", dtype="float32", name="upscale")(x)
        outputs = layers.Activation("sigmoid", dtype="float32", name="probability")(x)
    return keras.Model(inputs, outputs, name=name)
