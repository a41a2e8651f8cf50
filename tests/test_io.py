"""Reading stacks: every format users bring, and a clear one-line error for every bad input."""

import cv2
import numpy as np
import pytest
import tifffile

from pipeline.errors import InputError
from pipeline.io import natural_key, read_mask, read_stack


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_multipage_tiff_roundtrip(tmp_path, rng, dtype):
    stack = (rng.random((5, 20, 30)) * 1000).astype(dtype)
    tifffile.imwrite(tmp_path / "s.tif", stack)
    out = read_stack(tmp_path / "s.tif")
    assert out.shape == (5, 20, 30) and out.dtype == dtype
    np.testing.assert_array_equal(out, stack)


def test_folder_of_slices_in_natural_order(tmp_path):
    for z in (10, 2, 1):  # slice_10 must come after slice_2
        cv2.imwrite(str(tmp_path / f"slice_{z}.png"), np.full((8, 9), z, np.uint8))
    (tmp_path / "notes.txt").write_text("ignored")
    out = read_stack(tmp_path)
    assert out.shape == (3, 8, 9)
    assert list(out[:, 0, 0]) == [1, 2, 10]
    assert sorted(["a10", "a2", "a1"], key=natural_key) == ["a1", "a2", "a10"]


def test_single_2d_image_is_a_one_slice_stack(tmp_path):
    tifffile.imwrite(tmp_path / "one.tif", np.zeros((16, 16), np.uint16))
    assert read_stack(tmp_path / "one.tif").shape == (1, 16, 16)


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
        read_stack(path)
    assert str(path.name) in str(info.value) and "\n" not in str(info.value)


def test_truncated_tiff(tmp_path, rng):
    tifffile.imwrite(tmp_path / "full.tif", rng.integers(0, 255, (6, 64, 64), dtype=np.uint8))
    data = (tmp_path / "full.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated or corrupt"):
        read_stack(tmp_path / "cut.tif")


def test_folder_with_mismatched_slices(tmp_path):
    cv2.imwrite(str(tmp_path / "a1.png"), np.zeros((8, 8), np.uint8))
    cv2.imwrite(str(tmp_path / "a2.png"), np.zeros((8, 9), np.uint8))
    with pytest.raises(InputError, match=r"a2.png: slice has shape \(8, 9\)"):
        read_stack(tmp_path)


def test_labels_binarised_and_checked(tmp_path):
    image = np.zeros((2, 8, 8), np.uint8)
    labels = np.zeros((2, 8, 8), np.uint16)
    labels[0, 1, 1], labels[1, 2, 2] = 255, 7  # several values: any non-zero is foreground
    tifffile.imwrite(tmp_path / "l.tif", labels)
    mask = read_mask(tmp_path / "l.tif", image, "img.tif")
    assert mask.dtype == np.uint8 and mask.sum() == 2 and set(np.unique(mask)) == {0, 1}

    tifffile.imwrite(tmp_path / "bg.tif", np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(InputError, match="all background"):
        read_mask(tmp_path / "bg.tif", image, "img.tif")
    tifffile.imwrite(tmp_path / "small.tif", np.ones((2, 8, 7), np.uint8))
    with pytest.raises(InputError, match=r"small.tif has shape \(2, 8, 7\) but img.tif has \(2, 8, 8\)"):
        read_mask(tmp_path / "small.tif", image, "img.tif")


def test_lazy_stack_reads_slices_on_demand_and_matches_read_stack(tmp_path, rng):
    from pipeline.io import TiffStack, lazy_stack

    stack = rng.integers(0, 65535, (6, 20, 30), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "s.tif", stack, photometric="minisblack")
    lazy = lazy_stack(tmp_path / "s.tif")
    assert isinstance(lazy, TiffStack) and lazy.shape == (6, 20, 30) and lazy.dtype == np.uint16
    np.testing.assert_array_equal(lazy[2], stack[2])
    np.testing.assert_array_equal(lazy[1:4], stack[1:4])
    lazy.close()
    np.save(tmp_path / "s.npy", stack)
    assert isinstance(lazy_stack(tmp_path / "s.npy"), np.memmap)
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((4, 16, 16, 3), np.uint8), photometric="rgb")
    with pytest.raises(InputError, match="grayscale"):
        lazy_stack(tmp_path / "rgb.tif")


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
    assert path.stat().st_size < 2000
    return path


def test_a_header_declaring_more_than_memory_is_refused_before_allocating(tmp_path):
    from pipeline.io import available_memory, lazy_stack

    path = huge_header_tiff(tmp_path / "huge.tif")  # 3 x 300000 x 300000 uint16: 503 GiB
    assert available_memory() < 3 * 300_000**2 * 2
    with pytest.raises(InputError, match=r"huge.tif: the TIFF header declares \(3, 300000, 300000\) uint16, 502.9 GiB, "
                                         r"but only .* GiB of memory is available; crop the stack .* `predict`"):
        read_stack(path)
    # predict reads slice by slice, but one slice of 168 GiB does not fit either.
    with pytest.raises(InputError, match=r"one slice of the TIFF header declares \(300000, 300000\) uint16"):
        lazy_stack(path)
    # A stack that fits is still read (the check counts bytes, not pixels).
    assert read_stack(huge_header_tiff(tmp_path / "ok.tif", size=8)).shape == (3, 8, 8)
