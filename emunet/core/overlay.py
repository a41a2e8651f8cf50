"""Pictures for people: overlays of predictions on images and montages of slices (uint8 RGB arrays)."""

import numpy as np

# Colours a person can tell apart: true positive green, false positive magenta, false negative yellow.
TP, FP, FN = (0, 200, 0), (230, 0, 230), (255, 210, 0)
ALPHA = 0.45


def to_rgb(image01: np.ndarray) -> np.ndarray:
    """`(H, W)` float in [0, 1] to `(H, W, 3)` uint8 gray."""
    gray = np.clip(np.asarray(image01, np.float32) * 255, 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def overlay(image01: np.ndarray, truth: np.ndarray | None = None, pred: np.ndarray | None = None) -> np.ndarray:
    """`(H, W, 3)` uint8: the image with true positives, false positives and false negatives coloured.

    With only `truth` (or only `pred`), its foreground is drawn in the true-positive colour."""
    rgb = to_rgb(image01).astype(np.float32)
    truth = np.zeros(rgb.shape[:2], bool) if truth is None else np.asarray(truth, bool)
    pred = truth if pred is None else np.asarray(pred, bool)
    for region, colour in ((truth & pred, TP), (pred & ~truth, FP), (truth & ~pred, FN)):
        rgb[region] = (1 - ALPHA) * rgb[region] + ALPHA * np.array(colour, np.float32)
    return rgb.astype(np.uint8)


def montage(tiles: list[np.ndarray], columns: int, gap: int = 4) -> np.ndarray:
    """Tile equally sized `(H, W, 3)` uint8 images into a grid, `columns` wide, white gaps between."""
    h, w = tiles[0].shape[:2]
    rows = -(-len(tiles) // columns)
    canvas = np.full((rows * (h + gap) - gap, columns * (w + gap) - gap, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        canvas[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = tile
    return canvas
