"""Objects from a binary mask: the cells the user counts, one meaning of "object" everywhere.

An object in one slice is an 8-connected foreground component of at least `min_size` pixels; smaller
pieces are specks, not cells. `output=labels` links the objects of consecutive slices that touch (share
a pixel position, face to face in z) into one 3-D object, so a 3-D object seen in one slice is exactly
the objects the per-slice table lists there: the table and the label image count the same things.
"""

import cv2
import numpy as np
from scipy import ndimage

# In-plane 8-connectivity, and face connectivity across slices.
LINK_3D = np.zeros((3, 3, 3), bool)
LINK_3D[1] = True
LINK_3D[0, 1, 1] = LINK_3D[2, 1, 1] = True


def slice_objects(mask: np.ndarray, min_size: int) -> tuple[np.ndarray, list[int]]:
    """Objects of one `(H, W)` mask: `(labels, areas)`, labels int32 with ids 1..N (0 background) for the
    8-connected components of at least `min_size` pixels, and their areas in pixels."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(np.asarray(mask, np.uint8), connectivity=8,
                                                               ltype=cv2.CV_32S)
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.zeros(count, bool)
    keep[1:] = areas >= min_size
    new_ids = np.zeros(count, np.int32)
    new_ids[keep] = np.arange(1, int(keep.sum()) + 1)
    return new_ids[labels], [int(a) for a in areas[keep[1:]]]


def object_areas(mask: np.ndarray, min_size: int) -> list[int]:
    """Areas in pixels of the objects of one `(H, W)` mask (see `slice_objects`)."""
    return slice_objects(mask, min_size)[1]


def label_objects(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Instance labels of a `(Z, H, W)` mask: the objects of each slice (`slice_objects`, so pieces under
    `min_size` pixels in a slice are dropped) linked through consecutive slices into 3-D objects, ids
    1..N in scan order. Returns `(Z, H, W)` int32."""
    kept = np.stack([slice_objects(m, min_size)[0] > 0 for m in np.asarray(mask)])
    labels, _ = ndimage.label(kept, structure=LINK_3D)
    return labels.astype(np.int32)
