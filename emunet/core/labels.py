"""Instance label images: cells given as ids that touch (`label_kind="instances"`), and what they become.

A dense connectomics ground truth (the medulla cube: every voxel belongs to a neuron) separates cells
only where the id changes; given to the pipeline as a mask, it would be one foreground blob. The
training target is then the cells' interiors: the ids with the voxels on an id change (the membranes)
set to background, so the network learns the membrane as a gap and the watershed finds cells again. The
ids themselves are kept for scoring (`emunet.core.metrics3d`).

Whether a volume is seen in 3-D or slice by slice is decided by its voxel size (`is_near_isotropic`):
serial sections 5-10 times thicker than their pixels have no meaningful z neighbour at the pixel scale.
"""

import numpy as np

ISOTROPY_RATIO = 2.0  # slice spacing within 2x of the pixel size: z carries detail at the pixel scale
MOSTLY_FOREGROUND = 0.9  # a mask is never 90 % foreground in EM (ISBI's interiors: 78 %); dense ids are
TOUCHING_SHARE = 0.2  # a fifth of the objects' border between two ids: merging them would lose cells
MIN_IDS = 5  # fewer distinct values is a class map (a mask with 2-3 classes), not cells
SAMPLED_SLICES = 8  # enough to see the pattern, and cheap on a lazily read 250^3 volume


def _id_change(ids: np.ndarray, axis: int) -> np.ndarray:
    """Voxels whose neighbour along `axis` (either side) has a different non-zero id, while their own
    id is non-zero. Background next to a cell is no change: it already separates."""
    a = np.moveaxis(ids, axis, 0)
    change = (a[1:] != a[:-1]) & (a[1:] != 0) & (a[:-1] != 0)
    out = np.zeros(a.shape, bool)
    out[1:] |= change
    out[:-1] |= change  # both sides: the gap is symmetric, the same for a cell whichever side it is on
    return np.moveaxis(out, 0, axis)


def interiors(ids: np.ndarray, isotropic: bool) -> np.ndarray:
    """The training target of an instance label image: `ids` `(Z, Y, X)` (or `(Y, X)`), any integer
    dtype, 0 = background. Returns uint8 {0, 1} of the same shape: 1 on a cell's voxels except those
    with a 4-neighbour in y/x of another (non-zero) id; with `isotropic`, a z neighbour of another id
    counts too (the membrane is seen in 3-D). Two touching cells come out two voxels apart (one voxel
    of each is removed: in the medulla cube the dark membrane is thicker still, voxels on an id change
    average 99, one voxel further 109, the cells' inside 146; a one-voxel gap would call membrane
    cell). An `ignore_label` value is the caller's to map afterwards (it counts as an id here, so cells
    next to it lose their border voxels: a conservative target)."""
    ids = np.asarray(ids)
    if ids.ndim not in (2, 3):
        raise ValueError(f"instance ids have shape {ids.shape}; expected (Z, Y, X) or (Y, X)")
    boundary = _id_change(ids, ids.ndim - 1) | _id_change(ids, ids.ndim - 2)
    if isotropic and ids.ndim == 3:
        boundary |= _id_change(ids, 0)
    return ((ids != 0) & ~boundary).astype(np.uint8)


def _sample(labels) -> np.ndarray:
    """Up to `SAMPLED_SLICES` evenly spaced slices of a `(Z, Y, X)` (possibly lazy) label volume, or the
    whole `(Y, X)` image, as `(n, Y, X)`."""
    if len(labels.shape) == 2:
        return np.asarray(labels)[None]
    depth = labels.shape[0]
    picks = np.unique(np.linspace(0, depth - 1, min(depth, SAMPLED_SLICES)).round().astype(int))
    return np.stack([np.asarray(labels[int(z)]) for z in picks])


def _touching_pairs(slices: np.ndarray) -> tuple[int, int]:
    """`(between ids, against background)`: counts of in-plane 4-neighbour pairs of two different
    non-zero values, and of a non-zero value next to 0."""
    between = against = 0
    for a, b in ((slices[:, :, 1:], slices[:, :, :-1]), (slices[:, 1:, :], slices[:, :-1, :])):
        differ = a != b
        zero = (a == 0) | (b == 0)
        between += int(np.count_nonzero(differ & ~zero))
        against += int(np.count_nonzero(differ & zero))
    return between, against


def looks_like_instances(labels) -> str | None:
    """Whether a label image given as a mask is really instance ids: `labels` `(Z, Y, X)` (NumPy, a
    memory map or a lazy volume indexed `labels[z]`) or `(Y, X)`. Looks at a few evenly spaced slices.
    Returns a one-line warning naming `label_kind=instances` when there are at least `MIN_IDS` distinct
    non-zero values and either almost every voxel is foreground or a good part of the objects' border is
    with another id; None otherwise (a binary mask, a class map, separated objects)."""
    slices = _sample(labels)
    values = np.unique(slices)
    count = int(np.count_nonzero(values))
    if count < MIN_IDS:
        return None
    foreground = float(np.count_nonzero(slices)) / slices.size
    between, against = _touching_pairs(slices)
    share = between / (between + against) if between + against else 0.0
    if foreground <= MOSTLY_FOREGROUND and share < TOUCHING_SHARE:
        return None
    return (f"labels look like instance ids, not a mask ({count} distinct values in {len(slices)} sampled "
            f"slices, {foreground:.0%} foreground, {share:.0%} of object borders between two ids): as a mask "
            f"the touching cells would merge into one; pass label_kind=instances")


def is_near_isotropic(voxel_size) -> bool | None:
    """Whether a volume is seen in 3-D: `voxel_size` `(z, y, x)` in one unit, entries None when the file
    does not say. True when the slice spacing is within `ISOTROPY_RATIO` of the pixel size (either way),
    False when farther, None when the z size or both pixel sizes are unknown (never guessed)."""
    if voxel_size is None:
        return None
    z, *pixel = voxel_size
    pixel = [float(p) for p in pixel if p is not None and float(p) > 0]
    if z is None or float(z) <= 0 or not pixel:
        return None
    ratio = float(z) / float(np.mean(pixel))
    return 1.0 / ISOTROPY_RATIO <= ratio <= ISOTROPY_RATIO
