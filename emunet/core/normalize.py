"""The one normalisation used everywhere: preprocess, training, evaluation, serving and the viewer.

Robust percentile scaling of a whole stack to [0, 1] float32. Percentiles (not min/max, not `/ 255`)
so that 16-bit and float data, hot pixels and empty borders all land in the same range.
"""

import math

import numpy as np

from emunet.core.errors import InputError

# 0.5 / 99.5 % clip a few hot or dead pixels without flattening real contrast (EM histograms are wide).
LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5
# Percentiles of a large stack are estimated on at most this many voxels, drawn at random (fixed seed)
# from every slice: the estimate is stable to well under one grey level, it keeps a 200 x 2048 x 2048
# stack from being copied, and unlike every k-th voxel of the flattened stack it cannot fall on the
# same few columns when the slice width divides by k.
MAX_SAMPLES = 4_000_000
SEED = 0


def _sample(image: np.ndarray, z: int, count: int) -> np.ndarray:
    """`count` voxels of slice `z`, the same ones whichever way the stack is held (seeded by `z`)."""
    flat = np.asarray(image).reshape(-1)
    if count >= flat.size:
        return flat
    picks = np.random.default_rng([SEED, z]).choice(flat.size, size=count, replace=False)
    return flat[picks]


def stack_stats(stack, max_samples: int = MAX_SAMPLES) -> tuple[float, float]:
    """Return `(low, high)` intensity percentiles of a stack.

    `stack` is a `(Z, H, W)` or `(H, W)` array of any numeric dtype, or anything with `shape` that
    yields `(H, W)` slices by index (a lazily read volume): it is read one slice at a time. Always
    `high > low`: when the percentiles meet (a constant stack, or one value in nearly every voxel) it is
    `flat_window` around that value. Raises `InputError` for an empty stack or one with no finite value.
    """
    shape = tuple(stack.shape)
    if len(shape) == 2:
        stack, shape = np.asarray(stack)[None], (1, *shape)
    if int(np.prod(shape)) == 0:
        raise InputError(f"cannot compute intensity statistics of an empty stack (shape {shape})")
    per_slice = max(1, max_samples // shape[0])
    sample = np.concatenate([_sample(stack[z], z, per_slice).astype(np.float64) for z in range(shape[0])])
    if not np.all(np.isfinite(sample)):
        sample = sample[np.isfinite(sample)]
        if sample.size == 0:
            raise InputError("the stack has no usable intensity values (all NaN or infinite)")
    low, high = np.percentile(sample, [LOW_PERCENTILE, HIGH_PERCENTILE])
    if high <= low:  # a flat stack, or one value in nearly every voxel (the rest are outliers, clipped)
        return flat_window(float(low))
    return float(low), float(high)


def flat_window(value: float) -> tuple[float, float]:
    """The window of a constant stack: centred on its value, so it normalises to exactly 0.5 everywhere (as
    `normalize` maps a zero-width window), whatever the value and dtype, and the network's answer is its
    answer on a flat image. Every user of a window (the pyfunc's `low`, `high` included) needs `high > low`.
    The half-width is a power of two, at least 0.5 and 1/4096 of the value: float32 then holds `value - half`
    exactly (for a value float32 holds), so the subtraction and the scaling in `normalize` are exact."""
    half = 2.0 ** math.ceil(math.log2(max(0.5, abs(value) * 2.0 ** -12)))
    return value - half, value + half


def normalize(stack: np.ndarray, low: float, high: float) -> np.ndarray:
    """Scale `stack` (any shape) with the stack's `(low, high)` to float32 in [0, 1].

    A constant stack (high == low) maps to 0.5 rather than dividing by zero; NaNs map to 0.
    """
    span = float(high) - float(low)
    if span <= 0:
        return np.full(np.shape(stack), 0.5, dtype=np.float32)
    out = np.array(stack, dtype=np.float32)  # the one new array: scaled in place (a block's reads hold less)
    out -= np.float32(low)
    out *= np.float32(1.0 / span)
    np.clip(out, 0.0, 1.0, out=out)
    return np.nan_to_num(out, nan=0.0, copy=False)
