"""The dataset artifact: what `preprocess` writes and `train` / `evaluate` read.

```
dataset/
  manifest.json             stacks, their split, shape, dtype, normalisation stats, provenance
  <stack name>/image.npy    raw (Z, H, W) values, memory-mappable by worker processes
  <stack name>/mask.npy     (Z, H, W) uint8 in {0, 1, 255}: background, foreground, not annotated
  <stack name>/ids.npy      (Z, H, W) uint32 instance ids, only with `label_kind="instances"`
  montage.png               a look at the data
```
Raw values are stored (not normalised floats) so the artifact stays small and normalisation stays the
one function in `emunet.core.normalize`, applied with the per-stack `low` / `high` recorded here.

Sparse labels (nnU-Net's "ignore" label): voxels whose label is the user's `ignore_label` are stored as
`MASK_IGNORE` (255, whatever the user's value was, so readers need no parameter) and count in neither the
loss nor the metrics; the manifest records the user's `ignore_label` (-1: every voxel is annotated, and
then no mask holds 255). Readers split a stored mask with `mask_parts`.

Instance labels (`label_kind="instances"`, touching cells with different ids): the mask is then the
cells' interiors (`emunet.core.labels.interiors`), the training target, and the ids are kept beside it
for scoring (`open_ids`). The manifest records `label_kind`; artifacts without it hold masks.
"""

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from emunet.core.errors import InputError
from emunet.core.files import atomic_write
from emunet.core.labels import is_near_isotropic
from emunet.core.normalize import stack_stats

MANIFEST = "manifest.json"
MONTAGE = "montage.png"
STACK_FILES = {"image.npy", "mask.npy", "ids.npy"}  # ids.npy: instance labels only
IDS = "ids.npy"
LABEL_KINDS = ("mask", "instances")
FORMAT_VERSION = 1
SPLITS = ("train", "val")
MASK_IGNORE = 255  # stored value of a voxel that is not annotated (uint8's highest, as nnU-Net's ignore is the highest)
NO_IGNORE = -1  # `ignore_label` when every voxel is annotated
# Stack names become folder names: keep them to a safe alphabet so a manifest cannot point outside
# the dataset folder.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


@dataclass(frozen=True)
class StackInfo:
    name: str
    split: str  # "train" or "val"
    shape: tuple[int, int, int]
    dtype: str
    low: float  # normalisation percentiles of the whole source stack
    high: float
    source: dict = field(default_factory=dict)  # provenance: file names, slice range, generator seed


def safe_name(text: str) -> str:
    """Turn a file name into a stack name that is safe as a folder name."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "stack"
    return name[:100]


def encode_labels(labels: np.ndarray, ignore_label: int = NO_IGNORE) -> np.ndarray:
    """The stored mask of a label array of any shape and integer (or float) dtype: 0 stays background,
    `ignore_label` becomes `MASK_IGNORE`, any other value is foreground (1). uint8, same shape."""
    labels = np.asarray(labels)
    mask = (labels != 0).astype(np.uint8)
    if ignore_label >= 0:
        mask[labels == ignore_label] = MASK_IGNORE
    return mask


def mask_parts(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """`(foreground, annotated)` bool arrays of a stored mask; `annotated` is None when every voxel is
    (the common case: callers then skip the masking)."""
    mask = np.asarray(mask)
    ignored = mask == MASK_IGNORE
    if not ignored.any():
        return mask != 0, None
    return (mask != 0) & ~ignored, ~ignored


def fully_annotated(annotated: np.ndarray | None, depth: int) -> list[int]:
    """Slices of a `(Z, H, W)` `annotated` map (None: all) with every voxel annotated: the only ones whose
    objects can be scored (a predicted object where nobody looked is neither right nor wrong)."""
    if annotated is None:
        return list(range(depth))
    return [z for z in range(depth) if annotated[z].all()]


def content_hash(*arrays: np.ndarray) -> str:
    """SHA-256 of arrays' shapes, dtypes and bytes: identifies data whatever the file names."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(f"{array.shape}{array.dtype}".encode())
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def is_artifact(folder: Path) -> bool:
    """Whether `folder` holds a dataset artifact and nothing else: a manifest of ours, the montage, and
    the stack folders it names with their arrays (and instance ids). Only such a folder may be replaced."""
    try:
        names = {info.name for info in read_manifest(folder)["stacks"]}
    except InputError:
        return False
    for entry in folder.iterdir():
        if entry.name in (MANIFEST, MONTAGE) and entry.is_file():
            continue
        if entry.name in names and entry.is_dir() and {f.name for f in entry.iterdir()} <= STACK_FILES:
            continue
        return False
    return True


def check_output_dir(out_dir: str | Path) -> Path:
    """Where an artifact may be written: a new or empty folder, or a previous artifact (replaced whole).
    Raises `InputError` for a file, or a folder holding anything else: it may be the user's own files."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"output_dir {out_dir} exists and is a file; pass a new folder for the dataset artifact")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_artifact(out_dir):
        raise InputError(f"output_dir {out_dir} is a folder that holds files of its own, not a dataset artifact "
                         f"written by preprocess; refusing to replace it: pass a new or empty folder")
    return out_dir


def write_dataset(out_dir: str | Path, stacks: list[dict], montage: np.ndarray | None = None,
                  ignore_label: int = NO_IGNORE, label_kind: str = "mask") -> dict:
    """Write the artifact from `stacks`: dicts with `name`, `split`, `image` `(Z, H, W)`, `mask`
    `(Z, H, W)` {0, 1} (and `MASK_IGNORE` where not annotated, see `encode_labels`) and optional `source`,
    `low`, `high` (default: stats of `image`); `montage` is an `(H, W, 3)` uint8 RGB picture of the data;
    `ignore_label` the user's value for "not annotated", recorded in the manifest. A stack may carry `ids`
    `(Z, H, W)` instance ids (stored as uint32 `ids.npy`; `label_kind` is then "instances" and its `mask`
    the ids' interiors); `label_kind` is recorded in the manifest.

    Written to a temporary sibling folder and renamed into place, so a killed run leaves no folder that
    looks finished. `out_dir` must be new, empty or a previous artifact (`check_output_dir`): a previous
    artifact is replaced, anything else is refused, never deleted. Returns the manifest.
    """
    if label_kind not in LABEL_KINDS:
        raise InputError(f"label_kind is {label_kind!r}; expected one of {', '.join(LABEL_KINDS)}")
    out_dir = check_output_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out_dir) as tmp:
        tmp.mkdir()
        manifest = _write_contents(tmp, stacks, ignore_label, label_kind)
        if montage is not None:
            cv2.imwrite(str(tmp / MONTAGE), cv2.cvtColor(montage, cv2.COLOR_RGB2BGR))
    return manifest


def _checked_ids(stack: dict) -> np.ndarray | None:
    """A stack's instance ids as uint32, or None; refuses a shape unlike the image's and values that do
    not fit uint32 (a negative id would wrap into another cell's id)."""
    ids = stack.get("ids")
    if ids is None:
        return None
    ids = np.asarray(ids)
    if ids.shape != stack["image"].shape:
        raise InputError(f"instance ids of stack {stack['name']} have shape {ids.shape} but its image has "
                         f"{stack['image'].shape}")
    if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.uint32).max):
        raise InputError(f"instance ids of stack {stack['name']} run from {ids.min()} to {ids.max()}; "
                         f"expected 0 (background) and positive ids below 2**32")
    return ids.astype(np.uint32, copy=False)


def _write_contents(folder: Path, stacks: list[dict], ignore_label: int = NO_IGNORE,
                    label_kind: str = "mask") -> dict:
    infos, hashes = [], {}
    for s in stacks:
        if not SAFE_NAME.fullmatch(s["name"]):
            raise InputError(f"stack name {s['name']!r} is not a safe folder name")
        low, high = s.get("low"), s.get("high")
        if low is None:
            low, high = stack_stats(s["image"])
        (folder / s["name"]).mkdir()
        np.save(folder / s["name"] / "image.npy", s["image"])
        np.save(folder / s["name"] / "mask.npy", s["mask"].astype(np.uint8))
        ids = _checked_ids(s)
        if ids is not None:
            if label_kind != "instances":
                raise InputError(f"stack {s['name']} has instance ids but label_kind is {label_kind!r}; "
                                 f"pass label_kind='instances'")
            np.save(folder / s["name"] / IDS, ids)
        # The ids are scored: two artifacts with the same masks but other ids must not compare as equal.
        hashes[s["name"]] = content_hash(s["image"], s["mask"], *([] if ids is None else [ids]))
        infos.append(StackInfo(s["name"], s["split"], tuple(s["image"].shape), str(s["image"].dtype),
                               float(low), float(high), {**s.get("source", {}), "sha256": hashes[s["name"]]}))
    val = sorted(hashes[i.name] for i in infos if i.split == "val")
    manifest = {
        "format_version": FORMAT_VERSION,
        "stacks": [asdict(i) for i in infos],
        # Identifies the evaluation data: model versions are compared only on equal fingerprints.
        "eval_fingerprint": hashlib.sha256("".join(val).encode()).hexdigest()[:16],
        "content_hash": hashlib.sha256("".join(sorted(hashes.values())).encode()).hexdigest()[:16],
        # The user's "not annotated" value (stored as MASK_IGNORE): train and evaluate read it from here.
        "ignore_label": int(ignore_label),
        "label_kind": label_kind,  # "instances": ids.npy beside each mask (the interiors) for scoring
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def read_manifest(dataset_dir: str | Path) -> dict:
    """Read and check `manifest.json`; stacks come back as `StackInfo`. Raises `InputError` for a missing,
    unparsable or malformed manifest, and for a stack name that is not a plain folder name (`../x`, `/x`):
    a manifest must not make train or evaluate read files outside the dataset folder."""
    path = Path(dataset_dir) / MANIFEST
    if not path.is_file():
        raise InputError(f"{dataset_dir}: not a dataset artifact (no {MANIFEST}); run the preprocess step first")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc}); run the preprocess step again") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise InputError(f"{path}: format version {version}, expected {FORMAT_VERSION}")
    stacks = []
    for entry in manifest.get("stacks", []):
        try:
            info = StackInfo(**{**entry, "shape": tuple(entry["shape"])})
        except (TypeError, KeyError) as exc:
            raise InputError(f"{path}: malformed stack entry {str(entry)[:200]} ({exc})") from None
        if not isinstance(info.name, str) or not SAFE_NAME.fullmatch(info.name) or info.split not in SPLITS:
            raise InputError(f"{path}: bad stack entry name={info.name!r} split={info.split!r}; a stack name "
                             f"is a folder inside the dataset (letters, digits, _ . -), never a path")
        stacks.append(info)
    return {**manifest, "stacks": stacks}


def _load_array(path: Path, mode: str | None) -> np.ndarray:
    """One array of the artifact. A truncated, emptied or replaced file is the user's to fix (run the
    preprocess step again), not a NumPy failure to pass on: `InputError` naming the file."""
    try:
        return np.load(path, mmap_mode=mode, allow_pickle=False)
    except (ValueError, EOFError) as exc:  # a bad header, too few bytes, pickled objects
        raise InputError(f"{path}: not a readable .npy array ({exc}); the dataset artifact is damaged, run the "
                         f"preprocess step again") from None


def open_stack(dataset_dir: str | Path, info: StackInfo, mmap: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """`(image, mask)` of one stack, memory-mapped read-only by default (shared, not copied, by workers).
    Raises `InputError` for an array that does not read or whose shape is not the manifest's: a damaged
    artifact would otherwise fail much later, inside NumPy or Keras, as if it were a bug."""
    if not isinstance(info.name, str) or not SAFE_NAME.fullmatch(info.name):  # also for StackInfo not from read_manifest
        raise InputError(f"stack name {info.name!r} is not a folder inside {dataset_dir}; refusing to read it")
    folder = Path(dataset_dir) / info.name
    mode = "r" if mmap else None
    arrays = _load_array(folder / "image.npy", mode), _load_array(folder / "mask.npy", mode)
    for name, array in zip(("image.npy", "mask.npy"), arrays):
        if array.shape != tuple(info.shape):
            raise InputError(f"{folder / name} has shape {array.shape} but the manifest says {tuple(info.shape)}; "
                             f"the dataset artifact is damaged, run the preprocess step again")
    return arrays


def open_ids(dataset_dir: str | Path, info: StackInfo, mmap: bool = True) -> np.ndarray | None:
    """The `(Z, H, W)` uint32 instance ids of one stack (memory-mapped read-only by default), or None
    when the artifact holds none (`label_kind` "mask", or an artifact older than instance labels)."""
    if not isinstance(info.name, str) or not SAFE_NAME.fullmatch(info.name):
        raise InputError(f"stack name {info.name!r} is not a folder inside {dataset_dir}; refusing to read it")
    path = Path(dataset_dir) / info.name / IDS
    return np.load(path, mmap_mode="r" if mmap else None) if path.is_file() else None


def label_kind_of(manifest: dict) -> str:
    """"mask" or "instances": how the artifact's labels were given (artifacts without the key: "mask")."""
    return manifest.get("label_kind", "mask")


def is_sparse(manifest: dict) -> bool:
    """Whether the artifact's masks may hold `MASK_IGNORE` (preprocess was given an `ignore_label`;
    artifacts written before sparse labels have no such key)."""
    return int(manifest.get("ignore_label", NO_IGNORE)) >= 0


def stacks_in(manifest: dict, split: str) -> list[StackInfo]:
    """The stacks of one split."""
    return [s for s in manifest["stacks"] if s.split == split]


def seen_in_3d(manifest: dict, split: str | None = None) -> bool:
    """Whether every stack (of `split`, or of the artifact) is fully annotated and has a near-isotropic
    voxel size the files give (`emunet.core.labels.is_near_isotropic`; unknown counts as not): data whose
    cells are found and scored as 3-D objects."""
    stacks = manifest["stacks"] if split is None else stacks_in(manifest, split)
    return bool(stacks) and not is_sparse(manifest) and all(
        is_near_isotropic(s.source.get("voxel_size")) is True for s in stacks)


# Instance labels whose cells cover at least this share of the voxels tile the tissue (neurons in a
# connectome: 99.998 % of the medulla cube): their background is membrane, not a space between cells.
DENSE_COVERAGE = 0.5


def dense_instances(dataset_dir: str | Path, manifest: dict, split: str | None = None) -> bool:
    """Whether the artifact's instance labels (of `split`, or all its stacks: training and evaluate decide
    alike) are dense tissue: cells with ids cover at least `DENSE_COVERAGE` of the voxels. False for masks
    (no ids)."""
    covered = total = 0
    for info in manifest["stacks"] if split is None else stacks_in(manifest, split):
        ids = open_ids(dataset_dir, info)
        if ids is None:
            return False
        for z in range(ids.shape[0]):  # a slice at a time: the ids are memory-mapped
            covered += int(np.count_nonzero(ids[z]))
        total += ids.size
    return total > 0 and covered >= DENSE_COVERAGE * total
