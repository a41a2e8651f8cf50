import numpy as np
import pytest

from emunet.inference.tiling import gaussian_window, plan_tiles, predict_probabilities, tile_starts


def local_model(batch: np.ndarray) -> np.ndarray:
    """A stand-in network whose output at a pixel depends only on that pixel: tiled and whole-slice
    inference must then agree exactly, which isolates the tiling and blending arithmetic."""
    return 1 / (1 + np.exp(-8 * (batch - 0.5)))


def test_tile_starts_cover_every_pixel_with_overlap():
    for length, tile in [(100, 32), (32, 32), (1000, 256), (257, 256)]:
        starts = tile_starts(length, tile, 0.25)
        covered = np.zeros(length, bool)
        for s in starts:
            covered[s:s + tile] = True
        assert covered.all() and starts[-1] + tile == max(length, tile)
        assert all(b - a <= tile * 0.75 + 1 for a, b in zip(starts, starts[1:]))


def test_gaussian_window_peaks_in_the_centre_and_is_never_zero():
    w = gaussian_window(32, 48)
    assert w.shape == (32, 48) and w.max() == pytest.approx(1.0) and w.min() > 0
    assert w[16, 24] > w[0, 0]


@pytest.mark.parametrize("shape, tile", [((2, 100, 77), 32), ((1, 10, 7), 32), ((3, 64, 64), 64), ((1, 1, 1), 16)])
def test_any_size_comes_back_same_shape_and_blends_exactly(rng, shape, tile):
    stack = (rng.random(shape) * 255).astype(np.uint8)
    prob = predict_probabilities(local_model, stack, 0, 255, tile_size=tile, batch_size=3, multiple=16)
    assert prob.shape == shape and prob.dtype == np.float32
    np.testing.assert_allclose(prob, local_model(stack / 255.0), atol=1e-5)


def test_plan_pads_small_slices_to_the_network_multiple():
    plan = plan_tiles(10, 7, 512, 16, 0.25)
    assert (plan.pad_h, plan.pad_w, plan.tile_h, plan.tile_w, plan.boxes) == (16, 16, 16, 16, ((0, 0),))
    assert plan.slices_per_pass == 4  # four 16 x 16 slices fill a batch of 4 tiles
    plan = plan_tiles(1000, 777, 256, 16, 0.25)
    # stride 192: ceil(744/192)+1 rows, ceil(521/192)+1 columns
    assert (plan.tile_h, plan.tile_w) == (256, 256) and (plan.pad_h, plan.pad_w) == (1000, 777) and len(plan.boxes) == 5 * 4
    assert plan.slices_per_pass == 1


def test_inference_mirrors_borders_as_training_does(rng):
    """Training's crops mirror the slice with OpenCV's BORDER_REFLECT_101 ("dcb|abcd|cba"); tiled inference
    must pad a slice that is not a multiple of the network's down-sampling the same way, or the network
    sees at the border something it never saw in training. A stand-in network that averages each pixel's
    3 x 3 neighbourhood shows the padding in its answer at the last rows and columns."""
    import cv2
    from scipy import ndimage

    def neighbourhood(batch):
        return ndimage.uniform_filter(batch, size=(1, 3, 3, 1), mode="nearest")

    stack = rng.random((1, 30, 27)).astype(np.float32)  # padded to 32 x 32 for a multiple of 16
    prob = predict_probabilities(neighbourhood, stack, 0, 1, tile_size=64, multiple=16)
    padded = cv2.copyMakeBorder(stack[0], 0, 2, 0, 5, cv2.BORDER_REFLECT_101)
    expected = ndimage.uniform_filter(padded, size=3, mode="nearest")[:30, :27]
    np.testing.assert_allclose(prob[0], expected, atol=1e-6)


def test_forward_passes_are_capped_in_pixels(rng, monkeypatch):
    import emunet.inference.tiling as tiling

    monkeypatch.setattr(tiling, "MAX_BATCH_PIXELS", 3 * 32 * 32)
    sizes = []

    def recording(batch):
        sizes.append(batch.shape)
        return local_model(batch)

    stack = (rng.random((5, 32, 32)) * 255).astype(np.uint8)
    prob = predict_probabilities(recording, stack, 0, 255, tile_size=32, batch_size=100, multiple=16)
    assert prob.shape == (5, 32, 32)
    assert max(s[0] for s in sizes) == 3 and sum(s[0] for s in sizes) == 5  # small tiles batched, up to the cap


@pytest.mark.parametrize("mode", ["none", "flips", "d4"])
def test_tta_maps_every_view_back_to_the_tile(rng, mode):
    from emunet.inference.tiling import with_tta

    tiles = rng.random((2, 16, 24, 1)).astype(np.float32)  # not square: transposed views are 24 x 16
    np.testing.assert_allclose(with_tta(lambda t: t, mode)(tiles), tiles, rtol=1e-6)


def test_tta_averages_the_views():
    from emunet.inference.tiling import with_tta

    # A "network" that answers with each pixel's row position: not flip-invariant, so the views differ.
    def rows(t):
        return np.broadcast_to(np.arange(t.shape[1], dtype=np.float32)[None, :, None, None] / (t.shape[1] - 1),
                               t.shape)

    tiles = np.zeros((1, 5, 5, 1), np.float32)
    assert with_tta(rows, "none")(tiles)[0, 4, 0, 0] == 1.0
    # Row ramp plus its upside-down copy: 0.5 everywhere; d4's transposed views add column ramps, also 0.5.
    np.testing.assert_allclose(with_tta(rows, "flips")(tiles), 0.5)
    np.testing.assert_allclose(with_tta(rows, "d4")(tiles), 0.5)
    with pytest.raises(ValueError, match="tta must be one of none, flips, d4, got 'd8'"):
        with_tta(rows, "d8")
