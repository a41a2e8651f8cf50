"""Ortho-plane inference: a plane-wise network asked about the xy, xz and yz planes of a volume, the three
probabilities averaged (`emunet.inference.context.fuse_ortho`), chunk by chunk in z.

A near-isotropic volume looks alike from every side, and a network trained on all three orientations
(`planes=ortho` in training) sees a membrane that runs along the slices, invisible edge-on in xy, face-on
in xz or yz (empanada's MitoNet predicts and fuses the three planes the same way). The xz and yz planes
of a chunk of slices run through the chunk and its `halo` slices on each side, so rows near a chunk's
edge still have the network's context; a volume that fits the memory budget is one chunk.
"""

from collections.abc import Callable, Iterator

import numpy as np

from emunet.core.io import available_memory
from emunet.inference.context import ORTHO_ORDERS
from emunet.inference.tiling import iter_probabilities, predict_probabilities

# Slices read on each side of a chunk for its xz and yz planes: half a tile of the default network's
# field; rows nearer a chunk's edge than this would see a mirrored edge instead of the volume.
ORTHO_HALO = 32
# A chunk of slices holds its raw block, the running sum and one plane stack's probabilities (float32)
# and the tiler's temporaries: about this many bytes per voxel read.
ORTHO_BYTES_PER_VOXEL = 16
# Fewer slices than this have no xz or yz planes worth the name (a plane a few rows high is mostly padding).
MIN_ORTHO_SLICES = 8


def ortho_chunk(shape, halo: int = ORTHO_HALO, budget: int | None = None) -> int:
    """Slices per chunk: as many as fit a quarter of the memory available (or `budget` bytes) with their
    halo, at least one; the whole volume when it fits."""
    z, h, w = shape
    budget = available_memory() // 4 if budget is None else budget
    fits = int(budget // (ORTHO_BYTES_PER_VOXEL * h * w)) - 2 * halo
    return max(1, min(z, fits))


def ortho_probabilities(predict: Callable[[np.ndarray], np.ndarray], volume, low: float, high: float,
                        start: int = 0, stop: int | None = None, chunk: int | None = None, halo: int = ORTHO_HALO,
                        **options) -> Iterator[np.ndarray]:
    """Yield the `(H, W)` float32 probability of each slice `start .. stop - 1` of a raw `(Z, H, W)` volume
    (an array or a lazily read volume) as the mean of the network's answers on the xy, xz and yz planes
    through it. `predict` and `options` as `emunet.inference.tiling.iter_probabilities` takes them (a
    2.5-D network's context is then the neighbouring planes along each plane's own axis); `chunk` slices
    at a time (default: `ortho_chunk`), each read with `halo` slices on either side."""
    n = volume.shape[0]
    stop = n if stop is None else stop
    chunk = ortho_chunk(volume.shape, halo) if chunk is None else max(1, int(chunk))
    halo = max(halo, int(options.get("context", 0)))  # the xy planes' context lies within the block read
    for a in range(start, stop, chunk):
        b = min(stop, a + chunk)
        lo, hi = max(0, a - halo), min(n, b + halo)
        block = np.asarray(volume[lo:hi])
        total = np.stack(list(iter_probabilities(predict, block, low, high, start=a - lo, stop=b - lo, **options)))
        for axis in (1, 2):
            order = ORTHO_ORDERS[axis]
            planes = predict_probabilities(predict, np.ascontiguousarray(block.transpose(order)), low, high, **options)
            total += planes.transpose(np.argsort(order))[a - lo:b - lo]
            del planes
        total /= np.float32(3)
        yield from total
