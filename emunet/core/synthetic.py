"""The embedded default data: synthetic EM-like tomographic samples, made here, no download.

Each sample is a `(Z, H, W)` uint8 stack of densely packed cells that are 3-D objects spanning
consecutive slices: textured cytoplasm, dark membranes between cells, a little extracellular space,
organelles inside cells (mitochondria with cristae, vesicles, some nuclei with a dark envelope), then
blur, noise and a per-stack intensity drift. The mask marks cell interiors (membranes excluded, as in
ISBI 2012), so touching cells stay separate objects. Deterministic in `(seed, index)`.
"""

import os
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
from scipy import ndimage

# Intensities in [0, 1] before drift and noise, read off ssTEM sections: pale cytoplasm, darker organelles,
# near-black membranes.
CYTOPLASM = (0.55, 0.72)
EXTRACELLULAR = 0.82
MEMBRANE = 0.18
MITOCHONDRION = 0.28
NUCLEUS = 0.48


def _smooth_noise(rng: np.random.Generator, shape: tuple, sigma: tuple[float, float]) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-filtered white noise, `sigma = (along z, in plane)`: the basis of
    every texture and deformation. In-plane blur by OpenCV per slice, which is several times faster
    than a 3-D scipy filter at these sizes."""
    field = rng.standard_normal(shape, dtype=np.float32)
    for z in range(shape[0]):
        field[z] = cv2.GaussianBlur(field[z], (0, 0), sigma[1], borderType=cv2.BORDER_REFLECT)
    field = ndimage.gaussian_filter1d(field, sigma[0], axis=0, mode="reflect")
    return (field - field.mean()) / (field.std() + 1e-6)


def _ellipsoid_distance(shape, centre, radii, angle, bbox_scale=1.3):
    """Normalised distance (< 1 inside) of an in-plane rotated ellipsoid, on its bounding box only.

    Returns `(slices, distance)`; `slices` index the stack, or `None` if the box misses it."""
    z, y, x = centre
    rz, ry, rx = radii
    reach = bbox_scale * max(ry, rx)
    lo = np.floor([z - bbox_scale * rz, y - reach, x - reach]).astype(int)
    hi = np.ceil([z + bbox_scale * rz, y + reach, x + reach]).astype(int) + 1
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, shape)
    if np.any(hi <= lo):
        return None, None
    zz, yy, xx = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    dy, dx = yy - y, xx - x
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    dist = np.sqrt(((zz - z) / rz) ** 2 + (u / rx) ** 2 + (v / ry) ** 2)
    return tuple(slice(a, b) for a, b in zip(lo, hi)), dist


def _cells(rng, shape, deform):
    """Label volume of densely packed, irregular cells (0 = extracellular space)."""
    z_size, h, w = shape
    labels = np.zeros(shape, np.int32)
    best = np.full(shape, np.inf, np.float32)
    n_cells = int(h * w / 700)
    for label in range(1, n_cells + 1):
        centre = (rng.uniform(-4, z_size + 4), rng.uniform(0, h), rng.uniform(0, w))
        radii = (rng.uniform(6, 14), rng.uniform(14, 30), rng.uniform(16, 36))
        box, dist = _ellipsoid_distance(shape, centre, radii, rng.uniform(0, np.pi))
        if box is None:
            continue
        dist = dist * (1 + 0.18 * deform[box])
        # Each voxel goes to the cell it is deepest inside: neighbours touch along a shared wall.
        take = (dist < 1.0) & (dist < best[box])
        best[box] = np.where(take, dist, best[box])
        labels[box] = np.where(take, label, labels[box])
    return labels


def _membranes(labels: np.ndarray, width: int) -> np.ndarray:
    """In-plane boundaries of every cell, `width` pixels thick, as seen in each section."""
    edge = np.zeros(labels.shape, bool)
    edge[:, 1:, :] |= labels[:, 1:, :] != labels[:, :-1, :]
    edge[:, :, 1:] |= labels[:, :, 1:] != labels[:, :, :-1]
    return ndimage.binary_dilation(edge, structure=np.ones((1, width, width), bool))


def _organelles(rng, labels, interior, image):
    """Paint mitochondria (dark, striped by cristae), nuclei (grainy, dark envelope) and vesicles."""
    shape = labels.shape
    for label, cell_box in enumerate(ndimage.find_objects(labels), start=1):
        if cell_box is None:
            continue
        own = labels[cell_box] == label
        zz, yy, xx = np.nonzero(own)
        if zz.size < 2000:
            continue
        origin = [s.start for s in cell_box]
        zz, yy, xx = zz + origin[0], yy + origin[1], xx + origin[2]
        inside = np.zeros(shape, bool)
        inside[cell_box] = own & interior[cell_box]
        if rng.random() < 0.25:  # a nucleus in about a quarter of the cells
            i = rng.integers(zz.size)
            box, dist = _ellipsoid_distance(shape, (zz[i], yy[i], xx[i]), (5, 11, 13), rng.uniform(0, np.pi))
            if box is not None:
                core = (dist < 1) & inside[box]
                envelope = (dist >= 0.85) & core
                image[box][core] = NUCLEUS + 0.06 * rng.standard_normal(np.count_nonzero(core))
                image[box][envelope] = MEMBRANE + 0.12
        for _ in range(rng.integers(1, 4)):  # mitochondria
            i = rng.integers(zz.size)
            angle = rng.uniform(0, np.pi)
            radii = (rng.uniform(2, 4), rng.uniform(4, 6), rng.uniform(7, 13))
            box, dist = _ellipsoid_distance(shape, (zz[i], yy[i], xx[i]), radii, angle)
            if box is None:
                continue
            body = (dist < 1) & inside[box]
            _, yb, xb = np.ogrid[box]
            cristae = 0.5 + 0.5 * np.cos(2.2 * (np.cos(angle) * xb + np.sin(angle) * yb))
            tone = MITOCHONDRION + 0.12 * cristae * (dist < 0.75)
            image[box] = np.where(body, np.broadcast_to(tone, body.shape), image[box])
        for _ in range(rng.integers(2, 8)):  # vesicles: small dark rings
            i = rng.integers(zz.size)
            r = rng.uniform(1.8, 3.2)
            box, dist = _ellipsoid_distance(shape, (zz[i], yy[i], xx[i]), (1.5, r, r), 0.0)
            if box is not None:
                ring = (dist > 0.6) & (dist < 1) & inside[box]
                image[box][ring] = MEMBRANE + 0.2


def synthetic_stack(seed: int, index: int, shape: tuple[int, int, int] = (24, 256, 256),
                    with_ids: bool = False) -> tuple[np.ndarray, ...]:
    """One synthetic EM sample.

    Returns `(image, mask)`: `(Z, H, W)` uint8 image and `(Z, H, W)` uint8 mask in {0, 1} (cell interiors);
    with `with_ids` also the cells' instance ids `(Z, H, W)` uint32 (each 3-D cell one id on its interior,
    0 elsewhere). The same `(seed, index, shape)` always gives the same arrays.
    """
    rng = np.random.default_rng([seed, index])
    deform = _smooth_noise(rng, shape, (3, 8))
    labels = _cells(rng, shape, deform)
    membrane = _membranes(labels, width=int(rng.integers(2, 4)))
    interior = (labels > 0) & ~membrane

    # Each cell gets its own shade; cytoplasm is grainy at two scales.
    shades = rng.uniform(*CYTOPLASM, size=labels.max() + 1).astype(np.float32)
    image = shades[labels]
    image += 0.05 * _smooth_noise(rng, shape, (0.5, 1.2)) + 0.04 * _smooth_noise(rng, shape, (1, 4))
    outside = labels == 0
    image[outside] = EXTRACELLULAR + 0.05 * _smooth_noise(rng, shape, (1, 2))[outside]
    _organelles(rng, labels, interior, image)
    image[membrane] = MEMBRANE + 0.05 * rng.standard_normal(np.count_nonzero(membrane))

    # Optics and detector: blur, then a per-stack gain/offset drifting along z plus uneven illumination,
    # then shot-like noise.
    for z in range(shape[0]):
        image[z] = cv2.GaussianBlur(image[z], (0, 0), 1.0)
    z = np.linspace(-1, 1, shape[0], dtype=np.float32)[:, None, None]
    gain = rng.uniform(0.75, 1.15) * (1 + rng.uniform(-0.12, 0.12) * z)
    offset = rng.uniform(-0.08, 0.1) + rng.uniform(-0.05, 0.05) * z
    yy, xx = np.mgrid[-1:1:shape[1] * 1j, -1:1:shape[2] * 1j].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    illumination = 1 + rng.uniform(0, 0.15) * (np.cos(angle) * xx + np.sin(angle) * yy)
    image = image * gain * illumination + offset
    image += rng.uniform(0.03, 0.07) * rng.standard_normal(shape, dtype=np.float32)
    image = np.clip(image * 255, 0, 255).astype(np.uint8)
    if with_ids:
        return image, interior.astype(np.uint8), np.where(interior, labels, 0).astype(np.uint32)
    return image, interior.astype(np.uint8)


def synthetic_dataset(seed: int = 0, n_stacks: int = 9, shape: tuple[int, int, int] = (24, 256, 256)):
    """`n_stacks` synthetic samples as a list of `(name, image, mask, ids)`, like the original study's nine
    (`ids`: the cells' instance ids, see `synthetic_stack`).

    Stacks are made in parallel threads (NumPy, SciPy and OpenCV release the GIL on whole arrays); each
    is seeded by its index, so the result does not depend on the number of threads."""
    with ThreadPoolExecutor(min(n_stacks, os.cpu_count() or 1)) as pool:
        stacks = list(pool.map(synthetic_stack, [seed] * n_stacks, range(n_stacks), [shape] * n_stacks,
                               [True] * n_stacks))
    return [(f"synthetic_{i:02d}", image, mask, ids) for i, (image, mask, ids) in enumerate(stacks)]
