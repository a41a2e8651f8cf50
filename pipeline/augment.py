"""Random training patches: a crop at any rotation angle, with flips, read straight from a (memory-mapped)
stack. One affine warp per patch computes only the crop's pixels, so the cost does not grow with the slice."""

import cv2
import numpy as np

from pipeline.normalize import normalize

# dtypes that OpenCV warps directly; others are converted to float32 first.
WARPABLE = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))


def patch_transform(rng: np.random.Generator, slice_shape: tuple[int, int], crop: int) -> np.ndarray:
    """2x3 affine matrix mapping crop pixel coordinates to slice coordinates: random centre, random
    rotation by any angle, random horizontal / vertical flip."""
    h, w = slice_shape
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    angle = rng.uniform(0, 2 * np.pi)
    flip_x, flip_y = rng.choice([-1.0, 1.0], size=2)
    c, s = np.cos(angle), np.sin(angle)
    linear = np.array([[c, -s], [s, c]]) @ np.diag([flip_x, flip_y])
    half = (crop - 1) / 2
    offset = np.array([cx, cy]) - linear @ np.array([half, half])
    return np.hstack([linear, offset[:, None]]).astype(np.float32)


def random_patch(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, crop: int,
                 low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
    """One augmented patch from a `(Z, H, W)` stack and its `(Z, H, W)` {0, 1} mask.

    Returns `(crop, crop)` float32 image in [0, 1] (normalised with the stack's `low`, `high`) and
    `(crop, crop)` uint8 mask. Pixels rotated in from outside the slice are mirrored, never black; the
    mask uses nearest-neighbour sampling so it stays binary.
    """
    z = int(rng.integers(image.shape[0]))
    matrix = patch_transform(rng, image.shape[1:], crop)
    flags = cv2.WARP_INVERSE_MAP
    source = image[z]
    if source.dtype not in WARPABLE:
        source = source.astype(np.float32)
    # Warp raw values and normalise only the crop: a 2048 x 2048 slice is never scaled as a whole.
    patch = cv2.warpAffine(np.ascontiguousarray(source), matrix, (crop, crop), flags=flags | cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REFLECT_101)
    target = cv2.warpAffine(np.ascontiguousarray(mask[z]), matrix, (crop, crop),
                            flags=flags | cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT_101)
    return normalize(patch, low, high), target
