"""The U-Net paper's border weight map (Ronneberger et al. 2015, eq. 2): background pixels squeezed
between two cells weigh more in the loss, so the network learns the thin membranes that keep touching
cells apart instead of running its foreground across them.

    w(x) = 1 + w0 * exp(-(d1(x) + d2(x))**2 / (2 * sigma**2))   on background, 1 on foreground

`d1` is the distance to the nearest cell, `d2` to the second nearest. `d2` is approximated without one
distance transform per cell: the cells' Voronoi partition of the background is found from `d1`'s nearest
cell, and a pixel `t` away from the border between two Voronoi regions has `d2 ~ d1 + 2 t` (exact across
a straight gap). Cells are the 4-connected components of the crop's mask (`emunet.core.objects`). The
paper's class-balancing term is left out: the soft Dice of the default loss already balances classes.
"""

import numpy as np
from scipy import ndimage

from emunet.core.objects import components

SIGMA = 5.0  # pixels, the paper's value: the membranes that matter are a few pixels wide


def border_weights(mask: np.ndarray, w0: float, sigma: float = SIGMA) -> np.ndarray:
    """`(H, W)` float32 weights for a `(H, W)` {0, 1} mask (see the module); all ones with fewer than two
    cells or `w0` 0."""
    labels = components(np.asarray(mask) != 0)
    weights = np.ones(labels.shape, np.float32)
    if w0 <= 0 or labels.max() < 2:
        return weights
    background = labels == 0
    d1, (iy, ix) = ndimage.distance_transform_edt(background, return_indices=True)
    nearest = labels[iy, ix]  # the Voronoi region of every pixel
    region_border = np.zeros(labels.shape, bool)
    region_border[:, 1:] |= nearest[:, 1:] != nearest[:, :-1]
    region_border[:, :-1] |= nearest[:, 1:] != nearest[:, :-1]
    region_border[1:, :] |= nearest[1:, :] != nearest[:-1, :]
    region_border[:-1, :] |= nearest[1:, :] != nearest[:-1, :]
    t = ndimage.distance_transform_edt(~region_border) if region_border.any() else np.full(labels.shape, np.inf)
    d2 = d1 + 2 * t
    weights[background] += (w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma**2)))[background].astype(np.float32)
    return weights
