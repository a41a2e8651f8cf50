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
"""

import cv2
import numpy as np
from skimage.segmentation import watershed

from emunet.core.objects import components, drop_small
from emunet.inference.dips import merge_shallow

DEFAULT_SEED_THRESHOLD = 0.9  # cores the U-Net is sure of; a quarter of the way from 0.5 to 1 in logits
# Probability: a shallower dip between two cores is inside one object (see the module). Chosen with
# bench/instance_params.py on ISBI's training slices and a synthetic stack: 0.1 keeps object F1 within
# 0.005 of the best of each (0.2 lost 0.05 on synthetic cells, 0 over-split ISBI and VNC by 0.03-0.12).
SEED_DEPTH = 0.1
LINK_OVERLAP = 0.5  # shared pixels / pixels of the smaller object, for the same cell in the next slice


def slice_instances(prob: np.ndarray, threshold: float = 0.5, seed_threshold: float = DEFAULT_SEED_THRESHOLD,
                    min_size: int = 0, depth: float = SEED_DEPTH) -> np.ndarray:
    """Objects of one `(H, W)` probability map: int32 labels 1..N (0 background), touching cells split by
    a watershed from their cores (see the module). `seed_threshold <= threshold` turns splitting off:
    the objects are then the components of the mask."""
    prob = np.asarray(prob, np.float32)
    foreground = prob >= threshold
    if seed_threshold <= threshold or not foreground.any():
        return components(foreground, min_size)
    count, pieces = cv2.connectedComponents(foreground.astype(np.uint8), connectivity=4, ltype=cv2.CV_32S)
    seeds = components(prob >= seed_threshold)
    piece_of_seed = np.zeros(int(seeds.max()) + 1, np.int64)
    piece_of_seed[seeds.ravel()] = pieces.ravel()
    seeds_in_piece = np.bincount(piece_of_seed[1:], minlength=count)
    # A piece of foreground with at most one core is one object as it is; only the pieces with several
    # cores are flooded (the costly step, on a part of a typical slice).
    several = (seeds_in_piece > 1)[pieces]
    several[pieces == 0] = False
    labels = pieces.copy()
    if several.any():
        # Flooded downhill in probability, quantised to 1/255 (a third faster than float priorities).
        depth_map = (255 - np.round(prob * 255)).astype(np.uint8)
        grown = watershed(depth_map, markers=np.where(several, seeds, 0), mask=several, connectivity=1)
        if depth > 0:
            grown = merge_shallow(grown, prob, depth)
        labels[several] = grown[several] + count  # past the pieces' ids; drop_small renumbers
    return drop_small(labels, min_size)


class SliceLinker:
    """Gives the objects of consecutive slices their 3-D ids as slices come: `ids(labels)` maps a slice's
    per-slice labels to stack-wide ids, continuing an object of the previous slice where it overlaps one
    one-to-one (see the module), else starting a new id."""

    def __init__(self):
        self.previous: np.ndarray | None = None  # the last slice, in 3-D ids
        self.next_id = 1

    def ids(self, labels: np.ndarray) -> np.ndarray:
        labels = np.asarray(labels)
        count = int(labels.max(initial=0))
        mapping = np.zeros(count + 1, np.int64)
        if self.previous is not None and count:
            for new, old in _one_to_one(labels, self.previous).items():
                mapping[new] = old
        present = np.bincount(labels.ravel().astype(np.int64), minlength=count + 1) > 0
        for i in np.flatnonzero(present[1:] & (mapping[1:] == 0)) + 1:
            mapping[i], self.next_id = self.next_id, self.next_id + 1
        out = mapping[labels]
        self.previous = out
        return out


def _one_to_one(labels: np.ndarray, previous: np.ndarray) -> dict[int, int]:
    """`{id in labels: id in previous}` for pairs that are each other's largest overlap, sharing at least
    `LINK_OVERLAP` of the smaller one's pixels."""
    both = (labels > 0) & (previous > 0)
    if not both.any():
        return {}
    a, b = labels[both].astype(np.int64), previous[both].astype(np.int64)
    width = int(b.max()) + 1
    pairs, shared = np.unique(a * width + b, return_counts=True)
    new, old = np.divmod(pairs, width)
    area_new = np.bincount(labels.ravel().astype(np.int64))
    area_old = np.bincount(previous.ravel().astype(np.int64))
    best_for_new, best_for_old = {}, {}
    for n, o, s in zip(new, old, shared):
        if s > best_for_new.get(n, (0, 0))[1]:
            best_for_new[n] = (o, s)
        if s > best_for_old.get(o, (0, 0))[1]:
            best_for_old[o] = (n, s)
    links = {}
    for n, (o, s) in best_for_new.items():
        if best_for_old[o][0] == n and s >= LINK_OVERLAP * min(area_new[n], area_old[o]):
            links[int(n)] = int(o)
    return links


def label_instances(probs, threshold: float = 0.5, seed_threshold: float = DEFAULT_SEED_THRESHOLD,
                    min_size: int = 0) -> np.ndarray:
    """Instance labels of a `(Z, H, W)` stack of probabilities (or an iterable of `(H, W)` maps): the
    objects of each slice (`slice_instances`) linked through the slices. Returns `(Z, H, W)` int32 ids
    1..N, numbered as they first appear."""
    linker = SliceLinker()
    return np.stack([linker.ids(slice_instances(p, threshold, seed_threshold, min_size)) for p in probs]).astype(np.int32)
