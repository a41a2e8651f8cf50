"""Results of volume-EM inputs: OME-Zarr in, OME-Zarr out with the same scale and chunking; a level and a
region of a big volume; HDF5 datasets; the per-object table in physical units."""

import csv

import numpy as np
import pytest
import tifffile
import zarr

from emunet.core.errors import InputError
from emunet.core.objects import MEASURE_COLUMNS, ObjectMeasures
from emunet.core.omezarr import SliceWriter, create_image, open_image
from emunet.core.io import open_volume
from serving.predict import PredictConfig, predict
from tests.test_io_formats import write_ome_zarr


def read_image(path):
    """`(array, scale, axis units, chunks)` of an OME-Zarr image read with plain zarr (not our reader)."""
    group = zarr.open_group(str(path), mode="r")
    attrs = dict(group.attrs)
    multiscale = (attrs.get("ome") or attrs)["multiscales"][0]
    dataset = multiscale["datasets"][0]
    scale = [t["scale"] for t in dataset["coordinateTransformations"] if t["type"] == "scale"][0]
    array = group[dataset["path"]]
    return array[:], scale, [a.get("unit") for a in multiscale["axes"]], array.chunks


def test_object_measures_by_hand():
    """Object 1: 2 voxels in slice 0 and 1 in slice 1; object 2: one voxel in slice 1."""
    measures = ObjectMeasures(voxel_size=(50.0, 4.0, 2.0), unit="nm")
    measures.add(0, np.array([[1, 1], [0, 0]]))
    measures.add(1, np.array([[0, 0], [1, 2]]))
    rows = {r[0]: dict(zip(MEASURE_COLUMNS, r)) for r in measures.rows()}
    one = rows[1]
    assert (one["voxels"], one["first_slice"], one["last_slice"]) == (3, 0, 1)
    assert (one["centroid_z"], one["centroid_y"], one["centroid_x"]) == pytest.approx((1 / 3, 1 / 3, 1 / 3), abs=0.01)
    assert one["volume"] == pytest.approx(3 * 50 * 4 * 2) and one["unit"] == "nm"
    assert (one["z"], one["y"], one["x"]) == pytest.approx((50 / 3, 4 / 3, 2 / 3), rel=1e-4)
    assert rows[2]["voxels"] == 1 and rows[2]["volume"] == pytest.approx(400) and rows[2]["x"] == pytest.approx(2)
    assert ObjectMeasures().rows() == [] and ObjectMeasures(None).rows() == []
    uncalibrated = ObjectMeasures()
    uncalibrated.add(3, np.array([[0, 5]]))
    assert uncalibrated.rows() == [[5, 1, 3, 3, 3.0, 0.0, 1.0, "", "", "", "", ""]]


def test_slice_writer_stores_whole_rows_of_chunks(tmp_path):
    """Slices are stored only when a chunk depth is complete (and at the end): never a partial chunk
    rewritten per slice, and a writer starting off a chunk boundary is refused (Spark tasks own chunks)."""
    create_image(tmp_path / "x.ome.zarr", (5, 6, 7), np.uint8, chunks=(2, 3, 7), voxel_size=(3, 2, 1), unit="nm")
    array = open_image(tmp_path / "x.ome.zarr")
    with SliceWriter(array) as write:
        write(0, np.full((6, 7), 1))
        assert not array[:].any()  # buffered
        write(1, np.full((6, 7), 2))
        assert array[1].max() == 2  # chunk row 0-1 complete
        for z in (2, 3, 4):
            write(z, np.full((6, 7), z + 1))
    np.testing.assert_array_equal(array[:, 0, 0], [1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="chunk boundary"):
        SliceWriter(array, start=1)
    data, scale, units, chunks = read_image(tmp_path / "x.ome.zarr")
    assert scale == [3.0, 2.0, 1.0] and units == ["nanometer"] * 3 and chunks == (2, 3, 7)


@pytest.fixture
def cells_zarr(tmp_path, rng):
    """A calibrated OME-Zarr volume (NGFF 0.5, as ome-zarr-py writes it) with two levels and 4 x 32 x 32 chunks,
    and the same voxels as a TIFF."""
    data = (rng.random((6, 48, 64)) * 200).astype(np.uint8)
    data[:, 10:30, 10:30] = 230  # a bright block: an object whatever the tiny model learned
    path = write_ome_zarr(tmp_path / "cells.ome.zarr", data, scale=(0.05, 0.008, 0.008), unit="micrometer",
                          levels=2, chunks=(4, 32, 32))
    tifffile.imwrite(tmp_path / "cells.tif", data, photometric="minisblack")
    return path, data


def test_ome_zarr_in_ome_zarr_out_with_scale_chunks_and_object_volumes(world, tmp_path, cells_zarr):
    path, data = cells_zarr
    cfg = PredictConfig(model_uri=world["trained"]["model_uri"], input=str(path), output_dir=str(tmp_path / "out"),
                        save_probability=True, save_labels=True, min_object_size=1)
    predict(cfg)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["cells_instances.csv", "cells_labels.ome.zarr", "cells_mask.ome.zarr",
                                                    "cells_objects.csv", "cells_prob.ome.zarr"]
    mask, scale, units, chunks = read_image(out / "cells_mask.ome.zarr")
    assert mask.shape == data.shape and mask.dtype == np.uint8
    assert scale == pytest.approx([0.05, 0.008, 0.008]) and units == ["micrometer"] * 3 and chunks == (4, 32, 32)
    prob = read_image(out / "cells_prob.ome.zarr")[0]
    ids = read_image(out / "cells_labels.ome.zarr")[0]
    assert prob.dtype == np.float32 and ids.dtype == np.uint32
    np.testing.assert_array_equal(mask == 255, prob >= 0.5)
    # The same voxels as a TIFF give the same mask: the format changes the container, not the result.
    tif = PredictConfig(**{**cfg.__dict__, "input": str(tmp_path / "cells.tif"), "output_dir": str(tmp_path / "tif")})
    predict(tif)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "tif" / "cells_mask.tif"), mask)
    # Per 3-D object: the voxels of each id in the label image, its volume in µm³ and centroid in µm.
    rows = list(csv.DictReader(open(out / "cells_instances.csv")))
    counts = np.bincount(ids.ravel())
    assert len(rows) == np.count_nonzero(counts[1:]) > 0
    for row in rows:
        i = int(row["id"])
        assert int(row["voxels"]) == counts[i]
        assert float(row["volume"]) == pytest.approx(counts[i] * 0.05 * 0.008 * 0.008, rel=1e-4)
        zyx = np.argwhere(ids == i).mean(axis=0)
        assert float(row["z"]) == pytest.approx(zyx[0] * 0.05, rel=1e-3, abs=1e-4) and row["unit"] == "µm"
    # A second run replaces the results it wrote itself...
    predict(cfg)
    assert (out / "cells_mask.ome.zarr" / "0").is_dir() and not list(out.glob("*.partial"))


def test_a_folder_not_written_by_us_is_never_replaced(world, tmp_path, cells_zarr):
    path, _ = cells_zarr
    out = tmp_path / "out"
    (out / "cells_mask.ome.zarr").mkdir(parents=True)
    (out / "cells_mask.ome.zarr" / "notes.txt").write_text("mine")
    cfg = PredictConfig(model_uri=world["trained"]["model_uri"], input=str(path), output_dir=str(out))
    with pytest.raises(InputError, match="not written by em-unet"):
        predict(cfg)
    assert (out / "cells_mask.ome.zarr" / "notes.txt").read_text() == "mine"
    # Nor is a folder where a result file would go (a TIFF, a table): refused before any work, kept.
    for folder in ("cells_mask.tif", "cells_instances.csv"):
        (out / "tif" / folder).mkdir(parents=True)
        (out / "tif" / folder / "notes.txt").write_text("mine")
        with pytest.raises(InputError, match="is a folder"):
            predict(PredictConfig(**{**cfg.__dict__, "output_dir": str(out / "tif"), "output_format": "tif"}))
        assert (out / "tif" / folder / "notes.txt").read_text() == "mine"
        (out / "tif" / folder / "notes.txt").unlink()
        (out / "tif" / folder).rmdir()
    assert not list((out / "tif").iterdir())  # nothing written, not even a .partial


def test_level_region_and_zarr_output_from_a_tiff(world, tmp_path, cells_zarr):
    """A block of level 1, and `output_format=zarr` for a TIFF input (default chunks, its calibration)."""
    path, data = cells_zarr
    cfg = PredictConfig(model_uri=world["trained"]["model_uri"], input=str(path), output_dir=str(tmp_path / "lv"),
                        level="1", region="1:5,0:16,")
    predict(cfg)
    mask, scale, _, _ = read_image(tmp_path / "lv" / "cells_mask.ome.zarr")
    assert mask.shape == (4, 16, 32) and scale == pytest.approx([0.05, 0.016, 0.016])
    tifffile.imwrite(tmp_path / "cal.tif", data, imagej=True, resolution=(1 / 0.008, 1 / 0.008),
                     metadata={"spacing": 0.05, "unit": "micron", "axes": "ZYX"})
    predict(PredictConfig(model_uri=world["trained"]["model_uri"], input=str(tmp_path / "cal.tif"),
                          output_dir=str(tmp_path / "z"), output_format="zarr", region=",,0:40"))
    with open_volume(tmp_path / "z" / "cal_mask.ome.zarr") as back:  # our own reader takes it back too
        assert back.shape == (6, 48, 40) and back.voxel_size == pytest.approx((0.05, 0.008, 0.008)) and back.unit == "µm"
    with pytest.raises(InputError, match="output_format must be one of"):
        predict(PredictConfig(model_uri=world["trained"]["model_uri"], input=str(path), output_format="n5"))


def test_hdf5_dataset_and_mrc_tomogram_through_predict(world, tmp_path, rng):
    import h5py

    from tests.test_io_formats import write_mrc

    data = (rng.random((3, 32, 40)) * 255).astype(np.uint8)
    with h5py.File(tmp_path / "vol.h5", "w") as f:
        f.create_dataset("volumes/raw", data=data, chunks=(1, 32, 40))
        f["volumes/raw"].attrs["element_size_um"] = (0.04, 0.01, 0.01)
    write_mrc(tmp_path / "tomo.rec", data.astype(np.int16) - 128, voxel_size=(6.8, 6.8, 13.6))  # x, y, z in Å
    predict(PredictConfig(model_uri=world["trained"]["model_uri"], output_dir=str(tmp_path / "out"),
                          input=f"{tmp_path / 'vol.h5'}:/volumes/raw,{tmp_path / 'tomo.rec'}"))
    with open_volume(tmp_path / "out" / "vol_raw_mask.tif") as mask:
        assert mask.shape == data.shape and mask.voxel_size == pytest.approx((0.04, 0.01, 0.01))
    with open_volume(tmp_path / "out" / "tomo_mask.tif") as mask:  # the MRC header's Å, as nm
        assert mask.shape == data.shape and mask.voxel_size == pytest.approx((1.36, 0.68, 0.68)) and mask.unit == "nm"
    rows = list(csv.DictReader(open(tmp_path / "out" / "tomo_instances.csv")))
    assert all(row["unit"] == "nm" for row in rows)


def test_preprocess_cuts_a_training_block_out_of_an_ome_zarr_level_and_an_hdf5_file(store, tmp_path, rng):
    """`region` and `level` take a block of a big volume (labels alike) without the rest; the artifact
    records where it came from and its voxel size."""
    import h5py
    import mlflow

    from emunet.core.dataset import read_manifest
    from pipeline.preprocess import PreprocessConfig, preprocess

    data = (rng.random((8, 64, 64)) * 255).astype(np.uint8)
    labels = (data > 128).astype(np.uint8) * 255  # 0 / 255: ome-zarr's down-sampling keeps it a mask
    write_ome_zarr(tmp_path / "em.ome.zarr", data, scale=(0.03, 0.004, 0.004), levels=2, chunks=(2, 16, 16))
    write_ome_zarr(tmp_path / "em_gt.ome.zarr", labels, scale=(0.03, 0.004, 0.004), levels=2, chunks=(2, 16, 16))
    result = preprocess(PreprocessConfig(images=str(tmp_path / "em.ome.zarr"), labels=str(tmp_path / "em_gt.ome.zarr"),
                                         level="1", region="2:8,0:32,", val_slices="4:6"))
    folder = mlflow.artifacts.download_artifacts(result["dataset_uri"])
    manifest = read_manifest(folder)
    assert [(s.name, s.shape) for s in manifest["stacks"]] == [("em_z0-4", (4, 32, 32)), ("em_z4-6", (2, 32, 32))]
    with open_volume(tmp_path / "em.ome.zarr", level=1, region="2:8,0:32,") as block:
        np.testing.assert_array_equal(np.load(f"{folder}/em_z0-4/image.npy"), block[0:4])
    source = manifest["stacks"][0].source
    assert source["voxel_size"] == pytest.approx([0.03, 0.008, 0.008]) and source["unit"] == "µm"
    assert (source["level"], source["region"]) == ("1", "2:8,0:32,")

    with h5py.File(tmp_path / "vol.h5", "w") as f:  # image and labels in one file, as ilastik keeps them
        f["raw"], f["labels"] = data, labels
    result = preprocess(PreprocessConfig(images=f"{tmp_path / 'vol.h5'}:/raw", labels=f"{tmp_path / 'vol.h5'}:/labels",
                                         region=",16:48,16:48"))
    manifest = read_manifest(mlflow.artifacts.download_artifacts(result["dataset_uri"]))
    assert {s.shape[1:] for s in manifest["stacks"]} == {(32, 32)} and manifest["stacks"][0].name.startswith("vol_raw")
    with pytest.raises(InputError, match="region"):
        preprocess(PreprocessConfig(images=str(tmp_path / "em.ome.zarr"), labels=str(tmp_path / "em_gt.ome.zarr"),
                                    region="0:99,,"))

    from tests.test_io_formats import write_mrc  # a tomogram and its segmentation as MRC, as IMOD / Amira keep them

    write_mrc(tmp_path / "tomo.rec", data.astype(np.float32), voxel_size=(10.0, 10.0, 20.0))
    write_mrc(tmp_path / "tomo_seg.mrc", (labels > 0).astype(np.int8))
    result = preprocess(PreprocessConfig(images=str(tmp_path / "tomo.rec"), labels=str(tmp_path / "tomo_seg.mrc")))
    source = read_manifest(mlflow.artifacts.download_artifacts(result["dataset_uri"]))["stacks"][0].source
    assert source["voxel_size"] == pytest.approx([2.0, 1.0, 1.0]) and source["unit"] == "nm"


def test_a_result_file_never_replaces_a_folder_and_a_result_folder_replaces_only_a_folder(tmp_path):
    """`atomic_write`, under every writer: a file written to a path that is a user's folder is refused (the
    folder stays); a folder result replaces the earlier folder at its path whole."""
    from emunet.core.files import atomic_write

    (tmp_path / "cells_mask.tif").mkdir()
    (tmp_path / "cells_mask.tif" / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="never replaces a folder"):
        with atomic_write(tmp_path / "cells_mask.tif") as tmp:
            tmp.write_bytes(b"result")
    assert (tmp_path / "cells_mask.tif" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells_mask.tif"]  # no .partial left behind
    (tmp_path / "old.ome.zarr").mkdir()
    (tmp_path / "old.ome.zarr" / "stale").write_text("old")
    with atomic_write(tmp_path / "old.ome.zarr") as tmp:
        tmp.mkdir()
        (tmp / "0").write_text("new")
    assert sorted(p.name for p in (tmp_path / "old.ome.zarr").iterdir()) == ["0"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells_mask.tif", "old.ome.zarr"]
