"""`predict` entry point: segment stacks with a registered (or any logged) model and write the results.

    python -m serving.predict --input stack.tif --output_dir predictions
    python -m serving.predict --model_uri models:/em-unet/3 --input a.tif,b.tif --labels a_gt.tif,b_gt.tif

Inputs are anything `emunet.core.io.open_volume` reads (TIFF, MRC, OME-Zarr, HDF5 as `file.h5:/dataset`,
.npy, folders of slices), optionally one `level` of a multiscale image and one `region` of it. For each
input `<name>` it writes `<name>_mask.tif` (uint8, 0 / 255), optionally `<name>_prob.tif` (float32) and
`<name>_labels.tif` (uint32 instance ids: touching cells separated and followed through the slices),
with the input's voxel size as Fiji reads it; from a Zarr input (or with `output_format=zarr`) the same
as `.ome.zarr` images with its scale and chunking. Also `<name>_objects.csv` (per slice: count and areas
of those instances) and `<name>_instances.csv` (per 3-D object: voxels, centroid, and volume and centroid
in physical units when calibrated). Results are written slice by slice (OME-Zarr: a row of chunks at a
time) to `.partial` files that are renamed only when complete. Images and labels are read one slice at a
time, so memory does not grow with the stack. Two inputs that would write the same `<name>` are refused
before any work. With `labels`, the prediction is also scored, on pixels (Dice...) and on objects (object F1...,
`emunet.core.metrics.ObjectScorer`), the scores are logged to MLflow and printed, with
`per_slice_scores.csv` (one row per slice) as an artifact of the run.
"""

import csv
from dataclasses import dataclass
from pathlib import Path

import mlflow
from tqdm import tqdm

from emunet.registry.cli import run_entry
from emunet.core.errors import InputError
from emunet.core.files import atomic_writes, output_folder
from emunet.core.objects import MEASURE_COLUMNS
from emunet.core.io import check_same_shape, list_stack_paths, open_volume, stack_exists
from emunet.core.normalize import stack_stats
from emunet.registry.tracking import DEFAULT_EXPERIMENT, load_segmenter, log_config, step_run
from emunet.inference.blockplan import needs_blocks
from emunet.inference.blockwise import combine_measures, segment_in_blocks
from emunet.inference.preflight import check_results, check_slices_fit
from emunet.inference.outputs import (OBJECT_COLUMNS, check_targets, object_row, output_format, output_names,
                                      result_files, result_targets, rows_to_csv)
from emunet.inference.measures import merge_measures
from emunet.inference.blocks import default_memory_budget
from emunet.inference.params import DEFAULTS, GROWS_OVER_ALL_LINE, SegmentParams
from emunet.inference.segment import Truth, VolumeScores, segment_volume


@dataclass(frozen=True)
class PredictConfig:
    """Segment stacks with a logged model and write masks, probabilities and object tables."""

    model_uri: str = "models:/em-unet@champion"
    input: str = ""  # stack files or folders of slices, comma-separated
    output_dir: str = "predictions"
    labels: str = ""  # optional ground truth, same order as `input`: scores are logged to MLflow
    threshold: float = DEFAULTS.threshold
    tile_size: int = DEFAULTS.tile_size
    overlap: float = DEFAULTS.overlap
    batch_size: int = DEFAULTS.batch_size
    tta: str = DEFAULTS.tta  # "flips" or "d4": averaged over 4 or 8 views, 4x or 8x the time
    save_probability: bool = False  # also write <name>_prob.tif (float32, 4x the mask's size)
    min_object_size: int = DEFAULTS.min_object_size  # pixels in a slice; smaller pieces are not objects
    seed_threshold: float = DEFAULTS.seed_threshold  # cores that seed one object each; <= threshold: no split
    instances: str = DEFAULTS.instances  # auto: 3-D objects where the voxel size is near-isotropic, else per slice; 2d; 3d
    planes: str = DEFAULTS.planes  # auto: the planes the model records (near-isotropic training data: the xy, xz and yz planes, averaged); xy; ortho
    grow_over_all: str = DEFAULTS.grow_over_all  # 3-D objects cover membranes too (dense tissue, connectomics style): auto = what the model records (true for dense instance labels); true; false
    engine: str = DEFAULTS.engine  # auto: OpenVINO on a CPU, TensorFlow on a GPU; openvino; tensorflow
    precision: str = DEFAULTS.precision  # auto: bfloat16 where the CPU has bfloat16 units; float32; bfloat16
    save_labels: bool = False  # also write <name>_labels.tif (uint32 instance ids)
    label_kind: str = "mask"  # `labels` are a mask (objects: its components) or "instances" (values are ids)
    output_format: str = "auto"  # auto: OME-Zarr (<name>_mask.ome.zarr...) for a Zarr input, TIFF otherwise; tif; zarr
    level: str = ""  # level of an OME-Zarr multiscale input (labels too); "" = 0, full resolution
    region: str = ""  # z0:z1,y0:y1,x0:x1: segment only this block of every input (and its labels); "" = all
    # GiB the segmentation of one block may take; a slice (or, for 3-D objects, a volume) that needs more
    # goes by blocks in z, y and x (emunet.inference.blockwise). 0: half the memory free at the start.
    memory_gb: float = 0.0
    experiment: str = DEFAULT_EXPERIMENT


def options(cfg) -> SegmentParams:
    """The segmentation params of a predict-like config, checked once (an `InputError` names a bad one)."""
    return SegmentParams.from_config(cfg)


LABEL_KINDS = ("mask", "instances")


def window(stack, path: Path) -> tuple[float, float]:
    """The stack's intensity window `(low, high)`, or an `InputError` naming the file."""
    try:
        return stack_stats(stack)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None


def predict_stack(segmenter, stack, name: str, cfg: PredictConfig, out_dir: Path, truth=None,
                  low_high: tuple[float, float] | None = None, scores: VolumeScores | None = None,
                  fmt: str = "tif") -> None:
    """Segment a raw `(Z, H, W)` stack (an array or a lazily read volume) through the one segmentation
    path, writing `<name>_*` files as slices come. Slice by slice (`segment_volume`) when one slice's
    working memory fits `cfg.memory_gb` (default half the memory free), else by blocks in z, y and x
    (`segment_in_blocks`: the same probabilities and mask, the same cells up to their numbering). `truth`
    (same shape; a mask, or ids with `label_kind="instances"`) is read one slice at a time too, and each
    slice is added to `scores`; `low_high` is the stack's intensity window (default: computed here);
    `fmt` "tif" or "zarr" (OME-Zarr images chunked like the stack)."""
    low, high = low_high or stack_stats(stack)
    params = segmenter.settle(options(cfg).replace(low=low, high=high))  # grow_over_all=auto: the model's
    labels = Truth.of_labels(truth, cfg.label_kind) if truth is not None else None
    budget = cfg.memory_gb * 2**30 if cfg.memory_gb > 0 else default_memory_budget()
    blockwise = needs_blocks(tuple(stack.shape), params, segmenter.multiple, budget, getattr(stack, "voxel_size", None))
    where = dict(voxel_size=getattr(stack, "voxel_size", None), unit=getattr(stack, "unit", None), fmt=fmt,
                 shape=tuple(stack.shape), chunks=getattr(stack, "chunks", None))
    if blockwise and segmenter.plane_mode(params, stack.shape[0]) == "ortho":
        # Blocks see their slices (xy) only: the xz and yz planes would run through every block of a column.
        gb = f"{budget / 2**30:.3g}"
        if params.planes == "ortho":
            raise InputError(f"{name}: planes=ortho needs whole slices in memory, and this stack goes by blocks "
                             f"within memory_gb {gb}: use planes=xy or a larger memory_gb")
        print(f"{name}: by blocks (it needs more than memory_gb {gb} at once), which see the xy planes only: "
              "this model, made to be asked about three planes, is asked about the slices (planes=xy)", flush=True)
        params = params.replace(planes="xy")
    if not blockwise:
        with result_files(out_dir, name, probability=cfg.save_probability, labels=cfg.save_labels, **where) as add:
            for result in tqdm(segment_volume(segmenter, stack, params, labels), total=len(stack), desc=name,
                               unit="slice"):
                add(result.z, result.mask, result.prob, result.areas, result.ids)
                if labels is not None:
                    scores.add(result, stack=name)
        return
    # By blocks: the objects tables are made from the blocks' counts (`BlockSliceResult.areas`, `.measures`),
    # never from a whole slice's ids, which alone would take several times a slice's bytes.
    tables = {k: v for k, v in result_targets(out_dir, name, fmt=fmt).items() if k in ("objects", "instances")}
    check_targets(tables, fmt)
    bar = tqdm(desc=name, unit="block")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    with atomic_writes(tables) as tmp, open(tmp["objects"], "w", newline="") as objects, \
            result_files(out_dir, name, probability=cfg.save_probability, objects=False, labels=cfg.save_labels,
                         **where) as add:
        table, measures = csv.writer(objects), None
        table.writerow(OBJECT_COLUMNS)
        for result in segment_in_blocks(segmenter, stack, params, budget=budget, progress=progress, truth=labels):
            add(result.z, result.mask, result.prob, None, result.ids)
            table.writerow(object_row(result.z, result.areas))
            measures = result.measures if measures is None else combine_measures([measures, result.measures])
            if labels is not None:
                scores.add(result, stack=name)
        rows = merge_measures([measures] if measures is not None else [], where["voxel_size"], where["unit"])
        with open(tmp["instances"], "w", newline="") as out:
            csv.writer(out).writerows([MEASURE_COLUMNS, *rows])
    bar.close()


def predict(cfg: PredictConfig) -> dict:
    """Run the step: returns `{"run_id", "outputs", "metrics"}` (`metrics` is empty without labels)."""
    inputs, labels = list_stack_paths(cfg.input), list_stack_paths(cfg.labels)
    if not inputs:
        raise InputError("no input given: pass input=stack.tif (or several, comma-separated)")
    if labels and len(labels) != len(inputs):
        raise InputError(f"got {len(inputs)} input stacks but {len(labels)} label stacks")
    missing = [str(p) for p in [*inputs, *labels] if not stack_exists(p)]
    if missing:
        raise InputError(f"{missing[0]}: file not found" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if cfg.label_kind not in LABEL_KINDS:
        raise InputError(f"label_kind must be one of {', '.join(LABEL_KINDS)}, got {cfg.label_kind!r}")
    names = output_names(inputs)  # before any work: a second input must not overwrite the first's results
    formats = [output_format(cfg.output_format, p) for p in inputs]
    options(cfg)
    check_results([*inputs, *labels], cfg.output_dir, names, formats, cfg.save_probability, cfg.save_labels)
    check_slices_fit(inputs, scored=bool(labels), budget=cfg.memory_gb * 2**30 if cfg.memory_gb > 0 else None,
                     params=options(cfg), level=cfg.level, region=cfg.region)
    out_dir = output_folder(cfg.output_dir)
    with step_run("predict", cfg.experiment) as run:
        log_config(cfg)
        segmenter = load_segmenter(cfg.model_uri)
        forward = segmenter.forward_for(SegmentParams.from_config(cfg))  # chosen on this machine: say which
        print(f"network on {forward.engine} in {forward.precision}", flush=True)
        mlflow.set_tags({"engine": forward.engine, "precision": forward.precision})
        if options(cfg).grow_over_all == "auto" and segmenter.grow_over_all:
            print(GROWS_OVER_ALL_LINE, flush=True)
        written, scores = [], VolumeScores(options(cfg).min_object_size)
        where = {"level": cfg.level, "region": cfg.region}
        for i, (path, name, fmt) in enumerate(zip(inputs, names, formats)):
            with open_volume(path, **where) as stack:
                if labels:
                    with open_volume(labels[i], **where) as truth:
                        check_same_shape(truth, stack.shape, path)
                        predict_stack(segmenter, stack, name, cfg, out_dir, truth, window(stack, path), scores, fmt)
                else:
                    predict_stack(segmenter, stack, name, cfg, out_dir, low_high=window(stack, path), fmt=fmt)
            written.append(name)
        metrics = {}
        if scores.rows:
            metrics = scores.metrics()
            mlflow.log_metrics({f"test_{k}": v for k, v in metrics.items()})
            mlflow.log_text(rows_to_csv(scores.rows), "per_slice_scores.csv")
            print("scores: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        print(f"wrote {len(written)} segmentation(s) to {out_dir.resolve()}")
        return {"run_id": run.info.run_id, "outputs": sorted(str(p) for p in out_dir.iterdir()), "metrics": metrics}


if __name__ == "__main__":
    run_entry(predict, PredictConfig)
