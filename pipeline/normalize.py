"""The one normalisation used everywhere: preprocess, training, evaluation, serving and the viewer.

Robust percentile scaling of a whole stack to [0, 1] float32. Percentiles (not min/max, not `/ 255`)
so that 16-bit and float data, hot pixels and empty borders all land in the same range.
"""

import numpy as np

# 0.5 / 99.5 % clip a few hot or dead pixels without flattening real contrast (EM histograms are wide).
LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5
# Percentiles of a large stack are estimated on at most this many evenly spaced voxels: the estimate is
# stable to well under one grey level and it keeps a 200 x 2048 x 2048 stack from being copied.
MAX_SAMPLES = 4_000_000


def stack_stats(stack) -> tuple[float, float]:
    """Return `(low, high)` intensity percentiles of a stack.

    `stack` is a `(Z, H, W)` or `(H, W)` array of any numeric dtype, or anything with `shape` that
    yields `(H, W)` slices by index (a lazily read TIFF): it is read one slice at a time, and the
    evenly spaced sample is the same whichever way the stack is held.
    """
    shape = tuple(stack.shape)
    size = int(np.prod(shape))
    if size == 0:
        raise ValueError("cannot compute intensity statistics of an empty stack")
    step = max(1, size // MAX_SAMPLES)
    if len(shape) < 3:
        sample = np.asarray(stack).reshape(-1)[::step].astype(np.float64)
    else:
        per_slice = size // shape[0]
        # Voxel i of the flattened stack is sampled when i % step == 0; slice z starts at z * per_slice.
        sample = np.concatenate([np.asarray(stack[z]).reshape(-1)[(-z * per_slice) % step::step].astype(np.float64)
                                 for z in range(shape[0])])
    if not np.all(np.isfinite(sample)):
        sample = sample[np.isfinite(sample)]
        if sample.size == 0:
            raise ValueError("stack has no finite values (all NaN or infinite)")
    low, high = np.percentile(sample, [LOW_PERCENTILE, HIGH_PERCENTILE])
    return float(low), float(high)


def normalize(stack: np.ndarray, low: float, high: float) -> np.ndarray:
    """Scale `stack` (any shape) with the stack's `(low, high)` to float32 in [0, 1].

    A constant stack (high == low) maps to 0.5 rather than dividing by zero; NaNs map to 0.
    """
    x = np.asarray(stack, dtype=np.float32)
    span = float(high) - float(low)
    if span <= 0:
        return np.full(x.shape, 0.5, dtype=np.float32)
    out = (x - np.float32(low)) * np.float32(1.0 / span)
    np.clip(out, 0.0, 1.0, out=out)
    return np.nan_to_num(out, nan=0.0, copy=False)
