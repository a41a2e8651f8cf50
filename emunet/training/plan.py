"""The plan derived from the data before training (as nnU-Net plans): the resolution the network works at,
chosen from the training masks, and the crop that goes with it. Logged as `plan.json` with the run.

A U-Net learns a structure from its edges and its context. When the thinnest labelled structure is many
pixels thick (mitochondria in 5 nm images are 30-40 px across), averaging the image down loses nothing
the mask needs, and each training image costs a quarter (half the resolution) with twice the context.
Thin structures (ISBI membranes, 6 px) keep full resolution.
"""

import dataclasses
import math
from pathlib import Path

import numpy as np
from scipy import ndimage

from emunet.core.dataset import dense_instances, is_sparse, mask_parts, open_stack, seen_in_3d, stacks_in
from emunet.core.errors import InputError
from emunet.core.labels import is_near_isotropic
from emunet.core.model import INPUT_SCALES, UNetSpec, multiple_of
from emunet.registry.champion import AUTO, choose_champion_metric
from emunet.training.config import TrainConfig

MIN_THICKNESS_PX = 16  # the thinnest structure keeps at least this many pixels at the working resolution
SAMPLE_SLICES = 8  # slices measured, spread over the training stacks


def thickness(mask: np.ndarray) -> float:
    """Typical thickness in pixels of the `True` regions of a 2-D mask: twice the median of the distance
    transform along its ridges (the local maxima, the regions' medial axes). NaN if there is none."""
    distance = ndimage.distance_transform_edt(mask)
    ridge = mask & (distance > 0) & (distance == ndimage.maximum_filter(distance, 3))
    return float(2 * np.median(distance[ridge])) if ridge.any() else float("nan")


def thinnest_structure(masks: list[np.ndarray]) -> float:
    """Thickness of the thinner class (foreground or background) over up to `SAMPLE_SLICES` slices of
    the `(Z, H, W)` masks: membranes are the background of a cell-interior mask, and just as thin."""
    slices = [(m, z) for m in masks for z in range(m.shape[0])]
    picked = np.linspace(0, len(slices) - 1, min(SAMPLE_SLICES, len(slices))).round().astype(int)
    fg, bg = [], []
    for i in picked:
        m, z = slices[i]
        s, annotated = mask_parts(m[z])
        if s.any():  # a slice with nothing labelled has no structure: its background is not a membrane
            fg.append(thickness(s))
            bg.append(thickness(~s if annotated is None else annotated & ~s))  # unannotated voxels are neither
    measured = [np.nanmedian(v) for v in (fg, bg) if v and not np.all(np.isnan(v))]
    return float(min(measured)) if measured else float("nan")


def auto_input_scale(thinnest: float) -> int:
    """The largest of `INPUT_SCALES` that keeps the thinnest structure `MIN_THICKNESS_PX` thick."""
    fits = [s for s in INPUT_SCALES if np.isfinite(thinnest) and thinnest / s >= MIN_THICKNESS_PX]
    return max(fits, default=1)


def choose_scale(cfg: TrainConfig, crop_from_preset: bool, dataset_dir: Path, manifest: dict) -> tuple[TrainConfig, float]:
    """Fill `input_scale` (0 = auto, from the training masks) and grow a preset crop with it, so the
    network still sees the preset's crop at its own resolution (capped by the smallest slice). Returns the
    config and the thinnest structure measured (NaN when the scale was given)."""
    train_stacks = stacks_in(manifest, "train")
    thinnest, scale = float("nan"), cfg.input_scale
    if not scale:
        thinnest = thinnest_structure([open_stack(dataset_dir, s)[1] for s in train_stacks])
        scale = auto_input_scale(thinnest)
    crop, multiple = cfg.crop_size, multiple_of(UNetSpec(depth=cfg.depth, input_scale=scale))
    if crop_from_preset:
        smallest = min(min(s.shape[1:]) for s in train_stacks)
        crop = max(multiple, min(crop * scale, smallest // multiple * multiple))
    if crop % multiple:
        raise InputError(f"crop_size {crop} must be a multiple of 2**depth x input_scale = {multiple}")
    return dataclasses.replace(cfg, input_scale=scale, crop_size=crop), thinnest


def check_sizes(cfg: TrainConfig, manifest: dict) -> None:
    """Every training slice must hold a crop."""
    for s in stacks_in(manifest, "train"):
        if min(s.shape[1:]) < cfg.crop_size:
            raise InputError(f"crop_size {cfg.crop_size} is larger than the {s.shape[1]} x {s.shape[2]} slices of "
                             f"stack {s.name}; pass a smaller crop_size")


def choose_planes(cfg: TrainConfig, manifest: dict) -> tuple[str, str]:
    """`(crops, asked)`: the planes the training crops come from and the planes the model will be asked
    about (recorded in the model), each "xy" or "ortho". `planes=xy` or `ortho` is both; `auto` asks a
    model about all three planes where every training stack's voxel size is near-isotropic
    (`emunet.core.labels.is_near_isotropic`; unknown counts as not), and trains it on the slices either way.

    Why slices for crops under `auto`: on the medulla cube (isotropic 10 nm, bench/volume_cells.py, 10 min
    each), networks trained on the slices and asked about the three planes scored a 3-D adapted Rand
    error of 0.150, 0.145 and 0.160 (VI 1.68, 1.71, 1.70), networks trained on all three planes 0.171,
    0.262 and 0.152 (VI 1.83, 2.00, 1.76), at the same cost per epoch; and slices are all sparse labels
    (annotated slices) can give. `planes=ortho` trains on all three."""
    if cfg.planes == "ortho" and is_sparse(manifest):
        raise InputError("planes=ortho needs fully annotated stacks: sparse labels (an ignore_label) annotate "
                         "slices, not the xz and yz planes through them; use planes=xy")
    if cfg.planes != "auto":
        return cfg.planes, cfg.planes
    return "xy", "ortho" if isotropic_training(manifest) else "xy"


def isotropic_training(manifest: dict) -> bool:
    """Whether every training stack's voxel size, as the files give it, is near-isotropic
    (`emunet.core.labels.is_near_isotropic`; unknown counts as not)."""
    stacks = stacks_in(manifest, "train")
    return bool(stacks) and all(is_near_isotropic(s.source.get("voxel_size")) is True for s in stacks)


# `context_slices=auto` on near-isotropic stacks: the slice above and the slice below. On the medulla cube
# (isotropic 10 nm, bench/volume_cells.py, 10 min each) the volume recipe with one slice of context gave a
# 3-D adapted Rand error of 0.145-0.207 (four runs) against 0.34-0.51 for the one-slice network's
# probabilities through the same 3-D step in the same runs; on serial sections (ISBI, VNC: 50 nm sections of 4-6 nm pixels) one slice of context lost
# Dice and object F1 (bench/time_to_quality.py), so anisotropic data keeps the 2-D network.
AUTO_CONTEXT_SLICES = 1


def choose_context(cfg: TrainConfig, manifest: dict) -> int:
    """The neighbouring slices on each side the network takes as channels: `context_slices`, or with
    "auto" `AUTO_CONTEXT_SLICES` where every training stack is near-isotropic (its voxel size given by
    the files: `emunet.core.labels.is_near_isotropic`), else 0."""
    if cfg.context_slices != AUTO:
        return cfg.context_slices
    return AUTO_CONTEXT_SLICES if isotropic_training(manifest) else 0


def make_plan(cfg: TrainConfig, crop_from_preset: bool, dataset_dir: Path, manifest: dict) -> tuple[TrainConfig, dict]:
    """The resolved config with its working resolution, crop, crop planes (`planes`), context slices and
    champion metric, and the plan to log: `input_scale`, `crop_size`, `planes` (those the model will be
    asked about), `crop_planes`, `context_slices`, `champion_metric`, `grow_over_all` (what predict's
    `grow_over_all=auto` gives: objects grow over every voxel for a model of dense instance labels,
    `emunet.core.dataset.dense_instances`), `multiple_of` (what every tile side must divide by) and
    `thinnest_structure_px`."""
    cfg, thinnest = choose_scale(cfg, crop_from_preset, dataset_dir, manifest)
    check_sizes(cfg, manifest)
    crops, asked = choose_planes(cfg, manifest)
    dense = dense_instances(dataset_dir, manifest)
    cfg = dataclasses.replace(cfg, planes=crops, context_slices=choose_context(cfg, manifest),
                              champion_metric=choose_champion_metric(cfg.champion_metric, seen_in_3d(manifest), dense))
    plan = {"input_scale": cfg.input_scale, "crop_size": cfg.crop_size, "planes": asked, "crop_planes": crops,
            "context_slices": cfg.context_slices, "champion_metric": cfg.champion_metric, "grow_over_all": dense,
            "multiple_of": multiple_of(UNetSpec(depth=cfg.depth, input_scale=cfg.input_scale)),
            "thinnest_structure_px": None if math.isnan(thinnest) else round(thinnest, 1)}
    return cfg, plan
