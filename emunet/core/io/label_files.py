"""Label volumes against their image: the same shape and voxel grid, finite values, and the stored mask
(`read_mask`); see `emunet.core.io`."""

from collections.abc import Callable
from pathlib import Path

import numpy as np

from emunet.core.errors import InputError
from emunet.core.io.opener import open_volume
from emunet.core.io.volume import NM_PER_UNIT, Volume, _warn, describe_voxel


def check_same_shape(labels: Volume, image_shape: tuple, image_path: str | Path) -> None:
    if tuple(labels.shape) != tuple(image_shape):
        raise InputError(f"{Path(labels.path).name} has shape {tuple(labels.shape)} but {Path(image_path).name} "
                         f"has {tuple(image_shape)}")


VOXEL_TOLERANCE = 0.01  # labels drawn on the image's grid have its voxel size; 1 % covers rounding in headers


def voxel_mismatch(labels: Volume, image: Volume) -> list[str]:
    """Axes ("z", "y", "x") whose size is known in both volumes, in units that compare, and differs by more
    than `VOXEL_TOLERANCE`."""
    if labels.voxel_size is None or image.voxel_size is None:
        return []
    if labels.unit == image.unit:
        factor = 1.0
    elif labels.unit in NM_PER_UNIT and image.unit in NM_PER_UNIT:
        factor = NM_PER_UNIT[labels.unit] / NM_PER_UNIT[image.unit]
    else:
        return []  # one has no unit: nothing to compare
    return [axis for axis, a, b in zip("zyx", labels.voxel_size, image.voxel_size)
            if a is not None and b is not None and abs(a * factor - b) > VOXEL_TOLERANCE * b]


def check_labels(labels: Volume, image: Volume, allow_voxel_mismatch: bool = False) -> None:
    """The checks for every labels/image pair: the same shape, and the same voxel size (within 1 % on every
    axis both know), else `InputError` naming both; with `allow_voxel_mismatch` a different voxel size is a
    warning (labels known to match voxel for voxel despite their header)."""
    check_same_shape(labels, image.shape, image.path)
    axes = voxel_mismatch(labels, image)
    if not axes:
        return
    text = (f"{Path(labels.path).name} has voxel size {describe_voxel(labels.voxel_size, labels.unit)} but "
            f"{Path(image.path).name} has {describe_voxel(image.voxel_size, image.unit)} (z, y, x; "
            f"{', '.join(axes)} differ by more than {VOXEL_TOLERANCE:.0%})")
    if not allow_voxel_mismatch:
        raise InputError(f"{text}; resample the labels to the image's grid, or pass allow_voxel_mismatch=true "
                         f"if they match voxel for voxel")
    _warn(f"{text}; accepted (allow_voxel_mismatch)")


def nonfinite(array) -> int:
    """How many values of `array` are NaN or infinite (0 for integers)."""
    array = np.asarray(array)
    return int(array.size - np.count_nonzero(np.isfinite(array))) if array.dtype.kind in "fc" else 0


def check_finite_labels(page, path, z: int) -> None:
    """For labels read lazily, slice by slice: `InputError` naming the slice and the count of NaN or
    infinite values (a label is a class or an object id: there is no such one)."""
    count = nonfinite(page)
    if count:
        raise InputError(f"{path}: slice {z} of the labels holds {count} NaN or infinite value(s); labels must be "
                         f"finite numbers (0 background): fix or export the label file again")


def read_label_slices(labels: Volume, convert: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Every slice of `labels` through `convert` (e.g. `!= 0`), stacked; `InputError` giving the total
    count of NaN or infinite values when there are any."""
    out, bad, first = [], 0, None
    for z in range(labels.shape[0]):
        page = np.asarray(labels[z])
        count = nonfinite(page)
        if count:
            bad, first = bad + count, z if first is None else first
        out.append(convert(page))
    if bad:
        raise InputError(f"{labels.path}: the labels hold {bad} NaN or infinite value(s) (the first in slice "
                         f"{first}); labels must be finite numbers (0 background): fix or export the label file "
                         f"again")
    return np.stack(out)


def read_mask(path: str | Path, image, image_path: str | Path | None = None, allow_voxel_mismatch: bool = False,
              **options) -> np.ndarray:
    """Read a label stack for `image` (its `Volume`, or only its shape with `image_path`) and binarise it: any
    non-zero value is foreground. `options` are `open_volume`'s (give the labels the image's `level`,
    `region`).

    Returns `(Z, H, W)` uint8 in {0, 1}. Raises `InputError` if the shapes (or, given a `Volume`, the voxel
    sizes: `check_labels`) differ, a label is NaN or infinite, or nothing is foreground."""
    with open_volume(path, **options) as labels:
        if isinstance(image, Volume):
            check_labels(labels, image, allow_voxel_mismatch)
        else:
            check_same_shape(labels, image, image_path)
        mask = read_label_slices(labels, lambda page: page != 0).astype(np.uint8)
    if not mask.any():
        raise InputError(f"{path}: the label stack is all background (no non-zero pixel)")
    return mask
