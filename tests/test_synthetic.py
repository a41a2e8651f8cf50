import numpy as np
from scipy import ndimage

from emunet.core.synthetic import synthetic_dataset, synthetic_stack

SHAPE = (8, 96, 96)


def test_deterministic_for_a_seed_and_different_across_seeds():
    a_image, a_mask = synthetic_stack(3, 1, SHAPE)
    b_image, b_mask = synthetic_stack(3, 1, SHAPE)
    np.testing.assert_array_equal(a_image, b_image)
    np.testing.assert_array_equal(a_mask, b_mask)
    c_image, _ = synthetic_stack(4, 1, SHAPE)
    assert np.mean(a_image != c_image) > 0.5


def test_looks_like_em_statistics():
    image, mask = synthetic_stack(0, 0, SHAPE)
    assert image.dtype == np.uint8 and image.shape == SHAPE
    assert set(np.unique(mask)) == {0, 1}
    assert 0.2 < mask.mean() < 0.8  # cells and background both present
    # Membranes: the darkest pixels are outside the cell interiors.
    dark = image < np.percentile(image, 3)
    assert mask[dark].mean() < 0.3
    assert image.std() > 20  # texture and contrast, not a flat cartoon


def test_cells_are_3d_objects_spanning_consecutive_slices():
    _, mask = synthetic_stack(0, 2, SHAPE)
    labels, n = ndimage.label(mask)  # 3-D connectivity
    extents = [s[0].stop - s[0].start for s in ndimage.find_objects(labels)]
    assert n > 5
    assert np.median(extents) >= 3  # most cells continue through several sections
    # Neighbouring slices overlap far more than distant ones.
    def overlap(a, b):
        return (mask[a] & mask[b]).sum() / max(1, (mask[a] | mask[b]).sum())
    assert overlap(3, 4) > overlap(0, 7) + 0.1


def test_dataset_names_and_count():
    stacks = synthetic_dataset(seed=0, n_stacks=3, shape=(2, 32, 32))
    assert [s[0] for s in stacks] == ["synthetic_00", "synthetic_01", "synthetic_02"]
    np.testing.assert_array_equal(stacks[1][1], synthetic_stack(0, 1, (2, 32, 32))[0])
    image, mask, ids = synthetic_stack(0, 1, (2, 32, 32), with_ids=True)
    np.testing.assert_array_equal(stacks[1][3], ids)
    assert ((ids > 0) == (mask > 0)).all()  # the ids are the cells' interiors
