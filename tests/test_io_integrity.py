"""What a damaged or inconsistent input does: malformed OME-Zarr metadata of any shape is one `InputError`
naming the file and the field; missing Zarr chunks are refused (or read as the fill value when allowed);
NaN labels and labels on another voxel grid are refused before any work."""

import copy
import json
import math
import shutil
import warnings

import numpy as np
import pytest
import tifffile
import zarr

from emunet.core.io import arrays as io_arrays
from emunet.core.errors import InputError
from emunet.core.io import (CalibrationWarning, check_finite_labels, check_labels, open_volume, read_mask,
                            read_volume)
from emunet.core.omezarr import create_image, open_image

# --- A: malformed OME-Zarr metadata ----------------------------------------------------------------------


def valid_image(folder, version):
    """A real 3-level-free OME-Zarr image: NGFF 0.4 on Zarr v2 (attributes in `.zattrs`) or 0.5 on Zarr v3
    (in `zarr.json` under "ome")."""
    path = folder / f"valid{version}.ome.zarr"
    group = zarr.open_group(path, mode="w", zarr_format=2 if version == "0.4" else 3)
    group.create_array("0", data=np.arange(4 * 6 * 8, dtype=np.uint8).reshape(1, 4, 6, 8), chunks=(1, 2, 3, 4))
    multiscale = {"version": version, "name": "cells",
                  "axes": [{"name": "c", "type": "channel"}, {"name": "z", "type": "space", "unit": "nanometer"},
                           {"name": "y", "type": "space", "unit": "nanometer"},
                           {"name": "x", "type": "space", "unit": "nanometer"}],
                  "datasets": [{"path": "0", "coordinateTransformations": [
                      {"type": "scale", "scale": [1.0, 50.0, 4.0, 4.0]}]}],
                  "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0, 1.0]}]}
    if version == "0.4":
        group.attrs["multiscales"] = [multiscale]
    else:
        group.attrs["ome"] = {"version": version, "multiscales": [multiscale]}
    return path


def attrs_io(path, version):
    """(read, write) of the image group's attributes as JSON, as a text editor (or a bad tool) would."""
    if version == "0.4":
        file = path / ".zattrs"
        return (lambda: json.loads(file.read_text())["multiscales"],
                lambda ms: file.write_text(json.dumps({"multiscales": ms})))
    file = path / "zarr.json"

    def write(ms):
        document = json.loads(file.read_text())
        document["attributes"]["ome"]["multiscales"] = ms
        file.write_text(json.dumps(document))
    return lambda: json.loads(file.read_text())["attributes"]["ome"]["multiscales"], write


def _set(ms, keys, value):
    target = ms
    for k in keys[:-1]:
        target = target[k]
    if value is DELETE:
        del target[keys[-1]]
    elif isinstance(target, list) and keys[-1] == len(target):
        target.append(value)
    else:
        target[keys[-1]] = value


DELETE = object()
LEVEL = [0, "datasets", 0]
SCALE = [*LEVEL, "coordinateTransformations", 0, "scale"]
# (what is wrong, the field the message must name, keys into multiscales, the bad value).
VARIANTS = [
    ("multiscales an object", "multiscales", [], {"datasets": []}),
    ("multiscales empty", "multiscales", [], []),
    ("multiscales[0] a string", "multiscales[0]", [0], "image"),
    ("datasets missing", "multiscales[0].datasets", [0, "datasets"], DELETE),
    ("datasets an object", "multiscales[0].datasets", [0, "datasets"], {"path": "0"}),
    ("datasets empty", "multiscales[0].datasets", [0, "datasets"], []),
    ("a dataset a string", "multiscales[0].datasets[0]", LEVEL, "0"),
    ("a dataset without path", "multiscales[0].datasets[0].path", [*LEVEL, "path"], DELETE),
    ("a dataset path a number", "multiscales[0].datasets[0].path", [*LEVEL, "path"], 0),
    ("axes an object", "multiscales[0].axes", [0, "axes"], {"name": "x"}),
    ("axes empty", "multiscales[0].axes", [0, "axes"], []),
    ("an axis without name", "multiscales[0].axes[2].name", [0, "axes", 2, "name"], DELETE),
    ("an axis name a number", "multiscales[0].axes[1].name", [0, "axes", 1, "name"], 3),
    ("an axis a number", "multiscales[0].axes[0].name", [0, "axes", 0], 7),
    ("too few axes", "multiscales[0].axes", [0, "axes"], [{"name": a} for a in "zyx"]),
    ("a unit a number", "multiscales[0].axes[3].unit", [0, "axes", 3, "unit"], 4),
    ("transformations an object", "multiscales[0].datasets[0].coordinateTransformations",
     [*LEVEL, "coordinateTransformations"], {"type": "scale", "scale": [1, 50, 4, 4]}),
    ("image transformations an object", "multiscales[0].coordinateTransformations",
     [0, "coordinateTransformations"], {"type": "scale", "scale": [1, 1, 1, 1]}),
    ("a transformation a list", "multiscales[0].datasets[0].coordinateTransformations[0]",
     [*LEVEL, "coordinateTransformations", 0], [1, 50, 4, 4]),
    ("a transformation without type", "multiscales[0].datasets[0].coordinateTransformations[0]",
     [*LEVEL, "coordinateTransformations", 0, "type"], DELETE),
    ("scale null", "coordinateTransformations[0].scale", SCALE, None),
    ("scale missing", "coordinateTransformations[0].scale", SCALE, DELETE),
    ("scale a number", "coordinateTransformations[0].scale", SCALE, 4.0),
    ("scale too short", "coordinateTransformations[0].scale", SCALE, [50.0, 4.0, 4.0]),
    ("scale too long", "coordinateTransformations[0].scale", SCALE, [1.0, 1.0, 50.0, 4.0, 4.0]),
    ("a zero scale", "coordinateTransformations[0].scale[1]", SCALE, [1.0, 0.0, 4.0, 4.0]),
    ("a negative scale", "coordinateTransformations[0].scale[3]", SCALE, [1.0, 50.0, 4.0, -4.0]),
    ("a scale string", "coordinateTransformations[0].scale[2]", SCALE, [1.0, 50.0, "4", 4.0]),
    ("a scale boolean", "coordinateTransformations[0].scale[2]", SCALE, [1.0, 50.0, True, 4.0]),
    ("an image scale zero", "multiscales[0].coordinateTransformations[0].scale[1]",
     [0, "coordinateTransformations", 0, "scale"], [1.0, 0.0, 1.0, 1.0]),
    ("a translation too short", "coordinateTransformations[1].translation",
     [*LEVEL, "coordinateTransformations", 1], {"type": "translation", "translation": [0.0]}),
]


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_every_malformed_ome_zarr_variant_is_one_input_error_naming_file_and_field(tmp_path, version):
    valid = valid_image(tmp_path, version)
    with open_volume(valid) as volume:  # the document every variant starts from is a good one
        assert volume.shape == (4, 6, 8) and volume.voxel_size == pytest.approx((50.0, 4.0, 4.0))
    read, _ = attrs_io(valid, version)
    original = read()
    attrs_file = ".zattrs" if version == "0.4" else "zarr.json"
    tested = 0
    for what, field, keys, value in VARIANTS:
        path = tmp_path / f"bad_{tested}.ome.zarr"
        shutil.copytree(valid, path)
        multiscales = copy.deepcopy(original)
        if keys:
            _set(multiscales, keys, value)
        else:
            multiscales = value
        attrs_io(path, version)[1](multiscales)
        try:
            read_volume(path)
        except InputError as exc:
            message = str(exc)
            assert str(path / attrs_file) in message, (what, message)
            assert field in message, (what, message)
            assert "\n" not in message, what
        except Exception as exc:  # anything else (KeyError, ZeroDivisionError, ...) is the bug this guards
            pytest.fail(f"{what}: {type(exc).__name__}: {exc}")
        else:
            pytest.fail(f"{what}: read without an error")
        tested += 1
    assert tested == len(VARIANTS) > 25


def test_non_finite_scales_are_refused_where_read(tmp_path):
    """JSON has no NaN, but Python's json (and zarr) write and read `NaN` and `Infinity` tokens."""
    valid = valid_image(tmp_path, "0.4")
    read, write = attrs_io(valid, "0.4")
    for bad in (math.nan, math.inf):
        multiscales = read()
        multiscales[0]["datasets"][0]["coordinateTransformations"][0]["scale"] = [1.0, bad, 4.0, 4.0]
        write(multiscales)
        with pytest.raises(InputError, match=r"\.zattrs: .*scale\[1\] is (nan|inf) but should be a positive"):
            read_volume(valid)


def test_a_level_opened_by_path_under_malformed_metadata_warns_and_reads_uncalibrated(tmp_path):
    valid = valid_image(tmp_path, "0.4")
    read, write = attrs_io(valid, "0.4")
    multiscales = read()
    multiscales[0]["datasets"][0]["coordinateTransformations"][0]["scale"] = [1.0, 0.0, 4.0, 4.0]
    write(multiscales)
    with pytest.warns(CalibrationWarning, match=r"scale\[1\] is 0.0 .* read as a plain array, uncalibrated"):
        with open_volume(valid / "0") as volume:
            assert volume.shape == (4, 6, 8) and volume.voxel_size is None


# --- B: missing chunks -----------------------------------------------------------------------------------


def chunk_files(folder):
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".") and p.name != "zarr.json")


@pytest.mark.parametrize("few", [0, 256], ids=["listed", "looked-up"])
@pytest.mark.parametrize("fmt, encoding", [(2, None), (2, {"name": "v2", "separator": "/"}), (3, None),
                                           (3, {"name": "default", "separator": "."})])
def test_missing_chunks_are_refused_with_their_count_or_read_as_fill_when_allowed(tmp_path, monkeypatch, fmt,
                                                                                  encoding, few):
    """Both ways of finding the keys: one listing of the folder, or (a small block) one look-up per chunk."""
    monkeypatch.setattr(io_arrays, "FEW_CHUNKS", few)
    data = np.arange(1, 1 + 4 * 6 * 8, dtype=np.uint16).reshape(4, 6, 8)  # no zero: every chunk is stored
    path = tmp_path / "raw.zarr"
    extra = {"chunk_key_encoding": encoding} if encoding else {}
    zarr.create_array(path, data=data, chunks=(2, 3, 4), zarr_format=fmt, fill_value=0, **extra)
    files = chunk_files(path)
    assert len(files) == 8
    with open_volume(path) as volume:  # complete: no error, no warning
        np.testing.assert_array_equal(volume[:], data)
    files[0].unlink()  # chunk (0, 0, 0): slices 0-1, rows 0-2, columns 0-3
    files[-1].unlink()  # chunk (1, 1, 1)
    with pytest.raises(InputError, match=r"raw.zarr: 2 of the 8 chunks to read are missing \((c[/.])?0[/.]0[/.]0, "
                                         r"(c[/.])?1[/.]1[/.]1\).*allow_missing_chunks=true") as info:
        read_volume(path)
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="1 of the 2 chunks to read are missing"):
        read_volume(path, region="0:2,0:3,")  # a region meets only its own chunks
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a region away from the holes reads without a word
        np.testing.assert_array_equal(read_volume(path, region="2:4,0:3,"), data[2:4, 0:3])
    with pytest.warns(CalibrationWarning) as caught:
        holes = read_volume(path, allow_missing_chunks=True)
    assert len(caught) == 1 and "2 of the 8 chunks to read are missing" in str(caught[0].message)
    assert (holes[0:2, 0:3, 0:4] == 0).all() and (holes[2:4, 3:6, 4:8] == 0).all()
    np.testing.assert_array_equal(holes[2:4, 0:3], data[2:4, 0:3])


def test_missing_chunks_of_an_ome_zarr_level_and_the_sparse_convention(tmp_path):
    create_image(tmp_path / "ours.ome.zarr", (4, 6, 8), np.uint8, chunks=(2, 3, 4), voxel_size=(50, 4, 4), unit="nm")
    array = open_image(tmp_path / "ours.ome.zarr")
    array[2:4] = 7  # slices 0-1 stay zero: their chunks are never stored (sparse, and said so)
    assert len(chunk_files(tmp_path / "ours.ome.zarr")) == 4
    np.testing.assert_array_equal(read_volume(tmp_path / "ours.ome.zarr")[:2], 0)
    # The same image without the attribute (a copy by a tool that drops it) is an incomplete copy.
    zarray = tmp_path / "ours.ome.zarr" / "0" / ".zattrs"
    zarray.write_text(json.dumps({k: v for k, v in json.loads(zarray.read_text()).items() if k != "sparse_chunks"}))
    with pytest.raises(InputError, match=r"ours.ome.zarr: 4 of the 8 chunks to read are missing \(0/0/0, 0/0/1, "
                                         r"0/1/0, \.\.\.\)"):
        read_volume(tmp_path / "ours.ome.zarr")
    with pytest.warns(CalibrationWarning, match="4 of the 8 chunks"):
        assert read_volume(tmp_path / "ours.ome.zarr", allow_missing_chunks=True).sum() == 7 * 2 * 6 * 8
    # The attribute on the image group says the same for all its levels.
    group = zarr.open_group(tmp_path / "ours.ome.zarr", mode="r+")
    group.attrs["sparse_chunks"] = True
    assert read_volume(tmp_path / "ours.ome.zarr").shape == (4, 6, 8)


# --- C: labels -------------------------------------------------------------------------------------------


def test_nan_labels_are_refused_with_their_count(tmp_path):
    image = np.zeros((3, 8, 8), np.uint8)
    labels = np.zeros((3, 8, 8), np.float32)
    labels[1, 2:4, 2:4] = 1
    labels[0, 0, :3] = np.nan
    labels[2, 5, 5] = np.inf
    tifffile.imwrite(tmp_path / "image.tif", image, photometric="minisblack")
    tifffile.imwrite(tmp_path / "labels.tif", labels, photometric="minisblack")
    with open_volume(tmp_path / "image.tif") as volume:
        with pytest.raises(InputError, match=r"labels.tif: the labels hold 4 NaN or infinite value\(s\) \(the first "
                                             r"in slice 0\)"):
            read_mask(tmp_path / "labels.tif", volume)
    with pytest.raises(InputError, match=r"labels.tif: slice 2 of the labels holds 1 NaN or infinite"):
        check_finite_labels(labels[2], tmp_path / "labels.tif", 2)
    check_finite_labels(labels[1], tmp_path / "labels.tif", 1)  # a finite slice passes


def test_labels_on_another_voxel_grid_are_refused_unless_allowed(tmp_path):
    stack = np.zeros((3, 8, 8), np.uint8)
    stack[1, 2:5, 2:5] = 1

    def imagej(name, pixel, spacing, unit="nm"):
        tifffile.imwrite(tmp_path / name, stack, imagej=True, resolution=(1 / pixel, 1 / pixel),
                         metadata={"spacing": spacing, "unit": unit, "axes": "ZYX"})
        return tmp_path / name

    image = imagej("image.tif", 4.0, 50.0)
    with open_volume(image) as volume:
        assert read_mask(imagej("same.tif", 4.02, 50.0), volume).sum() == 9  # within 1 %: header rounding
        assert read_mask(imagej("micron.tif", 0.004, 0.05, "micron"), volume).sum() == 9  # same size, other unit
        coarse = imagej("coarse.tif", 8.0, 50.0)
        with pytest.raises(InputError, match=r"coarse.tif has voxel size 50 x 8 x 8 nm but image.tif has 50 x 4 x 4 nm "
                                             r"\(z, y, x; y, x differ by more than 1%\); .*allow_voxel_mismatch=true"):
            read_mask(coarse, volume)
        with pytest.warns(CalibrationWarning, match="coarse.tif has voxel size 50 x 8 x 8 nm.*accepted"):
            assert read_mask(coarse, volume, allow_voxel_mismatch=True).sum() == 9
        with open_volume(imagej("thick.tif", 4.0, 60.0)) as labels:
            with pytest.raises(InputError, match=r"thick.tif has voxel size 60 x 4 x 4 nm.*\(z, y, x; z differ"):
                check_labels(labels, volume)
        tifffile.imwrite(tmp_path / "plain.tif", stack, photometric="minisblack")  # no calibration: nothing to compare
        assert read_mask(tmp_path / "plain.tif", volume).sum() == 9
        tifffile.imwrite(tmp_path / "small.tif", stack[:, :7], photometric="minisblack")
        with pytest.raises(InputError, match=r"small.tif has shape \(3, 7, 8\) but image.tif has \(3, 8, 8\)"):
            read_mask(tmp_path / "small.tif", volume)
