"""Training batches from the dataset artifact, made by worker processes while the accelerator trains
(the original study's multiprocess generator, as a `keras.utils.PyDataset`).

Workers memory-map the `.npy` stacks, so no stack is pickled between processes, and hand each batch back
through shared memory (`SharedArray`) rather than Keras' pipe: at 464 x 464 a batch is 7 MB, and piping it
cost more than making it. Every sample is a pure function of `(seed, epoch, index)`: the same run gives the
same batches whatever the number of workers.
"""

from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

import cv2
import keras
import numpy as np

from emunet.core.dataset import StackInfo, open_stack
from emunet.training.augment import AugmentSpec, foreground_points, random_patch
from emunet.training.weights import border_weights


class SharedArray(np.ndarray):
    """An array that, when pickled (a worker's batch on its way back to the training process), travels
    through a shared-memory block instead of the pickle stream: the unpickling side copies it out and
    frees the block. Everywhere else it is an ordinary array.

    Blocks are registered with multiprocessing's resource tracker, which the training process starts
    before its workers and which they share: a block whose batch was never read (a killed run) is
    removed when the training process ends."""

    def __reduce_ex__(self, protocol):
        array = np.ascontiguousarray(self).view(np.ndarray)
        block = shared_memory.SharedMemory(create=True, size=max(1, array.nbytes))
        np.ndarray(array.shape, array.dtype, buffer=block.buf)[...] = array
        block.close()
        return _from_shared, (block.name, array.shape, array.dtype.str)


def _from_shared(name: str, shape: tuple, dtype: str) -> np.ndarray:
    block = shared_memory.SharedMemory(name=name)
    try:
        return np.ndarray(shape, dtype, buffer=block.buf).copy()
    finally:
        block.close()
        block.unlink()


class PatchDataset(keras.utils.PyDataset):
    """`steps` batches per epoch of `(batch_size, crop, crop, 1)` float32 images in [0, 1] and
    `(batch_size, crop, crop, 1)` float32 {0, 1} masks, drawn from `stacks` of `dataset_dir`; with
    `border_weight`, masks are `(..., 2)`: the mask and its border weight map (`emunet.training.weights`).

    Stacks are chosen in proportion to their number of slices, so every slice is equally likely;
    `augment` says how patches are transformed (`emunet.training.augment.AugmentSpec`).
    """

    def __init__(self, dataset_dir: str | Path, stacks: list[StackInfo], batch_size: int, crop: int,
                 steps: int, seed: int, workers: int = 1, augment: AugmentSpec = AugmentSpec(),
                 border_weight: float = 0.0, **kwargs):
        super().__init__(workers=workers, use_multiprocessing=workers > 1, **kwargs)
        self.dataset_dir, self.stacks = str(dataset_dir), list(stacks)
        self.batch_size, self.crop, self.steps, self.seed = batch_size, crop, steps, seed
        self.augment, self.border_weight = augment, border_weight
        # Where the foreground is: found once here, so each epoch's new worker pool inherits a small
        # array instead of scanning the masks again (Keras starts a fresh pool every epoch).
        self.points = [foreground_points(open_stack(self.dataset_dir, s)[1]) if augment.foreground else None
                       for s in self.stacks]
        self.epoch = 0
        slices = np.array([s.shape[0] for s in self.stacks], float)
        self.weights = slices / slices.sum()
        self._arrays = None  # opened lazily, once per process
        resource_tracker.ensure_running()  # here, before any worker starts, so that they share it (SharedArray)

    def _open(self):
        if self._arrays is None:
            cv2.setNumThreads(1)  # one warp per sample; OpenCV's own threads would only contend
            self._arrays = [open_stack(self.dataset_dir, s) for s in self.stacks]
        return self._arrays

    def __len__(self) -> int:
        return self.steps

    def sample(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Patch number `index` of `epoch`: `(crop, crop)` image and mask, a function of the seed only."""
        rng = np.random.default_rng([self.seed, epoch, index])
        k = int(rng.choice(len(self.stacks), p=self.weights))
        image, mask = self._open()[k]
        return random_patch(rng, image, mask, self.crop, self.stacks[k].low, self.stacks[k].high,
                            self.augment, self.points[k])

    def __getitem__(self, batch: int):
        first = batch * self.batch_size
        pairs = [self.sample(self.epoch, first + j) for j in range(self.batch_size)]
        images = np.stack([p[0] for p in pairs])[..., None]
        masks = np.stack([p[1] for p in pairs])[..., None].astype(np.float32)
        if self.border_weight:  # the mask's second channel: the border weight map of each augmented crop
            weights = np.stack([border_weights(p[1], self.border_weight) for p in pairs])[..., None]
            masks = np.concatenate([masks, weights], axis=-1)
        return images.view(SharedArray), masks.view(SharedArray)

    def on_epoch_end(self):
        # Called in the main process after the epoch's worker pool has stopped; the next pool is made
        # from this object, so workers see the new epoch number.
        self.epoch += 1
