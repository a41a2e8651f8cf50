"""Stacks from the browser: uploaded files (one stack in any single-file format `emunet.core.io` reads:
TIFF, MRC, .npy, HDF5, PNG; or several 2-D PNG/TIFF slices) opened with `open_volume`, the same reader and
the same checks as the pipeline, with its messages rewritten to name the uploaded files instead of the
server's temporary paths. The stack keeps the voxel size the file declares, for the page and the downloads."""

import hashlib
import re
import tempfile
from pathlib import Path

import numpy as np

from emunet.core.errors import InputError
from emunet.core.io import SLICE_SUFFIXES, STACK_SUFFIXES, open_volume
from emunet.core.normalize import stack_stats
from emunet.core.synthetic import synthetic_stack
from viewer.messages import short_error

# One file: anything `open_volume` reads from a single file; several files: 2-D slices, as in a folder.
UPLOAD_TYPES = tuple(s.lstrip(".") for s in STACK_SUFFIXES)
SLICE_TYPES = tuple(s.lstrip(".") for s in SLICE_SUFFIXES)
UPLOAD_LABEL = "Image stack (TIFF, MRC, .npy, HDF5, or PNG/TIFF slices)"
UPLOAD_HELP = ("one stack (multi-page or OME-TIFF, MRC/.rec/.st, .npy, HDF5 with one dataset), or several 2-D "
               "PNG/TIFF slices (ordered by name: z2 before z10); the voxel size is read from the file")
# The "sample data" button: one synthetic sample, small enough to segment in seconds on a laptop CPU.
SAMPLE_SHAPE = (12, 192, 192)
SAMPLE_SEED, SAMPLE_INDEX = 0, 0


def safe_name(name: str) -> str:
    """The file name a browser sent, without any directory part (never trusted as a path)."""
    base = re.split(r"[\\/]", name)[-1].strip()
    return base or "upload"


def _scrub(message: str, folder: Path) -> str:
    """`emunet.core.io` names files by their path; on the server that is a temporary folder nobody should
    see. Keep the uploaded names only."""
    return message.replace(str(folder / "slices") + "/", "").replace(str(folder / "slices"), "the uploaded slices") \
        .replace(str(folder) + "/", "").replace(str(folder), "the upload")


def _read(target: Path) -> tuple[np.ndarray, dict]:
    with open_volume(target) as volume:
        calibration = {"voxel_size": volume.voxel_size, "unit": volume.unit}
        return np.asarray(volume), calibration if volume.voxel_size is not None else {}


def read_upload(files: list[tuple[str, bytes]]) -> tuple[np.ndarray, dict]:
    """Read uploaded `(name, content)` files as one stack.

    One file: any stack `open_volume` reads from one file (a 2-D image is one slice). Several files: 2-D
    PNG/TIFF slices of the same size, ordered by natural sort of their names (`z2` before `z10`). Returns
    the raw `(Z, H, W)` array in its own dtype and its calibration, `{"voxel_size": (z, y, x), "unit": u}`
    or `{}` when the file declares none (the keywords `result_files` takes). Raises `InputError` with a
    one-line message naming the uploaded file, for whatever the reader refuses or fails on.
    """
    if not files:
        raise InputError("no file uploaded")
    names = [safe_name(name) for name, _ in files]
    types = UPLOAD_TYPES if len(files) == 1 else SLICE_TYPES
    for name in names:
        if Path(name).suffix.lower().lstrip(".") not in types:
            what = "not an image stack" if len(files) == 1 else "not a 2-D slice"
            raise InputError(f"{name}: {what}; upload one stack ({', '.join('.' + t for t in UPLOAD_TYPES)}) "
                             f"or several PNG/TIFF slices")
    if len(set(names)) != len(names):
        raise InputError(f"two uploaded slices have the same name: {sorted(n for n in names if names.count(n) > 1)[0]}")
    with tempfile.TemporaryDirectory(prefix="em-unet-viewer-") as tmp:
        folder = Path(tmp)
        target = folder / names[0] if len(files) == 1 else folder / "slices"
        target.parent.mkdir(exist_ok=True)
        if len(files) > 1:
            target.mkdir()
        for name, (_, content) in zip(names, files):
            (target / name if len(files) > 1 else target).write_bytes(content)
        try:
            return _read(target)
        except InputError as exc:
            message = str(exc)
        except Exception as exc:  # a reader's own error on a file it half understood: still one line
            message = f"{names[0] if len(files) == 1 else 'the uploaded slices'}: cannot be read ({short_error(exc)})"
        raise InputError(" ".join(_scrub(message, folder).split()))


def upload_name(names) -> str:
    """What to call an upload in messages: its file name, or `N slices` for several files."""
    names = [safe_name(n) for n in names]
    return names[0] if len(names) == 1 else f"{len(names)} slices"


def check_truth(truth: np.ndarray, image: np.ndarray, truth_name: str, image_name: str) -> np.ndarray:
    """A ground-truth stack for `image` as a `(Z, H, W)` uint8 mask in {0, 1} (any non-zero value is
    foreground). Raises `InputError` when the shapes differ."""
    if truth.shape != image.shape:
        raise InputError(f"{truth_name} has shape {truth.shape} but {image_name} has {image.shape}; "
                         f"the ground truth must have one label slice per image slice, of the same size")
    return (np.nan_to_num(truth) != 0).astype(np.uint8)


def describe_stack(stack: np.ndarray) -> str:
    """`12 slices of 192 x 192, uint8`."""
    z, h, w = stack.shape
    return f"{z} slice{'s' if z != 1 else ''} of {h} x {w}, {stack.dtype}"


def _size(value: float) -> str:
    text = f"{value:.4g}"
    return text if any(c in text for c in ".e") else text + ".0"


def describe_voxel(voxel_size=None, unit: str | None = None) -> str:
    """`voxel 2.0 × 1.1 × 1.1 nm (z, y, x)`, or `voxel size unknown` when the file declares none; a size
    the file leaves out (an ImageJ stack without slice spacing: `(None, y, x)`) is `?`."""
    if voxel_size is None:
        return "voxel size unknown"
    sizes = [_size(float(v)) if v is not None else "?" for v in voxel_size]
    missing = [axis for axis, v in zip("zyx", voxel_size) if v is None]
    note = f"; {', '.join(missing)} not given" if missing else ""
    return f"voxel {' × '.join(sizes)} {unit or '(no unit given)'} (z, y, x{note})"


def digest(stack: np.ndarray) -> str:
    """A short content hash of a stack (values, shape and dtype): the stack's part of the cache key."""
    h = hashlib.sha256(f"{stack.shape}{stack.dtype}".encode())
    h.update(np.ascontiguousarray(stack).view(np.uint8).reshape(-1))
    return h.hexdigest()[:16]


def with_stats(stack: np.ndarray, calibration: dict | None = None) -> dict:
    """What the page keeps of a stack: the array, its cache digest, its normalisation window and its
    calibration (`{}` when unknown)."""
    return {"stack": stack, "digest": digest(stack), "stats": stack_stats(stack), "calibration": calibration or {}}


def sample_data() -> tuple[np.ndarray, np.ndarray]:
    """The sample stack: `(image, mask)`, `SAMPLE_SHAPE` uint8, from `emunet.core.synthetic`."""
    return synthetic_stack(SAMPLE_SEED, SAMPLE_INDEX, SAMPLE_SHAPE)
