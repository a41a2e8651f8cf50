"""The resolution the network works at, chosen from the training masks (as nnU-Net picks its spacing).

A U-Net learns a structure from its edges and its context. When the thinnest labelled structure is many
pixels thick (mitochondria in 5 nm images are 30-40 px across), averaging the image down loses nothing
the mask needs, and each training image costs a quarter (half the resolution) with twice the context.
Thin structures (ISBI membranes, 6 px) keep full resolution.
"""

import numpy as np
from scipy import ndimage

from pipeline.model import INPUT_SCALES

MIN_THICKNESS_PX = 16  # the thinnest structure keeps at least this many pixels at the working resolution
SAMPLE_SLICES = 8  # slices measured, spread over the training stacks


def thickness(mask: np.ndarray) -> float:
    """Typical thickness in pixels of the `True` regions of a 2-D mask: twice the median of the distance
    transform along its ridges (the local maxima, the regions' medial axes). NaN if there is none."""
    distance = ndimage.distance_transform_edt(mask)
    ridge = mask & (distance > 0) & (distance == ndimage.maximum_filter(distance, 3))
    return float(2 * np.median(distance[ridge])) if ridge.any() else float("nan")


def thinnest_structure(masks: list[np.ndarray]) -> float:
    """Thickness of the thinner class (foreground or background) over up to `SAMPLE_SLICES` slices of
    the `(Z, H, W)` masks: membranes are the background of a cell-interior mask, and just as thin."""
    slices = [(m, z) for m in masks for z in range(m.shape[0])]
    picked = np.linspace(0, len(slices) - 1, min(SAMPLE_SLICES, len(slices))).round().astype(int)
    fg, bg = [], []
    for i in picked:
        m, z = slices[i]
        s = np.asarray(m[z]) > 0
        fg.append(thickness(s))
        bg.append(thickness(~s))
    measured = [np.nanmedian(v) for v in (fg, bg) if not np.all(np.isnan(v))]
    return float(min(measured)) if measured else float("nan")


def auto_input_scale(thinnest: float) -> int:
    """The largest of `INPUT_SCALES` that keeps the thinnest structure `MIN_THICKNESS_PX` thick."""
    fits = [s for s in INPUT_SCALES if np.isfinite(thinnest) and thinnest / s >= MIN_THICKNESS_PX]
    return max(fits, default=1)
