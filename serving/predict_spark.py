"""`predict_spark` entry point: segment many stacks on Apache Spark, with the same results as `predict`.

    python -m serving.predict_spark --input stacks.txt --output_dir predictions --master "local[4]"
    PYTHONPATH=. spark-submit --master spark://head:7077 serving/predict_spark.py --input /shared/stacks.txt ...

`input` is stack files or folders, comma-separated, or a `.txt` file with one path per line. Three stages:
1. one task per stack reads it once for its normalisation statistics: percentiles of the WHOLE stack, as
   `predict` uses (a chunk normalised by its own percentiles would come out differently);
2. each stack becomes rows `(path, z_start, z_end)` of about `chunk_slices` slices, one task per row,
   segmented by the logged pyfunc with its stack's statistics;
3. one task per stack writes `<name>_mask.tif` (uint8, 0 / 255, as `predict` writes it, with the input's
   calibration) from its chunks; the driver writes one `objects.csv` for all stacks (per slice: object
   count and areas).
A Zarr input (or any input with `output_format=zarr`) gets `<name>_mask.ome.zarr` instead, with the input's
scale and chunking: the driver makes the empty image, and in stage 2 each task writes its own slices
straight into it (its block of slices starts on a chunk boundary, so no two tasks share a chunk and no
task assembles the volume); the image is renamed into place when the job has succeeded.
Inputs and `output_dir` must be paths that every executor sees (a shared file system). Executors never
talk to MLflow: the driver resolves `model_uri` once (an alias cannot move under a running job) and ships
the model and this project's code to them.
"""

import contextlib
import csv
import functools
import math
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from pyspark import SparkFiles

import emunet
from emunet.core.errors import InputError
from emunet.core.files import atomic_write, output_folder
from emunet.core.io import list_stack_paths, open_volume, stack_exists
from emunet.core.omezarr import SliceWriter, create_image, open_image
from emunet.core.normalize import stack_stats
from emunet.registry.tracking import DEFAULT_EXPERIMENT, load_segmenter, log_config, step_run
from emunet.inference.outputs import (check_targets, mask_page, object_row, output_format, output_names, result_files,
                                     result_targets)
from emunet.inference.params import DEFAULTS, SegmentParams
from emunet.inference.preflight import check_results, check_slices_fit
from emunet.inference.segment import segment_probabilities
from emunet.inference.tiling import plan_tiles

MODEL_ARCHIVE = "em_unet_model.zip"  # unpacked by Spark on every executor under this name
FACTS = "stack long, slices long, height long, width long, low double, high double, error string"
SLICES = "stack long, mask binary, slice long, objects long, total_area long, mean_area double, areas string"
TABLE = "stack long, slice long, objects long, total_area long, mean_area double, areas string"


@dataclass(frozen=True)
class PredictSparkConfig:
    """Segment many stacks on a Spark cluster; same options and outputs as `predict` (masks, objects)."""

    model_uri: str = "models:/em-unet@champion"
    input: str = ""  # stack files or folders, comma-separated, or a .txt file listing one per line
    output_dir: str = "predictions"
    # Slices per task. 32 slices of 1024 x 1024 are about half a minute on 2 CPU cores: long enough to
    # hide task overhead, short enough that a 200-slice stack spreads over 7 executors.
    chunk_slices: int = 32
    threshold: float = DEFAULTS.threshold
    tile_size: int = DEFAULTS.tile_size
    overlap: float = DEFAULTS.overlap
    batch_size: int = DEFAULTS.batch_size
    tta: str = DEFAULTS.tta
    min_object_size: int = DEFAULTS.min_object_size  # pixels in a slice, as in predict
    seed_threshold: float = DEFAULTS.seed_threshold  # as in predict: touching cells counted apart
    instances: str = DEFAULTS.instances  # auto: 3-D objects where the voxel size is near-isotropic, else per slice; 2d; 3d
    grow_over_all: bool = DEFAULTS.grow_over_all  # objects cover membranes too (dense tissue, connectomics style)
    engine: str = DEFAULTS.engine  # auto: OpenVINO on a CPU, TensorFlow on a GPU; openvino; tensorflow
    precision: str = DEFAULTS.precision  # auto: bfloat16 where the CPU has bfloat16 units; float32; bfloat16
    output_format: str = "auto"  # as in predict: auto (OME-Zarr for a Zarr input, else TIFF), tif or zarr
    master: str = ""  # "" = what spark-submit or spark-defaults.conf say (local[*] under plain python)
    experiment: str = DEFAULT_EXPERIMENT


def _columns(schema: str) -> list[str]:
    return [field.split()[0] for field in schema.split(", ")]


def input_paths(spec: str) -> list[Path]:
    """Absolute stack paths from `a.tif,b.tif` or from a `.txt` list (relative lines: from its folder)."""
    paths = list_stack_paths(spec)
    if len(paths) == 1 and paths[0].suffix.lower() == ".txt":
        if not paths[0].is_file():
            raise InputError(f"{paths[0]}: list of stacks not found")
        folder = paths[0].parent
        paths = [folder / line.strip() for line in paths[0].read_text().splitlines() if line.strip()]
    return [p.absolute() for p in paths]


def block_step(slices_per_pass: int, chunk_depth: int | None) -> int:
    """The multiple every task's block of slices is cut at: the tiler's slices per forward pass (so that
    chunks batch slices as one pass over the stack does) and, for OME-Zarr output, the chunk depth (so
    that each task owns whole chunks)."""
    return math.lcm(slices_per_pass, chunk_depth) if chunk_depth else slices_per_pass


def chunk_bounds(slices: int, chunk_slices: int, step: int) -> list[tuple[int, int]]:
    """`(z_start, z_end)` rows covering `slices`, each `chunk_slices` rounded up to a multiple of `step`."""
    size = -(-max(1, chunk_slices) // step) * step
    return [(z, min(z + size, slices)) for z in range(0, slices, size)]


class SliceRange:
    """Slices `[start, end)` of a lazily read stack, indexed like a stack: the tiler reads a few slices
    at a time, so a task holds one forward pass of pixels, not its whole chunk."""

    def __init__(self, stack, start: int, end: int):
        self.stack, self.start = stack, start
        self.shape = (end - start, *stack.shape[1:])

    def __getitem__(self, key: slice) -> np.ndarray:
        a, b, _ = key.indices(self.shape[0])
        return np.asarray(self.stack[self.start + a:self.start + b])


@functools.lru_cache(maxsize=1)
def _segmenter(model_dir: str):
    """The pyfunc's segmenter, loaded once per Python worker (Spark reuses workers across tasks)."""
    return load_segmenter(model_dir)


def _with_stack(path: str, use):
    with open_volume(path) as stack:
        return use(stack)


def stack_facts(frames):
    """mapInPandas, rows `(stack, path)` -> shape and whole-stack percentiles, or why it is unreadable."""
    for frame in frames:
        rows = []
        for index, path in zip(frame["stack"], frame["path"]):
            try:
                shape, (low, high) = _with_stack(path, lambda s: (s.shape, stack_stats(s)))
                rows.append((index, *shape, low, high, ""))
            except InputError as exc:
                text = str(exc)
                rows.append((index, 0, 0, 0, np.nan, np.nan, text if path in text else f"{path}: {text}"))
        yield pd.DataFrame(rows, columns=_columns(FACTS))


def _segment_range(stack, row, segmenter, params: SegmentParams) -> list[tuple]:
    """Rows of SLICES for the block, through the one segmentation path; with a `row.target` (an OME-Zarr
    image) the masks are written there, not returned."""
    # The block's slices with the context they have in the whole stack (a 2.5-D model's neighbours).
    params = params.replace(low=row.low, high=row.high)
    probs = segmenter.probabilities(stack, params, row.z_start, row.z_end)
    results = segment_probabilities(probs, params, voxel_size=getattr(stack, "voxel_size", None))
    out = []
    with SliceWriter(open_image(row.target), start=row.z_start) if row.target else contextlib.nullcontext() as write:
        for result in results:
            z = row.z_start + result.z  # results count from 0 within the block
            if write:
                write(z, mask_page(result.mask))
            out.append((row.stack, b"" if write else np.packbits(result.mask).tobytes(), *object_row(z, result.areas)))
    return out


def segment_chunks(frames, params: SegmentParams):
    """mapInPandas, rows `(stack, path, z_start, z_end, low, high, target)` -> one row per slice: the mask as
    packed bits (or, with a `target`, written into that OME-Zarr image) and its objects, computed as
    `predict` computes them. Why not `mlflow.pyfunc.spark_udf`:
    it hands the pyfunc's `predict` a batch of rows, and `predict` normalises what it is given by that
    input's own percentiles; here each chunk needs its whole stack's, which only the segmenter's
    `probabilities(stack, params)` accepts, and a chunk reads its own pixels from its path."""
    segmenter = _segmenter(SparkFiles.get(MODEL_ARCHIVE))
    for frame in frames:
        for row in frame.itertuples(index=False):
            run = functools.partial(_segment_range, row=row, segmenter=segmenter, params=params)
            yield pd.DataFrame(_with_stack(row.path, run), columns=_columns(SLICES))


def write_mask_stack(frame: pd.DataFrame, out_dir: str, shapes: dict) -> pd.DataFrame:
    """applyInPandas per stack: write `<name>_mask.tif` from its slices (unless the stack's masks went
    to OME-Zarr in stage 2) and return its rows of the objects table. `shapes[stack]` is `(name, slices,
    height, width, calibration)`. Each task attempt writes to a temporary name of its own and renames it
    when complete, so a retried or speculative attempt never writes into another's file."""
    frame = frame.sort_values("slice")
    name, slices, height, width, calibration = shapes[int(frame["stack"].iloc[0])]
    if frame["slice"].tolist() != list(range(slices)):
        raise RuntimeError(f"{name}: got slices {frame['slice'].tolist()} of {slices}")
    if calibration.get("fmt") != "zarr":
        with result_files(Path(out_dir), name, objects=False, voxel_size=calibration.get("voxel_size"),
                          unit=calibration.get("unit")) as add:
            for z, packed in zip(frame["slice"], frame["mask"]):
                add(z, np.unpackbits(np.frombuffer(packed, np.uint8), count=height * width).reshape(height, width))
    return frame.drop(columns="mask")


def _zip_code(folder: Path) -> str:
    """`emunet` and `serving` as one zip for `addPyFile`: executors import the task functions from it."""
    import serving

    target = folder / "em_unet_code.zip"
    with zipfile.ZipFile(target, "w") as zf:
        for package in (emunet, serving):
            root = Path(package.__file__).parent
            for source in sorted(root.rglob("*.py")):
                zf.write(source, str(Path(root.name) / source.relative_to(root)))
    return str(target)


def _fetch_model(model_uri: str, folder: Path) -> Path:
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(folder / "model")))
    except MlflowException as exc:
        raise InputError(f"{model_uri}: cannot load the model ({exc.message})") from exc


def _write_table(table: pd.DataFrame, names: list[str], target: Path) -> None:
    with atomic_write(target) as tmp, open(tmp, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["stack", "slice", "objects", "total_area", "mean_area", "areas"])
        for row in table.sort_values(["stack", "slice"]).itertuples(index=False):
            writer.writerow([names[row.stack], row.slice, row.objects, row.total_area,
                             row.mean_area if row.objects else 0, row.areas])


def _checked_inputs(cfg: PredictSparkConfig) -> tuple[list[Path], list[str], list[str]]:
    """Input paths, output names and formats ("tif", "zarr"), refused before any Spark work if missing,
    clashing (two inputs, one name; a result onto or inside what is read, or onto a file em-unet did not
    write) or too large to segment a slice at a time."""
    paths = input_paths(cfg.input)
    if not paths:
        raise InputError("no input given: pass input=a.tif,b.tif or input=stacks.txt (one path per line)")
    missing = [str(p) for p in paths if not stack_exists(p)]
    if missing:
        raise InputError(f"{len(missing)} input(s) not found: {', '.join(missing[:5])}")
    SegmentParams.from_config(cfg)  # checked before any Spark work
    if cfg.chunk_slices < 1:
        raise InputError(f"chunk_slices must be at least 1, got {cfg.chunk_slices}")
    names = output_names(paths)
    formats = [output_format(cfg.output_format, p) for p in paths]
    out_dir = Path(cfg.output_dir).absolute()
    check_results(paths, out_dir, names, formats, objects=False, extra=[out_dir / "objects.csv"])
    check_slices_fit(paths)  # on the driver: executors like it are assumed
    return paths, names, formats


def calibrations(paths: list[Path], formats: list[str]) -> list[dict]:
    """Per input, what its results keep of it: `{"fmt", "voxel_size", "unit", "chunks"}` (the driver reads
    only metadata: every format opens lazily)."""
    out = []
    for path, fmt in zip(paths, formats):
        with open_volume(path) as volume:
            out.append({"fmt": fmt, "voxel_size": volume.voxel_size, "unit": volume.unit, "chunks": volume.chunks})
    return out


def zarr_images(stack: contextlib.ExitStack, out_dir: Path, names: list[str], facts: pd.DataFrame,
                calibration: list[dict]) -> dict[int, str]:
    """`{stack: temporary OME-Zarr image}` for the stacks whose masks go to OME-Zarr, made empty here (the
    driver) and renamed onto `<name>_mask.ome.zarr` when `stack` closes without an error."""
    images = {}
    for f in facts.itertuples():
        cal = calibration[f.stack]
        if cal["fmt"] == "zarr":
            tmp = stack.enter_context(atomic_write(result_targets(out_dir, names[f.stack], objects=False,
                                                                  fmt="zarr")["mask"]))
            create_image(tmp, (int(f.slices), int(f.height), int(f.width)), np.uint8, cal["chunks"],
                         cal["voxel_size"], cal["unit"], name=f"{names[f.stack]}_mask")
            images[int(f.stack)] = str(tmp)
    return images


def plan_chunks(facts: pd.DataFrame, paths: list[Path], multiple: int, cfg: PredictSparkConfig,
                images: dict[int, str] | None = None) -> list[tuple]:
    """Rows `(stack, path, z_start, z_end, low, high, target)` for every stack of `facts` (the first stage's
    output); `target` is the stack's OME-Zarr image from `images` (blocks then start on its chunks) or ""."""
    rows, images = [], images or {}
    for f in facts.sort_values("stack").itertuples():
        target = images.get(int(f.stack), "")
        per_pass = plan_tiles(int(f.height), int(f.width), cfg.tile_size, multiple, cfg.overlap,
                              cfg.batch_size).slices_per_pass
        step = block_step(per_pass, open_image(target).chunks[0] if target else None)
        rows += [(int(f.stack), str(paths[f.stack]), z0, z1, float(f.low), float(f.high), target)
                 for z0, z1 in chunk_bounds(int(f.slices), cfg.chunk_slices, step)]
    return rows


def _segment_on_spark(spark, paths: list[Path], names: list[str], formats: list[str], model_dir: Path,
                      multiple: int, cfg: PredictSparkConfig, out_dir: Path, tmp: Path, images: contextlib.ExitStack
                      ) -> tuple[pd.DataFrame, int]:
    """The three stages; returns the objects table (one row per slice) and the number of chunks. OME-Zarr
    results are made in `images` (renamed into place when it closes)."""
    context = spark.sparkContext
    context.addPyFile(_zip_code(tmp))
    context.addArchive(shutil.make_archive(str(tmp / MODEL_ARCHIVE.removesuffix(".zip")), "zip", model_dir))
    listed = context.parallelize([(i, str(p)) for i, p in enumerate(paths)], len(paths))
    facts = spark.createDataFrame(listed, "stack long, path string").mapInPandas(stack_facts, FACTS).toPandas()
    if (facts["error"] != "").any():
        raise InputError("; ".join(facts.loc[facts["error"] != "", "error"]))
    calibration = calibrations(paths, formats)
    rows = plan_chunks(facts, paths, multiple, cfg, zarr_images(images, out_dir, names, facts, calibration))
    chunks = spark.createDataFrame(context.parallelize(rows, len(rows)),  # one chunk per task, in order
                                   "stack long, path string, z_start long, z_end long, low double, high double, "
                                   "target string")
    shapes = {int(f.stack): (names[f.stack], int(f.slices), int(f.height), int(f.width), calibration[f.stack])
              for f in facts.itertuples()}
    params, target = SegmentParams.from_config(cfg), str(out_dir)
    segmented = chunks.mapInPandas(lambda frames: segment_chunks(frames, params), SLICES)
    table = segmented.groupBy("stack").applyInPandas(lambda frame: write_mask_stack(frame, target, shapes), TABLE)
    return table.toPandas(), len(rows)


def predict_spark(cfg: PredictSparkConfig) -> dict:
    """Run the step. Returns `{"run_id", "outputs", "slices"}`; writes `<name>_mask.tif` per input and
    `objects.csv` (columns stack, slice, objects, total_area, mean_area, areas) into `output_dir`."""
    from pyspark.sql import SparkSession

    paths, names, formats = _checked_inputs(cfg)
    out_dir = output_folder(Path(cfg.output_dir).absolute())
    for name, fmt in zip(names, formats):
        check_targets(result_targets(out_dir, name, objects=False, fmt=fmt), fmt)
    check_targets({"table": out_dir / "objects.csv"}, "tif")
    with step_run("predict_spark", cfg.experiment) as run, tempfile.TemporaryDirectory() as tmp, \
            contextlib.ExitStack() as images:
        log_config(cfg)
        model_dir = _fetch_model(cfg.model_uri, Path(tmp))
        multiple = int(load_segmenter(str(model_dir)).meta["multiple_of"])  # also: refuse a bad model early
        mlflow.set_tag("model_run_id", mlflow.models.Model.load(str(model_dir)).run_id or "")
        ours = SparkSession.getActiveSession() is None  # a session we start, we stop; a caller's stays
        builder = SparkSession.builder.appName("em-unet predict_spark")
        spark = (builder.master(cfg.master) if cfg.master else builder).getOrCreate()
        try:
            start = time.time()
            table, chunks = _segment_on_spark(spark, paths, names, formats, model_dir, multiple, cfg, out_dir, Path(tmp),
                                              images)
            seconds = time.time() - start
        finally:
            if ours:
                spark.stop()
        _write_table(table, names, out_dir / "objects.csv")
        mlflow.log_metrics({"stacks": len(paths), "slices": len(table), "slices_per_sec": len(table) / seconds})
        print(f"wrote {len(paths)} segmentation(s) ({len(table)} slices, {chunks} chunks) to {out_dir}")
        return {"run_id": run.info.run_id, "outputs": sorted(str(p) for p in out_dir.iterdir()), "slices": len(table)}


if __name__ == "__main__":
    # Run by module name, not as __main__: executors must import the task functions from the shipped code.
    from emunet.registry.cli import run_entry
    from serving.predict_spark import PredictSparkConfig as Config, predict_spark as step

    run_entry(step, Config)
