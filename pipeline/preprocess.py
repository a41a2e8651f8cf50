"""`preprocess` entry point: the user's stacks (or the embedded synthetic samples) in, the dataset
artifact out (see `emunet.core.dataset`), logged to MLflow with its provenance.

    python -m pipeline.preprocess --images a.tif,b.tif --labels a_labels.tif,b_labels.tif
    python -m pipeline.preprocess --images stack.tif --labels labels.tif --val_slices 24:30
    python -m pipeline.preprocess --images stack.tif --labels sparse.tif --ignore_label 255
    python -m pipeline.preprocess --images sections.tif --labels labels.tif --voxel_size 50,, --unit nm

The image files' voxel size is what they say, an axis they do not give stays unknown (`voxel_size` and
`unit` supply it; `emunet.core.io`); labels must be on the image's grid (`check_labels`: same shape, voxel
size within 1 %, else an error unless `allow_voxel_mismatch`) and finite; missing Zarr chunks are an error
unless `allow_missing_chunks`.

Instance labels (`label_kind=instances`: touching cells with different ids, as napari, Cellpose or
connectomics ground truth give them): the training target is the cells' interiors, the ids with every voxel
on an id change set to background (in-plane for anisotropic voxels, in 3-D where the voxel size says
near-isotropic: `emunet.core.labels`), and the ids are kept in the artifact, so validation and evaluate score
objects against the real cells. A label image given as a mask that looks like instances (almost all
foreground, or many ids touching) gets one warning saying so. The embedded synthetic data carries its ids.

Sparse labels (`ignore_label`, as nnU-Net's "ignore" label): voxels labelled with that value were not
annotated. They are stored as `MASK_IGNORE` in the artifact and the value is recorded in its manifest, so
train (loss, patch sampling, validation) and evaluate leave them out without being told again. An
unannotated slice is the special case of a slice all `ignore_label`; with `ignore_label` set, the
`unlabelled=skip` guess marks the slices it finds as not annotated instead of dropping them.
"""

import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import mlflow
import numpy as np
from tqdm import tqdm

from emunet.registry.cli import run_entry
from emunet.core.dataset import (MASK_IGNORE, NO_IGNORE, check_output_dir, encode_labels, mask_parts, safe_name,
                                 write_dataset)
from emunet.core.errors import InputError
from emunet.core.io import (ReadOptions, Volume, check_labels, check_same_shape, list_stack_paths, open_volume,
                            read_label_slices, read_mask, read_options)
from emunet.core.normalize import normalize, stack_stats
from emunet.core.overlay import montage, overlay
from emunet.core.labels import interiors, is_near_isotropic, looks_like_instances
from emunet.core.synthetic import synthetic_dataset
from emunet.registry.tracking import DEFAULT_EXPERIMENT, log_config, step_run
from emunet.inference.outputs import stack_name

DATASETS = ("synthetic",)
UNLABELLED = ("skip", "keep")
LABEL_KINDS = ("mask", "instances")


def unlabelled_slices(mask: np.ndarray) -> list[int]:
    """Slices of a `(Z, H, W)` mask with no foreground at all, in a stack where most slices have some:
    those were left unannotated (VNC's stack1 mitochondria labels miss slices 1, 7 and 18, whose images
    are full of mitochondria). Training on them teaches "no object here"; scoring on them counts every
    right answer as a false positive. A stack that is mostly empty keeps its empty slices."""
    labelled = np.array([bool(np.any((m != 0) & (m != MASK_IGNORE))) for m in mask])
    if len(labelled) < 3 or labelled.mean() < 0.5:
        return []
    return [int(z) for z in np.flatnonzero(~labelled)]


def keep_slices(part: dict, start: int, unlabelled: list[int], name: str) -> list[dict]:
    """`part` (slices `start`.. of its source stack `name`) without the `unlabelled` ones: one stack per run
    of consecutive slices left (`<name>_z<a>-<b>`, slices a..b-1 of the source), each noting what was left
    out. Runs, not one stack closed over the gaps: a slice's neighbours stay its neighbours, so 2.5-D
    context, 3-D crops and 3-D objects never jump a missing slice (an end of a run is mirrored, as a
    stack's end is)."""
    depth = part["image"].shape[0]
    dropped = [z for z in unlabelled if start <= z < start + depth]
    if not dropped:
        return [part]
    runs, a = [], start
    for z in sorted(dropped) + [start + depth]:
        if z > a:
            runs.append((a, z))
        a = z + 1
    return [{**part, "name": f"{name}_z{a}-{b}", "image": part["image"][a - start:b - start],
             "mask": part["mask"][a - start:b - start],
             **({"ids": part["ids"][a - start:b - start]} if part.get("ids") is not None else {}),
             "source": {**part["source"], "slices": f"{a}:{b}", "unlabelled_slices_left_out": dropped}}
            for a, b in runs]


def unique_names(stacks: list[dict]) -> list[dict]:
    """The stacks with distinct names of at most 100 characters (`dataset.SAFE_NAME`: each is a folder of
    the artifact): a name met before gets `_2`, `_3`, ... (two files `vol.tif` in two folders, or a file
    named like another stack's run of slices, `vol_z0-5`), a longer one is cut."""
    seen, out = set(), []
    for stack in stacks:
        base = name = stack["name"][:100]
        count = 1
        while name in seen:
            count += 1
            name = f"{base[:100 - len(str(count)) - 1]}_{count}"
        seen.add(name)
        out.append({**stack, "name": name})
    return out


@dataclass(frozen=True)
class PreprocessConfig:
    """Turn image stacks and label stacks into the dataset artifact."""

    images: str = ""  # comma-separated stacks (TIFF, PNG, .npy, or folders of slices); empty: `dataset`
    labels: str = ""  # label stacks in the same order; any non-zero value is foreground (but ignore_label)
    label_kind: str = "mask"  # mask: non-zero = foreground; instances: values are cell ids (touching cells differ), trained on their interiors
    dataset: str = "synthetic"  # used when `images` is empty: the embedded synthetic EM samples
    val_slices: str = ""  # single stack only: held-out block "start:stop"; empty = the last 20 %
    unlabelled: str = "skip"  # skip: leave out slices with no labelled pixel in a stack where most slices have some (annotation missing, not empty tissue), or with ignore_label mark them not annotated; keep
    ignore_label: int = NO_IGNORE  # label value meaning "not annotated" (e.g. 255 or the highest value, as nnU-Net): those voxels count in neither loss nor metrics; -1 (any negative) = none, every voxel is annotated (a 0/255 mask keeps 255 as foreground)
    level: str = ""  # level of OME-Zarr multiscale images (labels too); "" = 0, full resolution
    region: str = ""  # z0:z1,y0:y1,x0:x1: train on this block of every stack (and its labels), read alone; "" = all
    allow_missing_chunks: bool = False  # missing Zarr chunks (an interrupted copy) are an error; true: fill value, warned
    voxel_size: str = ""  # z,y,x of the images where their files lack it ("50,," gives z only); "" = the files' own
    unit: str = ""  # unit of voxel_size (nm, um, A, mm); "" = the files'
    allow_voxel_mismatch: bool = False  # labels on another voxel grid (> 1 % off) are an error; true: accepted, warned
    seed: int = 0  # seed of the synthetic samples
    synthetic_stacks: int = 9  # the original study had 9 samples: 8 train, 1 validation
    synthetic_shape: str = "24,256,256"  # Z,H,W per synthetic sample: big enough to look like EM, small for a CPU
    output_dir: str = ""  # where to write the artifact (a new or empty folder, or a previous artifact, which is replaced); empty = a temporary folder
    experiment: str = DEFAULT_EXPERIMENT


def parse_block(text: str, depth: int) -> tuple[int, int]:
    """`"24:30"` to `(24, 30)`, checked against a stack of `depth` slices; empty = last 20 %."""
    if depth < 2:
        raise InputError(f"a single stack needs at least 2 slices to hold some out, got {depth}")
    if not text:
        return depth - max(1, round(depth * 0.2)), depth
    try:
        start, stop = (int(part) for part in text.split(":"))
    except ValueError:
        raise InputError(f"val_slices must look like 24:30 (start:stop), got {text!r}") from None
    if not 0 <= start < stop <= depth or (start == 0 and stop == depth):
        raise InputError(f"val_slices {text!r} must be a block inside 0:{depth} that leaves slices for training")
    return start, stop


def split_single(name: str, image: np.ndarray, mask: np.ndarray, block: tuple[int, int], source: dict,
                 unlabelled: list[int] = (), window: tuple[float, float] | None = None,
                 ids: np.ndarray | None = None) -> list[dict]:
    """Contiguous blocks of one stack: before, held-out, after. Neighbouring sections are nearly the
    same image, so random slices would leak into validation. `unlabelled` slices (numbered in the
    whole stack) are left out of their block, which becomes its runs of consecutive slices (`keep_slices`);
    a block left with none is dropped. `window` is the whole
    stack's `(low, high)`, one normalisation for all its blocks (computed when not given)."""
    low, high = window or stack_stats(image)
    start, stop = block
    parts = [(0, start, "train"), (start, stop, "val"), (stop, image.shape[0], "train")]
    return [run for a, b, split in parts if b > a
            for run in keep_slices(dict(name=f"{name}_z{a}-{b}", split=split, image=image[a:b], mask=mask[a:b],
                                        low=low, high=high, source={**source, "slices": f"{a}:{b}"},
                                        ids=None if ids is None else ids[a:b]), a, list(unlabelled), name)]


def read_labels(path: Path, image, image_path: Path | None = None, ignore_label: int = NO_IGNORE,
                allow_voxel_mismatch: bool = False, **where) -> np.ndarray:
    """The stored mask (`emunet.core.dataset.encode_labels`) of a label stack for `image`: its `Volume`
    (shape and voxel size are checked, `check_labels`) or only its shape, with `image_path`. {0, 1}, and
    `MASK_IGNORE` where the label is `ignore_label` (>= 0); `where` are `open_volume`'s options. Raises
    `InputError` for a shape or voxel size that is not the image's, NaN or infinite labels, or when no
    annotated voxel is foreground."""
    if ignore_label < 0:
        return read_mask(path, image, image_path, allow_voxel_mismatch, **where)
    with open_volume(path, **where) as labels:
        if isinstance(image, Volume):
            check_labels(labels, image, allow_voxel_mismatch)
        else:
            check_same_shape(labels, image, image_path)
        mask = read_label_slices(labels, lambda page: encode_labels(page, ignore_label))
    foreground, annotated = mask_parts(mask)
    if not foreground.any():
        raise InputError(f"{path}: no annotated voxel is foreground (every label is 0 or the ignore_label "
                         f"{ignore_label})")
    if annotated is None:
        print(f"preprocess: {path.name}: no voxel has the ignore_label {ignore_label}: every voxel is annotated",
              flush=True)
    return mask


def read_instances(path: Path, image: Volume, ignore_label: int, allow_voxel_mismatch: bool, **where) -> tuple:
    """`(stored mask, ids)` of an instance label stack: the mask is the cells' interiors (voxels on an id
    change are background; in 3-D where the image's voxel size is near-isotropic, else in-plane), with
    `MASK_IGNORE` where the label is `ignore_label`; `ids` uint32 (0 there)."""
    with open_volume(path, **where) as labels:
        check_labels(labels, image, allow_voxel_mismatch)
        ids = read_label_slices(labels, lambda page: np.asarray(page))
    if ids.dtype.kind == "f":
        if (ids != np.round(ids)).any() or (ids < 0).any():
            raise InputError(f"{path}: label_kind=instances needs whole, non-negative cell ids; found values such "
                             f"as {ids[(ids != np.round(ids)) | (ids < 0)][0]}")
    elif (ids < 0).any():
        raise InputError(f"{path}: label_kind=instances needs non-negative cell ids; found {int(ids.min())}")
    if ids.max(initial=0) >= 2**32:
        raise InputError(f"{path}: cell ids up to {int(ids.max())} do not fit uint32")
    ignored = (ids == ignore_label) if ignore_label >= 0 else None
    ids = ids.astype(np.uint32)
    if ignored is not None:
        ids[ignored] = 0
    isotropic = is_near_isotropic(image.voxel_size) is True
    mask = interiors(ids, isotropic)
    if ignored is not None:
        mask[ignored] = MASK_IGNORE
    if not (mask == 1).any():
        raise InputError(f"{path}: no cell interior is left once the voxels on an id change are set to background "
                         f"(are the ids per voxel, not per slice?)")
    print(f"preprocess: {path.name}: {len(np.unique(ids)) - 1} cell ids; training target = their interiors "
          f"({'3-D' if isotropic else 'in-plane'} boundaries, {float((mask == 1).mean()):.1%} of voxels)", flush=True)
    return mask, ids


def load_files(cfg: PreprocessConfig) -> list[dict]:
    """Read the user's stacks and labels and split them by stack (last one held out)."""
    if cfg.unlabelled not in UNLABELLED:
        raise InputError(f"unlabelled must be one of {', '.join(UNLABELLED)}, got {cfg.unlabelled!r}")
    if cfg.label_kind not in LABEL_KINDS:
        raise InputError(f"label_kind must be one of {', '.join(LABEL_KINDS)}, got {cfg.label_kind!r}")
    images, labels = list_stack_paths(cfg.images), list_stack_paths(cfg.labels)
    if len(images) != len(labels):
        raise InputError(f"got {len(images)} image stacks but {len(labels)} label stacks; pass one label stack per image stack")
    if len(images) > 1 and cfg.val_slices:
        raise InputError(f"val_slices splits a single stack; with {len(images)} stacks the last one is held out")
    stacks = []
    pairs = list(zip(images, labels))
    for i, (image_path, label_path) in enumerate(tqdm(pairs, desc="reading", unit="stack", disable=len(pairs) < 2)):
        options = read_options(cfg)
        with open_volume(image_path, **asdict(options)) as volume:
            image = np.asarray(volume)
            calibration = {"voxel_size": list(volume.voxel_size), "unit": volume.unit} if volume.voxel_size else {}
        # The labels' own calibration is compared with the image's, not replaced by the user's voxel_size.
        label_options = asdict(ReadOptions(options.level, options.region, options.allow_missing_chunks))
        ids = None
        if cfg.label_kind == "instances":
            mask, ids = read_instances(label_path, volume, cfg.ignore_label, cfg.allow_voxel_mismatch, **label_options)
        else:
            with open_volume(label_path, **label_options) as labels:
                warning = looks_like_instances(labels)
            if warning:
                print(f"preprocess: warning: {label_path.name}: {warning}", flush=True)
            mask = read_labels(label_path, volume, None, cfg.ignore_label, cfg.allow_voxel_mismatch, **label_options)
        where = {"level": cfg.level, "region": cfg.region}
        try:
            low, high = stack_stats(image)
        except InputError as exc:
            raise InputError(f"{image_path}: {exc}") from None
        name = safe_name(stack_name(image_path))  # made distinct from the others' at the end (`unique_names`)
        source = {"images": image_path.name, "labels": label_path.name, "dtype": str(image.dtype),
                  "shape": list(image.shape), **calibration,
                  **{k: v for k, v in where.items() if str(v).strip()}}
        unlabelled = unlabelled_slices(mask) if cfg.unlabelled == "skip" else []
        if unlabelled and cfg.ignore_label >= 0:  # kept in place, counted nowhere: the stack keeps its depth
            mask[unlabelled] = MASK_IGNORE
            print(f"preprocess: {name}: slice(s) {', '.join(map(str, unlabelled))} have no labelled pixel while "
                  f"most slices do: marked not annotated (ignore_label; unlabelled=keep keeps them as background)",
                  flush=True)
            unlabelled = []
        if unlabelled:
            print(f"preprocess: {name}: slice(s) {', '.join(map(str, unlabelled))} have no labelled pixel while "
                  f"{image.shape[0] - len(unlabelled)} of {image.shape[0]} slices do: left out as unannotated "
                  f"(unlabelled=keep keeps them)", flush=True)
        if len(images) == 1:
            return split_single(name, image, mask, parse_block(cfg.val_slices, image.shape[0]), source, unlabelled,
                                (low, high), ids)
        stacks += keep_slices(dict(name=name, split="val" if i == len(images) - 1 else "train", image=image,
                                   mask=mask, source=source, low=low, high=high, ids=ids), 0, unlabelled, name)
    return stacks


def load_synthetic(cfg: PreprocessConfig) -> list[dict]:
    if cfg.dataset not in DATASETS:
        raise InputError(f"dataset must be one of {', '.join(DATASETS)} (or pass images=...), got {cfg.dataset!r}")
    try:
        shape = tuple(int(v) for v in cfg.synthetic_shape.split(","))
        assert len(shape) == 3 and min(shape) > 0
    except (ValueError, AssertionError):
        raise InputError(f"synthetic_shape must be Z,H,W like 24,256,256, got {cfg.synthetic_shape!r}") from None
    if cfg.synthetic_stacks < 2:
        raise InputError(f"synthetic_stacks must be at least 2 (train and validation), got {cfg.synthetic_stacks}")
    samples = synthetic_dataset(cfg.seed, cfg.synthetic_stacks, shape)
    return [dict(name=name, split="val" if i == len(samples) - 1 else "train", image=image, mask=mask, ids=ids,
                 source={"generator": "emunet.core.synthetic", "seed": cfg.seed, "index": i, "shape": list(shape)})
            for i, (name, image, mask, ids) in enumerate(samples)]


def preview(stacks: list[dict], per_stack: int = 3) -> np.ndarray:
    """Montage, one row per stack: a few slices, then the same slices with their masks overlaid
    (green), each tile scaled to 256 px."""
    tiles = []
    for s in stacks[:9]:
        low, high = s.get("low"), s.get("high")
        if low is None:
            low, high = stack_stats(s["image"])
        row_images, row_masks = [], []
        for z in np.linspace(0, s["image"].shape[0] - 1, per_stack).astype(int):
            image = normalize(s["image"][z], low, high)
            scale = 256 / max(image.shape)
            size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
            mask = cv2.resize(mask_parts(s["mask"][z])[0].astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
            row_images.append(overlay(image))
            row_masks.append(overlay(image, mask))
        tiles += row_images + row_masks
    same = [t for t in tiles if t.shape == tiles[0].shape]  # stacks of another aspect ratio are left out
    return montage(same, columns=per_stack * 2)


def preprocess(cfg: PreprocessConfig) -> dict:
    """Run the step: returns `{"run_id", "dataset_uri", "manifest"}`."""
    if cfg.ignore_label == 0:
        raise InputError("ignore_label 0 would mark the background as not annotated; pass the value your labels "
                         "use for unannotated voxels (e.g. 255), or -1 for none")
    if cfg.output_dir:
        check_output_dir(cfg.output_dir)  # before any work: never replace a folder of the user's
    with step_run("preprocess", cfg.experiment) as run:
        log_config(cfg)
        stacks = unique_names(load_files(cfg) if cfg.images else load_synthetic(cfg))
        if not any(s["split"] == "train" for s in stacks) or not any(s["split"] == "val" for s in stacks):
            raise InputError("need at least one training and one validation stack")
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(cfg.output_dir) if cfg.output_dir else Path(tmp) / "dataset"
            kind = "instances" if all(s.get("ids") is not None for s in stacks) else "mask"
            manifest = write_dataset(out, stacks, montage=preview(stacks), ignore_label=cfg.ignore_label,
                                     label_kind=kind)
            mlflow.log_artifacts(str(out), artifact_path="dataset")
        with warnings.catch_warnings():  # MLflow cannot tell which local source class to use; either is right
            warnings.simplefilter("ignore", UserWarning)
            for s in stacks:
                mlflow.log_input(mlflow.data.from_numpy(s["image"], source=s["source"].get("images", s["name"]), name=s["name"]),
                                 context=s["split"])
        mlflow.set_tags({"data_fingerprint": manifest["eval_fingerprint"], "content_hash": manifest["content_hash"]})
        mlflow.log_dict({"stacks": [{**s["source"], "name": s["name"], "split": s["split"], "shape": s["shape"],
                                     "dtype": s["dtype"]} for s in manifest["stacks"]]}, "provenance.json")
        mlflow.log_metrics({"train_slices": sum(s["image"].shape[0] for s in stacks if s["split"] == "train"),
                            "val_slices": sum(s["image"].shape[0] for s in stacks if s["split"] == "val")})
        summary = ", ".join(f"{s['name']} {s['split']} {tuple(s['image'].shape)} {s['image'].dtype}" for s in stacks)
        print(f"preprocess: {summary}")
        return {"run_id": run.info.run_id, "dataset_uri": f"runs:/{run.info.run_id}/dataset", "manifest": manifest}


if __name__ == "__main__":
    run_entry(preprocess, PreprocessConfig)
