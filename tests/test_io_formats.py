"""The formats labs keep their data in (MRC, OME-Zarr, plain Zarr, HDF5, Fiji hyperstacks), written here with
the libraries and tools that write them in the wild, read through `open_volume`: shape, dtype, voxel size
and unit, lazy block reads, regions, and a one-line `InputError` for each bad input."""

import json
import shutil
import tracemalloc

import h5py
import mrcfile
import numpy as np
import pytest
import tifffile
import zarr

from emunet.core.errors import InputError
from emunet.core.io import open_volume, read_mask, read_volume


def one_line_error(path, message, **options):
    with pytest.raises(InputError, match=message) as info:
        read_volume(path, **options)
    assert "\n" not in str(info.value)
    return str(info.value)


def write_mrc(path, data, voxel_size=None):
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        if voxel_size is not None:
            mrc.voxel_size = voxel_size  # (x, y, z) in Å, as mrcfile takes it
    return path


def write_ome_zarr(path, data, axes="zyx", scale=None, unit="micrometer", levels=2, version="0.5", chunks=None):
    """An OME-Zarr image as the `ome-zarr` package writes it (NGFF 0.5 on Zarr v3, or 0.4 on Zarr v2)."""
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_image

    root = zarr.open_group(path, mode="w", zarr_format=3 if version == "0.5" else 2)
    spatial = [a for a in axes if a in "zyx"]
    write_image(data, root, axes=axes, scale_factors=[2] * (levels - 1),
                fmt=FormatV05() if version == "0.5" else FormatV04(),
                scale={a: dict(zip(spatial, scale)).get(a, 1.0) for a in axes} if scale else None,
                axes_units={a: unit for a in spatial} if unit else None,
                storage_options={"chunks": chunks} if chunks else None)
    return path


# --- MRC -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix, dtype", [(".mrc", np.int16), (".rec", np.float32), (".st", np.uint16),
                                           (".map", np.int8)])
def test_mrc_is_read_with_its_voxel_size_in_nm(tmp_path, rng, suffix, dtype):
    data = (rng.random((5, 12, 20)) * 100).astype(dtype)
    path = write_mrc(tmp_path / f"tomo{suffix}", data, voxel_size=(8.0, 8.0, 21.0))  # x, y, z in Å
    with open_volume(path) as volume:
        assert volume.shape == (5, 12, 20) and volume.dtype == dtype
        assert volume.voxel_size == pytest.approx((2.1, 0.8, 0.8)) and volume.unit == "nm"
        np.testing.assert_array_equal(volume[1:4], data[1:4])
        np.testing.assert_array_equal(volume[2, 3:7, 5:9], data[2, 3:7, 5:9])
    np.testing.assert_array_equal(read_volume(path), data)


def test_2d_mrc_is_one_slice_and_an_unset_voxel_size_is_none(tmp_path, rng):
    image = rng.integers(0, 1000, (16, 24), dtype=np.int16)
    with open_volume(write_mrc(tmp_path / "micrograph.mrc", image)) as volume:
        assert volume.shape == (1, 16, 24) and volume.voxel_size is None and volume.unit is None
        np.testing.assert_array_equal(volume[0], image)
        np.testing.assert_array_equal(volume[:, 2:5, 1:3], image[None, 2:5, 1:3])


def test_mrc_is_memory_mapped_and_read_slice_by_slice(tmp_path, rng):
    data = rng.random((64, 128, 128)).astype(np.float32)  # 4 MiB, 64 KiB a slice
    path = write_mrc(tmp_path / "big.mrc", data)
    tracemalloc.start()
    try:
        with open_volume(path) as volume:
            np.testing.assert_array_equal(volume[7], data[7])
            _, peak = tracemalloc.get_traced_memory()
            with open(path, "r+b") as f:  # the file changes after opening: slice 20 is read from it now
                f.seek(1024 + 20 * 128 * 128 * 4)
                f.write(np.full(128, 5, np.float32).tobytes())
            assert (volume[20][0] == 5).all() and (volume[19] == data[19]).all()
    finally:
        tracemalloc.stop()
    assert peak < data.nbytes / 8, f"opening and reading one slice allocated {peak} bytes"


def test_truncated_or_corrupt_mrc_gives_one_line(tmp_path, rng):
    path = write_mrc(tmp_path / "full.mrc", rng.integers(0, 100, (6, 32, 32), dtype=np.int16))
    data = path.read_bytes()
    (tmp_path / "cut.mrc").write_bytes(data[:-3000])
    assert "cut.mrc" in one_line_error(tmp_path / "cut.mrc", "truncated or corrupt")
    (tmp_path / "header.rec").write_bytes(data[:500])
    one_line_error(tmp_path / "header.rec", "header.rec: not a readable MRC file.*less than the 1024-byte header")
    (tmp_path / "junk.st").write_bytes(b"x" * 4000)
    one_line_error(tmp_path / "junk.st", "junk.st: not a readable MRC file")
    with mrcfile.new(tmp_path / "complex.mrc") as mrc:
        mrc.set_data(np.zeros((2, 4, 4), np.complex64))
    one_line_error(tmp_path / "complex.mrc", "complex.mrc: expected integer or float pixels")


# --- OME-Zarr and plain Zarr -----------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["0.5", "0.4"])
def test_ome_zarr_written_by_ome_zarr_levels_scale_and_units(tmp_path, rng, version):
    data = rng.integers(0, 4000, (1, 1, 6, 32, 40), dtype=np.uint16)  # tczyx with one time point and channel
    path = write_ome_zarr(tmp_path / "cells.ome.zarr", data, axes="tczyx", scale=(0.05, 0.008, 0.008),
                          version=version)
    with open_volume(path) as volume:
        assert volume.shape == (6, 32, 40) and volume.dtype == np.uint16
        assert volume.voxel_size == pytest.approx((0.05, 0.008, 0.008)) and volume.unit == "µm"
        np.testing.assert_array_equal(volume[2:5], data[0, 0, 2:5])
    with open_volume(path, level=1) as volume:  # ome-zarr halves y and x, keeps z
        assert volume.shape == (6, 16, 20) and volume.voxel_size == pytest.approx((0.05, 0.016, 0.016))
    with open_volume(path, level="1") as volume:  # as a CLI parameter gives it
        assert volume.shape == (6, 16, 20)
    with open_volume(path / "s1") as volume:  # the level's own array finds its scale in the image's metadata
        assert volume.shape == (6, 16, 20) and volume.voxel_size == pytest.approx((0.05, 0.016, 0.016))
    one_line_error(path, r"level 2 does not exist; the image has levels 0-1", level=2)
    one_line_error(path, r"level: expected a whole number >= 0", level="-1")


def test_ome_zarr_hand_written_czyx_with_image_scale_and_mixed_units(tmp_path, rng):
    """NGFF 0.4 on Zarr v2 written by hand: a czyx image, a scale on the image as well as on the level, z in
    µm and y, x in nm (all reported in x's unit)."""
    data = rng.integers(0, 255, (1, 4, 10, 12), dtype=np.uint8)
    root = zarr.open_group(tmp_path / "hand.zarr", mode="w", zarr_format=2)
    root.create_array("0", data=data, chunks=(1, 1, 10, 12))
    root.attrs["multiscales"] = [{
        "version": "0.4",
        "axes": [{"name": "c", "type": "channel"}, {"name": "z", "type": "space", "unit": "micrometer"},
                 {"name": "y", "type": "space", "unit": "nanometer"}, {"name": "x", "type": "space", "unit": "nanometer"}],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 0.025, 2, 2]}]}],
        "coordinateTransformations": [{"type": "scale", "scale": [1, 2, 2, 2]}]}]
    with open_volume(tmp_path / "hand.zarr") as volume:
        assert volume.shape == (4, 10, 12) and volume.dtype == np.uint8
        assert volume.voxel_size == pytest.approx((50.0, 4.0, 4.0)) and volume.unit == "nm"
        np.testing.assert_array_equal(volume[:], data[0])
    # bioformats2raw's layout (what `bioformats2raw` makes of a vendor file): the image is the group "0".
    outer = zarr.open_group(tmp_path / "converted.zarr", mode="w", zarr_format=2)
    outer.attrs["bioformats2raw.layout"] = 3
    shutil.copytree(tmp_path / "hand.zarr", tmp_path / "converted.zarr" / "0")
    with open_volume(tmp_path / "converted.zarr") as volume:
        assert volume.shape == (4, 10, 12) and volume.voxel_size == pytest.approx((50.0, 4.0, 4.0))


def test_plain_zarr_arrays_v2_and_v3(tmp_path, rng):
    data = rng.random((5, 9, 11)).astype(np.float32)
    for fmt in (2, 3):
        zarr.create_array(tmp_path / f"raw{fmt}.zarr", data=data, chunks=(2, 9, 11), zarr_format=fmt)
        with open_volume(tmp_path / f"raw{fmt}.zarr") as volume:
            assert volume.shape == (5, 9, 11) and volume.dtype == np.float32 and volume.voxel_size is None
            np.testing.assert_array_equal(volume[1:4, 2:5], data[1:4, 2:5])
    zarr.create_array(tmp_path / "plane.zarr", data=data[0])
    np.testing.assert_array_equal(read_volume(tmp_path / "plane.zarr"), data[:1])
    zarr.create_array(tmp_path / "lead.zarr", data=data[None, None])  # leading size-1 axes are dropped
    assert read_volume(tmp_path / "lead.zarr").shape == (5, 9, 11)
    one_line_error(tmp_path / "raw3.zarr", "plain Zarr array, not a multiscale image", level=1)


def test_zarr_reads_only_the_chunks_asked_for(tmp_path, rng):
    """Lazy for real: chunks outside what is read are garbage, so a read that touched them would fail."""
    data = rng.integers(0, 60000, (8, 32, 32), dtype=np.uint16)
    zarr.create_array(tmp_path / "lazy.zarr", data=data, chunks=(1, 16, 16))
    chunk_files = sorted((tmp_path / "lazy.zarr" / "c").rglob("*"))
    for chunk in (tmp_path / "lazy.zarr" / "c").glob("*"):
        if chunk.name not in ("1", "2"):  # all slices but 1 and 2
            for f in chunk.rglob("*"):
                if f.is_file():
                    f.write_bytes(b"garbage, not a chunk")
    assert len([f for f in chunk_files if f.is_file()]) == 8 * 4
    with open_volume(tmp_path / "lazy.zarr") as volume:
        np.testing.assert_array_equal(volume[1:3], data[1:3])
        with pytest.raises(InputError, match=r"lazy.zarr: slice 5 is not readable") as info:
            volume[5]
        assert "\n" not in str(info.value)
    # A region inside slices 1-2 and inside one chunk column reads nothing else either.
    with open_volume(tmp_path / "lazy.zarr", region="1:3,0:16,16:32") as volume:
        assert volume.shape == (2, 16, 16)
        np.testing.assert_array_equal(volume[:], data[1:3, :16, 16:])


def test_bad_zarr_inputs(tmp_path, rng):
    data = rng.integers(0, 255, (2, 3, 8, 8), dtype=np.uint8)
    write_ome_zarr(tmp_path / "two_channels.ome.zarr", data, axes="czyx", scale=(1.0, 1.0, 1.0), levels=1)
    one_line_error(tmp_path / "two_channels.ome.zarr", r"axes 'czyx' \(2 channels\)")
    write_ome_zarr(tmp_path / "series.ome.zarr", data, axes="tzyx", levels=1)
    one_line_error(tmp_path / "series.ome.zarr", r"\(2 time points\)")
    group = zarr.open_group(tmp_path / "plates.zarr", mode="w")
    group.create_array("raw", shape=(2, 8, 8), dtype=np.uint8)
    group.create_array("labels", shape=(2, 8, 8), dtype=np.uint8)
    message = one_line_error(tmp_path / "plates.zarr", "a Zarr group without OME-Zarr 'multiscales' metadata is not an image")
    assert "plates.zarr/labels" in message and "plates.zarr/raw" in message
    zarr.open_group(tmp_path / "empty.zarr", mode="w")
    one_line_error(tmp_path / "empty.zarr", "it holds no array")
    (tmp_path / "nothing.zarr").mkdir()
    one_line_error(tmp_path / "nothing.zarr", "nothing.zarr: not a readable Zarr array or group")
    zarr.create_array(tmp_path / "rgb.zarr", data=np.zeros((4, 8, 8, 3), np.uint8))
    one_line_error(tmp_path / "rgb.zarr", r"expected a 2-D image or a \(Z, H, W\) stack but found shape \(4, 8, 8, 3\)")
    zarr.create_array(tmp_path / "complex.zarr", data=np.zeros((2, 4, 4), np.complex64))
    one_line_error(tmp_path / "complex.zarr", "expected integer or float pixels")


# --- HDF5 ------------------------------------------------------------------------------------------------

def test_hdf5_dataset_path_and_calibration(tmp_path, rng):
    raw = rng.integers(0, 255, (4, 10, 12), dtype=np.uint8)
    with h5py.File(tmp_path / "sample.h5", "w") as f:
        f.create_dataset("volumes/raw", data=raw, chunks=(1, 10, 12))
        f["volumes/raw"].attrs["element_size_um"] = (0.05, 0.004, 0.004)  # Fiji's HDF5 plugin, ilastik
        f.create_dataset("volumes/labels/cells", data=raw > 100)
        f["volumes/labels/cells"].attrs["resolution"] = (40.0, 4.0, 4.0)  # CREMI
        f["volumes/labels/cells"].attrs["unit"] = "nm"
        f.create_dataset("volumes/plain", data=raw.astype(np.float32))
    with open_volume(f"{tmp_path}/sample.h5:/volumes/raw") as volume:
        assert volume.shape == (4, 10, 12) and volume.dtype == np.uint8
        assert volume.voxel_size == pytest.approx((0.05, 0.004, 0.004)) and volume.unit == "µm"
        np.testing.assert_array_equal(volume[1:3, 2:6, 3:9], raw[1:3, 2:6, 3:9])
    with open_volume(tmp_path / "sample.h5:volumes/labels/cells") as volume:  # leading "/" optional
        assert volume.dtype == np.uint8 and volume.voxel_size == pytest.approx((40.0, 4.0, 4.0)) and volume.unit == "nm"
        np.testing.assert_array_equal(volume[:], raw > 100)
    with open_volume(f"{tmp_path}/sample.h5:/volumes/plain") as volume:
        assert volume.voxel_size is None and volume.unit is None
    message = one_line_error(f"{tmp_path}/sample.h5:/volumes/missing", r"sample.h5: no dataset '/volumes/missing'; name one "
                                                                        r"as sample.h5:/path/to/dataset")
    assert "/volumes/raw" in message and "/volumes/labels/cells" in message
    one_line_error(f"{tmp_path}/sample.h5", "no dataset path was given")
    one_line_error(f"{tmp_path}/sample.h5:/volumes/labels", r"no dataset '/volumes/labels'.*holds /volumes/labels/cells$")


def test_hdf5_single_dataset_ilastik_axistags_and_bad_files(tmp_path, rng):
    data = rng.random((3, 8, 9, 1)).astype(np.float32)  # ilastik's export: zyxc with one channel
    with h5py.File(tmp_path / "export.hdf5", "w") as f:
        f["exported_data"] = data
        f["exported_data"].attrs["axistags"] = json.dumps({"axes": [{"key": k, "typeFlags": 2} for k in "zyxc"]})
        f["exported_data"].attrs["element_size_um"] = (1.0, 0.5, 0.5, 1.0)
    with open_volume(tmp_path / "export.hdf5") as volume:  # one dataset: no need to name it
        assert volume.shape == (3, 8, 9) and volume.voxel_size == pytest.approx((1.0, 0.5, 0.5))
        np.testing.assert_array_equal(volume[:], data[..., 0])
    with h5py.File(tmp_path / "xyz.hdf", "w") as f:  # axes in another order are put as (Z, Y, X)
        f["d"] = data[..., 0].transpose(2, 1, 0)
        f["d"].attrs["axistags"] = json.dumps({"axes": [{"key": k} for k in "xyz"]})
    np.testing.assert_array_equal(read_volume(tmp_path / "xyz.hdf"), data[..., 0])
    with h5py.File(tmp_path / "rgb.h5", "w") as f:
        f["d"] = np.zeros((2, 8, 8, 3), np.uint8)
        f["d"].attrs["axistags"] = json.dumps({"axes": [{"key": k} for k in "zyxc"]})
    one_line_error(tmp_path / "rgb.h5", r"\(3 channels\)")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5" * 100)
    one_line_error(tmp_path / "junk.h5", "junk.h5: not a readable HDF5 file")
    one_line_error(tmp_path / "missing.h5:/raw", "missing.h5: file not found")
    with h5py.File(tmp_path / "none.h5", "w"):
        pass
    one_line_error(tmp_path / "none.h5", "the file holds no dataset")


# --- Fiji hyperstacks, regions, options ------------------------------------------------------------------

def test_imagej_hyperstack_written_by_tifffile(tmp_path, rng):
    data = rng.integers(0, 65535, (1, 5, 1, 16, 18), dtype=np.uint16)  # TZCYX as Fiji saves a hyperstack
    tifffile.imwrite(tmp_path / "hyper.tif", data, imagej=True, resolution=(1 / 0.004, 1 / 0.004),
                     metadata={"axes": "TZCYX", "spacing": 0.05, "unit": "micron"})
    with open_volume(tmp_path / "hyper.tif") as volume:
        assert volume.shape == (5, 16, 18) and volume.dtype == np.uint16
        assert volume.voxel_size == pytest.approx((0.05, 0.004, 0.004)) and volume.unit == "µm"
        np.testing.assert_array_equal(volume[:], data[0, :, 0])
    with open_volume(tmp_path / "hyper.tif", region="1:3,,4:") as volume:
        assert volume.shape == (2, 16, 14) and volume.voxel_size == pytest.approx((0.05, 0.004, 0.004))
        np.testing.assert_array_equal(volume[:], data[0, 1:3, 0, :, 4:])


@pytest.mark.parametrize("kind", ["tif", "npy", "mrc", "zarr", "h5", "folder"])
def test_a_region_is_the_same_block_in_every_format(tmp_path, rng, kind):
    data = rng.integers(0, 30000, (7, 20, 24), dtype=np.int16)
    path = tmp_path / f"v.{kind}"
    if kind == "tif":
        tifffile.imwrite(path, data, photometric="minisblack")
    elif kind == "npy":
        path = tmp_path / "v.npy"
        np.save(path, data)
    elif kind == "mrc":
        write_mrc(path, data)
    elif kind == "zarr":
        zarr.create_array(path, data=data, chunks=(2, 8, 8))
    elif kind == "h5":
        with h5py.File(path, "w") as f:
            f["raw"] = data
        path = f"{path}:/raw"
    else:
        path.mkdir()
        for z in range(7):
            tifffile.imwrite(path / f"z{z}.tif", data[z])
    for region, block in [("2:5,3:11,4:20", data[2:5, 3:11, 4:20]), ("4:7,,", data[4:]),
                          (",,-5:", data[:, :, -5:]), ("3", data[3:4]), (" : , 5:6 ", data[:, 5:6]), ("", data)]:
        with open_volume(path, region=region) as volume:
            assert volume.shape == block.shape, region
            np.testing.assert_array_equal(volume[:], block)
            np.testing.assert_array_equal(volume[-1], block[-1])
            np.testing.assert_array_equal(volume[0:2, 1:3, :-1], block[0:2, 1:3, :-1])
    np.testing.assert_array_equal(read_volume(path, region="1:2,0:1,0:1"), data[1:2, 0:1, 0:1])


@pytest.mark.parametrize("region, message", [
    ("1:2,3:4,5:6,7:8", "has 4 parts"),
    ("a:b,,", r"is not of the form z0:z1,y0:y1,x0:x1 \(bad part 'a:b'\)"),
    ("1:2:3", "bad part '1:2:3'"),
    ("0:9,,", r"asks for z 0:9 but the volume has 7 along z \(shape \(7, 20, 24\)\)"),
    ("5:5,,", "expected 0 <= start < stop <= 7"),
    (",,30:", "asks for x 30:"),
])
def test_bad_regions_give_one_line(tmp_path, region, message):
    tifffile.imwrite(tmp_path / "v.tif", np.zeros((7, 20, 24), np.uint8), photometric="minisblack")
    assert "v.tif" in one_line_error(tmp_path / "v.tif", message, region=region)


def test_level_is_refused_where_there_are_no_levels_and_new_suffixes_are_listed(tmp_path):
    tifffile.imwrite(tmp_path / "v.tif", np.zeros((2, 8, 8), np.uint8), photometric="minisblack")
    one_line_error(tmp_path / "v.tif", "levels exist only in a multiscale OME-Zarr image", level=1)
    (tmp_path / "x.jpg").write_bytes(b"1234")
    message = one_line_error(tmp_path / "x.jpg", "unsupported file type")
    assert all(s in message for s in (".mrc", ".rec", ".st", ".h5", ".zarr folder"))


def test_labels_take_the_same_region_as_their_image(tmp_path):
    labels = np.zeros((6, 10, 10), np.uint8)
    labels[3, 4, 5] = 7
    zarr.create_array(tmp_path / "labels.zarr", data=labels)
    mask = read_mask(tmp_path / "labels.zarr", (2, 5, 5), "image.mrc", region="2:4,2:7,5:10")
    assert mask.shape == (2, 5, 5) and mask.sum() == 1 and mask[1, 2, 0] == 1
