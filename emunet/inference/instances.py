"""Instances from probabilities: touching cells separated, then followed through the slices.

In a slice, foreground is `prob >= threshold`. Where the membrane between two cells is thin the network's
foreground runs across it, but its confident cores (`prob >= seed_threshold`) stay apart: each core is
grown back over the foreground, downhill in probability (a seeded watershed), so the cells meet where
the probability dips, on the membrane. Two neighbouring objects are merged back unless the probability
between them dips at least `SEED_DEPTH` below the lower of their two peaks (the dynamic of the weaker
core, as h-maxima measure it): a dip that shallow is texture inside one cell (an organelle, a vesicle),
not a membrane. A foreground piece with no core stays one object. Objects under
`min_size` pixels are specks and are dropped (`emunet.core.objects`: 4-connected, the one meaning of an
object everywhere).

Through the slices (anisotropic stacks: sections much thicker than pixels), an object continues the
object of the slice before that it overlaps most, when that one overlaps it most too and their overlap
is at least `LINK_OVERLAP` of the smaller: one-to-one links, so ids can be given as slices come and a
cell that divides or two that meet never fuse into one id.

A stack's slices are labelled, and their overlaps with the slice before counted, several at once in
threads (`iter_slice_instances`); only the ids are given out in order, one slice after the other.
"""

import os
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain

import cv2
import numpy as np
from skimage.segmentation import watershed

from emunet.core.hardware import cpu_count
from emunet.core.objects import components
from emunet.inference.dips import merge_roots

DEFAULT_SEED_THRESHOLD = 0.9  # cores the U-Net is sure of; a quarter of the way from 0.5 to 1 in logits
# Probability: a shallower dip between two cores is inside one object (see the module). Chosen with
# bench/instance_params.py on ISBI's training slices and a synthetic stack: 0.1 keeps object F1 within
# 0.005 of the best of each (0.2 lost 0.05 on synthetic cells, 0 over-split ISBI and VNC by 0.03-0.12).
SEED_DEPTH = 0.1
LINK_OVERLAP = 0.5  # shared pixels / pixels of the smaller object, for the same cell in the next slice
# Pixels of the slices whose objects are found at once, in threads (`iter_slice_instances`): each holds
# about 40 bytes a pixel while it is labelled, so 2^23 pixels keep them within ~0.3 GB, what one slice of
# 2896 x 2896 costs alone; slices larger than half of it are found one at a time.
PARALLEL_PIXELS = 1 << 23


def _box(mask: np.ndarray) -> tuple[slice, ...]:
    """The bounding box of the True pixels of a 2-D `mask` (which has some)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _sizes(labels: np.ndarray, minlength: int, foreground: np.ndarray | None = None) -> np.ndarray:
    """Pixels per id of the int ids `labels` (id 0's count left 0; `foreground`, when given, is
    `labels > 0`): counted over the foreground's pixels where it is sparse (most of a slice of
    mitochondria is background), over every pixel where it is not (selecting them would cost more)."""
    if 4 * np.count_nonzero(labels if foreground is None else foreground) < labels.size:
        return np.bincount(labels[labels > 0 if foreground is None else foreground].astype(np.int64, copy=False),
                           minlength=minlength)
    counts = np.bincount(labels.ravel().astype(np.int64, copy=False), minlength=minlength)
    counts[0] = 0
    return counts


def _numbered(keep: np.ndarray) -> np.ndarray:
    """int32 new ids 1, 2, ... for the True entries of `keep`, in order; 0 for the others (`drop_small`'s)."""
    new_ids = np.zeros(len(keep), np.int32)
    new_ids[keep] = np.arange(1, int(keep.sum()) + 1)
    return new_ids


def slice_instances(prob: np.ndarray, threshold: float = 0.5, seed_threshold: float = DEFAULT_SEED_THRESHOLD,
                    min_size: int = 0, depth: float = SEED_DEPTH) -> np.ndarray:
    """Objects of one `(H, W)` probability map: int32 labels 1..N (0 background), touching cells split by
    a watershed from their cores (see the module). `seed_threshold <= threshold` turns splitting off:
    the objects are then the components of the mask."""
    prob = np.asarray(prob, np.float32)
    foreground = prob >= threshold
    if seed_threshold <= threshold or not foreground.any():
        return components(foreground, min_size)
    count, pieces = cv2.connectedComponents(foreground.view(np.uint8), connectivity=4, ltype=cv2.CV_32S)
    # The cores' 4-connected components, every one kept (`components` with no minimum size numbers them the
    # same way, without the statistics and the renumbering it would not use).
    cores = prob >= seed_threshold
    seed_count, seeds = cv2.connectedComponents(cores.view(np.uint8), connectivity=4, ltype=cv2.CV_32S)
    piece_of_seed = np.zeros(seed_count, np.int64)
    piece_of_seed[seeds[cores]] = pieces[cores]  # over the cores' pixels only: a core lies in one piece
    crowded = np.bincount(piece_of_seed[1:], minlength=count) > 1
    crowded[0] = False  # the background (no core lies there: seed_threshold > threshold)
    # A piece of foreground with at most one core is one object as it is; only the pieces with several
    # cores are flooded (the costly step), within the box that holds them: the flood, the shallow-dip
    # merge and their numbering are the same as over the whole slice (the mask confines both), for the
    # box's share of the work.
    labels = pieces
    new_ids = np.arange(count)  # what drop_small does below, written with the ids the merge gives
    if crowded.any():
        several = np.take(crowded, pieces)
        box = _box(several)
        several, prob = several[box], prob[box]
        # Flooded downhill in probability, quantised to 1/255 (a third faster than float priorities).
        depth_map = (255 - np.round(prob * 255)).astype(np.uint8)
        grown = watershed(depth_map, markers=np.where(several, seeds[box], 0), mask=several, connectivity=1)
        root = merge_roots(grown, prob, depth) if depth > 0 else None
        # Cores' ids past the pieces' (as one image); each core's region is its merged root's.
        labels[box][several] = grown[several] + count
        new_ids = np.concatenate([new_ids, count + (np.arange(int(grown.max()) + 1) if root is None else root)])
    # drop_small with the merge folded in: the pixels of each object (a core's region added up over the
    # cores merged into it) and its new id, then one pass over the slice (a slice's passes are most of
    # the step's time).
    area = np.bincount(new_ids, weights=_sizes(labels, len(new_ids), foreground), minlength=len(new_ids))
    renumbered = _numbered(area >= max(min_size, 1))
    if not crowded.any() and np.array_equal(renumbered, new_ids):
        return labels  # nothing dropped: the pieces' ids as they are
    return np.take(renumbered[new_ids], labels)


def labelled_at_once(pixels: int, slices: int | None = None, workers: int | None = None) -> int:
    """Slices of `pixels` pixels that `iter_slice_instances` labels at once with `workers` threads
    (default: the process's CPUs): no more than `PARALLEL_PIXELS` pixels together, nor than the stack's
    `slices` when known, one slice at least."""
    workers = cpu_count() if workers is None else workers
    at_once = min(workers, PARALLEL_PIXELS // max(int(pixels), 1))
    return max(1, at_once if slices is None else min(at_once, int(slices)))


def iter_slice_instances(probs: Iterable[np.ndarray], threshold: float = 0.5,
                         seed_threshold: float = DEFAULT_SEED_THRESHOLD, min_size: int = 0,
                         depth: float = SEED_DEPTH, link: bool = True, workers: int | None = None
                         ) -> Iterator[tuple[np.ndarray, np.ndarray, "LinkCounts | None"]]:
    """`(prob, objects, counts)` for each `(H, W)` map of `probs`, in order: the map as float32, its
    objects (`slice_instances`) and, with `link`, what `SliceLinker.ids` needs to link them to the slice
    before (`link_counts`; else None). Both depend on one or two slices' objects only, so `workers`
    slices (default: the process's CPUs, as many as `PARALLEL_PIXELS` allows, no more than `probs` has)
    are done at once in the process's threads (`_pool`; OpenCV's labelling, scikit-image's flood and
    NumPy's passes let go of the GIL), while the caller gives out the ids of the slice before, which only
    it can."""
    count = len(probs) if hasattr(probs, "__len__") else None  # one slice (a block one deep): no thread
    probs = iter(probs)
    first = next(probs, None)
    if first is None:
        return
    maps = (np.asarray(p, np.float32) for p in chain([first], probs))
    workers = labelled_at_once(np.asarray(first).size, count, workers)

    def job(prob: np.ndarray, before: Future | None, mine: Future) -> tuple:
        try:
            objects = slice_instances(prob, threshold, seed_threshold, min_size, depth)
        except BaseException as error:  # the next slice's job waits for these objects: it fails alike
            mine.set_exception(error)
            raise
        mine.set_result(objects)
        previous = None if before is None else before.result()
        return prob, objects, link_counts(objects, previous) if link else None

    before = None
    if workers == 1:
        for prob in maps:
            mine: Future = Future()
            yield job(prob, before, mine)
            before = mine
        return
    pool, pending = _pool(), deque()
    try:
        for prob in maps:
            mine = Future()
            pending.append(pool.submit(job, prob, before, mine))
            before = mine
            if len(pending) > workers:  # one slice ready to hand over, `workers` being labelled
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # the caller stopped early or a slice failed: what was not started is not started (a job
        for task in pending:  # waits for the one before it only, and the shared queue started that first)
            task.cancel()


_POOL: tuple[int, ThreadPoolExecutor] | None = None  # (the process that made it, the pool)
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """The process's threads for `iter_slice_instances`, one per CPU, made once: threads made anew for
    every stack (or every block) would each take memory of their own from the allocator (glibc's
    per-thread arenas), which keeps it; 16384 x 16384 by 70 blocks grew from 1.3 to 2.2 GB so. A forked
    child (Spark's workers) makes its own: threads do not survive a fork."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL[0] != os.getpid():
            _POOL = (os.getpid(), ThreadPoolExecutor(cpu_count(), thread_name_prefix="slice-instances"))
        return _POOL[1]


# The overlaps of two slices' objects are counted in a table of (new x old labels) cells, at most as many
# as the slice's pixels or this many (a few MB): over a slice of thousands of objects, by sorting instead.
PAIR_TABLE_MIN = 1 << 16


def first_pixels(labels: np.ndarray, count: int) -> np.ndarray:
    """`(count + 1,)` int64: the raster index (`y * width + x`) of each label's first pixel in a 2-D
    `labels` (`labels.size` for a label absent). Distinct objects of a slice have distinct first pixels:
    the key that breaks a tie between them whatever their numbering (see `one_to_one`)."""
    flat = np.asarray(labels).ravel()
    out = np.full(count + 1, flat.size, np.int64)
    np.minimum.at(out, flat, np.arange(flat.size, dtype=np.int64))
    return out


def one_to_one(new, old, shared, area_new, area_old, key_new, key_old) -> np.ndarray:
    """The linking rule (see the module), on a table: which of the pairs `(new[i], old[i])` of objects of
    two consecutive slices that share `shared[i] > 0` pixels are links (bool, one per pair). A pair links
    when each is the other's largest overlap and they share at least `LINK_OVERLAP` of the smaller one's
    pixels (`area_*[i]`: the pixels of the pair's objects). A tie goes to the object whose first pixel
    comes first (`key_*[i]`, `first_pixels`), so links depend on the objects, never on their numbering:
    whole slices (`SliceLinker`) and tables summed over blocks (`stitch.link_tables`) link alike. Any
    integers name the objects, as long as each names one object."""
    new, old, shared = (np.asarray(a, np.int64) for a in (new, old, shared))
    best = np.ones(len(new), bool)
    if not len(new):
        return best
    for mine, their_key in ((new, key_old), (old, key_new)):  # each object's largest overlap, ties by key
        order = np.lexsort((np.asarray(their_key), -shared, mine))
        first = np.r_[True, mine[order][1:] != mine[order][:-1]]
        chosen = np.zeros(len(new), bool)
        chosen[order[first]] = True
        best &= chosen
    return best & (shared >= LINK_OVERLAP * np.minimum(area_new, area_old))


@dataclass
class LinkCounts:
    """What linking a slice's objects to the slice before needs, counted from the two slices' objects
    alone (`link_counts`): `count` objects, their first pixels `key` and pixels `area` (`(count + 1,)`
    int64, label 0's area 0), and `pairs` `(new, old, shared)`, the overlaps with the slice before's
    objects (`overlap_counts`; None for a first slice or one without objects)."""

    count: int
    key: np.ndarray
    area: np.ndarray
    pairs: tuple[np.ndarray, np.ndarray, np.ndarray] | None


def link_counts(labels: np.ndarray, previous: np.ndarray | None) -> LinkCounts:
    """`LinkCounts` of a slice's objects `labels` against the slice before's objects `previous` (None:
    the first slice)."""
    count = int(labels.max(initial=0))
    key = first_pixels(labels, count)
    if previous is None or not count:
        return LinkCounts(count, key, _sizes(labels, count + 1), None)
    pairs, area = overlap_counts(labels, previous, int(previous.max(initial=0)) + 1, count + 1)
    return LinkCounts(count, key, area, pairs)


class SliceLinker:
    """Gives the objects of consecutive slices their 3-D ids as slices come: `ids(labels)` maps a slice's
    per-slice labels to stack-wide ids, continuing an object of the previous slice where `one_to_one`
    links them, else starting a new id (in label order)."""

    def __init__(self):
        # The last slice: its labels as given, their pixel counts, first pixels and 3-D ids (`ids[label]`).
        self.previous: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
        self.next_id = 1

    def ids(self, labels: np.ndarray, counts: LinkCounts | None = None) -> np.ndarray:
        """The slice's stack-wide ids; `counts`, when given, are `link_counts(labels, the slice before's
        labels)` counted beforehand (`iter_slice_instances`)."""
        labels = np.array(labels, copy=True)  # kept for the next slice: the caller may reuse its array
        if counts is None:
            counts = link_counts(labels, None if self.previous is None else self.previous[0])
        count, key, area = counts.count, counts.key, counts.area
        mapping = np.zeros(count + 1, np.int64)
        if counts.pairs is not None:
            _, area_old, key_old, old_ids = self.previous
            new, old, shared = counts.pairs
            linked = one_to_one(new, old, shared, area[new], area_old[old], key[new], key_old[old])
            mapping[new[linked]] = old_ids[old[linked]]
        fresh = np.flatnonzero((area[1:] > 0) & (mapping[1:] == 0)) + 1  # new ids in label order
        mapping[fresh] = self.next_id + np.arange(len(fresh))
        self.next_id += len(fresh)
        self.previous = (labels, area, key, mapping)
        return np.take(mapping, labels)  # half the time of mapping[labels]


def overlap_counts(labels: np.ndarray, previous: np.ndarray, width: int, height: int) -> tuple:
    """`((new, old, shared), area)`: the pairs of labels (`labels` < `height`, `previous` < `width`, both
    > 0; two label images of one shape) that share pixels, sorted by new then old, and how many pixels
    each pair shares (int64 arrays); and the pixels of each label of `labels` (label 0's left 0). One
    count over the pixels of `labels`' objects, each with the label under it in `previous`, 0 included,
    gives both (or over every pixel, where the objects are most of the slice and selecting their pixels
    would cost more)."""
    table = width * height <= max(labels.size, PAIR_TABLE_MIN)  # counted in a table: no sort
    if table and 4 * np.count_nonzero(labels) >= labels.size:
        key = labels.astype(np.int64).ravel()  # the background's pixels land in row 0, left out below
        key *= width
        key += previous.ravel()
    else:
        inside = labels > 0
        key = labels[inside].astype(np.int64)
        key *= width
        key += previous[inside]
    if table:
        counts = np.bincount(key, minlength=width * height).reshape(height, width)
        area = counts.sum(axis=1)
        counts[0] = counts[:, 0] = 0
        pairs = np.flatnonzero(counts)
        shared = counts.ravel()[pairs]
    else:
        pairs, shared = np.unique(key, return_counts=True)
        area = np.bincount(pairs // width, weights=shared, minlength=height).astype(np.int64)
        on_old = pairs % width > 0  # (the keys are of the objects' pixels only: every new label is > 0)
        pairs, shared = pairs[on_old], shared[on_old]
    area[0] = 0
    new, old = np.divmod(pairs, width)
    return (new, old, shared), area


def label_instances(probs, threshold: float = 0.5, seed_threshold: float = DEFAULT_SEED_THRESHOLD,
                    min_size: int = 0, workers: int | None = None) -> np.ndarray:
    """Instance labels of a `(Z, H, W)` stack of probabilities (or an iterable of `(H, W)` maps): the
    objects of each slice (`slice_instances`) linked through the slices, `workers` slices at a time
    (`iter_slice_instances`). Returns `(Z, H, W)` int32 ids 1..N, numbered as they first appear."""
    linker = SliceLinker()
    return np.stack([linker.ids(objects, counts)
                     for _, objects, counts in iter_slice_instances(probs, threshold, seed_threshold, min_size,
                                                                    workers=workers)],
                    dtype=np.int32)
