"""Segmentation for the viewer: probabilities of a whole stack from a pyfunc segmenter, slice by slice
(so the page can show progress), cached by (model version, stack, options). The threshold is applied
by the page to the cached probabilities, so moving it never runs the model again."""

import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from emunet.core.normalize import stack_stats
from emunet.inference.params import DEFAULTS, SegmentParams

# Probabilities kept in memory, all sessions together: 2 GB is ~25 stacks of 100 x 512 x 512 float32,
# and bounds a long session on a workstation.
CACHE_BYTES = 2 * 1024 ** 3
TILE_SIZES = (256, 512, 1024, 2048)  # multiples of 2**depth for every preset (depth <= 4)


def segmentation_key(tracking_uri: str, name: str, version: str, stack_digest: str, tile_size: int,
                     tta: str) -> tuple:
    """The cache key of one segmentation. The version is a number, never an alias: an alias can move
    to another version, and the cached result must not follow it."""
    return (tracking_uri, name, str(int(version)), stack_digest, int(tile_size), str(tta))


class ProbabilityCache:
    """A thread-safe least-recently-used map from `segmentation_key` to `(Z, H, W)` float32 arrays,
    bounded by total bytes (one Streamlit server runs sessions in threads)."""

    def __init__(self, max_bytes: int = CACHE_BYTES):
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> np.ndarray | None:
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: tuple, value: np.ndarray) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > 1 and sum(v.nbytes for v in self._items.values()) > self.max_bytes:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


def probabilities(model, stack: np.ndarray, tile_size: int = DEFAULTS.tile_size,
                  tta: str = DEFAULTS.tta,
                  on_slice: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Foreground probabilities of a raw `(Z, H, W)` stack from a loaded pyfunc segmenter `model`.

    Returns `(Z, H, W)` float32, the same as `model.predict(stack, params={"output": "probability", ...})`
    (the stack is normalised with its own whole-stack statistics, not per slice), but computed slice by
    slice so that `on_slice(done, total)` can report progress.
    """
    segmenter = model.unwrap_python_model()
    low, high = stack_stats(stack)
    out = np.empty(stack.shape, np.float32)
    params = SegmentParams(output="probability", tile_size=int(tile_size), tta=tta, low=low, high=high)
    slices = segmenter.probabilities(stack, params)
    for z, prob in enumerate(slices):
        out[z] = prob
        if on_slice is not None:
            on_slice(z + 1, stack.shape[0])
    return out
