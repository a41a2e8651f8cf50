"""Memory per slice (issue 21): a 40000 x 40000 slice (a 2.5 MB compressed TIFF, 1.5 GiB of pixels) passed
the readers' up-front check, which counts pixels only, and then drove predict past 8 GB. The working memory
of one slice (`slice_working_bytes`, measured by bench/slice_memory.py) is now checked against the memory
available before any work, in predict and on Spark's driver. A slice beyond it goes by blocks in z, y and
x (issue 25): then only a budget below the smallest block is refused."""

import math
import time

import numpy as np
import pytest
import tifffile

from emunet.core.errors import InputError
from emunet.core.io import available_memory
from emunet.inference.params import SegmentParams
from emunet.inference.preflight import BYTES_PER_PIXEL, check_slice_memory, slice_working_bytes
from serving.predict_spark import PredictSparkConfig, _checked_inputs
from tests.conftest import run_module


def test_working_bytes_grow_with_the_slice_and_its_pixel_size():
    assert BYTES_PER_PIXEL > 10  # the measured figure: many times a pixel's own bytes
    assert slice_working_bytes(4000, 6000) == pytest.approx(4 * slice_working_bytes(2000, 3000), rel=1e-6)
    # Slices small enough to be labelled two at once (two CPUs or more) count the second one's labelling.
    from emunet.inference import blockplan
    from emunet.inference.instances import labelled_at_once

    others = labelled_at_once(1000 * 1500) - 1
    assert slice_working_bytes(1000, 1500) == 1000 * 1500 * (BYTES_PER_PIXEL + others * blockplan.BYTES_PER_PIXEL)
    assert slice_working_bytes(1000, 1000, itemsize=4) - slice_working_bytes(1000, 1000) == 3_000_000
    assert slice_working_bytes(1000, 1000, scored=True) > slice_working_bytes(1000, 1000)  # labels cost more


def test_the_refusal_gives_both_figures_and_the_remedies():
    needed = slice_working_bytes(40000, 40000, scored=True)
    with pytest.raises(InputError) as caught:  # scored: the scores are counted on whole slices
        check_slice_memory("big.tif", (1, 40000, 40000), np.uint8, scored=True, available=8 * 2**30)  # issue 21's slice
    message = str(caught.value)
    assert message.startswith("big.tif: one 40000 x 40000 slice needs about")
    assert f"{needed / 2**30:.1f} GiB" in message and "only 8.0 GiB is available" in message
    assert "region=z0:z1,y0:y1,x0:x1" in message and "more memory" in message and "\n" not in message
    check_slice_memory("small.tif", (500, 2048, 2048), np.uint16, available=8 * 2**30)  # depth is not the issue


def test_a_slice_beyond_the_memory_goes_by_blocks_unless_the_smallest_block_does_not_fit():
    check_slice_memory("big.tif", (1, 40000, 40000), np.uint8, available=8 * 2**30)  # by blocks: not refused
    check_slice_memory("big.tif", (1, 16384, 16384), np.uint8, available=2 * 2**30)  # bench/big_slice.py's
    with pytest.raises(InputError) as caught:
        check_slice_memory("big.tif", (1, 40000, 40000), np.uint8, budget=16 * 2**20)
    message = str(caught.value)
    assert message.startswith("big.tif: one 40000 x 40000 slice goes by blocks, but even the smallest block needs")
    assert "the budget is 16 MiB" in message and "memory_gb" in message and "tile_size" in message
    # The smallest block is mostly its tiles' region: smaller tiles make it fit.
    check_slice_memory("big.tif", (1, 40000, 40000), np.uint8, budget=16 * 2**20,
                       params=SegmentParams(tile_size=128))


def huge_slice(path) -> int:
    """A one-page TIFF of a square uint8 slice whose pixels fit in the memory available but whose working
    memory does not (1.5x over). Written without its data: the file is sparse, its pixels read as zeros."""
    free = available_memory()
    side = math.ceil(1.5 * math.sqrt(free / (slice_working_bytes(1000, 1000) / 1e6)))
    assert side * side < free / 4  # the pixels alone pass the readers' check, with room to spare
    tifffile.imwrite(path, shape=(side, side), dtype=np.uint8, photometric="minisblack")
    return side


def test_a_slice_too_large_to_segment_is_refused_before_any_work(world, tmp_path):
    """Beyond the memory, a slice goes by blocks; a `memory_gb` below its smallest block is refused."""
    side = huge_slice(tmp_path / "big.tif")
    out = tmp_path / "out"
    start = time.monotonic()
    proc = run_module("serving.predict", "--model_uri", world["trained"]["model_uri"], "--input",
                      str(tmp_path / "big.tif"), "--output_dir", str(out), "--memory_gb", "0.01", cwd=tmp_path,
                      env_uri=world["uri"])
    seconds = time.monotonic() - start
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert errors[0].startswith(f"error: {tmp_path / 'big.tif'}: one {side} x {side} slice goes by blocks, but even "
                                "the smallest block needs"), errors[0]
    assert "region=" in errors[0] and not out.exists()  # refused before anything was made
    assert seconds < 120, seconds  # the interpreter and TensorFlow start; no slice was read
    # The remedy works: a block of it is segmented.
    proc = run_module("serving.predict", "--model_uri", world["trained"]["model_uri"], "--input",
                      str(tmp_path / "big.tif"), "--region", "0:1,0:256,0:320", "--output_dir", str(out),
                      cwd=tmp_path, env_uri=world["uri"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tifffile.imread(out / "big_mask.tif").shape == (256, 320)


def test_spark_driver_refuses_a_slice_too_large_before_starting_spark(tmp_path):
    side = huge_slice(tmp_path / "big.tif")
    tifffile.imwrite(tmp_path / "small.tif", np.zeros((2, 32, 32), np.uint8), photometric="minisblack")
    inputs = f"{tmp_path / 'small.tif'},{tmp_path / 'big.tif'}"
    _checked_inputs(PredictSparkConfig(input=inputs, output_dir=str(tmp_path / "out")))  # by blocks
    with pytest.raises(InputError, match=f"big.tif: one {side} x {side} slice goes by blocks, but even the smallest"):
        _checked_inputs(PredictSparkConfig(input=inputs, output_dir=str(tmp_path / "out"), memory_gb=0.01))
    assert not (tmp_path / "out").exists()
