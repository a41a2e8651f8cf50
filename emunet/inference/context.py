"""3-D context for a 2-D network: neighbouring slices as channels, and the three orthogonal planes.

A near-isotropic volume (`emunet.core.labels.is_near_isotropic`) carries as much detail across slices
as within them, and a 2-D U-Net can use it two ways, both without 3-D convolutions:

- *Context channels*: slice `z` with the `k` slices above and below stacked as `2k + 1` channels, so
  a membrane that is oblique in one slice is seen in its neighbours. At the ends of the stack the
  slices are mirrored without repeating the edge slice (OpenCV's BORDER_REFLECT_101, as the tiles are
  padded in y and x): a repeated edge slice would look like a membrane-free, z-constant region.
- *Orthogonal planes*: the same network predicts the xy, xz and yz planes and the three probability
  volumes are averaged (a 2.5-D ensemble): each voxel is then judged from three directions.
"""

from collections.abc import Callable, Iterator

import numpy as np


def reflect_index(i: int, n: int) -> int:
    """Index `i` mirrored into `0..n-1` without repeating the edge (…, 2, 1, 0, 1, 2, …, n-2, n-1,
    n-2, …): reflected again as often as needed when `i` is more than a stack's length away, and 0
    for a stack of one slice."""
    if n == 1:
        return 0
    period = 2 * (n - 1)
    i %= period
    return period - i if i >= n else i


def context_indices(z: int, k: int, n: int) -> list[int]:
    """The slices that make the context of slice `z` of `n`: `z-k .. z+k` mirrored into the stack."""
    if not 0 <= z < n:
        raise IndexError(f"slice {z} is outside a stack of {n} slices")
    return [reflect_index(i, n) for i in range(z - k, z + k + 1)]


def context_stack(volume, z: int, k: int) -> np.ndarray:
    """Slice `z` of `volume` with its `k` neighbours on each side as channels: `(H, W, 2k + 1)`, channel
    `j` being slice `z - k + j` mirrored at the ends (see `reflect_index`), in the volume's dtype.
    `volume` is a `(Z, H, W)` array or a lazy volume indexed `volume[a:b]` -> `(b - a, H, W)`; the
    slices needed are read in one call."""
    n = volume.shape[0]
    indices = context_indices(z, k, n)
    lo, hi = min(indices), max(indices)
    block = np.asarray(volume[lo:hi + 1])
    return np.stack([block[i - lo] for i in indices], axis=-1)


def iter_context(volume, k: int, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """`(z, context_stack(volume, z, k))` for every slice in order (slices `start .. stop - 1` only, when
    given: their neighbours are still the volume's, so a chunk of a stack gets the context it has inside
    the stack), reading each slice of `volume` once: mirrored neighbours are always within `k` of `z` (a
    reflection never moves an index farther from a slice inside the stack), so a window of the last
    `2k + 1` slices read is enough."""
    n = volume.shape[0]
    stop = n if stop is None else stop
    if not 0 <= start <= stop <= n:
        raise IndexError(f"slices {start}..{stop - 1} are outside a stack of {n} slices")
    cache: dict[int, np.ndarray] = {}
    read = max(0, start - k)  # slices before `read` are not needed (or have been read)
    for z in range(start, stop):
        lo, hi = max(0, z - k), min(n - 1, z + k)
        if hi >= read:
            block = np.asarray(volume[read:hi + 1])
            cache.update({read + j: block[j] for j in range(len(block))})
            read = hi + 1
        for old in [i for i in cache if i < lo]:
            del cache[old]
        yield z, np.stack([cache[i] for i in context_indices(z, k, n)], axis=-1)


# The axes of a `(Z, Y, X)` volume as each stack of planes orders them (plane, row, column): xy planes
# (one per z), xz planes (one per y, z down the rows) and yz planes (one per x, z down the rows).
ORTHO_ORDERS = {0: (0, 1, 2), 1: (1, 0, 2), 2: (2, 0, 1)}


def ortho_views(volume: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three stacks of planes of a `(Z, Y, X)` volume, as views (no copy): xy planes `(Z, Y, X)`,
    xz planes `(Y, Z, X)` (one per y, z down its rows) and yz planes `(X, Z, Y)` (one per x)."""
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"volume has shape {volume.shape}; expected (Z, Y, X)")
    return tuple(volume.transpose(ORTHO_ORDERS[axis]) for axis in range(3))


def fuse_ortho(pred_xy: np.ndarray, pred_xz: np.ndarray, pred_yz: np.ndarray) -> np.ndarray:
    """The mean of the three planes' predictions, `(Z, Y, X)` float32, from the shapes `ortho_views`
    gives: `(Z, Y, X)`, `(Y, Z, X)` and `(X, Z, Y)`."""
    back = np.asarray(pred_xz).transpose(1, 0, 2), np.asarray(pred_yz).transpose(1, 2, 0)
    if not all(b.shape == np.shape(pred_xy) for b in back):
        raise ValueError(f"plane predictions do not fit one volume: xy {np.shape(pred_xy)}, xz "
                         f"{np.shape(pred_xz)}, yz {np.shape(pred_yz)}")
    total = np.asarray(pred_xy, np.float32).copy()
    for b in back:
        total += b
    return total / np.float32(3)


def ortho_predict(predict_planes: Callable[[np.ndarray], np.ndarray], volume: np.ndarray) -> np.ndarray:
    """Probabilities of a `(Z, Y, X)` volume (or a block of one, with its halo) from a plane-wise model
    seen from three directions: `predict_planes(stack)` maps an `(N, A, B)` stack of planes to `(N, A,
    B)` probabilities and is called once per orientation (xy, xz, yz; each stack contiguous); the result
    is their mean, `(Z, Y, X)` float32. The whole volume is in memory: call it on blocks for a large one."""
    predictions = [predict_planes(np.ascontiguousarray(view)) for view in ortho_views(volume)]
    for view, pred in zip(ortho_views(volume), predictions):
        if np.shape(pred) != view.shape:
            raise ValueError(f"predict_planes returned shape {np.shape(pred)} for planes of shape {view.shape}")
    return fuse_ortho(*predictions)
