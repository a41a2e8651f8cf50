"""`predict_spark` entry point: segment many stacks on Apache Spark, with the same results as `predict`.

    python -m serving.predict_spark --input stacks.txt --output_dir predictions --master "local[4]"
    PYTHONPATH=. spark-submit --master spark://head:7077 serving/predict_spark.py --input /shared/stacks.txt ...

`input` is stack files or folders, comma-separated, or a `.txt` file with one path per line; `level` and
`region` pick a level and a block of every input, as in `predict`. Each stack goes by blocks in z, y and x
with a halo (`emunet.inference.blockplan`: at most `chunk_slices` slices deep, as large in y and x as
`memory_gb` allows), one Spark task per block, through the same per-block code as `predict`'s blockwise
path (`emunet.inference.blocktask`). Stages:
1. one task per stack reads it once for its normalisation statistics: percentiles of the WHOLE stack, as
   `predict` uses (a block normalised by its own percentiles would come out differently);
2. one task per block: probabilities of its read box (exactly whole-slice inference's), its objects with
   ids of its own (2-D: each slice's, with their sizes and the pixels they share with the slice before,
   counted in the block's core; 3-D: its cells); it writes its core's mask (and probabilities) and its
   local ids into chunk-aligned images (no two tasks share a chunk) and keeps the labels of its overlaps
   with its neighbours;
3. one task per overlap compares the two blocks' labels there (`stitch.local_pairs`); only the pairs of
   ids that are one object come back to the driver, which joins them (union-find) into one table per
   block (local id -> volume id) and broadcasts them: 3-D cells as the pairs join them
   (`stitch.merge_pairs`), 2-D objects linked through the slices from the blocks' summed counts by the
   rule that links predict's whole slices (`stitch.link_tables`), so the cells are predict's;
4. one task per block relabels its core and writes it into `<name>_labels`, and returns its share of the
   instances table and of the per-slice objects table (a few numbers per cell): the driver adds them up
   into `<name>_instances.csv` and `<name>_objects.csv` (and `objects.csv`, all stacks in one table);
5. a TIFF result (`<name>_mask.tif`, `_prob.tif`, `_labels.tif`, as `predict` writes them, with the
   input's calibration) is written by one task per stack from the blocks' images, a slice at a time.
OME-Zarr results (a Zarr input, or `output_format=zarr`) are the blocks' images themselves, with the
input's scale and chunking, renamed into place when the job has succeeded. No task holds a volume.
Inputs and `output_dir` must be paths that every executor sees (a shared file system). Executors never
talk to MLflow: the driver resolves `model_uri` once (an alias cannot move under a running job) and ships
the model and this project's code to them. The driver shows a bar per stage of blocks (done / total, time
left), from Spark's status tracker.
"""

import contextlib
import csv
import dataclasses
import functools
import shutil
import tempfile
import time
import uuid
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from pyspark import SparkFiles, StorageLevel
from tqdm import tqdm

import emunet
from emunet.core.errors import InputError
from emunet.core.files import atomic_write, output_folder, remove
from emunet.core.io import list_stack_paths, open_volume, stack_exists
from emunet.core.objects import MEASURE_COLUMNS
from emunet.core.omezarr import chunking, create_image, open_image
from emunet.core.normalize import stack_stats
from emunet.registry.tracking import DEFAULT_EXPERIMENT, load_segmenter, log_config, step_run
from emunet.inference.blockplan import halo_for, plan_for
from emunet.inference.blocks import box_slices, default_memory_budget, overlaps_by_block, plan_blocks, plan_overlaps
from emunet.inference.blocktask import label_in_block, relabel_in_block, slice_areas
from emunet.inference.outputs import (DTYPES, OBJECT_COLUMNS, check_targets, mask_page, object_row, output_format,
                                      output_names, result_files, result_targets)
from emunet.inference.params import DEFAULTS, GROWS_OVER_ALL_LINE, SegmentParams
from emunet.inference.preflight import check_results, check_slices_fit
from emunet.inference.segment import instance_mode
from emunet.inference.measures import merge_measures
from emunet.inference.stitch import link_tables, local_pairs, merge_pairs

MODEL_ARCHIVE = "em_unet_model.zip"  # unpacked by Spark on every executor under this name
FACTS = "stack long, slices long, height long, width long, low double, high double, error string"
# The blocks' images of a TIFF result: one slice deep, so the TIFF is read back a slice at a time, and
# y / x as OME-Zarr's default (blocks are multiples of it).
SCRATCH_CHUNKS = (1, 512, 512)


@dataclass(frozen=True)
class PredictSparkConfig:
    """Segment many stacks on a Spark cluster; same options and outputs as `predict`."""

    model_uri: str = "models:/em-unet@champion"
    input: str = ""  # stack files or folders, comma-separated, or a .txt file listing one per line
    output_dir: str = "predictions"
    # Most slices of a task's block. 32 slices of 1024 x 1024 are about half a minute on 2 CPU cores: long
    # enough to hide task overhead, short enough that a 200-slice stack spreads over 7 executors.
    chunk_slices: int = 32
    threshold: float = DEFAULTS.threshold
    tile_size: int = DEFAULTS.tile_size
    overlap: float = DEFAULTS.overlap
    batch_size: int = DEFAULTS.batch_size
    tta: str = DEFAULTS.tta
    save_probability: bool = False  # also write <name>_prob (float32, 4x the mask's size), as predict
    min_object_size: int = DEFAULTS.min_object_size  # pixels in a slice, as in predict
    seed_threshold: float = DEFAULTS.seed_threshold  # as in predict: touching cells counted apart
    instances: str = DEFAULTS.instances  # auto: 3-D objects where the voxel size is near-isotropic, else per slice; 2d; 3d
    grow_over_all: str = DEFAULTS.grow_over_all  # 3-D objects cover membranes too (dense tissue, connectomics style): auto = what the model records (true for dense instance labels); true; false
    engine: str = DEFAULTS.engine  # auto: OpenVINO on a CPU, TensorFlow on a GPU; openvino; tensorflow
    precision: str = DEFAULTS.precision  # auto: bfloat16 where the CPU has bfloat16 units; float32; bfloat16
    save_labels: bool = False  # also write <name>_labels (uint32 instance ids, one per cell in the volume)
    output_format: str = "auto"  # as in predict: auto (OME-Zarr for a Zarr input, else TIFF), tif or zarr
    level: str = ""  # as in predict: level of an OME-Zarr multiscale input; "" = 0, full resolution
    region: str = ""  # as in predict: z0:z1,y0:y1,x0:x1, segment only this block of every input; "" = all
    # GiB one task's block may take (y and x are split to fit). 0: half the memory free on the driver,
    # shared by the tasks a local master runs at once (executors like the driver are assumed).
    memory_gb: float = 0.0
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


@functools.lru_cache(maxsize=1)
def _segmenter(model_dir: str):
    """The pyfunc's segmenter, loaded once per Python worker (Spark reuses workers across tasks)."""
    return load_segmenter(model_dir)


def _with_stack(path: str, use, where: dict | None = None):
    with open_volume(path, **(where or {})) as stack:
        return use(stack)


def stack_facts(frames, where: dict | None = None):
    """mapInPandas, rows `(stack, path)` -> shape and whole-stack percentiles (of the `level` and `region`
    in `where`), or why it is unreadable."""
    for frame in frames:
        rows = []
        for index, path in zip(frame["stack"], frame["path"]):
            try:
                shape, (low, high) = _with_stack(path, lambda s: (s.shape, stack_stats(s)), where)
                rows.append((index, *shape, low, high, ""))
            except InputError as exc:
                text = str(exc)
                rows.append((index, 0, 0, 0, np.nan, np.nan, text if path in text else f"{path}: {text}"))
        yield pd.DataFrame(rows, columns=_columns(FACTS))


@dataclass(frozen=True)
class StackPlan:
    """What every task of one stack needs (broadcast once): where to read it, its window, its blocks with
    their overlaps, the slices' tile plan, the labelling mode, and the images its blocks write
    (`{kind: path}`: "mask", "prob", "labels" as asked, and "local", the blocks' own ids)."""

    path: str
    low: float
    high: float
    blocks: list
    overlaps: list
    of_block: dict
    tiles: object
    mode: str
    images: dict


def spark_blocks(shape, params: SegmentParams, multiple: int, budget: float, mode: str, chunks, chunk_slices: int,
                 channels: int = 1):
    """`(blocks, tiles)` of a `(Z, Y, X)` stack for the tasks: `blockplan.plan_for` in `budget` bytes with
    sides in whole `chunks` for a network of `channels` inputs, at most `chunk_slices` deep (rounded down
    to whole chunks, one at least)."""
    blocks, tiles = plan_for(shape, params, multiple, budget, mode=mode, chunks=chunks, channels=channels)
    depth, height, width = (b - a for a, b in blocks[0].core)
    if depth > chunk_slices:
        blocks = plan_blocks(shape, (chunk_slices, height, width), halo_for(mode), chunks)
    return blocks, tiles


def label_task(item, plans, params: SegmentParams, where: dict):
    """Stage 2, one block `(stack, n)`: label it (`blocktask.label_in_block`), write its core's mask, its
    probabilities (when asked) and its local ids into the stack's images; returns `(stack, n, id_count,
    sizes, slabs, objects, links)`, the slabs being its overlaps' labels, `objects` and `links` the
    tables of its 2-D objects (`stitch.link_tables`; None for 3-D objects)."""
    stack, n = item
    plan = plans.value[stack]
    block = plan.blocks[n]
    segmenter = _segmenter(SparkFiles.get(MODEL_ARCHIVE))
    params = params.replace(low=plan.low, high=plan.high)
    with open_volume(plan.path, **where) as volume:
        part = label_in_block(segmenter.forward_for(params), volume, plan.tiles, plan.low, plan.high, block, params,
                              plan.mode, plan.overlaps, plan.of_block.get(n, []), int(getattr(segmenter, "context", 0)))
    core = box_slices(block.core)
    open_image(plan.images["mask"])[core] = mask_page(part.prob >= params.threshold)
    if "prob" in plan.images:
        open_image(plan.images["prob"])[core] = part.prob
    open_image(plan.images["local"])[core] = part.labels
    return stack, n, part.id_count, part.sizes, part.slabs, part.objects, part.links


def pairs_task(item):
    """Stage 3, one overlap: `((stack, overlap), [(block, labels), (block, labels)])` -> `(stack, a, b,
    pairs)` of `stitch.local_pairs` (a < b)."""
    (stack, _), sides = item
    (a, first), (b, second) = sorted(sides, key=lambda side: side[0])
    return stack, a, b, local_pairs(first, second)


def relabel_task(item, plans, tables):
    """Stage 4, one block `(stack, n)`: its core in volume ids (written to "labels" when asked); returns
    `(stack, measures, slice counts)` (`blocktask.relabel_in_block`)."""
    stack, n = item
    plan = plans.value[stack]
    block = plan.blocks[n]
    local = np.asarray(open_image(plan.images["local"])[box_slices(block.core)])
    ids, measures, counts = relabel_in_block(local, tables.value[(stack, n)], block.core)
    if "labels" in plan.images:
        open_image(plan.images["labels"])[box_slices(block.core)] = ids
    return stack, measures, counts


def stack_tables(mode: str, found: list, pairs: list) -> dict:
    """`{block: relabel table}` of one stack from its blocks' `(n, id_count, sizes, objects, links)` and
    its overlaps' `(a, b, pairs)`: 2-D objects linked through the slices from the summed tables
    (`stitch.link_tables`: exactly predict's cells, up to their numbering), 3-D ones joined by their
    overlaps (`stitch.merge_pairs`)."""
    found = sorted(found, key=lambda f: f[0])
    if mode == "3d":
        return dict(enumerate(merge_pairs(pairs, [f[1] for f in found], [f[2] for f in found])))
    return link_tables(pairs, {f[0]: f[3] for f in found}, {f[0]: f[1] for f in found},
                       {f[0]: f[4] for f in found})[0]


def tiff_task(job):
    """Stage 5, one stack `(out_dir, name, images, calibration)`: its TIFF results from its blocks' images,
    a slice at a time, written as `predict` writes them (`outputs.result_files`)."""
    out_dir, name, images, calibration = job
    arrays = {kind: open_image(path) for kind, path in images.items() if kind != "local"}
    with result_files(Path(out_dir), name, probability="prob" in arrays, objects=False, labels="labels" in arrays,
                      voxel_size=calibration["voxel_size"], unit=calibration["unit"]) as add:
        for z in range(arrays["mask"].shape[0]):
            page = {kind: np.asarray(array[z]) for kind, array in arrays.items()}
            add(z, page["mask"], page.get("prob"), None, page.get("labels"))
    return name


def _collect(spark, rdd, total: int, desc: str) -> list:
    """`rdd.collect()` with a bar of its tasks done out of `total` (one task a block) and the time left,
    read from Spark's status tracker while the job runs."""
    context, group = spark.sparkContext, f"em-unet-{uuid.uuid4().hex}"

    def run():
        context.setJobGroup(group, desc)
        return rdd.collect()

    with ThreadPoolExecutor(1) as pool, tqdm(total=total, desc=desc, unit="block") as bar:
        future = pool.submit(run)
        while not future.done():
            tracker = context.statusTracker()
            done = 0
            for job in tracker.getJobIdsForGroup(group):
                info = tracker.getJobInfo(job)
                for stage in (info.stageIds if info else []):
                    stage_info = tracker.getStageInfo(stage)
                    done += stage_info.numCompletedTasks if stage_info else 0
            bar.update(min(done, total) - bar.n)
            time.sleep(0.5)
        out = future.result()
        bar.update(total - bar.n)
    return out


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


def _write_csv(target: Path, rows: list[list]) -> None:
    with atomic_write(target) as tmp, open(tmp, "w", newline="") as out:
        csv.writer(out).writerows(rows)


def _reads(cfg) -> dict:
    return {"level": cfg.level, "region": cfg.region}


def _budget(cfg) -> float:
    return cfg.memory_gb * 2**30 if cfg.memory_gb > 0 else default_memory_budget()


def _checked_inputs(cfg: PredictSparkConfig) -> tuple[list[Path], list[str], list[str]]:
    """Input paths, output names and formats ("tif", "zarr"), refused before any Spark work if missing,
    clashing (two inputs, one name; a result onto or inside what is read, or onto a file em-unet did not
    write) or too large to segment even by blocks."""
    paths = input_paths(cfg.input)
    if not paths:
        raise InputError("no input given: pass input=a.tif,b.tif or input=stacks.txt (one path per line)")
    missing = [str(p) for p in paths if not stack_exists(p)]
    if missing:
        raise InputError(f"{len(missing)} input(s) not found: {', '.join(missing[:5])}")
    params = SegmentParams.from_config(cfg)  # checked before any Spark work
    if cfg.chunk_slices < 1:
        raise InputError(f"chunk_slices must be at least 1, got {cfg.chunk_slices}")
    if cfg.memory_gb < 0:
        raise InputError(f"memory_gb must be 0 (half the memory free) or more, got {cfg.memory_gb}")
    names = output_names(paths)
    formats = [output_format(cfg.output_format, p) for p in paths]
    out_dir = Path(cfg.output_dir).absolute()
    check_results(paths, out_dir, names, formats, cfg.save_probability, cfg.save_labels,
                  extra=[out_dir / "objects.csv"])
    # On the driver (executors like it are assumed): the smallest block must fit the budget.
    check_slices_fit(paths, budget=_budget(cfg), params=params, **_reads(cfg))
    return paths, names, formats


def calibrations(paths: list[Path], formats: list[str], where: dict) -> list[dict]:
    """Per input, what its results keep of it: `{"fmt", "voxel_size", "unit", "chunks"}` (the driver reads
    only metadata: every format opens lazily)."""
    out = []
    for path, fmt in zip(paths, formats):
        with open_volume(path, **where) as volume:
            out.append({"fmt": fmt, "voxel_size": volume.voxel_size, "unit": volume.unit, "chunks": volume.chunks})
    return out


def stack_images(stack: contextlib.ExitStack, scratch: Path, out_dir: Path, name: str, shape, cal: dict,
                 cfg: PredictSparkConfig) -> tuple[dict, tuple]:
    """`({kind: empty image}, chunks)` for one stack's blocks to write: OME-Zarr results are made at
    temporary names renamed onto `<name>_<kind>.ome.zarr` when `stack` closes without an error; a TIFF
    result's images, and the blocks' local ids, go to `scratch` (removed at the end)."""
    targets = result_targets(out_dir, name, cfg.save_probability, False, cfg.save_labels, fmt=cal["fmt"])
    chunks = chunking(shape, cal["chunks"] if cal["fmt"] == "zarr" else SCRATCH_CHUNKS)
    images = {}
    for kind, target in targets.items():
        path = stack.enter_context(atomic_write(target)) if cal["fmt"] == "zarr" else scratch / f"{name}_{kind}.zarr"
        create_image(path, shape, DTYPES[kind], chunks, cal["voxel_size"], cal["unit"], name=f"{name}_{kind}")
        images[kind] = str(path)
    images["local"] = str(scratch / f"{name}_local.zarr")
    create_image(images["local"], shape, np.int32, chunks)
    return images, chunks


def _tasks_at_once(spark) -> int:
    """Tasks that share one machine's memory: a local master's cores, else an executor's."""
    context = spark.sparkContext
    if context.master.startswith("local"):
        return max(1, context.defaultParallelism)
    return max(1, int(context.getConf().get("spark.executor.cores", "1")))


def _segment_on_spark(spark, paths, names, formats, model_dir: Path, multiple: int, cfg: PredictSparkConfig,
                      out_dir: Path, tmp: Path, images: contextlib.ExitStack, scratch: Path, channels: int = 1) -> dict:
    """The five stages (`channels`: the network's inputs, a 2.5-D network's neighbouring slices and the
    slice); returns `{"blocks", "slices", "rows": objects rows per stack, "cells"}`."""
    context, where = spark.sparkContext, _reads(cfg)
    context.addPyFile(_zip_code(tmp))
    context.addArchive(shutil.make_archive(str(tmp / MODEL_ARCHIVE.removesuffix(".zip")), "zip", model_dir))
    listed = context.parallelize([(i, str(p)) for i, p in enumerate(paths)], len(paths))
    facts = spark.createDataFrame(listed, "stack long, path string").mapInPandas(
        lambda frames: stack_facts(frames, where), FACTS).toPandas().sort_values("stack")
    if (facts["error"] != "").any():
        raise InputError("; ".join(facts.loc[facts["error"] != "", "error"]))
    calibration = calibrations(paths, formats, where)
    params = SegmentParams.from_config(cfg)
    budget = (cfg.memory_gb * 2**30) if cfg.memory_gb > 0 else default_memory_budget() / _tasks_at_once(spark)
    plans, items, depths = {}, [], {int(f.stack): int(f.slices) for f in facts.itertuples()}
    for f in facts.itertuples():
        i, shape, cal = int(f.stack), (int(f.slices), int(f.height), int(f.width)), calibration[int(f.stack)]
        mode = instance_mode(params, cal["voxel_size"])
        stack_files, chunks = stack_images(images, scratch, out_dir, names[i], shape, cal, cfg)
        try:
            blocks, tiles = spark_blocks(shape, params, multiple, budget, mode, chunks, cfg.chunk_slices, channels)
        except ValueError as exc:  # the budget is below the smallest block (with this model's tiles)
            raise InputError(f"{paths[i]}: {exc}; pass a larger memory_gb") from None
        overlaps = plan_overlaps(blocks)
        plans[i] = StackPlan(str(paths[i]), float(f.low), float(f.high), blocks, overlaps, overlaps_by_block(overlaps),
                             tiles, mode, stack_files)
        items += [(i, n) for n in range(len(blocks))]
        print(f"{names[i]}: {shape[0]} x {shape[1]} x {shape[2]} in {len(blocks)} blocks of up to "
              f"{' x '.join(str(b - a) for a, b in blocks[0].core)} ({mode} objects)", flush=True)
    shared = context.broadcast(plans)
    labelled = context.parallelize(items, len(items)).map(
        lambda item: label_task(item, shared, params, where)).persist(StorageLevel.MEMORY_AND_DISK)
    found = _collect(spark, labelled.map(lambda r: (*r[:4], *r[5:])), len(items), "label blocks")
    slabs = labelled.flatMap(lambda r: [((r[0], o), (r[1], slab)) for o, slab in r[4].items()])
    pairs = slabs.groupByKey(max(1, min(len(items), context.defaultParallelism * 4))).map(
        lambda kv: pairs_task((kv[0], list(kv[1])))).collect()
    labelled.unpersist()
    tables = {}
    for i, plan in plans.items():
        tables.update({(i, n): table for n, table in stack_tables(plan.mode, [f[1:] for f in found if f[0] == i],
                                                                  [p[1:] for p in pairs if p[0] == i]).items()})
    shared_tables = context.broadcast(tables)
    parts = _collect(spark, context.parallelize(items, len(items)).map(
        lambda item: relabel_task(item, shared, shared_tables)), len(items), "write blocks")
    rows, cells = {}, 0
    for i, plan in plans.items():
        measures = merge_measures([m for stack, m, _ in parts if stack == i], calibration[i]["voxel_size"],
                                  calibration[i]["unit"])
        counts = [c for stack, _, c in parts if stack == i]
        areas = slice_areas(np.concatenate(counts) if counts else np.zeros((0, 3), np.int64), depths[i])
        rows[i] = [object_row(z, a) for z, a in enumerate(areas)]
        _write_csv(out_dir / f"{names[i]}_instances.csv", [MEASURE_COLUMNS, *measures])
        _write_csv(out_dir / f"{names[i]}_objects.csv", [OBJECT_COLUMNS, *rows[i]])
        cells += len(measures)
    tiffs = [(str(out_dir), names[i], plan.images, calibration[i]) for i, plan in plans.items()
             if calibration[i]["fmt"] == "tif"]
    if tiffs:
        context.parallelize(tiffs, len(tiffs)).map(tiff_task).collect()
    return {"blocks": len(items), "slices": sum(depths.values()), "rows": rows, "cells": cells}


def predict_spark(cfg: PredictSparkConfig) -> dict:
    """Run the step. Returns `{"run_id", "outputs", "slices", "blocks"}`; writes per input what `predict`
    writes (`<name>_mask`, with `save_probability` `<name>_prob`, with `save_labels` `<name>_labels`,
    `<name>_objects.csv`, `<name>_instances.csv`) and `objects.csv` (columns stack, slice, objects,
    total_area, mean_area, areas: all stacks) into `output_dir`."""
    from pyspark.sql import SparkSession

    paths, names, formats = _checked_inputs(cfg)
    out_dir = output_folder(Path(cfg.output_dir).absolute())
    for name, fmt in zip(names, formats):
        check_targets(result_targets(out_dir, name, cfg.save_probability, True, cfg.save_labels, fmt), fmt)
    check_targets({"table": out_dir / "objects.csv"}, "tif")
    scratch = out_dir / f".emunet-spark-{uuid.uuid4().hex[:12]}.partial"  # seen by every executor
    with step_run("predict_spark", cfg.experiment) as run, tempfile.TemporaryDirectory() as tmp, \
            contextlib.ExitStack() as images:
        log_config(cfg)
        model_dir = _fetch_model(cfg.model_uri, Path(tmp))
        meta = load_segmenter(str(model_dir)).meta  # also: refuse a bad model early
        multiple = int(meta["multiple_of"])
        if meta.get("planes", "xy") == "ortho":  # blocks see their slices; xz and yz planes cross every block
            print("this model is to be asked about the xy, xz and yz planes; Spark's blocks see the slices (xy) "
                  "only, so it is asked about the slices (predict, for volumes whose slices fit memory_gb, "
                  "asks all three)", flush=True)
        grows = SegmentParams.from_config(cfg).settled(bool(meta.get("grow_over_all", False))).grow_over_all
        if grows and cfg.grow_over_all == "auto":
            print(GROWS_OVER_ALL_LINE, flush=True)
        cfg = dataclasses.replace(cfg, grow_over_all=str(grows).lower())  # what every task segments with
        mlflow.set_tag("model_run_id", mlflow.models.Model.load(str(model_dir)).run_id or "")
        ours = SparkSession.getActiveSession() is None  # a session we start, we stop; a caller's stays
        # Spark's own console bar would write over the driver's bars of blocks.
        builder = SparkSession.builder.appName("em-unet predict_spark").config("spark.ui.showConsoleProgress", "false")
        spark = (builder.master(cfg.master) if cfg.master else builder).getOrCreate()
        try:
            scratch.mkdir()
            start = time.time()
            done = _segment_on_spark(spark, paths, names, formats, model_dir, multiple, cfg, out_dir, Path(tmp),
                                     images, scratch, 2 * int(meta.get("context_slices", 0)) + 1)
            seconds = time.time() - start
        finally:
            remove(scratch)
            if ours:
                spark.stop()
        _write_csv(out_dir / "objects.csv", [["stack", *OBJECT_COLUMNS]] +
                   [[names[i], *row] for i in sorted(done["rows"]) for row in done["rows"][i]])
        mlflow.log_metrics({"stacks": len(paths), "slices": done["slices"], "blocks": done["blocks"],
                            "cells": done["cells"], "slices_per_sec": done["slices"] / seconds})
        print(f"wrote {len(paths)} segmentation(s) ({done['slices']} slices, {done['blocks']} blocks, "
              f"{done['cells']} cells) to {out_dir}")
        return {"run_id": run.info.run_id, "outputs": sorted(str(p) for p in out_dir.iterdir()),
                "slices": done["slices"], "blocks": done["blocks"]}


if __name__ == "__main__":
    # Run by module name, not as __main__: executors must import the task functions from the shipped code.
    from emunet.registry.cli import run_entry
    from serving.predict_spark import PredictSparkConfig as Config, predict_spark as step

    run_entry(step, Config)
