import os
import pickle

import numpy as np
import pytest
from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter

from emunet.training.augment import AUGMENTATIONS, AugmentSpec, foreground_points, patch_transform, random_patch
from emunet.core.dataset import read_manifest, stacks_in, write_dataset
from emunet.training.loader import PatchDataset, SharedArray
from emunet.core.synthetic import synthetic_stack


@pytest.fixture
def dataset_dir(tmp_path):
    stacks = []
    for i in range(3):
        image, mask = synthetic_stack(0, i, (4, 64, 64))
        stacks.append(dict(name=f"s{i}", split="val" if i == 2 else "train", image=image, mask=mask))
    write_dataset(tmp_path / "ds", stacks)
    return tmp_path / "ds"


def test_patch_is_normalised_and_mask_stays_binary(rng):
    image = (rng.random((3, 40, 50)) * 4000).astype(np.uint16)
    mask = (rng.random((3, 40, 50)) > 0.5).astype(np.uint8)
    for _ in range(20):
        patch, target = random_patch(rng, image, mask, 32, 0.0, 4000.0)
        assert patch.shape == target.shape == (32, 32) and patch.dtype == np.float32
        assert 0 <= patch.min() and patch.max() <= 1
        assert set(np.unique(target)) <= {0, 1}


def test_rotation_moves_pixels_with_their_labels(rng):
    """The same warp is applied to image and mask: where the image is bright, the mask is set."""
    image = np.zeros((1, 64, 64), np.uint8)
    image[0, 20:40, 10:30] = 200
    mask = (image > 0).astype(np.uint8)
    seen = 0
    for _ in range(30):
        patch, target = random_patch(rng, image, mask, 48, 0.0, 200.0)
        inside = patch > 0.9
        if inside.sum() > 20:
            seen += 1
            assert target[inside].mean() > 0.98
    assert seen >= 5


def test_transform_is_a_rotation_with_optional_flip(rng):
    m = patch_transform(rng, (50, 50), 32, AUGMENTATIONS["basic"])
    linear = m[:, :2]
    assert np.allclose(np.abs(np.linalg.det(linear)), 1, atol=1e-5)
    assert np.allclose(linear @ linear.T, np.eye(2), atol=1e-5)
    # The crop's centre pixel lands on the requested centre.
    assert np.allclose(m @ np.array([15.5, 15.5, 1]), [50, 50], atol=1e-3)


def test_scale_stays_in_range_and_keeps_angles(rng):
    for _ in range(50):
        linear = patch_transform(rng, (0, 0), 32, AugmentSpec(scale=0.2))[:, :2]
        zoom = np.sqrt(abs(np.linalg.det(linear)))
        assert 1 / 1.2 - 1e-5 <= zoom <= 1.2 + 1e-5
        assert np.allclose(linear @ linear.T, zoom**2 * np.eye(2), atol=1e-4)


def test_without_augmentation_the_transform_is_a_pure_shift(rng):
    m = patch_transform(rng, (20.0, 30.0), 16, AUGMENTATIONS["none"])
    np.testing.assert_allclose(m, [[1, 0, 30 - 7.5], [0, 1, 20 - 7.5]])


def test_full_em_augmentation_keeps_masks_binary_and_images_in_range(rng):
    image = (rng.random((3, 80, 90)) * 4000).astype(np.uint16)
    mask = np.zeros((3, 80, 90), np.uint8)
    mask[:, 30:50, 40:60] = 1
    spec = AugmentSpec(elastic=1.0, intensity=1.0, blur=1.0, noise=1.0)
    for _ in range(20):
        patch, target = random_patch(rng, image, mask, 48, 0.0, 4000.0, spec)
        assert patch.dtype == np.float32 and 0 <= patch.min() and patch.max() <= 1
        assert set(np.unique(target)) <= {0, 1}


def test_foreground_sampling_centres_crops_on_objects(rng):
    """Sparse objects (one small mitochondrion per slice): with foreground oversampling, far more crops
    contain foreground than with uniform crops."""
    image = rng.integers(0, 255, (4, 256, 256), dtype=np.uint8)
    mask = np.zeros(image.shape, np.uint8)
    mask[:, 200:210, 30:40] = 1
    points = foreground_points(mask)
    assert points.shape[1] == 3 and mask[tuple(points.T)].all()

    def share(fraction):
        spec = AugmentSpec(foreground=fraction)
        hits = [random_patch(rng, image, mask, 32, 0, 255, spec, points)[1].any() for _ in range(200)]
        return np.mean(hits)

    assert share(1.0) == 1.0
    assert share(0.0) < 0.2
    assert 0.35 < share(0.5) < 0.75


def test_batches_depend_only_on_seed_epoch_index(dataset_dir):
    manifest = read_manifest(dataset_dir)
    train = stacks_in(manifest, "train")
    serial = PatchDataset(dataset_dir, train, batch_size=4, crop=32, steps=3, seed=7, workers=1)
    expected = [serial[i] for i in range(3)]
    serial.on_epoch_end()
    next_epoch = serial[0]
    assert not np.array_equal(next_epoch[0], expected[0][0])  # a new epoch gives new patches

    # The same batches from two worker processes through Keras' own multiprocess enqueuer.
    parallel = PatchDataset(dataset_dir, train, batch_size=4, crop=32, steps=3, seed=7, workers=2)
    adapter = PyDatasetAdapter(parallel, shuffle=False)
    adapter.on_epoch_begin()
    got = list(adapter.get_numpy_iterator())
    adapter.on_epoch_end()
    assert len(got) == 3
    for (x, y), (ex, ey) in zip(got, expected):
        np.testing.assert_array_equal(x, ex)
        np.testing.assert_array_equal(y, ey)
    assert expected[0][0].shape == (4, 32, 32, 1) and expected[0][1].dtype == np.float32


def test_a_batch_crosses_processes_through_shared_memory_and_frees_it(rng):
    batch = rng.random((2, 16, 16, 1)).astype(np.float32)
    shared = batch.view(SharedArray)
    stream = pickle.dumps(shared)
    assert len(stream) < 1000  # the pixels are not in the pickle stream...
    blocks = [name for name in os.listdir("/dev/shm") if name.encode() in stream]
    assert len(blocks) == 1  # ...they wait in one shared-memory block
    back = pickle.loads(stream)
    assert type(back) is np.ndarray and back.dtype == np.float32
    np.testing.assert_array_equal(back, batch)
    assert not os.path.exists(f"/dev/shm/{blocks[0]}")  # read once, then freed
