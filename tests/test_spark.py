"""`predict_spark` on a real local Spark (`local[2]`): several stacks, one cut into chunks, give the very
masks and object counts of the single-machine `predict` with the same registered model."""

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import tifffile

from emunet.core.io import open_volume
from emunet.core.normalize import stack_stats
from serving.predict import PredictConfig, predict
from serving.predict_spark import SliceRange, chunk_bounds, input_paths, stack_facts, write_mask_stack
from emunet.inference.outputs import result_files
from emunet.inference.tiling import iter_probabilities, plan_tiles
from tests.conftest import ROOT, run_module
from tests.test_io_formats import write_ome_zarr
from tests.test_zarr_output import read_image


def forward_passes(stack, bounds, **options) -> list[tuple]:
    """The slices in each forward pass of the tiler over `stack` cut at `bounds` (slice z holds value z)."""
    passes = []

    def record(tiles):
        passes.append(tuple(int(round(t.mean() * (len(stack) - 1))) for t in tiles))
        return tiles

    low, high = stack_stats(stack)
    for z0, z1 in bounds:
        list(iter_probabilities(record, SliceRange(stack, z0, z1), low, high, **options))
    return passes


@pytest.mark.parametrize("shape, tile_size", [((11, 64, 64), 1024), ((9, 40, 57), 1024), ((7, 100, 150), 64)])
def test_aligned_chunks_make_the_forward_passes_of_the_whole_stack(shape, tile_size):
    stack = np.broadcast_to(np.arange(shape[0], dtype=np.float32)[:, None, None], shape)
    step = plan_tiles(shape[1], shape[2], tile_size, 4, batch_size=4).slices_per_pass
    options = dict(tile_size=tile_size, batch_size=4, multiple=4)
    whole = forward_passes(stack, [(0, shape[0])], **options)
    assert forward_passes(stack, chunk_bounds(shape[0], 3, step), **options) == whole
    if step > 1:  # chunks of 3 slices that ignore the step would batch slices differently
        assert forward_passes(stack, chunk_bounds(shape[0], 3, 1), **options) != whole


def test_chunk_bounds_cover_the_stack_in_multiples_of_the_step():
    assert chunk_bounds(11, 4, 4) == [(0, 4), (4, 8), (8, 11)]
    assert chunk_bounds(11, 3, 4) == [(0, 4), (4, 8), (8, 11)]
    assert chunk_bounds(5, 32, 1) == [(0, 5)]


def test_input_list_file_resolves_relative_lines(tmp_path):
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "stacks.txt").write_text("a.tif\n\n/data/b.tif\n")
    assert input_paths(str(tmp_path / "lists" / "stacks.txt")) == [tmp_path / "lists" / "a.tif", Path("/data/b.tif")]


def stacks(folder):
    """Three inputs: a uint16 stack larger than a chunk whose brightness climbs with depth (so statistics
    of one chunk differ from the stack's), a small uint8 stack, and a float `.npy` stack."""
    from emunet.core.synthetic import synthetic_stack

    image, _ = synthetic_stack(3, 0, (10, 64, 64))
    ramp = (image.astype(np.float32) * np.linspace(2, 60, 10)[:, None, None]).astype(np.uint16)
    tifffile.imwrite(folder / "deep.tif", ramp, photometric="minisblack")
    small, _ = synthetic_stack(3, 1, (3, 40, 57))
    tifffile.imwrite(folder / "small.tif", small, photometric="minisblack")
    np.save(folder / "floaty.npy", synthetic_stack(3, 2, (5, 48, 48))[0].astype(np.float32) / 7)
    return ["deep", "small", "floaty"], [folder / "deep.tif", folder / "small.tif", folder / "floaty.npy"]


def mlflow_run(cwd: Path, store: str, *args: str) -> subprocess.CompletedProcess:
    """`mlflow run . <args>` as a user types it; `python` in the MLproject command is this interpreter."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for leftover in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):  # set by earlier tests
        env.pop(leftover, None)
    return subprocess.run([sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local",
                           "--experiment-name", "em-unet", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_spark_masks_equal_single_machine_predict(world, tmp_path):
    if shutil.which("java") is None:
        pytest.skip("no java on PATH: Spark needs a JRE (.ci/run installs openjdk-17-jre-headless)")
    version = mlflow.register_model(world["trained"]["model_uri"], "spark-test")
    model_uri = f"models:/spark-test/{version.version}"
    names, paths = stacks(tmp_path)
    # The deep stack again as a calibrated OME-Zarr image in chunks of 2 slices: its three tasks of 4 slices
    # write their chunks straight into one <name>_mask.ome.zarr.
    write_ome_zarr(tmp_path / "zdeep.ome.zarr", tifffile.imread(paths[0]), scale=(0.05, 0.01, 0.01), levels=1,
                   chunks=(2, 32, 32))
    names, paths = [*names, "zdeep"], [*paths, tmp_path / "zdeep.ome.zarr"]
    proc = mlflow_run(tmp_path, world["uri"], "-e", "predict_spark", "-P", "master=local[2]",
                      "-P", f"model_uri={model_uri}", "-P", f"input={','.join(map(str, paths))}",
                      "-P", f"output_dir={tmp_path / 'spark'}", "-P", "chunk_slices=4", "-P", "min_object_size=5")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "wrote 4 segmentation(s) (28 slices, 9 chunks)" in proc.stdout  # deep.tif and zdeep: 3 chunks each
    zarr_mask, scale, units, chunks = read_image(tmp_path / "spark" / "zdeep_mask.ome.zarr")
    assert scale == pytest.approx([0.05, 0.01, 0.01]) and units == ["micrometer"] * 3 and chunks == (2, 32, 32)
    assert not list((tmp_path / "spark").glob("*.partial"))

    predict(PredictConfig(model_uri=model_uri, input=",".join(map(str, paths[:3])), output_dir=str(tmp_path / "one"),
                          min_object_size=5))
    for name in names[:3]:
        spark_mask = tifffile.imread(tmp_path / "spark" / f"{name}_mask.tif")
        single = tifffile.imread(tmp_path / "one" / f"{name}_mask.tif")
        assert spark_mask.dtype == single.dtype == np.uint8 and spark_mask.shape == single.shape
        np.testing.assert_array_equal(spark_mask, single, err_msg=name)
    deep = tifffile.imread(tmp_path / "one" / "deep_mask.tif")
    np.testing.assert_array_equal(zarr_mask, deep)  # the chunks the tasks wrote make predict's volume
    assert 0.05 < (deep == 255).mean() < 0.95  # a real segmentation, not all one value

    # Had a chunk been normalised with its own statistics, its mask would differ.
    segmenter = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    last = tifffile.imread(paths[0])[8:10]
    assert (segmenter.segment(last, *stack_stats(last)) * 255 != deep[8:10]).any()

    table = list(csv.DictReader(open(tmp_path / "spark" / "objects.csv")))
    assert [(r["stack"], int(r["slice"])) for r in table] == [(n, z) for n, z_size in zip(names, (10, 3, 5, 10))
                                                               for z in range(z_size)]
    for name in names[:3]:
        single_rows = list(csv.DictReader(open(tmp_path / "one" / f"{name}_objects.csv")))
        spark_rows = [{k: v for k, v in r.items() if k != "stack"} for r in table if r["stack"] == name]
        assert spark_rows == single_rows, name
    assert any(int(r["objects"]) > 0 for r in table)

    run = mlflow.search_runs(experiment_names=["em-unet"], filter_string="tags.step = 'predict_spark'",
                             output_format="list")[0]
    assert run.info.status == "FINISHED" and run.data.params["chunk_slices"] == "4"
    assert run.data.metrics["slices"] == 28 and run.data.tags["model_run_id"] == world["trained"]["run_id"]


def test_predict_spark_refuses_clashing_names_before_starting_spark(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        tifffile.imwrite(tmp_path / folder / "cells.tif", np.zeros((2, 32, 32), np.uint8))
    inputs = f"{tmp_path / 'a' / 'cells.tif'},{tmp_path / 'b' / 'cells.tif'}"
    proc = run_module("serving.predict_spark", "--input", inputs, cwd=tmp_path, env_uri=f"sqlite:///{tmp_path / 'm.db'}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: several inputs would write the same output name cells")


def test_stack_facts_are_whole_stack_statistics_or_a_named_error(tmp_path):
    stack = np.random.default_rng(0).integers(0, 4000, (6, 20, 30), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "good.tif", stack, photometric="minisblack")
    (tmp_path / "cut.tif").write_bytes((tmp_path / "good.tif").read_bytes()[:300])  # a truncated copy
    frame = pd.DataFrame({"stack": [0, 1], "path": [str(tmp_path / "good.tif"), str(tmp_path / "cut.tif")]})
    facts = pd.concat(stack_facts(iter([frame])))
    good, cut = facts.iloc[0], facts.iloc[1]
    assert (good.slices, good.height, good.width) == (6, 20, 30) and good.error == ""
    assert (good.low, good.high) == stack_stats(stack)
    # Executors open every format the way predict does: an MRC tomogram, an HDF5 dataset, OME-Zarr.
    import h5py

    from tests.test_io_formats import write_mrc

    write_mrc(tmp_path / "tomo.mrc", stack.astype(np.int16))
    with h5py.File(tmp_path / "vol.h5", "w") as f:
        f["raw"] = stack
    write_ome_zarr(tmp_path / "vol.ome.zarr", stack, levels=1)
    others = [str(tmp_path / "tomo.mrc"), f"{tmp_path / 'vol.h5'}:/raw", str(tmp_path / "vol.ome.zarr")]
    facts = pd.concat(stack_facts(iter([pd.DataFrame({"stack": [0, 1, 2], "path": others})])))
    assert (facts["error"] == "").all() and (facts["slices"] == 6).all()
    assert all((f.low, f.high) == stack_stats(stack) for f in facts.itertuples())
    assert cut.error.startswith(f"{tmp_path / 'cut.tif'}: ") and "truncated or corrupt" in cut.error


def test_two_attempts_of_one_task_never_write_into_each_others_file(tmp_path):
    """A retried or speculative Spark task writes the mask its first attempt is still writing. With one
    fixed `.partial` name the second attempt truncated the first's file and renamed it away under it (the
    first then failed, or left a broken TIFF). Each attempt now writes a file of its own and renames it
    when complete: the result is one attempt's whole stack, whichever finishes last."""
    first_slices = np.zeros((3, 16, 16), np.uint8)
    second_slices = np.ones((3, 16, 16), np.uint8)
    with result_files(tmp_path, "cells", objects=False) as first:
        first(0, first_slices[0])
        with result_files(tmp_path, "cells", objects=False) as second:  # starts while the first is writing
            for z in range(3):
                second(z, second_slices[z])
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "cells_mask.tif") > 0, second_slices > 0)
        first(1, first_slices[1])
        first(2, first_slices[2])
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "cells_mask.tif"), first_slices)
    assert [p.name for p in tmp_path.iterdir()] == ["cells_mask.tif"]


def test_a_spark_task_writes_its_mask_from_packed_slices(tmp_path):
    masks = np.random.default_rng(0).random((3, 10, 13)) > 0.5
    frame = pd.DataFrame({"stack": [0] * 3, "slice": [2, 0, 1], "mask": [np.packbits(m).tobytes() for m in masks[[2, 0, 1]]],
                          "objects": [0] * 3, "total_area": [0] * 3, "mean_area": [0.0] * 3, "areas": [""] * 3})
    calibration = {"fmt": "tif", "voxel_size": (2.0, 0.5, 0.25), "unit": "µm"}
    rows = write_mask_stack(frame, str(tmp_path), {0: ("cells", 3, 10, 13, calibration)})
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "cells_mask.tif"), masks * 255)
    with open_volume(tmp_path / "cells_mask.tif") as back:  # the input's calibration, as predict keeps it
        assert back.voxel_size == pytest.approx((2.0, 0.5, 0.25)) and back.unit == "µm"
    assert list(rows.columns) == ["stack", "slice", "objects", "total_area", "mean_area", "areas"]
    assert [p.name for p in tmp_path.iterdir()] == ["cells_mask.tif"]
