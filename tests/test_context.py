"""3-D context: neighbouring slices as channels, mirrored at the ends, read once; orthogonal planes fused."""

import numpy as np
import pytest

from emunet.inference.context import context_stack, iter_context, ortho_predict, ortho_views


def numbered(n: int, h: int = 3, w: int = 4) -> np.ndarray:
    """A stack whose slice i holds the value i everywhere."""
    return np.broadcast_to(np.arange(n, dtype=np.uint16)[:, None, None], (n, h, w)).copy()


def channels(stack: np.ndarray) -> list[int]:
    assert (stack == stack[:1, :1]).all()  # every channel is one whole slice
    return [int(v) for v in stack[0, 0]]


class CountingVolume:
    """A lazy volume: `volume[a:b]` gives `(b - a, H, W)` and records which slices were read."""

    def __init__(self, array):
        self.array, self.reads = array, []
        self.shape, self.dtype = array.shape, array.dtype

    def __getitem__(self, item):
        assert isinstance(item, slice) and item.step is None
        self.reads += list(range(*item.indices(self.shape[0])))
        return self.array[item]


def test_context_is_the_neighbours_in_order_mirrored_without_repeating_the_edge():
    volume = numbered(10)
    out = context_stack(volume, 5, 2)
    assert out.shape == (3, 4, 5) and out.dtype == np.uint16
    assert channels(out) == [3, 4, 5, 6, 7]
    assert channels(context_stack(volume, 0, 2)) == [2, 1, 0, 1, 2]
    assert channels(context_stack(volume, 9, 2)) == [7, 8, 9, 8, 7]
    assert channels(context_stack(volume, 4, 0)) == [4]


def test_a_stack_shorter_than_the_context_is_mirrored_again():
    assert channels(context_stack(numbered(2), 0, 3)) == [1, 0, 1, 0, 1, 0, 1]
    assert channels(context_stack(numbered(3), 2, 3)) == [1, 0, 1, 2, 1, 0, 1]
    assert channels(context_stack(numbered(1), 0, 2)) == [0, 0, 0, 0, 0]
    with pytest.raises(IndexError, match="slice 3 is outside a stack of 3"):
        context_stack(numbered(3), 3, 1)


@pytest.mark.parametrize("n, k", [(10, 2), (3, 2), (1, 1), (6, 0)])
def test_iterating_reads_each_slice_once_and_equals_the_single_slice_call(n, k):
    volume = CountingVolume(numbered(n))
    got = list(iter_context(volume, k))
    assert [z for z, _ in got] == list(range(n))
    assert volume.reads == list(range(n))  # each slice once, in order
    for z, stack in got:
        assert np.array_equal(stack, context_stack(numbered(n), z, k))


def _plane_model(calls):
    """A per-plane function whose result depends on the plane's orientation (its rows and columns)."""
    def predict_planes(stack):
        calls.append(stack.shape)
        assert stack.flags.c_contiguous
        n, a, b = stack.shape
        return (stack + 0.01 * np.arange(a)[None, :, None] + 0.001 * np.arange(b)[None, None, :]
                + stack.reshape(n, -1).mean(axis=1)[:, None, None]).astype(np.float32)
    return predict_planes


def test_ortho_predict_is_the_mean_of_the_three_planes_done_by_hand():
    rng = np.random.default_rng(0)
    volume = rng.random((3, 4, 5)).astype(np.float32)

    def plane(p):  # the same function, one plane at a time
        a, b = p.shape
        return p + 0.01 * np.arange(a)[:, None] + 0.001 * np.arange(b)[None, :] + p.mean()

    expected = np.zeros_like(volume)
    for z in range(3):
        expected[z] += plane(volume[z])
    for y in range(4):
        expected[:, y, :] += plane(volume[:, y, :])  # the xz plane: rows z, columns x
    for x in range(5):
        expected[:, :, x] += plane(volume[:, :, x])  # the yz plane: rows z, columns y
    calls = []
    got = ortho_predict(_plane_model(calls), volume)
    assert calls == [(3, 4, 5), (4, 3, 5), (5, 3, 4)]  # once per orientation
    assert got.dtype == np.float32 and got.shape == volume.shape
    assert np.allclose(got, expected / 3, atol=1e-6)
    assert not np.allclose(got, _plane_model([])(volume))  # orientation matters: the test can fail


def test_ortho_views_are_views_and_a_wrong_prediction_shape_is_refused():
    volume = np.zeros((2, 3, 4))
    xy, xz, yz = ortho_views(volume)
    assert xz.shape == (3, 2, 4) and yz.shape == (4, 2, 3) and np.shares_memory(yz, volume)
    with pytest.raises(ValueError, match=r"returned shape \(1, 1, 1\)"):
        ortho_predict(lambda s: np.zeros((1, 1, 1)), volume)
