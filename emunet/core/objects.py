"""Objects in label images: what a user counts. The primitives every part shares, so "an object" means the
same thing in training, evaluation, predict's table, the pyfunc and the viewer.

An object in a slice is a 4-connected component: two cell interiors that touch only at a corner, across a
one-pixel diagonal membrane, stay two cells. Pieces smaller than `min_size` pixels are specks, not
objects. A ground truth given as a mask has one object per component of each slice; given as instance
ids (`label_kind="instances"`), its ids are the objects.
"""

import cv2
import numpy as np


def components(mask: np.ndarray, min_size: int = 0) -> np.ndarray:
    """Objects of one `(H, W)` mask: int32 labels 1..N of its 4-connected components of at least
    `min_size` pixels, 0 elsewhere."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(np.asarray(mask, np.uint8), connectivity=4,
                                                               ltype=cv2.CV_32S)
    keep = np.zeros(count, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_size
    new_ids = np.zeros(count, np.int32)
    new_ids[keep] = np.arange(1, int(keep.sum()) + 1)
    return new_ids[labels]


def sizes(labels: np.ndarray) -> list[int]:
    """Pixel counts of objects 1..N of a label image (ids need not be contiguous: missing ids are skipped)."""
    counts = np.bincount(np.asarray(labels).ravel().astype(np.int64))
    return [int(c) for c in counts[1:] if c > 0]


def drop_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """`labels` with the objects of fewer than `min_size` pixels set to 0, ids renumbered 1..N."""
    labels = np.asarray(labels)
    counts = np.bincount(labels.ravel().astype(np.int64))
    keep = counts >= max(min_size, 1)
    keep[0] = False
    new_ids = np.zeros(len(counts), np.int32)
    new_ids[keep] = np.arange(1, int(keep.sum()) + 1)
    return new_ids[labels]


def truth_objects(truth: np.ndarray, min_size: int = 0, instances: bool = False) -> np.ndarray:
    """The true objects of one `(H, W)` ground-truth slice: its components (a mask, any non-zero value is
    foreground) or, with `instances`, its own ids; specks under `min_size` pixels dropped. int32."""
    if instances:
        return drop_small(truth, min_size)
    return components(np.asarray(truth) != 0, min_size)
