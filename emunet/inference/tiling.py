"""Sliding-window inference with Gaussian-weighted blending (as nnU-Net does): any slice size, no seams.

A slice is mirrored out to at least one tile (and to a multiple of the network's down-sampling), cut into
overlapping tiles, the tiles of several slices are batched through the model, and each tile's
probabilities are added with a weight that is high in its centre and low at its border, where a U-Net
sees least context. Memory is bounded by the slices of one batch, not the stack.

A 2.5-D network (`context` k > 0) takes each slice with its k neighbours above and below as 2k + 1
channels (`emunet.inference.context`: mirrored at the stack's ends); a tile of slice z is then the same
window of each of those slices, and every slice is read once however many tiles and contexts use it.
"""

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from emunet.core.normalize import normalize
from emunet.inference.context import iter_context

log = logging.getLogger(__name__)

# Tiles overlap by a quarter: nnU-Net uses a half; a quarter is enough with Gaussian weights and
# costs 1.8x instead of 4x the pixels of the slice.
DEFAULT_OVERLAP = 0.25
SIGMA_SCALE = 1 / 8  # nnU-Net's Gaussian: sigma = tile / 8
# A forward pass holds at most this many pixels (four 512 x 512 tiles): it bounds activation memory
# whatever the tile size, so one large tile runs alone and small tiles are batched.
MAX_BATCH_PIXELS = 4 * 512 * 512
# Test-time augmentation: the prediction is averaged over these views of each tile (then mapped back).
# "flips": identity, vertical, horizontal, both; "d4": those and their transposes (all 8 symmetries).
TTA_MODES = ("none", "flips", "d4")


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles of size `tile` covering `[0, length)` with at least `overlap` shared."""
    if length <= tile:
        return [0]
    stride = max(1, int(tile * (1 - overlap)))
    count = -(-(length - tile) // stride) + 1
    return [int(round(s)) for s in np.linspace(0, length - tile, count)]


def gaussian_window(height: int, width: int) -> np.ndarray:
    """`(height, width)` float32 blending weights, 1 in the centre, never zero at the border."""
    axes = []
    for n in (height, width):
        x = np.arange(n) - (n - 1) / 2
        axes.append(np.exp(-0.5 * (x / (n * SIGMA_SCALE)) ** 2))
    window = np.outer(*axes).astype(np.float32)
    return np.maximum(window / window.max(), 1e-3)


def tile_side(tile_size: int, multiple: int) -> int:
    """The one rule for `tile_size` everywhere (pyfunc, predict, Spark, viewer): a U-Net of depth d halves a
    tile d times, so the side is rounded up to a multiple of `multiple` (= 2**depth x input_scale), and
    the change is logged. Raises `ValueError` for a side below 1."""
    if int(tile_size) != tile_size or tile_size < 1:
        raise ValueError(f"tile_size must be a whole number of pixels >= 1, got {tile_size!r}")
    side = round_up(int(tile_size), multiple)
    if side != tile_size:
        log.info("tile_size %d rounded up to %d, a multiple of %d (this model's down-sampling)", tile_size, side, multiple)
    return side


@dataclass(frozen=True)
class TilePlan:
    """How one slice size is cut and batched: written once, used by the tiler and by Spark's chunking.

    Slices are mirrored out to `(pad_h, pad_w)`, cut into `(tile_h, tile_w)` tiles at `boxes` (top-left
    corners), `batch` tiles per forward pass; `slices_per_pass` slices fill one batch of tiles."""

    pad_h: int
    pad_w: int
    tile_h: int
    tile_w: int
    boxes: tuple[tuple[int, int], ...]
    batch: int

    @property
    def slices_per_pass(self) -> int:
        """Slices the tiler takes per step: enough to fill a batch of tiles, so that small slices still
        run in full batches. Spark starts its chunks at multiples of it, so every forward pass holds the
        very tiles it holds in `predict` (the compiled network can round a tile differently in a batch of
        another size)."""
        return max(1, self.batch // len(self.boxes))


def plan_tiles(height: int, width: int, tile_size: int, multiple: int, overlap: float = DEFAULT_OVERLAP,
               batch_size: int = 4) -> TilePlan:
    """The `TilePlan` of `(height, width)` slices: tiles of at most `tile_side(tile_size, multiple)`,
    sharing at least `overlap`; at most `batch_size` tiles per pass, further capped by `MAX_BATCH_PIXELS`."""
    side = tile_side(tile_size, multiple)
    tile_h = min(side, round_up(height, multiple))
    tile_w = min(side, round_up(width, multiple))
    pad_h, pad_w = max(height, tile_h), max(width, tile_w)
    boxes = tuple((y, x) for y in tile_starts(pad_h, tile_h, overlap) for x in tile_starts(pad_w, tile_w, overlap))
    batch = max(1, min(int(batch_size), MAX_BATCH_PIXELS // (tile_h * tile_w)))
    return TilePlan(pad_h, pad_w, tile_h, tile_w, boxes, batch)


def mirror_pad(slices: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pad `(n, h, w)` slices (or `(n, h, w, c)`: each channel alike) at the bottom and right to
    `(n, height, width)` by mirroring without repeating the edge pixel ("dcb|abcd|cba": OpenCV's
    BORDER_REFLECT_101, which training's crops use too, so a network never sees at its border what it
    never saw in training)."""
    pad = ((0, 0), (0, height - slices.shape[1]), (0, width - slices.shape[2])) + ((0, 0),) * (slices.ndim - 3)
    if slices.shape[1] == 1 or slices.shape[2] == 1:  # a 1-pixel side has nothing to mirror
        return np.pad(slices, pad, mode="edge")
    return np.pad(slices, pad, mode="reflect")


def _views(mode: str) -> list[tuple[bool, bool, bool]]:
    """(flip rows, flip columns, transpose) of each view of a TTA mode."""
    flips = [(False, False), (True, False), (False, True), (True, True)] if mode != "none" else [(False, False)]
    transposes = (False, True) if mode == "d4" else (False,)
    return [(fy, fx, t) for t in transposes for fy, fx in flips]


def _view(tiles: np.ndarray, flip_y: bool, flip_x: bool, transpose: bool) -> np.ndarray:
    if flip_y:
        tiles = tiles[:, ::-1]
    if flip_x:
        tiles = tiles[:, :, ::-1]
    return tiles.transpose(0, 2, 1, 3) if transpose else tiles


def with_tta(predict: Callable[[np.ndarray], np.ndarray], mode: str) -> Callable[[np.ndarray], np.ndarray]:
    """`predict` averaged over the views of TTA `mode` (one of `TTA_MODES`); each view's output is mapped
    back to the tile's frame before averaging. The views are exact symmetries of the pixel grid, so tiles
    need not be square: a transposed tile is just another valid input to a fully convolutional net."""
    if mode not in TTA_MODES:
        raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}, got {mode!r}")
    views = _views(mode)
    if len(views) == 1:
        return predict

    def averaged(tiles: np.ndarray) -> np.ndarray:
        total = None  # the output's shape: one channel however many the input has (2.5-D context)
        for fy, fx, t in views:
            out = np.asarray(predict(np.ascontiguousarray(_view(tiles, fy, fx, t))), np.float32)
            # undo in reverse order: transpose first, then the flips (each is its own inverse)
            back = _view(out.transpose(0, 2, 1, 3) if t else out, fy, fx, False)
            total = back.copy() if total is None else total + back
        return total / len(views)

    return averaged


def slice_groups(stack, count: int, context: int = 0, start: int = 0, stop: int | None = None
                 ) -> Iterator[np.ndarray]:
    """The raw slices `start .. stop - 1` of a `(Z, H, W)` stack (array or lazy volume) in order, `count`
    at a time, as `(n, H, W, 2 * context + 1)`: each slice with its `context` neighbours on each side as
    channels (`emunet.inference.context.iter_context`, which reads each slice once)."""
    stop = stack.shape[0] if stop is None else stop
    if not context:
        for z0 in range(start, stop, count):
            yield np.asarray(stack[z0:min(z0 + count, stop)])[..., None]
        return
    group = []
    for _, channels in iter_context(stack, context, start, stop):
        group.append(channels)
        if len(group) == count:
            yield np.stack(group)
            group = []
    if group:
        yield np.stack(group)


def iter_probabilities(predict: Callable[[np.ndarray], np.ndarray], stack: np.ndarray, low: float, high: float,
                       tile_size: int = 1024, overlap: float = DEFAULT_OVERLAP, batch_size: int = 4,
                       multiple: int = 16, tta: str = "none", context: int = 0, start: int = 0,
                       stop: int | None = None) -> Iterator[np.ndarray]:
    """Yield the `(H, W)` float32 foreground probability of each slice of a raw `(Z, H, W)` stack in order
    (of slices `start .. stop - 1` only, when given; their context still comes from the whole stack).

    `predict` maps a `(n, h, w, 2 * context + 1)` float32 batch in [0, 1] to `(n, h, w, 1)`
    probabilities; `low`, `high` are the stack's normalisation percentiles; `multiple` is the network's
    `2**depth`; `batch_size` is the most tiles per forward pass, further capped by `MAX_BATCH_PIXELS`;
    `tta` one of `TTA_MODES` (each view transforms every channel alike); `context` the slices above and
    below each slice that a 2.5-D network takes as channels, z-k .. z+k, mirrored at the stack's ends
    (a stack of one slice gives that slice in every channel).
    """
    predict = with_tta(predict, tta)
    z_size, height, width = stack.shape
    plan = plan_tiles(height, width, tile_size, multiple, overlap, batch_size)
    window = gaussian_window(plan.tile_h, plan.tile_w)
    weight_sum = np.zeros((plan.pad_h, plan.pad_w), np.float32)
    for y, x in plan.boxes:
        weight_sum[y:y + plan.tile_h, x:x + plan.tile_w] += window
    for group in slice_groups(stack, plan.slices_per_pass, context, start, stop):
        slices = mirror_pad(normalize(group, low, high), plan.pad_h, plan.pad_w)
        jobs = [(k, y, x) for k in range(len(slices)) for y, x in plan.boxes]
        sums = np.zeros(slices.shape[:3], np.float32)
        for b in range(0, len(jobs), plan.batch):
            batch = jobs[b:b + plan.batch]
            tiles = np.stack([slices[k, y:y + plan.tile_h, x:x + plan.tile_w] for k, y, x in batch])
            probs = np.asarray(predict(tiles), np.float32)[..., 0]
            for (k, y, x), p in zip(batch, probs):
                sums[k, y:y + plan.tile_h, x:x + plan.tile_w] += p * window
        for k in range(len(slices)):
            yield sums[k, :height, :width] / weight_sum[:height, :width]


def predict_probabilities(predict, stack: np.ndarray, low: float, high: float, **options) -> np.ndarray:
    """`(Z, H, W)` float32 probabilities of a whole raw stack; see `iter_probabilities` for options."""
    return np.stack(list(iter_probabilities(predict, stack, low, high, **options)))
