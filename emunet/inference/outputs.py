"""What `predict`, `predict_spark` and the viewer write: output names, the mask, probability and instance
label images (TIFF or OME-Zarr, written as slices come), the objects table (per slice: count and areas of
the separated instances) and the instances table (per 3-D object: size and centroid, physical when
calibrated).

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
from emunet.core.io import HDF5_SPEC
from emunet.core.objects import MEASURE_COLUMNS, ObjectMeasures
from emunet.core.omezarr import SliceWriter, check_replaceable, create_image, open_image

OBJECT_COLUMNS = ["slice", "objects", "total_area", "mean_area", "areas"]


def stack_name(path: Path) -> str:
    """The `<name>` of an input's outputs: a file's name without its suffix, a folder's name, a Zarr
    folder's without `.ome.zarr` / `.zarr`, an HDF5 dataset's file name and dataset name (`vol_raw` for
    `vol.h5:/volumes/raw`)."""
    spec = HDF5_SPEC.fullmatch(str(path))
    if spec:
        inner = (spec[2] or "").strip("/").split("/")[-1]
        return Path(spec[1]).stem + (f"_{inner}" if inner else "")
    for suffix in (".ome.zarr", ".zarr"):
        if path.name.lower().endswith(suffix) and len(path.name) > len(suffix):
            return path.name[:-len(suffix)]
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
    # One allocation (a bool copy and a uint8 copy beside it cost 0.5 GB on a 16384^2 slice, bench/big_slice.py);
    # a bool mask, what the segmentation gives, needs not even the `!= 0` copy (0.27 GB there).
    mask = np.asarray(mask)
    return np.multiply(mask if mask.dtype == bool else mask != 0, np.uint8(255), dtype=np.uint8)


# ImageJ's spelling of the units `open_volume` reports (its TIFF description is ASCII: no "µ").
IMAGEJ_UNITS = {"µm": "micron", "nm": "nm", "Å": "A", "mm": "mm"}


def imagej_calibration(path: Path, shape: tuple[int, int, int], voxel_size, unit: str | None) -> None:
    """Make the finished TIFF at `path` (pages written with `page_options`) an ImageJ stack of `shape`
    (Z, Y, X) with slice spacing `voxel_size[0]` (left out when unknown, None: ImageJ then has no z size
    and `open_volume` reads none back) and `unit`, as Fiji reads calibration: the first page's description
    is rewritten in place (`tifffile.tiffcomment`); X/Y resolution are already on every page."""
    options = {"axes": "ZYX"}
    if voxel_size[0] is not None:
        options["spacing"] = float(voxel_size[0])
    if unit:
        options["unit"] = IMAGEJ_UNITS.get(unit, unit.encode("ascii", "replace").decode())
    tifffile.tiffcomment(path, tifffile.imagej_description(shape, **options))


def page_options(voxel_size) -> dict:
    """`TiffWriter.write` options for one page: minisblack, and with a voxel size whose y and x are known
    its X/Y resolution."""
    options = {"contiguous": True, "photometric": "minisblack"}
    if voxel_size is not None and voxel_size[1] is not None and voxel_size[2] is not None:
        options.update(resolution=(1 / float(voxel_size[2]), 1 / float(voxel_size[1])), resolutionunit="NONE")
    return options


FORMATS = ("auto", "tif", "zarr")
SUFFIXES = {"tif": ".tif", "zarr": ".ome.zarr"}


def output_format(choice: str, path) -> str:
    """"tif" or "zarr" for `choice` ("auto": OME-Zarr for a Zarr input, else TIFF); `InputError` for others."""
    if choice not in FORMATS:
        raise InputError(f"output_format must be one of {', '.join(FORMATS)}, got {choice!r}")
    if choice != "auto":
        return choice
    text = str(path).rstrip("/").lower()
    return "zarr" if text.endswith(".zarr") or ".zarr/" in text else "tif"


def result_targets(out_dir: Path, name: str, probability: bool = False, objects: bool = True, labels: bool = False,
                   fmt: str = "tif") -> dict[str, Path]:
    """`{kind: path}` of the files one input's results go to."""
    suffix = SUFFIXES[fmt]
    targets = {"mask": out_dir / f"{name}_mask{suffix}"}
    if probability:
        targets["prob"] = out_dir / f"{name}_prob{suffix}"
    if labels:
        targets["labels"] = out_dir / f"{name}_labels{suffix}"
    if objects:
        targets["objects"] = out_dir / f"{name}_objects.csv"
        targets["instances"] = out_dir / f"{name}_instances.csv"
    return targets


def check_targets(targets: dict[str, Path], fmt: str) -> None:
    """Before any work: refuse targets that are not ours to replace (an OME-Zarr folder em-unet did not
    write, a folder where a result file goes)."""
    for kind, target in targets.items():
        if fmt == "zarr" and kind in DTYPES:
            check_replaceable(target)
        elif target.is_dir():
            raise InputError(f"{target} is a folder; move it away or pick another output_dir (a result file "
                             f"never replaces a folder)")


DTYPES = {"mask": np.uint8, "prob": np.float32, "labels": np.uint32}


@contextlib.contextmanager
def _tiff_pages(tmp: dict, kinds: list[str], voxel_size, unit):
    """`write(kind, page)` appending pages to TIFFs; ImageJ calibration added when they are complete."""
    count, shape = {"pages": 0}, {}
    with contextlib.ExitStack() as files:
        writers = {k: files.enter_context(tifffile.TiffWriter(tmp[k])) for k in kinds}
        options = page_options(voxel_size)

        def write(kind: str, page: np.ndarray) -> None:
            first = {"description": "em-unet", "software": "em-unet", "metadata": None} if kind not in shape else {}
            writers[kind].write(page, **options, **first)
            shape[kind] = np.shape(page)
            count[kind] = count.get(kind, 0) + 1

        yield write
    if voxel_size is not None:
        for kind in kinds:
            if count.get(kind):
                imagej_calibration(tmp[kind], (count[kind], *shape[kind]), voxel_size, unit)


@contextlib.contextmanager
def _zarr_pages(tmp: dict, kinds: list[str], name: str, shape, chunks, voxel_size, unit):
    """`write(kind, page)` filling OME-Zarr images of `shape`, one row of chunks at a time."""
    if shape is None:
        raise ValueError("OME-Zarr results need the volume's shape up front")
    writers = {}
    for kind in kinds:
        create_image(tmp[kind], shape, DTYPES[kind], chunks, voxel_size, unit, name=f"{name}_{kind}")
        writers[kind] = SliceWriter(open_image(tmp[kind]))
    pages = dict.fromkeys(kinds, 0)

    def write(kind: str, page: np.ndarray) -> None:
        writers[kind](pages[kind], page)
        pages[kind] += 1

    yield write
    for kind, writer in writers.items():
        writer.flush()
        if pages[kind] != shape[0]:
            raise RuntimeError(f"{tmp[kind]}: {pages[kind]} of {shape[0]} slices written")


@contextlib.contextmanager
def result_files(out_dir: Path, name: str, probability: bool = False, objects: bool = True,
                 labels: bool = False, voxel_size=None, unit: str | None = None, fmt: str = "tif",
                 shape: tuple | None = None, chunks: tuple | None = None):
    """Write one input's results slice by slice: yields `add(z, mask, prob=None, areas=None, ids=None)`.

    Files: `<name>_mask` (uint8 0 / 255), with `probability` `<name>_prob` (float32), with `labels`
    `<name>_labels` (uint32 instance ids, 0 background, one id per object through the slices), as `.tif`
    or, with `fmt="zarr"`, `.ome.zarr` images of `shape` (Z, Y, X) chunked like `chunks` (the input's;
    `emunet.core.omezarr`); with `objects` `<name>_objects.csv` (`OBJECT_COLUMNS`: per slice) and
    `<name>_instances.csv` (`MEASURE_COLUMNS`: per 3-D object, from the `ids` given to `add`). With the input's
    `voxel_size` (z, y, x; an axis None where unknown) in `unit`, the images carry what is known: TIFFs as
    Fiji reads it (ImageJ stack: pixel width and height, slice spacing, unit), OME-Zarr as the scale
    (`emunet.core.omezarr` says what an unknown axis gets); the instances table leaves empty what needs an
    unknown axis. All are renamed into place together
    when the block ends without an error; a failure or a kill leaves nothing that looks finished."""
    targets = result_targets(out_dir, name, probability, objects, labels, fmt)
    images = [k for k in ("mask", "prob", "labels") if k in targets]
    check_targets(targets, fmt)
    with atomic_writes(targets) as tmp, contextlib.ExitStack() as files:
        pages = files.enter_context(_zarr_pages(tmp, images, name, shape, chunks, voxel_size, unit) if fmt == "zarr"
                                    else _tiff_pages(tmp, images, voxel_size, unit))
        table = csv.writer(files.enter_context(open(tmp["objects"], "w", newline=""))) if objects else None
        if table is not None:
            table.writerow(OBJECT_COLUMNS)
        measures = ObjectMeasures(voxel_size, unit)

        def add(z: int, mask: np.ndarray, prob: np.ndarray | None = None, areas: list[int] | None = None,
                ids: np.ndarray | None = None) -> None:
            page = {"mask": mask_page(mask), "prob": np.asarray(prob, np.float32) if prob is not None else None,
                    "labels": np.asarray(ids, np.uint32) if ids is not None else None}
            for kind in images:
                pages(kind, page[kind])
            if table is not None:
                table.writerow(object_row(z, areas))
                measures.add(z, ids)

        yield add
        if objects:
            with open(tmp["instances"], "w", newline="") as out:
                csv.writer(out).writerows([MEASURE_COLUMNS, *measures.rows()])
