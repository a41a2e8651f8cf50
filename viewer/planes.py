"""A volume seen as a volume: the xy, xz and yz planes through one point `(z, y, x)` of a `(Z, H, W)`
stack, cut from the image, the truth, the prediction and the 3-D object ids, each shown with a crosshair
at the point and, when the voxel size is known, stretched in z so that a micrometre looks the same along
every axis. Pure helpers on arrays; the page (`viewer/app.py`) lays them out.

Orientation (as the panels are drawn): xy has rows y and columns x; xz has rows z and columns x; yz has
rows z and columns y. z grows downwards in xz and yz, as the slice number does on the slider."""

import numpy as np

from emunet.core.overlay import to_rgb
from emunet.inference.params import DEFAULTS
from emunet.inference.segment import segment_probabilities
from viewer.pictures import mask_rgb, objects_rgb

PLANES = ("xy", "xz", "yz")
# (row axis, column axis) of each plane, and the axis held fixed at the point.
AXES = {"xy": ("y", "x"), "xz": ("z", "x"), "yz": ("z", "y")}
FIXED = {"xy": "z", "xz": "y", "yz": "x"}
DASH = 4  # crosshair dash length in display pixels: black and white dashes show on any colour
# 3-D scores (`scoring.summary` keys ending in `_3d`) as the page labels them; others by their name.
LABELS_3D = {"object_f1_3d": "Object F1", "object_precision_3d": "Object precision",
             "object_recall_3d": "Object recall", "ap50_3d": "AP50", "ap75_3d": "AP75",
             "adapted_rand_error_3d": "Adapted Rand error", "rand_fscore_3d": "Rand F-score", "vi_split_3d": "VI split",
             "vi_merge_3d": "VI merge"}


def cut(volume, plane: str, point: tuple[int, int, int]) -> np.ndarray:
    """The `plane` ("xy", "xz" or "yz") of a `(Z, H, W)` volume through `point` = `(z, y, x)`:
    `(H, W)` for xy, `(Z, W)` for xz, `(Z, H)` for yz."""
    z, y, x = (int(v) for v in point)
    if plane == "xy":
        return np.asarray(volume[z])
    if plane == "xz":
        return np.asarray(volume[:, y, :])
    if plane == "yz":
        return np.asarray(volume[:, :, x])
    raise ValueError(f"unknown plane {plane!r}; expected one of {PLANES}")


def mark(plane: str, point: tuple[int, int, int]) -> tuple[int, int]:
    """`(row, column)` of `point` = `(z, y, x)` in its `plane`."""
    z, y, x = (int(v) for v in point)
    return {"xy": (y, x), "xz": (z, x), "yz": (z, y)}[plane]


def z_stretch(voxel_size, plane: str) -> float | None:
    """How many times a slice is thicker than a pixel of `plane`'s other axis (`z / x` for xz, `z / y`
    for yz; 1 for xy), from `voxel_size` `(z, y, x)`; None when the voxel size, or the part of it needed,
    is unknown (an entry None; never guessed)."""
    if plane == "xy":
        return 1.0
    if voxel_size is None:
        return None
    vz, vy, vx = voxel_size
    across = vx if plane == "xz" else vy
    if vz is None or across is None or not (float(vz) > 0 and float(across) > 0):
        return None
    return float(vz) / float(across)


def scales(stretch: float | None) -> tuple[float, float]:
    """`(row scale, column scale)` that show a plane with square voxels: z rows repeated `stretch` times;
    when slices are thinner than pixels, the columns widened instead, so no slice is dropped."""
    if stretch is None or stretch == 1:
        return 1.0, 1.0
    return (stretch, 1.0) if stretch > 1 else (1.0, 1.0 / stretch)


def resample(picture: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an `(H, W)` or `(H, W, C)` picture to `shape` `(rows, columns)`:
    output pixel j takes input pixel floor((j + 0.5) * n_in / n_out), so each input pixel becomes a band."""
    rows = [np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)
            for n_in, n_out in zip(picture.shape[:2], shape)]
    return picture[rows[0]][:, rows[1]]


def band_centre(index: int, n_in: int, n_out: int) -> int:
    """The output pixel at the centre of input pixel `index`'s band after `resample` from `n_in` to `n_out`."""
    return min(n_out - 1, int((index + 0.5) * n_out / n_in))


def crosshair(rgb: np.ndarray, row: int, column: int, dash: int = DASH) -> np.ndarray:
    """A copy of `(H, W, 3)` uint8 `rgb` with a one-pixel dashed line across `row` and down `column`,
    white and black dashes `dash` pixels long (visible on any colour)."""
    out = rgb.copy()
    h, w = out.shape[:2]
    out[row, :] = np.where(((np.arange(w) // dash) % 2 == 0)[:, None], 255, 0).astype(np.uint8)
    out[:, column] = np.where(((np.arange(h) // dash) % 2 == 0)[:, None], 255, 0).astype(np.uint8)
    return out


def display(rgb: np.ndarray, plane: str, point: tuple[int, int, int], stretch: float | None,
            factor: int = 1) -> np.ndarray:
    """A plane's picture as shown: stretched in z by `stretch` (see `scales`), enlarged `factor` times
    (the xy slice's factor, so all panels share one pixel scale) and crossed at `point`."""
    row_scale, column_scale = scales(stretch if plane != "xy" else 1.0)
    h, w = rgb.shape[:2]
    shape = (max(1, round(h * row_scale * factor)), max(1, round(w * column_scale * factor)))
    shown = resample(rgb, shape)
    row, column = mark(plane, point)
    return crosshair(shown, band_centre(row, h, shape[0]), band_centre(column, w, shape[1]))


def plane_panels(image01: np.ndarray, truth: np.ndarray | None, mask: np.ndarray,
                 ids: np.ndarray) -> dict[str, np.ndarray]:
    """The panels of one plane, in display order, keyed by kind: `Image` (`image01`, float in [0, 1]),
    `Ground truth` (only with `truth`, {0, 1}), `Prediction` (the {0, 1} `mask`) and `Objects` (`ids` in
    colour, a colour per id, so an object has one colour in every plane; mask pixels in no object gray);
    all `(rows, columns, 3)` uint8 at one pixel per voxel."""
    panels = {"Image": to_rgb(image01)}
    if truth is not None:
        panels["Ground truth"] = mask_rgb(truth)
    panels["Prediction"] = mask_rgb(mask)
    panels["Objects"] = objects_rgb(ids, mask)
    return panels


def caption(plane: str, point: tuple[int, int, int], shape: tuple[int, int, int]) -> str:
    """`xz at y = 20 · z 0–3 down, x 0–63 across` for a `(Z, H, W)` stack of `shape`."""
    extent = dict(zip("zyx", shape))
    rows, columns = AXES[plane]
    index = dict(zip("zyx", point))[FIXED[plane]]
    return (f"{plane} at {FIXED[plane]} = {index} · {rows} 0–{extent[rows] - 1} down, "
            f"{columns} 0–{extent[columns] - 1} across")


def stretch_note(voxel_size) -> str:
    """The line under the planes that says how z is drawn."""
    stretch = z_stretch(voxel_size, "xz")
    if stretch is None:
        return ("Voxel size unknown: the xz and yz planes are not stretched (one pixel row per slice), so "
                "shapes look flattened if the slices are thicker than the pixels.")
    if z_stretch(voxel_size, "yz") == stretch == 1:
        return "Isotropic voxels: the xz and yz planes are drawn as they are."
    return (f"The xz and yz planes are stretched ×{stretch:.3g} in z (slice spacing / pixel size), so "
            "distances look the same along every axis.")


def object_ids(prob: np.ndarray, threshold: float, voxel_size=None, instances: str = "auto",
               grows: bool = False) -> np.ndarray:
    """The objects of a `(Z, H, W)` probability stack as `(Z, H, W)` int32 3-D ids, by the one segmentation
    path (`emunet.inference.segment.segment_probabilities`, as `output="labels"` finds them): with
    `instances="auto"`, solid 3-D objects where `voxel_size` `(z, y, x)` says near-isotropic, else the
    objects of each slice linked through the slices (one id per cell followed from slice to slice); 3-D
    objects grown over every voxel where the model records so (`grows`: its `grow_over_all`)."""
    prob = np.asarray(prob, np.float32)
    out = np.zeros(prob.shape, np.int32)
    params = DEFAULTS.replace(threshold=threshold, instances=instances).settled(grows)
    for result in segment_probabilities(prob, params, voxel_size=voxel_size):
        out[result.z] = result.ids
    return out


def scores_3d(summary: dict) -> dict[str, tuple[str, float]]:
    """The 3-D (whole-object) scores in a `scoring.summary` dict: `{key: (label, value)}` for every key
    ending in `_3d`, known ones first in `LABELS_3D`'s order; `{}` when there are none."""
    keys = [k for k in LABELS_3D if k in summary] + sorted(k for k in summary if k.endswith("_3d") and k not in LABELS_3D)
    # (A value may be NaN: not measured, e.g. on a stack whose slices are not all fully annotated.)
    return {k: (LABELS_3D.get(k, k.removesuffix("_3d").replace("_", " ").capitalize()), float(summary[k])) for k in keys}
