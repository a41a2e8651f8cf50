"""The result stacks the page offers for download, as the bytes of the TIFFs `predict` writes: the same
writer (`emunet.inference.outputs.result_files`), so a download carries the uploaded stack's voxel size
the way Fiji reads it (ImageJ stack: pixel width and height, slice spacing, unit)."""

import tempfile
from pathlib import Path

import numpy as np

from emunet.inference.outputs import result_files


def result_tiffs(mask: np.ndarray, prob: np.ndarray | None = None, ids: np.ndarray | None = None,
                 voxel_size=None, unit: str | None = None) -> dict[str, bytes]:
    """TIFF bytes of a `(Z, H, W)` {0, 1} / boolean `mask` ("mask": uint8 0 / 255), and with them the
    `(Z, H, W)` probabilities `prob` ("prob": float32) and instance ids `ids` ("labels": uint32), one page
    per slice. With `voxel_size` (z, y, x) in `unit` (the calibration `stacks.read_upload` returns) every
    file is calibrated; without, it is a plain stack."""
    with tempfile.TemporaryDirectory(prefix="em-unet-viewer-") as tmp:
        folder = Path(tmp)
        with result_files(folder, "stack", probability=prob is not None, objects=False, labels=ids is not None,
                          voxel_size=voxel_size, unit=unit) as add:
            for z in range(len(mask)):
                add(z, mask[z], None if prob is None else prob[z], ids=None if ids is None else ids[z])
        kinds = ["mask"] + ["prob"] * (prob is not None) + ["labels"] * (ids is not None)
        return {kind: (folder / f"stack_{kind}.tif").read_bytes() for kind in kinds}


def mask_tiff(mask: np.ndarray, voxel_size=None, unit: str | None = None) -> bytes:
    """The `(Z, H, W)` mask stack as calibrated TIFF bytes, uint8 0 / 255 (the page's mask download)."""
    return result_tiffs(mask, voxel_size=voxel_size, unit=unit)["mask"]
