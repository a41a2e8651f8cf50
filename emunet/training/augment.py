"""Random training patches for EM: a crop at any rotation angle and scale, flipped, elastically deformed,
with brightness / contrast / gamma, blur and noise, read straight from a (memory-mapped) stack.

Geometry is one `cv2.remap` per patch: the crop's pixel coordinates are mapped (rotation, flip, scale,
a smooth random displacement field) into the slice, so only the crop's pixels are computed and the cost
does not grow with the slice. The mask is sampled with nearest neighbour, so it stays binary. Any
rotation angle combined with a flip covers the transposes too (a transpose is a flip and a 90° turn).
"""

from dataclasses import dataclass

import cv2
import numpy as np

from emunet.core.dataset import MASK_IGNORE
from emunet.core.normalize import normalize
from emunet.inference.context import ORTHO_ORDERS, context_indices

# dtypes that OpenCV remaps directly; others are converted to float32 first.
WARPABLE = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))


@dataclass(frozen=True)
class AugmentSpec:
    """Probabilities and strengths of each augmentation (0 disables it)."""

    rotate: bool = True  # any angle: EM sections have no preferred orientation
    flip: bool = True
    scale: float = 0.2  # zoom by a factor in [1 / (1 + s), 1 + s]: magnifications differ between microscopes
    elastic: float = 0.3  # share of patches deformed by a smooth random field (nnU-Net uses 0.2-0.3)
    elastic_pixels: float = 6.0  # largest displacement, in crop pixels: bent membranes, not torn ones
    intensity: float = 0.8  # share with random brightness (±0.1), contrast (×0.75-1.25) and gamma (0.75-1.33)
    blur: float = 0.2  # share blurred with sigma 0.5-1.2 px: defocus
    noise: float = 0.2  # share with Gaussian noise of sigma up to 0.05: shot noise at low dose
    foreground: float = 0.33  # share of crops centred on a foreground pixel (nnU-Net's oversampling)


# Named augmentation sets. "basic" is the original study's (random rotation and crops, flips).
AUGMENTATIONS = {
    "em": AugmentSpec(),
    "basic": AugmentSpec(scale=0.0, elastic=0.0, intensity=0.0, blur=0.0, noise=0.0, foreground=0.0),
    "none": AugmentSpec(rotate=False, flip=False, scale=0.0, elastic=0.0, intensity=0.0, blur=0.0, noise=0.0,
                        foreground=0.0),
}


def patch_transform(rng: np.random.Generator, centre: tuple[float, float], crop: int,
                    spec: AugmentSpec = AugmentSpec()) -> np.ndarray:
    """2x3 affine matrix mapping crop pixel coordinates `(x, y)` to slice coordinates: the crop's centre
    lands on `centre` (y, x), rotated by a random angle, flipped and scaled at random per `spec`."""
    angle = rng.uniform(0, 2 * np.pi) if spec.rotate else 0.0
    flip_x, flip_y = rng.choice([-1.0, 1.0], size=2) if spec.flip else (1.0, 1.0)
    zoom = np.exp(rng.uniform(-1, 1) * np.log1p(spec.scale))
    c, s = np.cos(angle), np.sin(angle)
    linear = zoom * np.array([[c, -s], [s, c]]) @ np.diag([flip_x, flip_y])
    half = (crop - 1) / 2
    offset = np.array([centre[1], centre[0]]) - linear @ np.array([half, half])
    return np.hstack([linear, offset[:, None]]).astype(np.float32)


def displacement(rng: np.random.Generator, crop: int, pixels: float) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random `(crop, crop)` displacement field (dx, dy), at most about `pixels` long: random
    vectors on a coarse 5 x 5 grid, interpolated bicubically (Simard et al. 2003, without the big blur)."""
    coarse = rng.normal(0, pixels / 2, (2, 5, 5)).astype(np.float32)
    coarse = np.clip(coarse, -pixels, pixels)
    return tuple(cv2.resize(c, (crop, crop), interpolation=cv2.INTER_CUBIC) for c in coarse)


def sample_maps(rng: np.random.Generator, centre: tuple[float, float], crop: int,
                spec: AugmentSpec) -> tuple[np.ndarray, np.ndarray]:
    """`cv2.remap` maps: for each crop pixel, the slice coordinate it samples."""
    matrix = patch_transform(rng, centre, crop, spec)
    ys, xs = np.mgrid[0:crop, 0:crop].astype(np.float32)
    if spec.elastic and rng.random() < spec.elastic:
        dx, dy = displacement(rng, crop, spec.elastic_pixels)
        xs, ys = xs + dx, ys + dy
    map_x = matrix[0, 0] * xs + matrix[0, 1] * ys + matrix[0, 2]
    map_y = matrix[1, 0] * xs + matrix[1, 1] * ys + matrix[1, 2]
    return map_x, map_y


def intensity_jitter(rng: np.random.Generator, patch: np.ndarray, spec: AugmentSpec) -> np.ndarray:
    """Brightness, contrast, gamma, blur and noise on a `[0, 1]` float32 `(h, w)` or `(h, w, c)` patch;
    returns `[0, 1]` float32 of the same shape. The same draw applies to every channel (context slices
    come from one microscope session), the noise is drawn per pixel of each."""
    if spec.intensity and rng.random() < spec.intensity:
        contrast, brightness = rng.uniform(0.75, 1.25), rng.uniform(-0.1, 0.1)
        patch = np.clip((patch - 0.5) * contrast + 0.5 + brightness, 0, 1)
        patch = patch ** np.float32(np.exp(rng.uniform(-0.29, 0.29)))
    if spec.blur and rng.random() < spec.blur:
        sigma = rng.uniform(0.5, 1.2)
        # channel by channel: OpenCV's filters take at most 4 channels
        planes = patch[..., None] if patch.ndim == 2 else patch
        blurred = [cv2.GaussianBlur(np.ascontiguousarray(planes[..., c]), (0, 0), sigma,
                                    borderType=cv2.BORDER_REFLECT_101) for c in range(planes.shape[-1])]
        patch = blurred[0] if patch.ndim == 2 else np.stack(blurred, axis=-1)
    if spec.noise and rng.random() < spec.noise:
        patch = patch + rng.normal(0, rng.uniform(0, 0.05), patch.shape).astype(np.float32)
    return np.clip(patch, 0, 1).astype(np.float32)


def random_patch(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, crop: int,
                 low: float, high: float, spec: AugmentSpec = AugmentSpec(),
                 foreground_points: np.ndarray | None = None, slices: np.ndarray | None = None,
                 at: tuple[int, int, int] | None = None, context: int = 0, axis: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """One augmented patch from a `(Z, H, W)` stack and its `(Z, H, W)` mask ({0, 1}, and `MASK_IGNORE`
    where not annotated).

    Returns `(crop, crop)` float32 image in [0, 1] (normalised with the stack's `low`, `high`) and
    `(crop, crop)` uint8 mask of slice z; with `context` k > 0 the image is `(crop, crop, 2k + 1)`: the
    same crop (one geometric and one intensity transform) of slices z-k .. z+k, mirrored at the stack's
    ends (`emunet.inference.context`), the mask still slice z's.

    `foreground_points`: `(N, 3)` (z, y, x) foreground voxels; a share `spec.foreground` of crops is
    centred on one of them. Other crops come from a random slice, one of `slices` if given (sparse
    labels: the annotated ones), or are centred on voxel `at` (z, y, x) if given.
    Pixels mapped from outside the slice are mirrored, never black.

    `axis` 1 or 2 crops an xz or yz plane instead (ortho-plane training of near-isotropic volumes: the
    stack is seen as `emunet.inference.context.ORTHO_ORDERS[axis]` orders it, and `context` is then the
    neighbouring planes along that axis); `foreground_points` and `at` stay (z, y, x); `slices` only
    applies to xy planes.
    """
    if axis:
        order = ORTHO_ORDERS[axis]
        image, mask = image.transpose(order), mask.transpose(order)  # views: a memmap stays a memmap
        foreground_points = None if foreground_points is None else foreground_points[:, order]
        at = None if at is None else tuple(at[i] for i in order)
        slices = None
    z_size, h, w = image.shape
    if at is not None:
        z, centre = int(at[0]), (float(at[1]), float(at[2]))
    elif spec.foreground and foreground_points is not None and len(foreground_points) and \
            rng.random() < spec.foreground:
        z, y, x = foreground_points[rng.integers(len(foreground_points))]
        z, centre = int(z), (float(y), float(x))
    else:
        z = int(rng.integers(z_size)) if slices is None else int(slices[rng.integers(len(slices))])
        centre = (rng.uniform(0, h), rng.uniform(0, w))
    map_x, map_y = sample_maps(rng, centre, crop, spec)
    planes = []
    for i in context_indices(z, context, z_size) if context else (z,):
        source = image[i]
        if source.dtype not in WARPABLE:
            source = source.astype(np.float32)
        # Remap raw values and normalise only the crop: a 2048 x 2048 slice is never scaled as a whole.
        planes.append(cv2.remap(np.ascontiguousarray(source), map_x, map_y, cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_REFLECT_101))
    patch = np.stack(planes, axis=-1) if context else planes[0]
    target = cv2.remap(np.ascontiguousarray(mask[z]), map_x, map_y, cv2.INTER_NEAREST,
                       borderMode=cv2.BORDER_REFLECT_101)
    return intensity_jitter(rng, normalize(patch, low, high), spec), target


def foreground_points(mask: np.ndarray, limit: int = 100_000) -> np.ndarray:
    """Up to `limit` foreground voxels `(N, 3)` int32 (z, y, x) of a `(Z, H, W)` mask, evenly thinned,
    read slice by slice (the mask may be memory-mapped). Deterministic: every worker gets the same."""
    per_slice = max(1, limit // max(1, mask.shape[0]))
    points = []
    for z in range(mask.shape[0]):
        m = np.asarray(mask[z])
        ys, xs = np.nonzero((m != 0) & (m != MASK_IGNORE))
        step = max(1, len(ys) // per_slice)
        points.append(np.stack([np.full(len(ys[::step]), z), ys[::step], xs[::step]], axis=1))
    return np.concatenate(points).astype(np.int32) if points else np.zeros((0, 3), np.int32)


def annotated_slices(mask: np.ndarray) -> np.ndarray:
    """Indices (int32) of the slices of a `(Z, H, W)` mask with at least one annotated voxel (not
    `MASK_IGNORE`), read slice by slice (the mask may be memory-mapped)."""
    return np.array([z for z in range(mask.shape[0]) if np.any(np.asarray(mask[z]) != MASK_IGNORE)], np.int32)


def annotated_voxel(rng: np.random.Generator, mask: np.ndarray, slices: np.ndarray) -> tuple[int, int, int]:
    """A random annotated voxel `(z, y, x)` of one of `slices` (which must have one, `annotated_slices`)."""
    z = int(slices[rng.integers(len(slices))])
    ys, xs = np.nonzero(np.asarray(mask[z]) != MASK_IGNORE)
    i = rng.integers(len(ys))
    return z, int(ys[i]), int(xs[i])
