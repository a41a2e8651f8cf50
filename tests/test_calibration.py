"""A voxel size the file does not give is unknown, never guessed (serial sections of 50 nm cut from 4 nm
pixels must not become 4 nm cubes): readers give None for that axis, the user may supply it
(`voxel_size`, `unit`), and the writers and the instances table cope with what stays unknown. Then the
options through the real preprocess entry point."""

import csv
import json
import warnings

import mlflow
import mrcfile
import numpy as np
import pytest
import tifffile
import zarr

from emunet.core.errors import InputError
from emunet.core.io import CalibrationWarning, ReadOptions, open_volume, read_options
from emunet.core.objects import ObjectMeasures
from emunet.inference.outputs import result_files
from tests.conftest import run_module


def imagej_tif(path, stack, pixel=4.0, unit="nm", **metadata):
    """An ImageJ stack with a pixel size and, only if given, a slice spacing (as Fiji writes it)."""
    tifffile.imwrite(path, stack, imagej=True, resolution=(1 / pixel, 1 / pixel),
                     metadata={"unit": unit, "axes": "ZYX", **metadata})
    return path


def cube_ids():
    """Instance ids (4, 10, 10): object 1 is 2 slices x 3 x 3 voxels (z 1-2, y 2-4, x 5-7), object 2 one voxel."""
    ids = np.zeros((4, 10, 10), np.uint32)
    ids[1:3, 2:5, 5:8] = 1
    ids[3, 9, 9] = 2
    return ids


def instances(folder, ids, calibration):
    """Write the results of `ids` with `calibration` and read the instances table back, with the warnings."""
    folder.mkdir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with result_files(folder, "cells", labels=True, **calibration) as add:
            for z, page in enumerate(ids):
                add(z, page != 0, areas=[int((page == i).sum()) for i in np.unique(page) if i], ids=page)
    rows = list(csv.DictReader(open(folder / "cells_instances.csv")))
    return {int(r["id"]): r for r in rows}, [str(w.message) for w in caught]


def test_imagej_tiff_without_spacing_gives_rows_without_volumes_and_one_warning(tmp_path):
    ids = cube_ids()
    path = imagej_tif(tmp_path / "sections.tif", ids.astype(np.uint8))
    with open_volume(path) as volume:
        assert volume.voxel_size == (None, 4.0, 4.0) and volume.unit == "nm"  # not (4, 4, 4)
        calibration = {"voxel_size": volume.voxel_size, "unit": volume.unit}
    rows, caught = instances(tmp_path / "out", ids, calibration)
    one = rows[1]
    assert one["voxels"] == "18" and one["volume"] == "" and one["z"] == ""
    assert float(one["y"]) == pytest.approx(3 * 4.0) and float(one["x"]) == pytest.approx(6 * 4.0)
    assert one["unit"] == "nm" and rows[2]["volume"] == ""
    notes = [m for m in caught if "instances table" in m]
    assert len(notes) == 1 and "along z" in notes[0] and "voxel_size=z,y,x" in notes[0], caught
    # The TIFFs written keep what is known and claim nothing else: pixel size, no slice spacing.
    with open_volume(tmp_path / "out" / "cells_mask.tif") as mask:
        assert mask.voxel_size == (None, pytest.approx(4.0), pytest.approx(4.0)) and mask.unit == "nm"
    assert "spacing" not in tifffile.TiffFile(tmp_path / "out" / "cells_mask.tif").imagej_metadata


def test_given_voxel_size_gives_the_volumes_by_hand(tmp_path):
    ids = cube_ids()
    path = imagej_tif(tmp_path / "sections.tif", ids.astype(np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # supplying what the file lacks is not a contradiction: no warning
        with open_volume(path, voxel_size="50,4,4") as volume:
            assert volume.voxel_size == (50.0, 4.0, 4.0) and volume.unit == "nm"
            calibration = {"voxel_size": volume.voxel_size, "unit": volume.unit}
    rows, caught = instances(tmp_path / "out", ids, calibration)
    assert float(rows[1]["volume"]) == pytest.approx(18 * 50 * 4 * 4)  # 14 400 nm³
    assert float(rows[1]["z"]) == pytest.approx(1.5 * 50) and float(rows[2]["volume"]) == pytest.approx(800)
    assert not [m for m in caught if "instances table" in m]
    with open_volume(tmp_path / "out" / "cells_labels.tif") as labels:  # the spacing is written now
        assert labels.voxel_size == pytest.approx((50.0, 4.0, 4.0))
    # A given value that contradicts the file's is used, with a warning naming both.
    spaced = imagej_tif(tmp_path / "spaced.tif", ids.astype(np.uint8), spacing=40.0)
    with pytest.warns(CalibrationWarning, match=r"spaced.tif: voxel_size gives z = 50 nm but the file says 40 nm"):
        with open_volume(spaced, voxel_size="50,,") as volume:
            assert volume.voxel_size == (50.0, 4.0, 4.0)
    with open_volume(spaced, unit="um") as volume:  # a unit alone converts the file's sizes
        assert volume.voxel_size == pytest.approx((0.04, 0.004, 0.004)) and volume.unit == "µm"
    tifffile.imwrite(tmp_path / "plain.tif", ids.astype(np.uint8), photometric="minisblack")
    with open_volume(tmp_path / "plain.tif", voxel_size="50,4,4", unit="nm") as volume:
        assert volume.voxel_size == (50.0, 4.0, 4.0) and volume.unit == "nm"
    for bad in ("50,4", "50,0,4", "a,b,c", "nan,4,4", ",,"):
        with pytest.raises(InputError, match="voxel_size .*expected z,y,x"):
            open_volume(path, voxel_size=bad).__enter__()
    with pytest.raises(InputError, match="unit 'furlong': expected a length unit"):
        open_volume(path, unit="furlong").__enter__()


def test_ome_physical_size_z_in_micrometres_with_xy_in_nanometres_is_converted(tmp_path):
    stack = np.zeros((3, 8, 8), np.uint8)
    tifffile.imwrite(tmp_path / "mixed.ome.tif", stack, ome=True,
                     metadata={"axes": "ZYX", "PhysicalSizeX": 4.0, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 4.0,
                               "PhysicalSizeYUnit": "nm", "PhysicalSizeZ": 0.05, "PhysicalSizeZUnit": "µm"})
    with open_volume(tmp_path / "mixed.ome.tif") as volume:
        assert volume.voxel_size == pytest.approx((50.0, 4.0, 4.0)) and volume.unit == "nm"
    tifffile.imwrite(tmp_path / "noz.ome.tif", stack, ome=True,
                     metadata={"axes": "ZYX", "PhysicalSizeX": 0.004, "PhysicalSizeY": 0.004})
    with open_volume(tmp_path / "noz.ome.tif") as volume:  # no PhysicalSizeZ: z unknown; no unit: µm (OME's)
        assert volume.voxel_size == (None, pytest.approx(0.004), pytest.approx(0.004)) and volume.unit == "µm"


def test_other_formats_leave_an_unset_z_unknown(tmp_path):
    data = np.zeros((3, 8, 8), np.int16)
    with mrcfile.new(tmp_path / "tomo.mrc") as mrc:
        mrc.set_data(data)
        mrc.voxel_size = (40.0, 40.0, 0.0)  # x, y in Å; z unset
    with open_volume(tmp_path / "tomo.mrc") as volume:
        assert volume.voxel_size == (None, pytest.approx(4.0), pytest.approx(4.0)) and volume.unit == "nm"
    group = zarr.open_group(tmp_path / "plane.ome.zarr", mode="w", zarr_format=2)
    group.create_array("0", data=np.ones((8, 8), np.uint8))
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": "y", "unit": "nanometer"},
                                                              {"name": "x", "unit": "nanometer"}],
                                   "datasets": [{"path": "0", "coordinateTransformations": [
                                       {"type": "scale", "scale": [4.0, 4.0]}]}]}]
    with open_volume(tmp_path / "plane.ome.zarr") as volume:  # a 2-D image has no z size to report
        assert volume.shape == (1, 8, 8) and volume.voxel_size == (None, 4.0, 4.0) and volume.unit == "nm"


def test_unusable_calibration_is_a_warning_naming_the_file(tmp_path):
    stack = np.zeros((3, 8, 8), np.uint8)
    path = imagej_tif(tmp_path / "negative.tif", stack, spacing=-50.0)
    with pytest.warns(CalibrationWarning, match=r"negative.tif: ImageJ spacing is -50.0, not a positive size"):
        with open_volume(path) as volume:
            assert volume.voxel_size == (None, 4.0, 4.0)
    tifffile.imwrite(tmp_path / "text.ome.tif", stack, ome=True,
                     metadata={"axes": "ZYX", "PhysicalSizeX": "abc", "PhysicalSizeY": 0.004})
    with pytest.warns(CalibrationWarning, match=r"text.ome.tif: OME PhysicalSizeX is 'abc'"):
        with open_volume(tmp_path / "text.ome.tif") as volume:
            assert volume.voxel_size == (None, pytest.approx(0.004), None)


def test_ome_zarr_results_keep_known_axes_and_mark_the_unknown_one(tmp_path):
    ids = cube_ids()
    with result_files(tmp_path, "cells", objects=False, labels=True, voxel_size=(None, 4.0, 4.0), unit="nm",
                      fmt="zarr", shape=ids.shape) as add:
        for z, page in enumerate(ids):
            add(z, page != 0, ids=page)
    attrs = json.loads((tmp_path / "cells_labels.ome.zarr" / ".zattrs").read_text())
    multiscale = attrs["multiscales"][0]
    assert multiscale["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 4.0, 4.0]
    assert [a.get("unit") for a in multiscale["axes"]] == [None, "nanometer", "nanometer"]
    assert attrs["em-unet.unknown_axes"] == ["z"]
    with open_volume(tmp_path / "cells_labels.ome.zarr") as volume:  # read back: still unknown, not 1 nm
        assert volume.voxel_size == (None, 4.0, 4.0) and volume.unit == "nm"
        np.testing.assert_array_equal(volume[:], ids)


def test_object_measures_with_only_z_unknown_and_fully_unknown():
    measures = ObjectMeasures(voxel_size=None)
    measures.add(0, np.array([[1, 1], [0, 0]]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an uncalibrated table is empty for an obvious reason: no warning
        assert measures.rows()[0][7:] == ["", "", "", "", ""]


def test_read_options_pass_through_unchanged():
    class Cfg:
        level, region, allow_missing_chunks, voxel_size, unit, other = "1", "0:2,,", True, "50,,", "nm", 3

    options = read_options(Cfg())
    assert options == ReadOptions("1", "0:2,,", True, "50,,", "nm")
    assert read_options(Cfg(), voxel_size="").voxel_size == ""


# --- the options through the real preprocess entry point ---------------------------------------------------


def labelled_stack(shape=(6, 32, 32)):
    image = (np.arange(np.prod(shape)) % 251).astype(np.uint8).reshape(shape)
    labels = np.zeros(shape, np.uint8)
    labels[:, 8:20, 8:20] = 1
    return image, labels


def error_line(proc):
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and errors[0] == lines[-1], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return errors[0]


def test_preprocess_refuses_nan_labels_with_the_file_and_count(store, tmp_path):
    image, labels = labelled_stack()
    labels = labels.astype(np.float32)
    labels[2, :2, :3] = np.nan
    tifffile.imwrite(tmp_path / "image.tif", image, photometric="minisblack")
    tifffile.imwrite(tmp_path / "labels.tif", labels, photometric="minisblack")
    proc = run_module("pipeline.preprocess", "--images", str(tmp_path / "image.tif"), "--labels",
                      str(tmp_path / "labels.tif"), cwd=tmp_path, env_uri=store)
    line = error_line(proc)
    assert f"{tmp_path / 'labels.tif'}: the labels hold 6 NaN or infinite value(s) (the first in slice 2)" in line


def test_preprocess_voxel_mismatch_is_refused_or_accepted_with_a_warning(store, tmp_path):
    image, labels = labelled_stack()
    imagej_tif(tmp_path / "image.tif", image)  # 4 nm pixels, no spacing: z given below
    imagej_tif(tmp_path / "labels.tif", labels, pixel=8.0)
    args = ["--images", str(tmp_path / "image.tif"), "--labels", str(tmp_path / "labels.tif"), "--voxel_size", "50,,",
            "--unit", "nm"]
    line = error_line(run_module("pipeline.preprocess", *args, cwd=tmp_path, env_uri=store))
    assert "labels.tif has voxel size ? x 8 x 8 nm but image.tif has 50 x 4 x 4 nm" in line
    assert "allow_voxel_mismatch=true" in line
    proc = run_module("pipeline.preprocess", *args, "--allow_voxel_mismatch", "true", cwd=tmp_path, env_uri=store)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "labels.tif has voxel size ? x 8 x 8 nm but image.tif has 50 x 4 x 4 nm" in proc.stderr
    assert "accepted (allow_voxel_mismatch)" in proc.stderr
    run = mlflow.search_runs(experiment_names=["em-unet"], output_format="list")[0]
    assert run.data.params["voxel_size"] == "50,," and run.data.params["allow_voxel_mismatch"] == "True"
    provenance = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/provenance.json")
    assert provenance["stacks"][0]["voxel_size"] == [50.0, 4.0, 4.0] and provenance["stacks"][0]["unit"] == "nm"


def test_preprocess_refuses_missing_chunks_unless_allowed(store, tmp_path):
    image, labels = labelled_stack()
    zarr.create_array(tmp_path / "image.zarr", data=image, chunks=(2, 16, 16), zarr_format=2)
    (tmp_path / "image.zarr" / "1.0.1").unlink()  # an interrupted copy: one of 12 chunks never arrived
    tifffile.imwrite(tmp_path / "labels.tif", labels, photometric="minisblack")
    args = ["--images", str(tmp_path / "image.zarr"), "--labels", str(tmp_path / "labels.tif")]
    line = error_line(run_module("pipeline.preprocess", *args, cwd=tmp_path, env_uri=store))
    assert f"{tmp_path / 'image.zarr'}: 1 of the 12 chunks to read are missing (1.0.1)" in line
    assert "allow_missing_chunks=true" in line
    proc = run_module("pipeline.preprocess", *args, "--allow_missing_chunks", "true", cwd=tmp_path, env_uri=store)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("1 of the 12 chunks to read are missing (1.0.1); read as the fill value 0") == 1


def test_main_passes_the_read_options_to_preprocess():
    from pipeline.main import MainConfig, pick
    from pipeline.preprocess import PreprocessConfig

    cfg = pick(PreprocessConfig, MainConfig(allow_missing_chunks=True, voxel_size="50,4,4", unit="nm",
                                            allow_voxel_mismatch=True))
    assert (cfg.allow_missing_chunks, cfg.voxel_size, cfg.unit, cfg.allow_voxel_mismatch) == (True, "50,4,4", "nm", True)
