"""The shallow-dip rule shared by the 2-D and 3-D instance steps: neighbouring regions are merged while
the pass between them (the highest of the lower probabilities of two face-neighbouring voxels on their
border) is less than `depth` below the lower of their peaks, highest passes first; a merged region keeps
the higher peak. A dip that shallow is texture inside one cell, not a membrane. Any number of axes."""

import numpy as np


def _passes(labels: np.ndarray, prob: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """`(keys, heights)`: for each pair of neighbouring regions (key `low * (count + 1) + high`), its pass:
    the highest, over face-neighbouring voxel pairs on their border, of the lower probability of the
    two. Any number of dimensions."""
    keys, heights = [], []
    if not labels.size:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    flat, values = np.ascontiguousarray(labels).reshape(-1), np.ascontiguousarray(prob).reshape(-1)
    for axis in range(labels.ndim):
        # Voxel i and its neighbour i + step along the axis, compared over the flat arrays (contiguous: a
        # view of a box's last axis is slow to compare and select from), except where i is the axis' last.
        step = int(np.prod(labels.shape[axis + 1:], dtype=np.int64))
        change = np.zeros(flat.size, bool)
        np.not_equal(flat[:-step], flat[step:], out=change[:-step])
        change.reshape(-1, labels.shape[axis], step)[:, -1] = False
        first = np.flatnonzero(change)  # the few voxels where the label changes: then, between two regions?
        la, lb = flat[first].astype(np.int64), flat[first + step].astype(np.int64)
        border = (la > 0) & (lb > 0)
        if not border.any():
            continue
        first, la, lb = first[border], la[border], lb[border]
        keys.append(np.minimum(la, lb) * (count + 1) + np.maximum(la, lb))
        heights.append(np.minimum(values[first], values[first + step]))
    if not keys:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    keys, heights = np.concatenate(keys), np.concatenate(heights)
    order = np.lexsort((heights, keys))
    keys, heights = keys[order], heights[order]
    last = np.r_[keys[1:] != keys[:-1], True]  # sorted by height within a key: the last is its highest pass
    return keys[last], heights[last]


def merge_roots(labels: np.ndarray, prob: np.ndarray, depth: float) -> np.ndarray | None:
    """The region each id 0..max of `labels` (any dimensions) is merged into by the shallow-dip rule (see
    `merge_shallow`), as a lookup table: `merge_roots(labels, prob, depth)[labels]` is the merged image.
    None when no two regions touch (nothing to merge)."""
    count = int(labels.max(initial=0))
    keys, heights = _passes(labels, prob, count)
    if not keys.size:
        return None
    peak = np.zeros(count + 1, np.float32)
    # 0.15 s on 250^3 (scipy's ndimage.maximum sorts: 6 s); over the regions' voxels only where they are few
    # (the crowded pieces of a slice's box)
    if 4 * np.count_nonzero(labels) < labels.size:
        inside = labels > 0
        np.maximum.at(peak, labels[inside], prob[inside])
    else:
        np.maximum.at(peak, labels.ravel(), prob.ravel())
    root = np.arange(count + 1)

    def find(i: int) -> int:
        while root[i] != i:
            root[i] = root[root[i]]
            i = root[i]
        return i

    for k in np.argsort(-heights, kind="stable"):
        a, b = find(int(keys[k] // (count + 1))), find(int(keys[k] % (count + 1)))
        if a != b and min(peak[a], peak[b]) - heights[k] < depth:
            root[b], peak[a] = a, max(peak[a], peak[b])
    while True:  # every id straight to its root: follow the links all at once until none is left
        parent = root[root]
        if np.array_equal(parent, root):
            return root
        root = parent


def merge_shallow(labels: np.ndarray, prob: np.ndarray, depth: float) -> np.ndarray:
    """`labels` (any dimensions) with face-neighbouring regions merged while the pass between them is
    less than `depth` below the lower of their peaks; highest passes first, a merged region keeps the
    higher peak (the 2-D rule of `emunet.inference.instances`, for any number of axes). Ids stay within
    0..max, gaps allowed."""
    root = merge_roots(labels, prob, depth)
    return labels if root is None else np.take(root, labels)
