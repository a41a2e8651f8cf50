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

from emunet.core.dataset import MASK_IGNORE, StackInfo, open_stack
from emunet.core.errors import InputError
from emunet.training.augment import AugmentSpec, annotated_slices, annotated_voxel, foreground_points, random_patch
from emunet.training.weights import border_weights

# Sparse labels: draws of a crop before giving up on finding an annotated voxel in it. Every other draw
# is centred on an annotated voxel, so only the elastic field's few pixels can still miss: never in practice.
ANNOTATED_TRIES = 32


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
    """`steps` batches per epoch of `(batch_size, crop, crop, C)` float32 images in [0, 1] (C = 1, or
    2k + 1 with `context` k: each crop stacked with the same crop of the k slices above and below) and
    `(batch_size, crop, crop, 1)` float32 {0, 1} masks, drawn from `stacks` of `dataset_dir`; with
    `border_weight` or `sparse`, masks are `(..., 2)`: the mask and per-pixel weights for the loss
    (`emunet.core.losses`): the border weight map (`emunet.training.weights`, else 1), times 0 where the
    voxel is not annotated.

    Stacks are chosen in proportion to their number of slices, so every slice is equally likely;
    `augment` says how patches are transformed (`emunet.training.augment.AugmentSpec`). With `ortho`,
    a third of the crops each come from xy, xz and yz planes (`random_patch`'s `axis`). With `sparse`
    (the dataset has an `ignore_label`), only slices with an annotated voxel count and are drawn, and a
    crop without any annotated voxel is drawn again: it would teach nothing.
    """

    def __init__(self, dataset_dir: str | Path, stacks: list[StackInfo], batch_size: int, crop: int,
                 steps: int, seed: int, workers: int = 1, augment: AugmentSpec = AugmentSpec(),
                 border_weight: float = 0.0, sparse: bool = False, context: int = 0, ortho: bool = False,
                 **kwargs):
        super().__init__(workers=workers, use_multiprocessing=workers > 1, **kwargs)
        self.dataset_dir, self.stacks = str(dataset_dir), list(stacks)
        self.batch_size, self.crop, self.steps, self.seed = batch_size, crop, steps, seed
        self.augment, self.border_weight, self.sparse, self.context = augment, border_weight, sparse, context
        if ortho and sparse:  # emunet.training.plan.choose_planes refuses this combination to the user
            raise ValueError("ortho-plane crops need fully annotated stacks")
        self.ortho = ortho
        # Where the foreground (and, sparse, the annotation) is: found once here, so each epoch's new worker
        # pool inherits small arrays instead of scanning the masks again (Keras starts a fresh pool every epoch).
        self.points = [foreground_points(open_stack(self.dataset_dir, s)[1]) if augment.foreground else None
                       for s in self.stacks]
        self.annotated = [annotated_slices(open_stack(self.dataset_dir, s)[1]) for s in self.stacks] if sparse else None
        self.epoch = 0
        slices = np.array([len(a) for a in self.annotated] if sparse else [s.shape[0] for s in self.stacks], float)
        if not slices.sum():
            raise InputError(f"no training slice has an annotated voxel (every label is the ignore_label) in "
                             f"stacks {', '.join(s.name for s in self.stacks)}")
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
        """Patch number `index` of `epoch`: `(crop, crop)` image (`(crop, crop, 2k + 1)` with context k)
        and `(crop, crop)` mask, a function of the seed only."""
        rng = np.random.default_rng([self.seed, epoch, index])
        k = int(rng.choice(len(self.stacks), p=self.weights))
        image, mask = self._open()[k]
        args = (rng, image, mask, self.crop, self.stacks[k].low, self.stacks[k].high, self.augment, self.points[k])
        if not self.sparse:
            # Ortho-plane training: xy, xz and yz planes equally often (a near-isotropic volume looks
            # alike in all three, and the network will be asked about all three).
            axis = int(rng.integers(3)) if self.ortho else 0
            return random_patch(*args, context=self.context, axis=axis)
        slices = self.annotated[k]
        for attempt in range(ANNOTATED_TRIES):
            at = annotated_voxel(rng, mask, slices) if attempt % 2 else None
            patch, target = random_patch(*args, slices=slices, at=at, context=self.context)
            if np.any(target != MASK_IGNORE):
                return patch, target
        raise RuntimeError(f"no crop of stack {self.stacks[k].name} with an annotated voxel in {ANNOTATED_TRIES} draws")

    def __getitem__(self, batch: int):
        first = batch * self.batch_size
        pairs = [self.sample(self.epoch, first + j) for j in range(self.batch_size)]
        images = np.stack([p[0] for p in pairs])
        if images.ndim == 3:  # one slice: its channel axis
            images = images[..., None]
        targets = np.stack([p[1] for p in pairs])
        masks = (targets == 1)[..., None].astype(np.float32)
        if self.border_weight or self.sparse:  # the mask's second channel: per-pixel weights of each crop
            weights = np.stack([border_weights(t == 1, self.border_weight) for t in targets]) if self.border_weight \
                else np.ones(targets.shape, np.float32)
            weights[targets == MASK_IGNORE] = 0.0
            masks = np.concatenate([masks, weights[..., None]], axis=-1)
        return images.view(SharedArray), masks.view(SharedArray)

    def on_epoch_end(self):
        # Called in the main process after the epoch's worker pool has stopped; the next pool is made
        # from this object, so workers see the new epoch number.
        self.epoch += 1
