"""Stacks from the browser: uploaded files (one multi-page TIFF, or several 2-D PNG/TIFF slices) read
with `emunet.core.io`, the same reader and the same checks as the pipeline, with its messages rewritten to
name the uploaded files instead of the server's temporary paths."""

import hashlib
import re
import tempfile
from pathlib import Path

import numpy as np

from emunet.core.errors import InputError
from emunet.core.io import read_volume
from emunet.core.synthetic import synthetic_stack

UPLOAD_TYPES = ("tif", "tiff", "png")
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


def read_upload(files: list[tuple[str, bytes]]) -> np.ndarray:
    """Read uploaded `(name, content)` files as one stack.

    One file: a multi-page TIFF, or a single 2-D TIFF/PNG (one slice). Several files: 2-D slices of the
    same size, ordered by natural sort of their names (`z2` before `z10`). Returns the raw `(Z, H, W)`
    array in its own dtype. Raises `InputError` with a message naming the uploaded file.
    """
    if not files:
        raise InputError("no file uploaded")
    names = [safe_name(name) for name, _ in files]
    for name in names:
        if Path(name).suffix.lower().lstrip(".") not in UPLOAD_TYPES:
            raise InputError(f"{name}: not an image stack; upload a multi-page TIFF or PNG/TIFF slices "
                             f"({', '.join('.' + t for t in UPLOAD_TYPES)})")
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
            return read_volume(target)
        except InputError as exc:
            raise InputError(_scrub(str(exc), folder)) from None


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


def digest(stack: np.ndarray) -> str:
    """A short content hash of a stack (values, shape and dtype): the stack's part of the cache key."""
    h = hashlib.sha256(f"{stack.shape}{stack.dtype}".encode())
    h.update(np.ascontiguousarray(stack).view(np.uint8).reshape(-1))
    return h.hexdigest()[:16]


def sample_data() -> tuple[np.ndarray, np.ndarray]:
    """The sample stack: `(image, mask)`, `SAMPLE_SHAPE` uint8, from `emunet.core.synthetic`."""
    return synthetic_stack(SAMPLE_SEED, SAMPLE_INDEX, SAMPLE_SHAPE)
