"""Objects in label images: what a user counts. The primitives every part shares, so "an object" means the
same thing in training, evaluation, predict's table, the pyfunc and the viewer.

An object in a slice is a 4-connected component: two cell interiors that touch only at a corner, across a
one-pixel diagonal membrane, stay two cells. Pieces smaller than `min_size` pixels are specks, not
objects. A ground truth given as a mask has one object per component of each slice; given as instance
ids (`label_kind="instances"`), its ids are the objects.
"""

import warnings

import cv2
import numpy as np


def components(mask: np.ndarray, min_size: int = 0) -> np.ndarray:
    """Objects of one `(H, W)` mask: int32 labels 1..N of its 4-connected components of at least
    `min_size` pixels, 0 elsewhere."""
    count, labels = cv2.connectedComponents(np.asarray(mask, np.uint8), connectivity=4, ltype=cv2.CV_32S)
    if min_size <= 1:  # every component has a pixel: cv2's labels are the answer
        return labels
    # Sizes from the components' pixels only (cv2's statistics, or counting the background too, take
    # several times as long on a sparse slice).
    keep = np.bincount(labels[labels > 0], minlength=count) >= min_size
    if keep[1:].all():
        return labels
    keep[0] = False
    new_ids = np.zeros(count, np.int32)
    new_ids[keep] = np.arange(1, int(keep.sum()) + 1)
    return np.take(new_ids, labels)


def sizes(labels: np.ndarray) -> list[int]:
    """Pixel counts of objects 1..N of a label image (ids need not be contiguous: missing ids are skipped)."""
    labels = np.asarray(labels)
    if 4 * np.count_nonzero(labels) < labels.size:  # mostly background: counted over the objects' pixels
        labels = labels[labels != 0]
    counts = np.bincount(labels.ravel().astype(np.int64, copy=False))
    return [int(c) for c in counts[1:] if c > 0]


def drop_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """`labels` with the objects of fewer than `min_size` pixels set to 0, ids renumbered 1..N."""
    labels = np.asarray(labels)
    counts = np.bincount(labels.ravel().astype(np.int64))
    keep = counts >= max(min_size, 1)
    keep[0] = False
    new_ids = np.zeros(len(counts), np.int32)
    new_ids[keep] = np.arange(1, int(keep.sum()) + 1)
    return np.take(new_ids, labels)  # half the time of new_ids[labels]


def truth_objects(truth: np.ndarray, min_size: int = 0, instances: bool = False) -> np.ndarray:
    """The true objects of one `(H, W)` ground-truth slice: its components (a mask, any non-zero value is
    foreground) or, with `instances`, its own ids; specks under `min_size` pixels dropped. int32."""
    if instances:
        return drop_small(truth, min_size)
    return components(np.asarray(truth) != 0, min_size)


MEASURE_COLUMNS = ["id", "voxels", "first_slice", "last_slice", "centroid_z", "centroid_y", "centroid_x",
                   "volume", "z", "y", "x", "unit"]


def unknown_axes_note(voxel_size) -> str | None:
    """Why the physical columns of a partly calibrated table are empty (None when nothing is missing or
    nothing is known: an uncalibrated table is empty for an obvious reason)."""
    if voxel_size is None or all(s is not None for s in voxel_size) or all(s is None for s in voxel_size):
        return None
    missing = [a for a, s in zip("zyx", voxel_size) if s is None]
    return (f"instances table: the input does not give the voxel size along {', '.join(missing)}: `volume` and "
            f"the {', '.join(missing)} centroid are left empty (pass voxel_size=z,y,x to give it)")


# Per id of an `(H, W)` slice of ids: its pixels and the sums of their rows and of their columns, from one
# bincount each. The sums are of integers below 2**53, exact in float64 in any order.

def _sparse_sums(ids: np.ndarray, n: int) -> tuple:
    """Over the objects' pixels only (most of the slice is background), found by flat index (np.nonzero
    takes three times as long)."""
    where = np.flatnonzero(ids)
    values = ids.reshape(-1)[where].astype(np.int64)
    ys, xs = np.divmod(where, ids.shape[1])
    return (np.bincount(values, minlength=n), np.bincount(values, ys, minlength=n),
            np.bincount(values, xs, minlength=n))


def _dense_sums(ids: np.ndarray, n: int, rows: int = 64) -> tuple:
    """Over every pixel (the objects are most of the slice: selecting their pixels would cost more), the
    background's left out; the rows and columns given as weights a band of `rows` rows at a time (a
    few MB)."""
    flat = ids.reshape(-1).astype(np.int64, copy=False)
    voxels, sum_y, sum_x = np.bincount(flat, minlength=n), np.zeros(n), np.zeros(n)
    height, width = ids.shape
    columns = np.tile(np.arange(width, dtype=np.float64), min(rows, height))
    for top in range(0, height, rows):
        band = flat[top * width:min(top + rows, height) * width]
        sum_y += np.bincount(band, np.repeat(np.arange(top, top + len(band) // width, dtype=np.float64), width),
                             minlength=n)
        sum_x += np.bincount(band, columns[:len(band)], minlength=n)
    voxels[0], sum_y[0], sum_x[0] = 0, 0, 0  # the background
    return voxels, sum_y, sum_x


class ObjectMeasures:
    """Size and centroid of every object of a `(Z, H, W)` instance label volume (ids followed through the
    slices), added one slice at a time so that the volume never sits in memory: `add(z, ids)` per slice,
    then `rows()`. With `voxel_size` (z, y, x; an axis may be None, unknown), rows also give the volume in
    `unit` cubed (all three known) and the centroid in `unit` along each known axis (physical coordinates
    of voxel centres, from the volume's origin); what is unknown is left empty, with one warning per
    process saying why (`unknown_axes_note`)."""

    def __init__(self, voxel_size=None, unit: str | None = None):
        self.voxel_size, self.unit = voxel_size, unit
        self.sums = np.zeros((0, 4))  # per id: voxels, sum of z, y, x
        self.first = np.zeros(0, np.int64)
        self.last = np.zeros(0, np.int64)

    def _grow(self, n: int) -> None:
        if n > len(self.sums):
            extra = max(n, 2 * len(self.sums)) - len(self.sums)
            self.sums = np.concatenate([self.sums, np.zeros((extra, 4))])
            self.first = np.concatenate([self.first, np.full(extra, -1, np.int64)])
            self.last = np.concatenate([self.last, np.full(extra, -1, np.int64)])

    def add(self, z: int, ids: np.ndarray) -> None:
        ids = np.asarray(ids)
        count = np.count_nonzero(ids)
        if not count:
            return
        n = int(ids.max()) + 1
        voxels, sum_y, sum_x = (_dense_sums if 4 * count >= ids.size else _sparse_sums)(ids, n)
        self._grow(n)
        present = voxels > 0
        self.sums[:n, 0] += voxels
        self.sums[:n, 1] += voxels * z
        self.sums[:n, 2] += sum_y
        self.sums[:n, 3] += sum_x
        unseen = present & (self.first[:n] < 0)
        self.first[:n][unseen] = z
        self.last[:n][present] = z

    def rows(self) -> list[list]:
        """`MEASURE_COLUMNS` rows, one per object by id: voxel count, slices, centroid in voxels and, when
        calibrated, volume and centroid in physical units (else those are empty)."""
        out = []
        sizes = [None] * 3 if self.voxel_size is None else [None if s is None else float(s) for s in self.voxel_size]
        for i in np.flatnonzero(self.sums[:, 0] > 0):
            if i == 0:
                continue
            voxels = self.sums[i, 0]
            centre = self.sums[i, 1:] / voxels
            row = [int(i), int(voxels), int(self.first[i]), int(self.last[i]), *(round(float(c), 2) for c in centre)]
            if any(s is not None for s in sizes):
                volume = float(f"{voxels * np.prod(sizes):.6g}") if all(s is not None for s in sizes) else ""
                row += [volume, *("" if s is None else float(f"{c * s:.6g}") for c, s in zip(centre, sizes)),
                        self.unit or ""]
            else:
                row += ["", "", "", "", ""]
            out.append(row)
        note = unknown_axes_note(self.voxel_size)
        if out and note:
            warnings.warn(note, UserWarning, stacklevel=2)
        return out
