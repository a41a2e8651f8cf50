"""What `predict`, `predict_spark` and the viewer write: output names, the mask, probability and instance
label TIFFs (one page per slice, written as slices come), and the objects table (per slice: count and
areas of the separated instances).

Files are written to attempt-unique temporary names and renamed when complete (`emunet.core.files`).
"""

import contextlib
import csv
import io
from pathlib import Path

import numpy as np
import tifffile

from emunet.core.errors import InputError
from emunet.core.files import atomic_writes

OBJECT_COLUMNS = ["slice", "objects", "total_area", "mean_area", "areas"]


def stack_name(path: Path) -> str:
    """The `<name>` of an input's outputs: a file's name without its suffix, or a folder's name."""
    return path.stem if path.is_file() else path.name


def output_names(paths: list[Path]) -> list[str]:
    """`<name>` of every input, refused before any work when two inputs would write the same files
    (`a/cells.tif` and `b/cells.tif` both make `cells_mask.tif`): the second would silently win."""
    names = [stack_name(p) for p in paths]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        which = ", ".join(str(p) for p in paths if stack_name(p) in clashes)
        raise InputError(f"several inputs would write the same output name {', '.join(clashes)} ({which}); "
                         f"rename one, or segment them in separate runs with different output_dir")
    return names


def object_row(z: int, areas: list[int]) -> list:
    """A row of the objects table: slice, object count, total and mean area, the areas."""
    return [z, len(areas), sum(areas), round(float(np.mean(areas)), 1) if areas else 0.0, " ".join(map(str, areas))]


def rows_to_csv(rows: list[dict]) -> str:
    """Dict rows (all with the keys of the first) as CSV text, header first."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def mask_page(mask: np.ndarray) -> np.ndarray:
    """A `(H, W)` (or stack) {0, 1} / boolean mask as stored: uint8 0 / 255, which every viewer shows."""
    return (np.asarray(mask) != 0).astype(np.uint8) * np.uint8(255)


def mask_tiff(mask: np.ndarray) -> bytes:
    """A `(Z, H, W)` mask as multi-page TIFF bytes, uint8 0 / 255, one page per slice (a stack in Fiji)."""
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, mask_page(mask), photometric="minisblack")
    return buffer.getvalue()


# ImageJ's spelling of the units `open_volume` reports (its TIFF description is ASCII: no "µ").
IMAGEJ_UNITS = {"µm": "micron", "nm": "nm", "Å": "A", "mm": "mm"}


def imagej_calibration(path: Path, shape: tuple[int, int, int], voxel_size, unit: str | None) -> None:
    """Make the finished TIFF at `path` (pages written with `page_options`) an ImageJ stack of `shape`
    (Z, Y, X) with slice spacing `voxel_size[0]` and `unit`, as Fiji reads calibration: the first page's
    description is rewritten in place (`tifffile.tiffcomment`); X/Y resolution are already on every page."""
    options = {"axes": "ZYX", "spacing": float(voxel_size[0])}
    if unit:
        options["unit"] = IMAGEJ_UNITS.get(unit, unit.encode("ascii", "replace").decode())
    tifffile.tiffcomment(path, tifffile.imagej_description(shape, **options))


def page_options(voxel_size) -> dict:
    """`TiffWriter.write` options for one page: minisblack, and with a voxel size its X/Y resolution."""
    options = {"contiguous": True, "photometric": "minisblack"}
    if voxel_size is not None:
        options.update(resolution=(1 / float(voxel_size[2]), 1 / float(voxel_size[1])), resolutionunit="NONE")
    return options


@contextlib.contextmanager
def result_files(out_dir: Path, name: str, probability: bool = False, objects: bool = True,
                 labels: bool = False, voxel_size=None, unit: str | None = None):
    """Write one input's results slice by slice: yields `add(z, mask, prob=None, areas=None, ids=None)`.

    Files: `<name>_mask.tif` (uint8 0 / 255), with `probability` `<name>_prob.tif` (float32), with
    `labels` `<name>_labels.tif` (uint32 instance ids, 0 background, one id per object through the
    slices), with `objects` `<name>_objects.csv` (`OBJECT_COLUMNS`). With the input's `voxel_size`
    (z, y, x) in `unit`, the TIFFs carry it as Fiji reads it (ImageJ stack: pixel width and height,
    slice spacing, unit). All are renamed into place together when the block ends without an error; a
    failure or a kill leaves no file that looks finished."""
    targets = {"mask": out_dir / f"{name}_mask.tif"}
    if probability:
        targets["prob"] = out_dir / f"{name}_prob.tif"
    if labels:
        targets["labels"] = out_dir / f"{name}_labels.tif"
    if objects:
        targets["objects"] = out_dir / f"{name}_objects.csv"
    tiffs = [k for k in ("mask", "prob", "labels") if k in targets]
    pages = {"count": 0, "shape": None}
    with atomic_writes(targets) as tmp:
        with contextlib.ExitStack() as files:
            writers = {k: files.enter_context(tifffile.TiffWriter(tmp[k])) for k in tiffs}
            table = csv.writer(files.enter_context(open(tmp["objects"], "w", newline=""))) if objects else None
            if table is not None:
                table.writerow(OBJECT_COLUMNS)
            options = page_options(voxel_size)

            def add(z: int, mask: np.ndarray, prob: np.ndarray | None = None, areas: list[int] | None = None,
                    ids: np.ndarray | None = None) -> None:
                first = {"description": "em-unet", "metadata": None} if pages["count"] == 0 else {}
                page = {"mask": mask_page(mask), "prob": np.asarray(prob, np.float32) if prob is not None else None,
                        "labels": np.asarray(ids, np.uint32) if ids is not None else None}
                for key, writer in writers.items():
                    writer.write(page[key], **options, **first)
                if table is not None:
                    table.writerow(object_row(z, areas))
                pages["count"], pages["shape"] = pages["count"] + 1, np.shape(mask)

            yield add
        if voxel_size is not None and pages["count"]:
            for key in tiffs:
                imagej_calibration(tmp[key], (pages["count"], *pages["shape"]), voxel_size, unit)
