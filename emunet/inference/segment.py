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
from emunet.core.metrics import (UNMEASURED_OBJECTS, ObjectScorer, confusion, median_slice_accuracy,
                                 scores_from_counts)
from emunet.core.normalize import stack_stats
from emunet.core.objects import sizes, truth_objects
from emunet.inference.instances import SliceLinker, slice_instances
from emunet.inference.params import SegmentParams
from emunet.inference.tiling import iter_probabilities, tile_side

COUNTS = ("tp", "fp", "fn", "tn")


class Segmenter:
    """A network as the path uses it: `forward` maps a `(n, h, w, c)` float32 batch in [0, 1] to
    `(n, h, w, 1)` probabilities; `multiple` is its down-sampling (`2**depth`, times `input_scale`);
    `context` the slices above and below that a 2.5-D network takes as channels (`c = 2 * context + 1`;
    0: one slice, the 2-D network)."""

    def __init__(self, forward: Callable[[np.ndarray], np.ndarray] | None = None, multiple: int = 1,
                 context: int = 0):
        # (None until a pyfunc's load_context sets them)
        self.forward, self.multiple, self.context = forward, int(multiple), int(context)

    def probabilities(self, volume, params: SegmentParams, start: int = 0, stop: int | None = None
                      ) -> Iterator[np.ndarray]:
        """The `(H, W)` float32 probability of each slice of a raw `(Z, H, W)` volume (an array or a
        lazily read volume), normalised with the params' window or, without one, the volume's own. With
        `context`, each slice's neighbours come from `volume` itself, mirrored at its ends: a volume of
        one slice is that slice in every channel. `start`, `stop`: only those slices (a chunk of the
        stack, e.g. a Spark task's), each with the context it has in the whole volume."""
        low, high = (params.low, params.high) if params.low is not None else stack_stats(volume)
        return iter_probabilities(self.forward, volume, low, high, tile_size=tile_side(params.tile_size, self.multiple),
                                  overlap=params.overlap, batch_size=params.batch_size, multiple=self.multiple,
                                  tta=params.tta, context=self.context, start=start, stop=stop)


class Truth:
    """A ground truth read one slice at a time: `parts(z)` gives `(foreground, annotated or None,
    objects)` of slice z. `objects` are the true objects (int32 ids, specks under `min_size` dropped),
    computed only when asked (`min_size` given)."""

    def __init__(self, volume, kind: str = "mask", ids=None):
        if kind not in ("mask", "instances", "stored"):
            raise ValueError(f"unknown truth kind {kind!r}")
        self.volume, self.kind, self.ids = volume, kind, ids

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


def segment_probabilities(probs: Iterable[np.ndarray], params: SegmentParams, truth: Truth | None = None,
                          start: int = 0) -> Iterator[SliceResult]:
    """Turn `(H, W)` probability maps, in slice order from slice `start`, into `SliceResult`s: the mask
    (`prob >= threshold`), the instances of each slice (`emunet.inference.instances.slice_instances`:
    touching cells split at the membrane, specks under `min_object_size` dropped) linked through the
    slices, and with `truth` (indexed by absolute slice) the slice's score row."""
    linker = SliceLinker()
    for z, prob in enumerate(probs, start=start):
        prob = np.asarray(prob, np.float32)
        mask = prob >= params.threshold
        objects = slice_instances(prob, params.threshold, params.seed_threshold, params.min_object_size,
                                  params.seed_depth)
        result = SliceResult(z, prob, mask, objects, linker.ids(objects))
        if truth is not None:
            result.row, result.truth_objects, result.annotated = _score_row(z, mask, objects, truth,
                                                                            params.min_object_size)
        yield result


def segment_volume(segmenter, volume, params: SegmentParams, truth: Truth | None = None) -> Iterator[SliceResult]:
    """Segment a raw `(Z, H, W)` volume (array or lazily read) slice by slice with `segmenter` (anything
    with `probabilities(volume, params)`, e.g. `Segmenter` or the pyfunc's `StackSegmenter`); see
    `segment_probabilities` for what each result holds. Memory stays with a few slices."""
    if truth is not None and tuple(truth.volume.shape) != tuple(volume.shape):
        raise ValueError(f"truth of shape {tuple(truth.volume.shape)} for a volume of {tuple(volume.shape)}")
    return segment_probabilities(segmenter.probabilities(volume, params), params, truth)


class VolumeScores:
    """Scores pooled over the slices (and volumes) added: pixel scores from summed counts, the median
    slice accuracy, and object scores (`emunet.core.metrics.ObjectScorer`) over the fully annotated
    slices; `rows` are the per-slice rows, each with `stack` when given."""

    def __init__(self):
        self.rows: list[dict] = []
        self.objects = ObjectScorer()
        self.scored_slices = 0

    def add(self, result: SliceResult, stack: str | None = None) -> dict:
        """Count one scored slice; returns its row."""
        row = result.row
        if row is None:
            raise ValueError("a slice segmented without a truth has nothing to score")
        if result.annotated is None:
            found = self.objects.add(result.objects, result.truth_objects)
            row["objects_matched"] = found["matched"]
            self.scored_slices += 1
        row = {"stack": stack, **row} if stack is not None else row
        self.rows.append(row)
        return row

    def totals(self) -> dict[str, int]:
        """Pixel counts `tp`, `fp`, `fn`, `tn` summed over the rows."""
        return {k: sum(r[k] for r in self.rows) for k in COUNTS}

    def metrics(self) -> dict[str, float]:
        pooled = {**scores_from_counts(*self.totals().values()), "median_slice_accuracy": median_slice_accuracy(self.rows)}
        pooled.update(self.objects.scores() if self.scored_slices else UNMEASURED_OBJECTS)
        return pooled


def score_volume(results: Iterable[SliceResult], scores: VolumeScores | None = None, stack: str | None = None
                 ) -> VolumeScores:
    """Add every result to `scores` (a new `VolumeScores` if None) and return it."""
    scores = scores or VolumeScores()
    for result in results:
        scores.add(result, stack)
    return scores
