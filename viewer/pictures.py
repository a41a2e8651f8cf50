"""The panels of one slice as `(H, W, 3)` uint8 RGB pictures: image, ground truth, the prediction's
objects in colour, the TP / FP / FN overlay of `emunet.core.overlay`, and the probability map in a
colour scale."""

import cv2
import numpy as np

from emunet.core.overlay import FN, FP, TP, overlay, to_rgb

# Panels are shown at least this many pixels wide: a 64 x 64 slice in a 300-pixel column would
# otherwise be blurred by the browser's smooth scaling; integer nearest-neighbour keeps pixels sharp.
MIN_DISPLAY_SIDE = 384


def _hex(colour: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*colour)


# Markdown for the overlay's legend, coloured like the overlay itself.
LEGEND = (f"<span style='color:{_hex(TP)}'>■</span> true positive &nbsp; "
          f"<span style='color:{_hex(FP)}'>■</span> false positive &nbsp; "
          f"<span style='color:{_hex(FN)}'>■</span> false negative")


def enlarge_factor(shape: tuple[int, ...], min_side: int = MIN_DISPLAY_SIDE) -> int:
    """The smallest integer factor that makes the shorter side of an `(H, W, ...)` picture at least
    `min_side` (1 when it already is)."""
    return max(1, -(-min_side // max(1, min(shape[:2]))))


def enlarge(rgb: np.ndarray, min_side: int = MIN_DISPLAY_SIDE) -> np.ndarray:
    """Repeat pixels by the smallest integer factor that makes the shorter side at least `min_side`."""
    factor = enlarge_factor(rgb.shape, min_side)
    return rgb if factor == 1 else np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1)


def mask_rgb(mask: np.ndarray) -> np.ndarray:
    """`(H, W)` {0, 1} mask to `(H, W, 3)` uint8: foreground white on black."""
    return to_rgb(np.asarray(mask, np.float32))


def probability_rgb(prob: np.ndarray) -> np.ndarray:
    """`(H, W)` probabilities in [0, 1] to `(H, W, 3)` uint8 in the viridis scale (dark blue 0, yellow 1),
    which stays readable in gray print and to colour-blind readers."""
    gray = np.clip(np.nan_to_num(np.asarray(prob, np.float32)) * 255 + 0.5, 0, 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(gray, cv2.COLORMAP_VIRIDIS), cv2.COLOR_BGR2RGB)


SPECK = (110, 110, 110)  # foreground too small to be an object: gray


def objects_rgb(labels: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """`(H, W)` instance ids to `(H, W, 3)` uint8: each object its own bright colour (hues a golden angle
    apart, so neighbours differ), background black, and `mask` pixels in no object (specks) gray."""
    labels = np.asarray(labels).astype(np.int64)
    # The colour is a function of the id alone, so an object keeps its colour in every slice and plane
    # cut from one ids volume; a palette of the ids present (not of 0..max) keeps large 3-D ids cheap.
    ids, inverse = np.unique(labels, return_inverse=True)
    hsv = np.stack([(ids * 0.618034 % 1.0) * 180, np.full(len(ids), 200), np.full(len(ids), 255)], -1).astype(np.uint8)
    palette = cv2.cvtColor(hsv[None], cv2.COLOR_HSV2RGB)[0]
    palette[ids == 0] = 0
    rgb = palette[inverse.reshape(labels.shape)]
    if mask is not None:
        rgb[(np.asarray(mask) != 0) & (labels == 0)] = SPECK
    return rgb


def slice_panels(image01: np.ndarray, prob: np.ndarray, threshold: float,
                 truth: np.ndarray | None = None, objects: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The panels of one slice, in display order, keyed by caption.

    `image01`: `(H, W)` float in [0, 1] (normalised image); `prob`: `(H, W)` float32 probability;
    `truth`: optional `(H, W)` {0, 1} mask; `objects`: the prediction's instance ids (`(H, W)`, shown in
    colour; default: the mask's pixels all one object). The prediction is `prob >= threshold`. Without
    ground truth there is no ground-truth panel and the overlay shows the prediction in the true-positive
    colour."""
    pred = np.asarray(prob) >= threshold
    panels = {"Image": to_rgb(image01)}
    if truth is not None:
        panels["Ground truth"] = mask_rgb(truth)
    panels["Prediction"] = objects_rgb(pred if objects is None else objects, pred)
    panels["Overlay"] = overlay(image01, truth, pred) if truth is not None else overlay(image01, pred)
    panels["Probability"] = probability_rgb(prob)
    return panels
