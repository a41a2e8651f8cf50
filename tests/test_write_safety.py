"""Results never land on the user's data (issue 21): every path a run will write is checked, before any
work, against every path it reads (resolved: symlinks and `..` do not hide a clash; a Zarr image or a
folder of slices is its whole tree) and against existing files em-unet did not write. A user's
`cells_mask.tif` ground truth was scored against and then replaced by the prediction."""

import hashlib
import os

import numpy as np
import pytest
import tifffile

from emunet.core.errors import InputError
from emunet.core.omezarr import SliceWriter, create_image, open_image
from emunet.inference.outputs import result_files
from emunet.inference.preflight import check_writes, read_container, written_by_em_unet
from serving.predict_spark import PredictSparkConfig, _checked_inputs
from tests.conftest import run_module


def tree_digest(folder) -> dict[str, str]:
    """`{relative path: sha256}` of every file under `folder`: the bytes of the user's data, all of it."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def write_cells(folder, name="cells", shape=(3, 32, 40), seed=0):
    image = np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)
    tifffile.imwrite(folder / f"{name}.tif", image, photometric="minisblack")
    return folder / f"{name}.tif"


def predict_proc(world, cwd, *args):
    return run_module("serving.predict", "--model_uri", world["trained"]["model_uri"], *args, cwd=cwd,
                      env_uri=world["uri"])


def refused(proc) -> str:
    """The one `error:` line of a run refused as the user's mistake (exit 2, no traceback)."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


def test_ground_truth_named_like_a_result_is_scored_not_replaced(world, tmp_path):
    """input=d/cells.tif labels=d/cells_mask.tif output_dir=d: the prediction would replace the truth."""
    data = tmp_path / "d"
    data.mkdir()
    write_cells(data)
    truth = (np.random.default_rng(1).random((3, 32, 40)) > 0.5).astype(np.uint8) * 255
    tifffile.imwrite(data / "cells_mask.tif", truth, photometric="minisblack")
    before = tree_digest(data)
    proc = predict_proc(world, tmp_path, "--input", str(data / "cells.tif"), "--labels", str(data / "cells_mask.tif"),
                        "--output_dir", str(data))
    line = refused(proc)
    assert line.count(str(data / "cells_mask.tif")) >= 2 and "output_dir" in line, line  # the result and the labels
    assert tree_digest(data) == before  # byte-identical, and nothing new (not even a .partial)


def test_an_input_named_like_another_inputs_result_is_not_overwritten_before_it_is_read(world, tmp_path):
    """input=d/a.tif,d/a_mask.tif output_dir=d: a's mask would replace the second input before it is read.
    Spelled through `..` and a symlinked output_dir, it is the same file."""
    data = tmp_path / "d"
    data.mkdir()
    write_cells(data, "a")
    write_cells(data, "a_mask", seed=1)
    (tmp_path / "link").symlink_to(data)
    before = tree_digest(data)
    for out in (data, tmp_path / "d" / ".." / "d", tmp_path / "link"):
        proc = predict_proc(world, tmp_path, "--input", f"{data / 'a.tif'},{data / 'a_mask.tif'}",
                            "--output_dir", str(out))
        line = refused(proc)
        assert str(out / "a_mask.tif") in line and str(data / "a_mask.tif") in line, line
    assert tree_digest(data) == before


def write_zarr(path, data):
    create_image(path, data.shape, np.uint8, (2, 16, 16), (40.0, 8.0, 8.0), "nm")
    with SliceWriter(open_image(path)) as write:
        for z, page in enumerate(data):
            write(z, page)


def test_results_are_never_written_inside_the_zarr_image_they_read(world, tmp_path):
    """input=d/x.ome.zarr output_dir=d/x.ome.zarr: the results went into the input's container (and a level
    of it, x.ome.zarr/0, is the same container)."""
    data = tmp_path / "d"
    data.mkdir()
    image = data / "x.ome.zarr"
    write_zarr(image, np.random.default_rng(0).integers(0, 255, (4, 32, 32), dtype=np.uint8))
    before = tree_digest(data)
    for source, out in ((image, image), (image / "0", image / "results")):
        line = refused(predict_proc(world, tmp_path, "--input", str(source), "--output_dir", str(out)))
        assert str(out) in line and str(source) in line and "output_dir" in line, line
    assert tree_digest(data) == before and not (image / "results").exists()


def test_a_users_file_at_a_result_name_is_never_replaced(world, tmp_path):
    """A file em-unet did not write (not read by this run either) at a result's name is refused, not
    overwritten: a TIFF without our mark, a CSV with another header."""
    write_cells(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    tifffile.imwrite(out / "cells_mask.tif", np.ones((3, 32, 40), np.uint8), photometric="minisblack")
    before = tree_digest(out)
    line = refused(predict_proc(world, tmp_path, "--input", str(tmp_path / "cells.tif"), "--output_dir", str(out)))
    assert str(out / "cells_mask.tif") in line and "not written by em-unet" in line, line
    (out / "cells_mask.tif").unlink()
    (out / "cells_objects.csv").write_text("my,own,table\n1,2,3\n")
    before = tree_digest(out)
    line = refused(predict_proc(world, tmp_path, "--input", str(tmp_path / "cells.tif"), "--output_dir", str(out)))
    assert str(out / "cells_objects.csv") in line, line
    assert tree_digest(out) == before


def test_a_rerun_into_the_same_output_dir_replaces_its_own_results(world, tmp_path):
    """What em-unet wrote it may replace: calibrated TIFFs (whose first description Fiji's calibration
    rewrites), OME-Zarr images, the tables."""
    tifffile.imwrite(tmp_path / "tomo.tif", np.random.default_rng(2).integers(0, 255, (3, 32, 48), dtype=np.uint8),
                     imagej=True, resolution=(1 / 0.004, 1 / 0.004),
                     metadata={"spacing": 0.05, "unit": "um", "axes": "ZYX"})
    write_zarr(tmp_path / "vol.ome.zarr", np.random.default_rng(3).integers(0, 255, (4, 32, 32), dtype=np.uint8))
    out = tmp_path / "out"
    args = ("--input", f"{tmp_path / 'tomo.tif'},{tmp_path / 'vol.ome.zarr'}", "--output_dir", str(out),
            "--save_probability", "true", "--save_labels", "true")
    first = predict_proc(world, tmp_path, *args)
    assert first.returncode == 0, first.stderr[-3000:]
    results = sorted(p.name for p in out.iterdir())
    assert len(results) == 10 and all(written_by_em_unet(out / name) for name in results), results
    inodes = {name: os.stat(out / name).st_ino for name in results}
    second = predict_proc(world, tmp_path, *args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == results
    assert all(os.stat(out / name).st_ino != inodes[name] for name in results)  # each replaced by a new file


def test_spark_checks_its_objects_table_and_results_before_starting_spark(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    write_cells(data)
    (data / "objects.csv").write_text("sample,count\n")  # the user's table at the name of Spark's table
    with pytest.raises(InputError, match="objects.csv exists and was not written by em-unet"):
        _checked_inputs(PredictSparkConfig(input=str(data / "cells.tif"), output_dir=str(tmp_path / "d")))
    write_zarr(tmp_path / "x.ome.zarr", np.zeros((2, 16, 16), np.uint8))
    with pytest.raises(InputError, match="inside .*x.ome.zarr, which this run reads"):
        _checked_inputs(PredictSparkConfig(input=str(tmp_path / "x.ome.zarr"), output_dir=str(tmp_path / "x.ome.zarr")))
    assert not (tmp_path / "x.ome.zarr" / "x_mask.ome.zarr").exists()


def test_check_writes_resolves_containers(tmp_path):
    """The pure check: an HDF5 dataset is its file, a folder of slices its whole tree, a result folder
    that would replace a tree holding an input clashes too; our own results are recognised."""
    (tmp_path / "vol.h5").write_bytes(b"")
    with pytest.raises(InputError, match="onto .*vol.h5:/raw"):
        check_writes([f"{tmp_path / 'vol.h5'}:/raw"], [tmp_path / "vol.h5"])
    (tmp_path / "slices").mkdir()
    assert read_container(tmp_path / "slices") == tmp_path / "slices"
    with pytest.raises(InputError, match="inside"):
        check_writes([tmp_path / "slices"], [tmp_path / "slices" / "sub" / "slices_mask.tif"])
    with pytest.raises(InputError, match="over"):
        check_writes([tmp_path / "r.ome.zarr" / "in.tif"], [tmp_path / "r.ome.zarr"])
    check_writes([tmp_path / "slices"], [tmp_path / "slices_mask.tif", tmp_path / "out" / "slices_objects.csv"])
    (tmp_path / "out").mkdir()
    with result_files(tmp_path / "out", "cells", probability=True, voxel_size=(50.0, 4.0, 4.0), unit="nm") as add:
        add(0, np.ones((4, 4), bool), np.ones((4, 4)), [16], np.ones((4, 4), np.uint32))
    ours = sorted((tmp_path / "out").iterdir())
    assert len(ours) == 4 and all(written_by_em_unet(p) for p in ours)
    check_writes([tmp_path / "slices"], ours)  # replaceable
    tifffile.imwrite(tmp_path / "user.tif", np.zeros((4, 4), np.uint8), description="em-unet like")
    assert not written_by_em_unet(tmp_path / "user.tif")
    os.symlink(tmp_path / "user.tif", tmp_path / "out" / "linked_mask.tif")
    with pytest.raises(InputError, match="linked_mask.tif exists and was not written by em-unet"):
        check_writes([], [tmp_path / "out" / "linked_mask.tif"])
