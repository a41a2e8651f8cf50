"""3-D scores of instance ids: cells as whole objects of a `(Z, Y, X)` volume, not slice by slice.

Everything is computed from one contingency table: `(true id, predicted id, voxels)` for every pair of
ids that share a voxel, 0 included on both sides. A table is small (it grows with the number of cells,
not of voxels) and tables of blocks add up, so a volume scored block by block (with ids that agree
across blocks) gives exactly the scores of the whole volume.

- `adapted_rand_error_3d`, `vi_split_3d`, `vi_merge_3d`: the conventions of
  `emunet.core.metrics.ObjectScorer`: restricted to the true foreground (true id 0 is unlabelled), a true
  voxel in no predicted object is a segment of its own; VI in bits, split = H(pred | truth),
  merge = H(truth | pred). Lower is better. `rand_fscore_3d` is one minus the adapted Rand error (the Rand
  F-score of SNEMI3D and CREMI), higher is better, so that it can rank models as the champion metric does.
- `object_precision_3d`, `object_recall_3d`, `object_f1_3d`: 3-D objects matched one to one at
  IoU >= 0.5, greedily by decreasing IoU (as `emunet.core.metrics.match`).
- `ap50_3d`, `ap75_3d`: average precision as MitoEM defines it (Wei et al. 2020, whose evaluation is
  COCO's adapted to volumes): predicted objects ranked by a score, each matched in rank order to the
  unmatched true object of highest IoU at or above the threshold; precision made monotone and read at
  101 recall points 0, 0.01, ..., 1 (COCO's interpolation, so the figures compare with published MitoEM
  ones; all-point interpolation differs by up to about 1/101). The score is the object's size in voxels,
  MitoEM's default when a method gives no confidences: a segmentation has no other score, and the size
  is known from the table alone.
"""

import numpy as np

METRIC_NAMES_3D = ("adapted_rand_error_3d", "rand_fscore_3d", "vi_split_3d", "vi_merge_3d", "object_precision_3d",
                   "object_recall_3d", "object_f1_3d", "ap50_3d", "ap75_3d")
MATCH_IOU = 0.5
RECALL_POINTS = np.linspace(0.0, 1.0, 101)  # COCO's and MitoEM's
DENSE_TABLE = 1 << 25  # below this many (true, predicted) id cells a bincount beats sorting the voxels
EMPTY_TABLE = np.zeros((3, 0), np.int64)


def _ratio(num: float, den: float) -> float:
    return 1.0 if den == 0 else num / den


def contingency(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """The table of two label arrays of the same shape (any dimensions, non-negative integer ids below
    2**32): `(3, K)` int64 rows true id, predicted id, voxels, one column per pair that shares a voxel."""
    truth, pred = np.asarray(truth), np.asarray(pred)
    if truth.shape != pred.shape:
        raise ValueError(f"prediction has shape {pred.shape} but truth has {truth.shape}")
    if not truth.size:
        return EMPTY_TABLE
    t, p = truth.ravel().astype(np.int64), pred.ravel().astype(np.int64)
    if min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= 1 << 32:
        raise ValueError(f"ids must be in [0, 2**32); got truth {t.min()}..{t.max()}, pred {p.min()}..{p.max()}")
    width = int(p.max()) + 1
    if (int(t.max()) + 1) * width <= DENSE_TABLE:
        counts = np.bincount(t * width + p)
        keys = np.flatnonzero(counts)
        return np.stack([keys // width, keys % width, counts[keys]]).astype(np.int64)
    keys, counts = np.unique((t << 32) | p, return_counts=True)
    return np.stack([keys >> 32, keys & 0xFFFFFFFF, counts]).astype(np.int64)


def merge_tables(*tables: np.ndarray) -> np.ndarray:
    """One table from several (blocks, tasks): voxels of the same (true, predicted) pair added."""
    table = np.concatenate([EMPTY_TABLE, *tables], axis=1).astype(np.int64)
    keys, where = np.unique((table[0] << 32) | table[1], return_inverse=True)
    voxels = np.zeros(len(keys), np.int64)
    np.add.at(voxels, where, table[2])
    return np.stack([keys >> 32, keys & 0xFFFFFFFF, voxels])


def without_small_truth(table: np.ndarray, min_size: int) -> np.ndarray:
    """`table` with the true objects of fewer than `min_size` voxels (over the whole table: a cell cut by
    block edges is counted whole) made unlabelled, as `emunet.core.objects.truth_objects` drops specks
    in 2-D: fragments at the edge of a dense volume (half the medulla's ids are under 25 voxels) are
    neither cells to find nor voxels to score."""
    if min_size <= 1 or not table.shape[1]:
        return table
    ids, where = np.unique(table[0], return_inverse=True)
    small = np.bincount(where, weights=table[2], minlength=len(ids)) < min_size
    table = table.copy()
    table[0, small[where]] = 0
    return merge_tables(table)


def segmentation_errors(table: np.ndarray) -> dict[str, float]:
    """Adapted Rand error, VI split and merge of a table (see the module for the conventions)."""
    inside = table[:, table[0] > 0]
    found = inside[:, inside[1] > 0]
    n, lone = found[2].astype(np.float64), inside[:, inside[1] == 0]
    lone_n = lone[2].astype(np.float64)
    total = n.sum() + lone_n.sum()
    if not total:
        return {"adapted_rand_error_3d": 0.0, "rand_fscore_3d": 1.0, "vi_split_3d": 0.0, "vi_merge_3d": 0.0}
    true_ids, where = np.unique(inside[0], return_inverse=True)
    a = np.bincount(where, weights=inside[2].astype(np.float64), minlength=len(true_ids))
    a_found, a_lone = a[where[inside[1] > 0]], a[where[inside[1] == 0]]
    col = np.unique(found[1], return_inverse=True)[1]
    b = np.bincount(col, weights=n) if len(n) else np.zeros(0)
    same_both = n @ n + lone_n.sum() - total  # ordered pairs of voxels together in truth and prediction
    same_true, same_pred = a @ a - total, b @ b + lone_n.sum() - total
    denominator = 0.5 * (same_true + same_pred)
    error = 1.0 - same_both / denominator if denominator else 0.0
    split = -(n / total) @ np.log2(n / a_found) + (lone_n / total) @ np.log2(a_lone)
    merge = -(n / total) @ np.log2(n / b[col]) if len(n) else 0.0
    return {"adapted_rand_error_3d": float(error), "rand_fscore_3d": float(1.0 - error), "vi_split_3d": float(max(split, 0.0)),
            "vi_merge_3d": float(max(merge, 0.0))}


def _objects(table: np.ndarray):
    """`(true ids, true sizes, predicted ids, predicted sizes, pairs)` of a table; pairs are
    `(true index, predicted index, iou)` arrays for the objects that share voxels."""
    t_ids, t_where = np.unique(table[0], return_inverse=True)
    p_ids, p_where = np.unique(table[1], return_inverse=True)
    t_size = np.bincount(t_where, weights=table[2], minlength=len(t_ids))
    p_size = np.bincount(p_where, weights=table[2], minlength=len(p_ids))
    both = (table[0] > 0) & (table[1] > 0)
    ti, pi, inter = t_where[both], p_where[both], table[2][both].astype(np.float64)
    iou = inter / (t_size[ti] + p_size[pi] - inter)
    t_keep, p_keep = t_ids > 0, p_ids > 0
    return t_ids[t_keep], t_size[t_keep], p_ids[p_keep], p_size[p_keep], (ti, pi, iou), (t_keep, p_keep)


def object_scores(table: np.ndarray, threshold: float = MATCH_IOU) -> dict[str, float]:
    """3-D object precision, recall and F1 of a table: one-to-one matches at IoU >= `threshold`,
    greedily by decreasing IoU. Nothing to find and nothing found scores perfectly."""
    t_ids, _, p_ids, _, (ti, pi, iou), _ = _objects(table)
    used_t, used_p, matched = set(), set(), 0
    for k in np.argsort(-iou, kind="stable"):
        if iou[k] < threshold:
            break
        if ti[k] not in used_t and pi[k] not in used_p:
            used_t.add(ti[k])
            used_p.add(pi[k])
            matched += 1
    predicted, true = len(p_ids), len(t_ids)
    return {"object_precision_3d": _ratio(matched, predicted), "object_recall_3d": _ratio(matched, true),
            "object_f1_3d": _ratio(2 * matched, predicted + true)}


def average_precision(table: np.ndarray, threshold: float) -> float:
    """MitoEM's AP at one IoU `threshold` (see the module): predicted objects ranked by size, largest
    first (ties: lower id first). No true and no predicted object: 1; predictions but nothing to find,
    or nothing predicted: 0."""
    t_ids, _, p_ids, p_size, (ti, pi, iou), (t_keep, p_keep) = _objects(table)
    if not len(t_ids):
        return float(not len(p_ids))
    if not len(p_ids):
        return 0.0
    # Indices over the kept (non-zero) ids: background is neither an object nor a prediction.
    t_index, p_index = np.cumsum(t_keep) - 1, np.cumsum(p_keep) - 1
    ti, pi = t_index[ti], p_index[pi]
    candidates: dict[int, list[tuple[float, int]]] = {}
    for k in np.flatnonzero(iou >= threshold):
        candidates.setdefault(int(pi[k]), []).append((float(iou[k]), int(ti[k])))
    order = np.lexsort((p_ids, -p_size))  # by size descending, then id
    used, hit = set(), np.zeros(len(order), bool)
    for rank, p in enumerate(order):
        free = [(v, t) for v, t in candidates.get(int(p), []) if t not in used]
        if free:
            used.add(max(free)[1])
            hit[rank] = True
    tp = np.cumsum(hit)
    recall, precision = tp / len(t_ids), tp / np.arange(1, len(hit) + 1)
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # the envelope: best precision at >= recall
    at = np.searchsorted(recall, RECALL_POINTS, side="left")
    return float(np.where(at < len(precision), precision[np.minimum(at, len(precision) - 1)], 0.0).mean())


class VolumeScorer:
    """3-D scores of instance ids, accumulated by blocks: `add(truth, pred)` for each block of a volume
    (ids agree across blocks), or `add_table` for a table another task computed; then `scores()`. The
    memory held grows with the number of (true, predicted) pairs, not with the voxels."""

    def __init__(self):
        self.tables: list[np.ndarray] = []

    def add(self, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
        """Count one block (arrays of the same shape); returns its table."""
        return self.add_table(contingency(truth, pred))

    def add_table(self, table: np.ndarray) -> np.ndarray:
        self.tables = [merge_tables(*self.tables, np.asarray(table, np.int64))]
        return table

    def table(self) -> np.ndarray:
        return self.tables[0] if self.tables else EMPTY_TABLE

    def scores(self, min_size: int = 0) -> dict[str, float]:
        """`METRIC_NAMES_3D` of everything added, true objects under `min_size` voxels left out
        (`without_small_truth`; predicted specks are the segmentation's to drop)."""
        table = without_small_truth(self.table(), min_size)
        return {**segmentation_errors(table), **object_scores(table),
                "ap50_3d": average_precision(table, 0.5), "ap75_3d": average_precision(table, 0.75)}


def volume_scores(truth: np.ndarray, pred: np.ndarray, min_size: int = 0) -> dict[str, float]:
    """The 3-D scores (`METRIC_NAMES_3D`) of predicted instance ids against true ids: `(Z, Y, X)` integer
    arrays of the same shape, 0 = background (in truth: unlabelled, left out of VI and Rand); true
    objects under `min_size` voxels are left out as unlabelled."""
    scorer = VolumeScorer()
    scorer.add(truth, pred)
    return scorer.scores(min_size)
