"""Reading volumes: every format users bring, read lazily with their calibration, and a clear one-line
error for every bad input."""

import cv2
import numpy as np
import pytest
import tifffile

from emunet.core.errors import InputError
from emunet.core.io import natural_key, open_volume, read_mask, read_volume


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_multipage_tiff_roundtrip(tmp_path, rng, dtype):
    stack = (rng.random((5, 20, 30)) * 1000).astype(dtype)
    tifffile.imwrite(tmp_path / "s.tif", stack)
    out = read_volume(tmp_path / "s.tif")
    assert out.shape == (5, 20, 30) and out.dtype == dtype
    np.testing.assert_array_equal(out, stack)


def test_folder_of_slices_in_natural_order(tmp_path):
    for z in (10, 2, 1):  # slice_10 must come after slice_2
        cv2.imwrite(str(tmp_path / f"slice_{z}.png"), np.full((8, 9), z, np.uint8))
    (tmp_path / "notes.txt").write_text("ignored")
    out = read_volume(tmp_path)
    assert out.shape == (3, 8, 9)
    assert list(out[:, 0, 0]) == [1, 2, 10]
    assert sorted(["a10", "a2", "a1"], key=natural_key) == ["a1", "a2", "a10"]


def test_single_2d_image_is_a_one_slice_stack(tmp_path):
    tifffile.imwrite(tmp_path / "one.tif", np.zeros((16, 16), np.uint16))
    assert read_volume(tmp_path / "one.tif").shape == (1, 16, 16)


def write_tiff(path, array, **kwargs):
    tifffile.imwrite(path, array, **kwargs)
    return path


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.tif", "file not found"),
    (lambda p: (p / "zero.tif").write_bytes(b"") and p / "zero.tif" or p / "zero.tif", "empty"),
    (lambda p: (p / "junk.tif").write_bytes(b"not a tiff at all") and p / "junk.tif", "not a readable TIFF"),
    (lambda p: write_tiff(p / "rgb.tif", np.zeros((3, 16, 16, 3), np.uint8), photometric="rgb"), "grayscale"),
    (lambda p: write_tiff(p / "ch.tif", np.zeros((3, 2, 16, 16), np.uint8), imagej=True,
                          metadata={"axes": "ZCYX"}), "multi-channel"),
    (lambda p: (p / "x.jpg").write_bytes(b"1234") and p / "x.jpg", "unsupported file type"),
    (lambda p: (p / "empty_dir").mkdir() or p / "empty_dir", "holds no"),
    (lambda p: np.save(p / "none.npy", np.zeros((0, 8, 8), np.uint8)) or p / "none.npy", "empty"),
    (lambda p: np.save(p / "vol4d.npy", np.zeros((2, 2, 8, 8), np.uint8)) or p / "vol4d.npy", "expected a 2-D image"),
])
def test_bad_inputs_raise_one_clear_line(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(InputError, match=message) as info:
        read_volume(path)
    assert str(path.name) in str(info.value) and "\n" not in str(info.value)


def test_truncated_tiff(tmp_path, rng):
    tifffile.imwrite(tmp_path / "full.tif", rng.integers(0, 255, (6, 64, 64), dtype=np.uint8))
    data = (tmp_path / "full.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated or corrupt"):
        read_volume(tmp_path / "cut.tif")


def test_folder_with_mismatched_slices(tmp_path):
    cv2.imwrite(str(tmp_path / "a1.png"), np.zeros((8, 8), np.uint8))
    cv2.imwrite(str(tmp_path / "a2.png"), np.zeros((8, 9), np.uint8))
    with pytest.raises(InputError, match=r"a2.png: slice has shape \(8, 9\)"):
        read_volume(tmp_path)


def test_labels_binarised_and_checked(tmp_path):
    image = np.zeros((2, 8, 8), np.uint8)
    labels = np.zeros((2, 8, 8), np.uint16)
    labels[0, 1, 1], labels[1, 2, 2] = 255, 7  # several values: any non-zero is foreground
    tifffile.imwrite(tmp_path / "l.tif", labels)
    mask = read_mask(tmp_path / "l.tif", image.shape, "img.tif")
    assert mask.dtype == np.uint8 and mask.sum() == 2 and set(np.unique(mask)) == {0, 1}

    tifffile.imwrite(tmp_path / "bg.tif", np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(InputError, match="all background"):
        read_mask(tmp_path / "bg.tif", image.shape, "img.tif")
    tifffile.imwrite(tmp_path / "small.tif", np.ones((2, 8, 7), np.uint8))
    with pytest.raises(InputError, match=r"small.tif has shape \(2, 8, 7\) but img.tif has \(2, 8, 8\)"):
        read_mask(tmp_path / "small.tif", image.shape, "img.tif")


@pytest.mark.parametrize("kind", ["tif", "npy", "folder"])
def test_volumes_are_read_slice_by_slice_and_match_the_whole_read(tmp_path, rng, kind):
    stack = rng.integers(0, 65535, (6, 20, 30), dtype=np.uint16)
    if kind == "tif":
        path = write_tiff(tmp_path / "s.tif", stack, photometric="minisblack")
    elif kind == "npy":
        path = tmp_path / "s.npy"
        np.save(path, stack)
    else:
        path = tmp_path / "slices"
        path.mkdir()
        for z in range(6):
            tifffile.imwrite(path / f"z{z}.tif", stack[z])
    with open_volume(path) as volume:
        assert volume.shape == (6, 20, 30) and volume.dtype == np.uint16 and len(volume) == 6
        np.testing.assert_array_equal(volume[2], stack[2])
        np.testing.assert_array_equal(volume[-1], stack[-1])
        np.testing.assert_array_equal(volume[1:4], stack[1:4])
        np.testing.assert_array_equal(volume[::2], stack[::2])
        np.testing.assert_array_equal(volume[1:3, 5:9, 2:4], stack[1:3, 5:9, 2:4])
        with pytest.raises(IndexError):
            volume[6]
    np.testing.assert_array_equal(read_volume(path), stack)


def test_a_tiff_volume_reads_only_the_pages_asked_for(tmp_path, rng):
    """Lazy for real: a slice is read from its page, so a damaged page fails only when it is read."""
    stack = rng.integers(0, 255, (4, 64, 64), dtype=np.uint8)
    write_tiff(tmp_path / "s.tif", stack, photometric="minisblack")
    with tifffile.TiffFile(tmp_path / "s.tif") as tif:
        last = tif.pages[3].dataoffsets[0]
    data = bytearray((tmp_path / "s.tif").read_bytes())
    data[last:last + 4096] = b"\0" * len(data[last:last + 4096])  # not a read error, but check reads go page by page
    with open_volume(tmp_path / "s.tif") as volume:
        np.testing.assert_array_equal(volume[0], stack[0])
        with open(tmp_path / "s.tif", "r+b") as f:  # the file changes after opening: slice 3 reads the new bytes
            f.seek(last)
            f.write(b"\xff" * 64)
        assert (volume[3][0] == 255).all() and (volume[0] == stack[0]).all()


def test_imagej_and_ome_tiffs_carry_their_voxel_size(tmp_path):
    stack = np.zeros((3, 16, 16), np.uint8)
    tifffile.imwrite(tmp_path / "fiji.tif", stack, imagej=True, resolution=(1 / 4.0, 1 / 4.0),
                     metadata={"spacing": 50.0, "unit": "nm", "axes": "ZYX"})
    with open_volume(tmp_path / "fiji.tif") as volume:
        assert volume.voxel_size == pytest.approx((50.0, 4.0, 4.0)) and volume.unit == "nm"
    tifffile.imwrite(tmp_path / "micron.tif", stack, imagej=True, resolution=(2.0, 2.0),
                     metadata={"spacing": 0.25, "unit": "micron", "axes": "ZYX"})
    with open_volume(tmp_path / "micron.tif") as volume:
        assert volume.voxel_size == pytest.approx((0.25, 0.5, 0.5)) and volume.unit == "µm"
    tifffile.imwrite(tmp_path / "ome.ome.tif", stack, ome=True,
                     metadata={"axes": "ZYX", "PhysicalSizeX": 0.008, "PhysicalSizeY": 0.008, "PhysicalSizeZ": 0.05,
                               "PhysicalSizeXUnit": "µm"})
    with open_volume(tmp_path / "ome.ome.tif") as volume:
        assert volume.voxel_size == pytest.approx((0.05, 0.008, 0.008)) and volume.unit == "µm"
    tifffile.imwrite(tmp_path / "plain.tif", stack, photometric="minisblack")
    with open_volume(tmp_path / "plain.tif") as volume:
        assert volume.voxel_size is None and volume.unit is None


def huge_header_tiff(path, size=300_000, pages=3):
    """A tiny TIFF (under 1 KB) whose header declares `pages` slices of `size` x `size` uint16: a normal
    file with its ImageWidth / ImageLength tags patched, as a corrupt or hostile header would be."""
    import struct

    tifffile.imwrite(path, np.zeros((pages, 8, 8), np.uint16), photometric="minisblack")
    with tifffile.TiffFile(path) as tif:
        offsets = [p.tags[t].valueoffset for p in tif.pages for t in ("ImageWidth", "ImageLength")]
        assert all(p.tags["ImageWidth"].dtype == 4 for p in tif.pages)  # LONG: room for a large value
    with open(path, "r+b") as f:
        for offset in offsets:
            f.seek(offset)
            f.write(struct.pack("<I", size))
    assert path.stat().st_size < 10_000
    return path


def test_a_header_declaring_more_than_memory_is_refused_before_allocating(tmp_path):
    from emunet.core.io import available_memory

    path = huge_header_tiff(tmp_path / "huge.tif")  # 3 x 300000 x 300000 uint16: 503 GiB, 168 GiB a slice
    assert available_memory() < 300_000**2 * 2
    with pytest.raises(InputError, match=r"huge.tif: one slice of the TIFF header declares \(300000, 300000\) uint16, "
                                         r"167.6 GiB, but only .* GiB of memory is available; crop the slices"):
        open_volume(path).__enter__()
    # Slices that fit, a whole stack that does not: read slice by slice, refused as a whole.
    path = huge_header_tiff(tmp_path / "long.tif", size=60_000, pages=20)  # 6.7 GiB a slice, 134 GiB in all
    assert available_memory() < 20 * 60_000**2 * 2
    with open_volume(path) as volume:
        assert volume.shape == (20, 60_000, 60_000)
    with pytest.raises(InputError, match=r"long.tif: the stack declares \(20, 60000, 60000\) uint16, 134.1 GiB, but only "
                                         r".* GiB of memory is available; read it slice by slice"):
        read_volume(path)
    # A stack that fits is still read (the check counts bytes, not pixels).
    assert read_volume(huge_header_tiff(tmp_path / "ok.tif", size=8)).shape == (3, 8, 8)
