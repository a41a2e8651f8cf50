import numpy as np
import pytest

from emunet.core.normalize import normalize, stack_stats


def test_16bit_uses_its_own_range_not_255(rng):
    stack = rng.integers(20000, 40000, size=(4, 32, 32)).astype(np.uint16)
    low, high = stack_stats(stack)
    out = normalize(stack, low, high)
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    assert 0.4 < out.mean() < 0.6  # uniform data stays centred; `/ 255` would give all ones


def test_percentiles_ignore_hot_pixels(rng):
    stack = rng.normal(100, 10, size=(2, 64, 64)).astype(np.float32)
    stack[0, 0, :5] = 1e6
    low, high = stack_stats(stack)
    assert high < 200


def test_constant_and_nan_inputs():
    const = np.full((2, 8, 8), 7, np.uint8)
    assert np.all(normalize(const, *stack_stats(const)) == 0.5)
    x = np.arange(64, dtype=np.float32).reshape(1, 8, 8)
    x[0, 0, 0] = np.nan
    low, high = stack_stats(x)
    assert np.isfinite([low, high]).all()
    assert normalize(x, low, high)[0, 0, 0] == 0.0
    with pytest.raises(ValueError, match="no usable intensity values"):
        stack_stats(np.full((2, 2), np.nan))


class SliceReader:
    """Yields slices one at a time, like a lazily read TIFF."""

    def __init__(self, array):
        self.array, self.shape = array, array.shape

    def __getitem__(self, z):
        return self.array[z]


def test_streamed_statistics_equal_in_memory_statistics(rng):
    stack = rng.gamma(2.0, 300.0, size=(7, 33, 41)).astype(np.float32)
    # Under the sample cap every voxel counts: the exact percentiles.
    assert stack_stats(stack) == pytest.approx(tuple(np.percentile(stack, [0.5, 99.5])))
    # Over it, a fixed sample per slice: the same whichever way the stack is held.
    assert stack_stats(SliceReader(stack), max_samples=997) == stack_stats(stack, max_samples=997)
    assert stack_stats(stack, max_samples=997) == pytest.approx(tuple(np.percentile(stack, [0.5, 99.5])), rel=0.1)


def test_a_subsample_sees_the_whole_slice_not_a_few_columns():
    """The left half of every slice is dark, the right half bright. Every k-th voxel of the flattened
    stack, with the width a multiple of k, samples the same left-hand columns only (the window came out
    (0, 0)); a spatially spread sample sees both halves."""
    stack = np.zeros((40, 100, 64), np.uint8)
    stack[:, :, 32:] = 200
    low, high = stack_stats(stack, max_samples=4000)  # 256 000 voxels: one in 64 is sampled
    assert (low, high) == (0.0, 200.0)
    assert stack_stats(stack) == (0.0, 200.0)


@pytest.mark.parametrize("value, dtype", [(0, np.uint8), (7, np.uint8), (65535, np.uint16), (-3.25, np.float32),
                                          (-3.5e5, np.float32), (1e9, np.float32), (0.1, np.float32)])
def test_a_constant_stack_gets_a_proper_window_that_maps_it_to_a_constant(value, dtype):
    """A constant stack gave the window (v, v), which every user of a window refuses (the pyfunc's `high
    must be above low`): predict stopped on a flat image, naming parameters the user never passed."""
    const = np.full((3, 9, 11), value, dtype)
    low, high = stack_stats(const)
    assert high > low
    out = normalize(const, low, high)
    assert np.all(out == 0.5)  # exactly: every constant stack, whatever its value and dtype, looks the same


def test_one_value_nearly_everywhere_is_a_flat_image_with_clipped_outliers():
    stack = np.zeros((1, 100, 100), np.uint8)
    stack[0, 0, :20] = 255  # 0.2 % of the voxels: below the 99.5th percentile
    low, high = stack_stats(stack)
    assert low < 0 < high
    out = normalize(stack, low, high)
    assert out[0, 50, 50] == pytest.approx(0.5) and out[0, 0, 0] == 1.0


def test_predict_segments_a_constant_stack(world, tmp_path):
    """The README says constant images are segmented; predict stopped with `high must be above low ...
    low 0.0 and high 0.0`. The answer is the network's on a flat image: a mask of the stack's shape."""
    import tifffile

    from tests.conftest import run_module

    tifffile.imwrite(tmp_path / "flat.tif", np.zeros((2, 40, 48), np.uint16), photometric="minisblack")
    proc = run_module("serving.predict", "--model_uri", world["trained"]["model_uri"], "--input",
                      str(tmp_path / "flat.tif"), "--output_dir", str(tmp_path / "out"), cwd=tmp_path,
                      env_uri=world["uri"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    mask = tifffile.imread(tmp_path / "out" / "flat_mask.tif")
    assert mask.shape == (2, 40, 48) and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 255}
