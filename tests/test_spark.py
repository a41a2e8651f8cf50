"""`predict_spark` on a real local Spark (`local[2]`): stacks cut into blocks in z, y and x give the very
masks and probabilities of the single-machine `predict` with the same registered model, and the same
cells (instance labels, instances and objects tables) up to their numbering."""

import csv
import shutil
import sys
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import tifffile

from emunet.core.io import open_volume
from emunet.core.normalize import stack_stats
from emunet.inference.blocktask import slice_areas, slice_counts
from emunet.inference.outputs import result_files
from emunet.inference.params import SegmentParams
from serving.predict import PredictConfig, predict
from serving.predict_spark import PredictSparkConfig, input_paths, predict_spark, spark_blocks, stack_facts
from tests.conftest import run_module
from tests.test_blockwise import bijection
from tests.test_io_formats import write_ome_zarr
from tests.test_zarr_output import read_image


def test_input_list_file_resolves_relative_lines(tmp_path):
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "stacks.txt").write_text("a.tif\n\n/data/b.tif\n")
    assert input_paths(str(tmp_path / "lists" / "stacks.txt")) == [tmp_path / "lists" / "a.tif", Path("/data/b.tif")]


CELLS = {"big": ((192, 192), 70),  # across all eight blocks
         "neighbour": ((192, 300), 40),  # touches BIG across a thin membrane
         "near_x_face": ((60, 176), 10),  # in the first block's core; the blocks across x = 192 see it in their halo only
         "near_y_face": ((176, 40), 10),  # the same across y = 192
         "small": ((320, 320), 15), "other": ((300, 60), 12)}


def cells_volume(shape=(8, 384, 384)) -> np.ndarray:
    """Bright cells (`CELLS`) on a dark background, BIG and NEIGHBOUR parted by a two-pixel membrane;
    the cells shift a little from slice to slice, as sections do. Above them, the cells of
    `tests.test_blockwise.crossing_volume` at this scale (the blocks left of x = 192 read x < 256): TUBE
    through slices 0-5, drifting to the face; FAR, which those blocks see only as a strip x 236-255; in
    slices 6-7 WIDE over both (28 columns of TUBE, 64 of FAR), which continues FAR, not TUBE."""
    yy, xx = np.indices(shape[1:])
    out = np.full(shape, 30, np.uint8)
    for z in range(shape[0]):
        plane = np.zeros(shape[1:], bool)
        for (y, x), r in CELLS.values():
            plane |= (yy - y - z % 3 + 1) ** 2 + (xx - x) ** 2 <= r * r
        plane[:, 261:263] = False
        if z <= 5:
            plane[15:46, 60 + 16 * z:100 + 16 * z] = True  # TUBE
            plane[15:46, 236:300] = True  # FAR
        else:
            plane[15:46, 152:300] = True  # WIDE
        out[z][plane] = 220
    return out


def stacks(folder):
    """Two inputs: an OME-Zarr volume (`cells_volume`, chunks 4 x 192 x 192: 2 x 2 x 2 blocks of one chunk
    each), and a uint16 TIFF stack of synthetic EM cells whose brightness climbs with depth (so statistics
    of one block differ from the stack's), cut into blocks in z only."""
    from emunet.core.synthetic import synthetic_stack

    write_ome_zarr(folder / "cells.ome.zarr", cells_volume(), scale=(0.05, 0.01, 0.01), levels=1, chunks=(4, 192, 192))
    deep, _ = synthetic_stack(3, 1, (10, 64, 64))
    ramp = (deep.astype(np.float32) * np.linspace(2, 60, 10)[:, None, None]).astype(np.uint16)
    tifffile.imwrite(folder / "deep.tif", ramp, photometric="minisblack")
    return ["cells", "deep"], [folder / "cells.ome.zarr", folder / "deep.tif"]


def brightness_model(name: str) -> str:
    """A real Keras model, logged and registered as `name`, whose probability is the normalised image
    through a steep sigmoid (a 1 x 1 convolution of fixed weights): the cells it finds are the bright
    ones painted, so the test knows where they lie. Its model URI and run id."""
    import keras

    from emunet.inference.segmenter import log_segmenter

    inputs = keras.Input((None, None, 1))
    model = keras.Model(inputs, keras.layers.Conv2D(1, 1, activation="sigmoid", name="out")(inputs))
    model.get_layer("out").set_weights([np.full((1, 1, 1, 1), 12.0, np.float32), np.array([-6.0], np.float32)])
    with mlflow.start_run(run_name="brightness") as run, tempfile.TemporaryDirectory() as tmp:
        model.save(Path(tmp) / "brightness.keras")
        log_segmenter(Path(tmp) / "brightness.keras", {"multiple_of": 1})
    version = mlflow.register_model(f"runs:/{run.info.run_id}/model", name)
    return f"models:/{name}/{version.version}", run.info.run_id


OPTIONS = dict(tile_size=64, min_object_size=5, instances="2d", region="0:8", save_labels=True, save_probability=True)
MEMORY_GB = 0.015  # a whole 384 x 384 slice does not fit (30 MiB), nor half of one (20); a 192 x 192 block does (14)


def test_the_test_volume_goes_in_two_by_two_by_two_blocks():
    blocks, _ = spark_blocks((8, 384, 384), SegmentParams.from_dict(dict(tile_size=64, instances="2d")), 4,
                             MEMORY_GB * 2**30, "2d", (4, 192, 192), 4)
    assert [b.core for b in blocks][::7] == [((0, 4), (0, 192), (0, 192)), ((4, 8), (192, 384), (192, 384))]
    assert len(blocks) == 8


def read_instances(path) -> list:
    """The instances table's rows without their ids, sorted: the cells, whatever their numbering."""
    return sorted(row[1:] for row in list(csv.reader(open(path)))[1:])


def table_rows(path) -> list:
    """Per slice: objects, total area and the sorted areas."""
    return [(r["slice"], r["objects"], r["total_area"], sorted(r["areas"].split())) for r in csv.DictReader(open(path))]


@pytest.mark.slow
def test_spark_blocks_give_single_machine_predicts_results(store, tmp_path, monkeypatch, capfd):
    if shutil.which("java") is None:
        pytest.skip("no java on PATH: Spark needs a JRE (.ci/run installs openjdk-17-jre-headless)")
    monkeypatch.setenv("PYSPARK_PYTHON", sys.executable)  # Spark's Python workers run this interpreter
    model_uri, model_run = brightness_model("spark-test")
    names, paths = stacks(tmp_path)
    predict_spark(PredictSparkConfig(model_uri=model_uri, input=",".join(map(str, paths)), master="local[2]",
                                     output_dir=str(tmp_path / "spark"), chunk_slices=4, memory_gb=MEMORY_GB,
                                     **OPTIONS))
    out, err = capfd.readouterr()
    assert "cells: 8 x 384 x 384 in 8 blocks of up to 4 x 192 x 192" in out, out
    assert "deep: 8 x 64 x 64 in 2 blocks of up to 4 x 64 x 64" in out  # region 0:8 of 10 slices
    assert "wrote 2 segmentation(s) (16 slices, 10 blocks" in out
    assert "label blocks: 100%" in err and "10/10" in err and "write blocks: 100%" in err  # the driver's bars
    spark = tmp_path / "spark"
    assert not [p.name for p in spark.iterdir() if "partial" in p.name]  # scratch and temporary names gone
    mask, scale, units, chunks = read_image(spark / "cells_mask.ome.zarr")
    assert scale == pytest.approx([0.05, 0.01, 0.01]) and units == ["micrometer"] * 3 and chunks == (4, 192, 192)

    predict(PredictConfig(model_uri=model_uri, input=",".join(map(str, paths)), output_dir=str(tmp_path / "one"),
                          **OPTIONS))
    one = tmp_path / "one"
    for name, fmt in zip(names, ("ome.zarr", "tif")):
        read = (lambda p: read_image(p)[0]) if fmt == "ome.zarr" else tifffile.imread
        got = {kind: (read(spark / f"{name}_{kind}.{fmt}"), read(one / f"{name}_{kind}.{fmt}"))
               for kind in ("mask", "prob", "labels")}
        assert got["mask"][0].dtype == np.uint8 and got["labels"][0].dtype == np.uint32
        np.testing.assert_array_equal(*got["mask"], err_msg=name)
        np.testing.assert_allclose(*got["prob"], atol=1e-6, err_msg=name)
        mapping = bijection(got["labels"][1], got["labels"][0])  # predict's cells, renumbered
        assert len(mapping) > 5, name
        assert read_instances(spark / f"{name}_instances.csv") == read_instances(one / f"{name}_instances.csv")
        assert table_rows(spark / f"{name}_objects.csv") == table_rows(one / f"{name}_objects.csv")
    assert 0.05 < (mask == 255).mean() < 0.95  # a real segmentation, not all one value
    labels = read_image(spark / "cells_labels.ome.zarr")[0]
    assert len(np.unique(labels)) == len(CELLS) + 3  # every painted cell one id, none split at a face
    # Linked as in the whole volume, whatever a block alone sees: WIDE continues FAR, TUBE ends.
    assert labels[6, 30, 170] == labels[6, 30, 280] == labels[5, 30, 280] != labels[5, 30, 170] > 0

    def ids(name):
        (y, x), r = CELLS[name]
        return np.unique(labels[:, y - r // 2:y + r // 2, x - r // 2:x + r // 2])

    assert all(len(ids(name)) == 1 and ids(name)[0] > 0 for name in CELLS)
    # BIG lies across all eight blocks: its one id is in every block's core.
    assert all((labels[z:z + 4, y:y + 192, x:x + 192] == ids("big")[0]).any()
               for z in (0, 4) for y in (0, 192) for x in (0, 192))
    # The cells by a face, seen whole by the first block and in the halo only by its neighbours: one id,
    # written by the first block only.
    for name in ("near_x_face", "near_y_face"):
        where = np.argwhere(labels == ids(name)[0])
        assert where[:, 1].max() < 192 and where[:, 2].max() < 192 and len(where) > 8 * 250, name

    table = list(csv.DictReader(open(spark / "objects.csv")))
    assert [(r["stack"], int(r["slice"])) for r in table] == [(n, z) for n in names for z in range(8)]
    run = mlflow.search_runs(experiment_names=["em-unet"], filter_string="tags.step = 'predict_spark'",
                             output_format="list")[0]
    assert run.info.status == "FINISHED" and run.data.params["region"] == "0:8"
    assert run.data.metrics["blocks"] == 10 and run.data.tags["model_run_id"] == model_run


def test_slice_areas_add_the_blocks_counts_of_a_slice():
    left = np.array([[[1, 1, 0], [2, 0, 0]], [[0, 0, 0], [0, 3, 3]]], np.uint32)
    right = np.array([[[1, 0], [0, 0]], [[3, 0], [0, 0]]], np.uint32)
    counts = np.concatenate([slice_counts(left, 5), slice_counts(right, 5)])
    assert counts.tolist() == [[5, 1, 2], [5, 2, 1], [6, 3, 2], [5, 1, 1], [6, 3, 1]]
    assert slice_areas(counts - [5, 0, 0], 3) == [[3, 1], [3], []]

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
    # With predict's `level` and `region`: the statistics of what the run segments.
    write_ome_zarr(tmp_path / "two.ome.zarr", stack, levels=2)
    frame = pd.DataFrame({"stack": [0], "path": [str(tmp_path / "two.ome.zarr")]})
    part = pd.concat(stack_facts(iter([frame]), {"level": "1", "region": "1:4,2:8,:"})).iloc[0]
    with open_volume(tmp_path / "two.ome.zarr", level=1, region="1:4,2:8,:") as volume:
        assert (part.slices, part.height, part.width) == volume.shape and volume.shape[:2] == (3, 6)
        assert (part.low, part.high) == stack_stats(volume)


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
