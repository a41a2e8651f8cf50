"""The one segmentation path: a volume (or a stack of probabilities) becomes, slice by slice,
probabilities, a mask, instance ids and, against a ground truth, the counts every score is made of.

predict, Spark, evaluate, training validation, the viewer, the pyfunc and the benches all call
`segment_volume` (or `segment_probabilities`, when the probabilities are already there) with one
`SegmentParams`, and pool scores with `VolumeScores`: what counts as a cell, and how it is scored,
is written once.

    segmenter = Segmenter(forward, multiple=16)          # or the pyfunc's StackSegmenter
    scores = VolumeScores()
    for result in segment_volume(segmenter, volume, params, Truth.of_labels(labels)):
        write(result.z, result.mask, result.prob, result.ids)
        scores.add(result)
    scores.metrics()      # dice, iou, ..., object_f1, adapted_rand_error, ...
"""

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from emunet.core.dataset import MASK_IGNORE
from emunet.core.errors import InputError
from emunet.core.io import available_memory
from emunet.core.labels import is_near_isotropic
from emunet.core.metrics import (UNMEASURED_OBJECTS, ObjectScorer, confusion, median_slice_accuracy,
                                 scores_from_counts)
from emunet.core.metrics3d import METRIC_NAMES_3D, VolumeScorer
from emunet.core.normalize import stack_stats
from emunet.core.objects import sizes, truth_objects
from emunet.inference.instances import SliceLinker, iter_slice_instances
from emunet.inference.instances3d import volume_instances
from emunet.inference.ortho import MIN_ORTHO_SLICES, ortho_probabilities
from emunet.inference.params import DEFAULTS, SegmentParams
from emunet.inference.tiling import iter_probabilities, tile_side

COUNTS = ("tp", "fp", "fn", "tn")
UNMEASURED_3D = dict.fromkeys(METRIC_NAMES_3D, float("nan"))
# The 3-D instance step holds the volume's probabilities and its temporaries (ids, flood priorities, the
# watershed's own arrays; over every voxel also the distance transform and the region graph's arrays):
# this many bytes per voxel must fit in the memory available. Measured peaks (tracemalloc, 128^3 of
# smooth noise): 47 B/voxel over the foreground, 55 over every voxel.
BYTES_PER_VOXEL_3D = 56


def instance_mode(params: SegmentParams, voxel_size=None) -> str:
    """"2d" or "3d": the params' choice, or with "auto" 3-D where the voxel size says near-isotropic
    (`emunet.core.labels.is_near_isotropic`); a size the file does not give means slice by slice."""
    if params.instances != "auto":
        return params.instances
    return "3d" if is_near_isotropic(voxel_size) else "2d"


class Segmenter:
    """A network as the path uses it: `forward` maps a `(n, h, w, c)` float32 batch in [0, 1] to
    `(n, h, w, 1)` probabilities; `multiple` is its down-sampling (`2**depth`, times `input_scale`);
    `context` the slices above and below that a 2.5-D network takes as channels (`c = 2 * context + 1`;
    0: one slice, the 2-D network); `planes` those it records: "xy", or "ortho" (xy, xz and yz
    planes of near-isotropic volumes: it is then asked about all three, `emunet.inference.ortho`)."""

    def __init__(self, forward: Callable[[np.ndarray], np.ndarray] | None = None, multiple: int = 1,
                 context: int = 0, planes: str = "xy", grow_over_all: bool = False):
        # (None until a pyfunc's load_context sets them)
        self.forward, self.multiple, self.context, self.planes = forward, int(multiple), int(context), planes
        self.grow_over_all = bool(grow_over_all)

    def settle(self, params: SegmentParams) -> SegmentParams:
        """`params` with `grow_over_all="auto"` made the model's record (`grow_over_all`: True for a model
        of dense instance labels)."""
        return params.settled(self.grow_over_all)

    def plane_mode(self, params: SegmentParams, slices: int) -> str:
        """"xy" or "ortho" for a volume of `slices` slices: the params' choice, or with "auto" the planes
        the model records, xy for a volume too thin to have xz and yz planes."""
        mode = self.planes if params.planes == "auto" else params.planes
        if mode == "ortho" and slices < MIN_ORTHO_SLICES:
            if params.planes == "ortho":
                raise InputError(f"planes=ortho needs a volume of at least {MIN_ORTHO_SLICES} slices (its xz and yz "
                                 f"planes are as high as it has slices); got {slices}: use planes=xy")
            return "xy"
        return mode

    def forward_for(self, params: SegmentParams) -> Callable[[np.ndarray], np.ndarray]:
        """The forward that runs `params.engine` in `params.precision` (here: the one given; the pyfunc
        makes and keeps one per engine and precision)."""
        return self.forward

    def probabilities(self, volume, params: SegmentParams, start: int = 0, stop: int | None = None
                      ) -> Iterator[np.ndarray]:
        """The `(H, W)` float32 probability of each slice of a raw `(Z, H, W)` volume (an array or a
        lazily read volume), normalised with the params' window or, without one, the volume's own. With
        `context`, each slice's neighbours come from `volume` itself, mirrored at its ends: a volume of
        one slice is that slice in every channel. `start`, `stop`: only those slices (a chunk of the
        stack, e.g. a Spark task's), each with the context it has in the whole volume. With ortho planes
        (`plane_mode`) each is the mean over its xy, xz and yz planes."""
        low, high = (params.low, params.high) if params.low is not None else stack_stats(volume)
        options = dict(tile_size=tile_side(params.tile_size, self.multiple), overlap=params.overlap,
                       batch_size=params.batch_size, multiple=self.multiple, tta=params.tta, context=self.context)
        through = ortho_probabilities if self.plane_mode(params, volume.shape[0]) == "ortho" else iter_probabilities
        return through(self.forward_for(params), volume, low, high, start=start, stop=stop, **options)


class Truth:
    """A ground truth read one slice at a time: `parts(z)` gives `(foreground, annotated or None,
    objects)` of slice z. `objects` are the true objects (int32 ids, specks under `min_size` dropped),
    computed only when asked (`min_size` given)."""

    def __init__(self, volume, kind: str = "mask", ids=None):
        if kind not in ("mask", "instances", "stored"):
            raise ValueError(f"unknown truth kind {kind!r}")
        self.volume, self.kind, self.ids = volume, kind, ids
        self.linker = SliceLinker()  # a mask's objects followed through the slices, as predictions are

    @classmethod
    def of_labels(cls, volume, label_kind: str = "mask") -> "Truth":
        """A user's label volume: any non-zero value is foreground; with `label_kind="instances"` its
        values are object ids (touching cells with different ids stay apart)."""
        return cls(volume, label_kind)

    @classmethod
    def of_dataset(cls, mask, ids=None) -> "Truth":
        """A dataset artifact's stored mask (0, 1, and `MASK_IGNORE` where not annotated) and, when the
        labels were instances, their ids."""
        return cls(mask, "stored", ids)

    def __len__(self) -> int:
        return len(self.volume)

    def parts(self, z: int, min_size: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        label = np.asarray(self.volume[z])
        if self.kind == "instances" and label.size and label.min() < 0:
            where = getattr(self.volume, "path", "the labels")
            raise InputError(f"{where}: instance labels must be ids >= 0 (0 = background); slice {z} has {label.min()}")
        annotated = None
        if self.kind == "stored":
            ignored = label == MASK_IGNORE
            annotated = ~ignored if ignored.any() else None
            label = np.where(ignored, 0, label)
        foreground = label != 0
        if self.ids is not None:
            objects = truth_objects(np.asarray(self.ids[z]), min_size, instances=True)
        else:
            objects = truth_objects(label, min_size, instances=self.kind == "instances")
        return foreground, annotated, objects

    def volume_ids(self, z: int, objects: np.ndarray) -> np.ndarray:
        """The true 3-D objects in slice z (call in slice order): the ids of instance labels as they are;
        a mask's objects (`objects`, from `parts`) linked through the slices one to one, as the
        prediction's are."""
        if self.ids is not None:
            return np.asarray(self.ids[z])
        if self.kind == "instances":
            return np.asarray(self.volume[z])
        return self.linker.ids(objects)


@dataclass
class SliceResult:
    """One slice through the path. `prob` `(H, W)` float32; `mask` `(H, W)` bool; `objects` `(H, W)`
    int32 instances of this slice (1..N); `ids` `(H, W)` int64 ids of those objects through the volume
    (one per cell followed through the slices); with a truth, `row` holds the slice's pixel scores and
    counts (`tp`, `fp`, `fn`, `tn`) and its objects (`objects`, `objects_truth`, `objects_matched`; None
    when the slice is not fully annotated), and `truth_objects` / `annotated` what was scored."""

    z: int
    prob: np.ndarray
    mask: np.ndarray
    objects: np.ndarray
    ids: np.ndarray
    row: dict | None = None
    truth_objects: np.ndarray | None = None
    annotated: np.ndarray | None = None
    truth_ids: np.ndarray | None = None  # the true 3-D objects in this slice (see `Truth.volume_ids`)

    @property
    def areas(self) -> list[int]:
        return sizes(self.objects)


def _score_row(z: int, mask: np.ndarray, objects: np.ndarray, truth: Truth, min_size: int) -> tuple:
    foreground, annotated, true_objects = truth.parts(z, min_size)
    counts = confusion(mask, foreground, annotated)
    row = {"slice": z, **scores_from_counts(*counts), **dict(zip(COUNTS, counts)),
           "objects": None, "objects_truth": None, "objects_matched": None}
    # Objects are scored on fully annotated slices only: an object where nobody looked is neither right
    # nor wrong.
    if annotated is None:
        row.update(objects=int(objects.max(initial=0)), objects_truth=int(true_objects.max(initial=0)))
    return row, true_objects, annotated


def _slice_objects(ids: np.ndarray) -> np.ndarray:
    """The pieces of 3-D objects in one slice as that slice's objects: int32 ids 1..N."""
    values, inverse = np.unique(ids, return_inverse=True)
    dense = inverse.reshape(ids.shape).astype(np.int32)
    return dense if values[0] == 0 else dense + 1


def fits_3d(shape: tuple) -> bool:
    """Whether 3-D instances of a `(Z, H, W)` volume fit in the memory available now."""
    return int(np.prod(shape, dtype=np.float64)) * BYTES_PER_VOXEL_3D <= available_memory()


def _objects_3d(probs: Iterable[np.ndarray], params: SegmentParams) -> Iterator[tuple]:
    """`(prob, mask, objects, ids)` of each slice, objects found in 3-D (`volume_instances`) over the whole
    volume's probabilities, which must fit in memory."""
    probs = list(probs)
    if not probs:
        return
    needed = len(probs) * probs[0].size * BYTES_PER_VOXEL_3D
    if not fits_3d((len(probs), *probs[0].shape)):
        raise InputError(f"3-D instances of {len(probs)} slices of {probs[0].shape} need about {needed / 2**30:.1f} "
                         f"GiB but {available_memory() / 2**30:.1f} GiB are available; pass instances=2d, or a "
                         f"region=z0:z1,y0:y1,x0:x1 of the volume")
    volume = np.stack(probs).astype(np.float32, copy=False)
    ids = volume_instances(volume, params.threshold, params.seed_threshold, params.min_object_size,
                           params.seed_depth, params.grows_over_all)
    for prob, slice_ids in zip(volume, ids):
        yield prob, prob >= params.threshold, _slice_objects(slice_ids), slice_ids


def _objects_2d(probs: Iterable[np.ndarray], params: SegmentParams) -> Iterator[tuple]:
    """`(prob, mask, objects, ids)` of each slice: objects found in the slice, linked through the slices."""
    linker = SliceLinker()
    for prob, objects, counts in iter_slice_instances(probs, params.threshold, params.seed_threshold,
                                                      params.min_object_size, params.seed_depth):
        yield prob, prob >= params.threshold, objects, linker.ids(objects, counts)


def segment_probabilities(probs: Iterable[np.ndarray], params: SegmentParams, truth: Truth | None = None,
                          start: int = 0, voxel_size=None) -> Iterator[SliceResult]:
    """Turn `(H, W)` probability maps, in slice order from slice `start`, into `SliceResult`s: the mask
    (`prob >= threshold`), the objects (`instance_mode`: in each slice with
    `emunet.inference.instances.slice_instances`, touching cells split at the membrane, specks under
    `min_object_size` dropped, linked through the slices; or in 3-D with
    `emunet.inference.instances3d.volume_instances`), and with `truth` (indexed by absolute slice) the
    slice's score row and its true 3-D objects. `voxel_size` `(z, y, x)` (entries None when unknown)
    decides `instances="auto"`."""
    find = _objects_3d if instance_mode(params, voxel_size) == "3d" else _objects_2d
    for z, (prob, mask, objects, ids) in enumerate(find(probs, params), start=start):
        result = SliceResult(z, prob, mask, objects, ids)
        if truth is not None:
            result.row, result.truth_objects, result.annotated = _score_row(z, mask, objects, truth,
                                                                            params.min_object_size)
            result.truth_ids = truth.volume_ids(z, result.truth_objects)
        yield result


def segment_volume(segmenter, volume, params: SegmentParams, truth: Truth | None = None,
                   voxel_size=None) -> Iterator[SliceResult]:
    """Segment a raw `(Z, H, W)` volume (array or lazily read) slice by slice with `segmenter` (anything
    with `probabilities(volume, params)`, e.g. `Segmenter` or the pyfunc's `StackSegmenter`); see
    `segment_probabilities` for what each result holds. `voxel_size` defaults to the volume's own
    (`Volume.voxel_size`). Memory stays with a few slices (2-D objects) or the volume's probabilities
    (3-D objects)."""
    if truth is not None and tuple(truth.volume.shape) != tuple(volume.shape):
        raise ValueError(f"truth of shape {tuple(truth.volume.shape)} for a volume of {tuple(volume.shape)}")
    voxel_size = voxel_size if voxel_size is not None else getattr(volume, "voxel_size", None)
    params = segmenter.settle(params)
    return segment_probabilities(segmenter.probabilities(volume, params), params, truth, voxel_size=voxel_size)


class VolumeScores:
    """Scores pooled over the slices (and volumes) added: pixel scores from summed counts, the median
    slice accuracy, and object scores (`emunet.core.metrics.ObjectScorer`) over the fully annotated
    slices; `rows` are the per-slice rows, each with `stack` when given."""

    def __init__(self, min_size: int = DEFAULTS.min_object_size):
        self.rows: list[dict] = []
        self.objects = ObjectScorer()
        self.volumes = VolumeScorer()  # 3-D objects: the `_3d` scores
        self.scored_slices = 0
        self.min_size = min_size  # true 3-D objects under this many voxels are left out, as in a slice
        self.partial = False  # a slice not fully annotated: whole objects cannot be scored

    def add(self, result: SliceResult, stack: str | None = None) -> dict:
        """Count one scored slice; returns its row."""
        row = result.row
        if row is None:
            raise ValueError("a slice segmented without a truth has nothing to score")
        if result.annotated is None:
            found = self.objects.add(result.objects, result.truth_objects)
            row["objects_matched"] = found["matched"]
            self.scored_slices += 1
            self.volumes.add(result.truth_ids, result.ids)
        else:
            self.partial = True
        row = {"stack": stack, **row} if stack is not None else row
        self.rows.append(row)
        return row

    def totals(self) -> dict[str, int]:
        """Pixel counts `tp`, `fp`, `fn`, `tn` summed over the rows."""
        return {k: sum(r[k] for r in self.rows) for k in COUNTS}

    def metrics(self) -> dict[str, float]:
        pooled = {**scores_from_counts(*self.totals().values()), "median_slice_accuracy": median_slice_accuracy(self.rows)}
        pooled.update(self.objects.scores() if self.scored_slices else UNMEASURED_OBJECTS)
        pooled.update(self.volumes.scores(self.min_size) if self.scored_slices and not self.partial else UNMEASURED_3D)
        return pooled


def score_volume(results: Iterable[SliceResult], scores: VolumeScores | None = None, stack: str | None = None
                 ) -> VolumeScores:
    """Add every result to `scores` (a new `VolumeScores` if None) and return it."""
    scores = scores or VolumeScores()
    for result in results:
        scores.add(result, stack)
    return scores
