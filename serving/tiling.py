"""Sliding-window inference with Gaussian-weighted blending (as nnU-Net does): any slice size, no seams.

A slice is mirrored out to at least one tile (and to a multiple of the network's down-sampling), cut into
overlapping tiles, the tiles of several slices are batched through the model, and each tile's
probabilities are added with a weight that is high in its centre and low at its border, where a U-Net
sees least context. Memory is bounded by the slices of one batch, not the stack.
"""

from collections.abc import Callable, Iterator

import numpy as np

from pipeline.normalize import normalize

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


def plan_tiles(height: int, width: int, tile_size: int, multiple: int, overlap: float):
    """Padded size and tile boxes for a slice: returns `(pad_h, pad_w, tile_h, tile_w, boxes)`."""
    tile_h = min(round_up(tile_size, multiple), round_up(height, multiple))
    tile_w = min(round_up(tile_size, multiple), round_up(width, multiple))
    pad_h, pad_w = max(height, tile_h), max(width, tile_w)
    boxes = [(y, x) for y in tile_starts(pad_h, tile_h, overlap) for x in tile_starts(pad_w, tile_w, overlap)]
    return pad_h, pad_w, tile_h, tile_w, boxes


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
        total = np.zeros(tiles.shape, np.float32)
        for fy, fx, t in views:
            out = np.asarray(predict(np.ascontiguousarray(_view(tiles, fy, fx, t))), np.float32)
            # undo in reverse order: transpose first, then the flips (each is its own inverse)
            total += _view(out.transpose(0, 2, 1, 3) if t else out, fy, fx, False)
        return total / len(views)

    return averaged


def iter_probabilities(predict: Callable[[np.ndarray], np.ndarray], stack: np.ndarray, low: float, high: float,
                       tile_size: int = 1024, overlap: float = DEFAULT_OVERLAP, batch_size: int = 4,
                       multiple: int = 16, tta: str = "none") -> Iterator[np.ndarray]:
    """Yield the `(H, W)` float32 foreground probability of each slice of a raw `(Z, H, W)` stack in order.

    `predict` maps a `(n, h, w, 1)` float32 batch in [0, 1] to `(n, h, w, 1)` probabilities; `low`, `high`
    are the stack's normalisation percentiles; `multiple` is the network's `2**depth`; `batch_size` is the
    most tiles per forward pass, further capped by `MAX_BATCH_PIXELS`; `tta` one of `TTA_MODES`.
    """
    predict = with_tta(predict, tta)
    z_size, height, width = stack.shape
    pad_h, pad_w, tile_h, tile_w, boxes = plan_tiles(height, width, tile_size, multiple, overlap)
    window = gaussian_window(tile_h, tile_w)
    batch_size = max(1, min(batch_size, MAX_BATCH_PIXELS // (tile_h * tile_w)))
    weight_sum = np.zeros((pad_h, pad_w), np.float32)
    for y, x in boxes:
        weight_sum[y:y + tile_h, x:x + tile_w] += window
    # Enough slices per step to fill a batch of tiles, so small slices still run in full batches.
    chunk = max(1, batch_size // len(boxes))
    for z0 in range(0, z_size, chunk):
        slices = normalize(stack[z0:z0 + chunk], low, high)
        slices = np.pad(slices, ((0, 0), (0, pad_h - height), (0, pad_w - width)), mode="symmetric")
        jobs = [(k, y, x) for k in range(len(slices)) for y, x in boxes]
        sums = np.zeros(slices.shape, np.float32)
        for b in range(0, len(jobs), batch_size):
            batch = jobs[b:b + batch_size]
            tiles = np.stack([slices[k, y:y + tile_h, x:x + tile_w] for k, y, x in batch])[..., None]
            probs = np.asarray(predict(tiles), np.float32)[..., 0]
            for (k, y, x), p in zip(batch, probs):
                sums[k, y:y + tile_h, x:x + tile_w] += p * window
        for k in range(len(slices)):
            yield sums[k, :height, :width] / weight_sum[:height, :width]


def predict_probabilities(predict, stack: np.ndarray, low: float, high: float, **options) -> np.ndarray:
    """`(Z, H, W)` float32 probabilities of a whole raw stack; see `iter_probabilities` for options."""
    return np.stack(list(iter_probabilities(predict, stack, low, high, **options)))
