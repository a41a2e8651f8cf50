"""The instances table of a volume segmented by blocks, added up from the blocks' shares so that no one
holds the volume's ids: each block counts, per volume-wide id, its voxels, coordinate sums and extent
(`block_measures`, a slice at a time), and `merge_measures` turns the shares into the rows
`emunet.core.objects.ObjectMeasures` gives for a whole volume."""

from dataclasses import dataclass

import numpy as np

from emunet.inference.blocks import Box


@dataclass(frozen=True)
class MeasurePartial:
    """One block's share of the instances table, per volume-wide id: `voxels`, `sums` of the (z, y, x)
    coordinates (exact integers), and the first `low` and last `high` (z, y, x) coordinate."""

    ids: np.ndarray  # (n,) int64
    voxels: np.ndarray  # (n,) int64
    sums: np.ndarray  # (n, 3) int64
    low: np.ndarray  # (n, 3) int64
    high: np.ndarray  # (n, 3) int64


def block_measures(labels: np.ndarray, box: Box) -> MeasurePartial:
    """The `MeasurePartial` of a block's `(bz, by, bx)` labels (volume-wide ids) lying at `box` of the
    volume; read a slice at a time, so it holds a slice's coordinates, not the block's."""
    labels = np.asarray(labels)
    ids = np.unique(labels)
    ids = ids[ids > 0].astype(np.int64)
    n = len(ids)
    voxels, sums = np.zeros(n, np.int64), np.zeros((n, 3), np.int64)
    low, high = np.full((n, 3), np.iinfo(np.int64).max), np.full((n, 3), -1, np.int64)
    (z0, _), (y0, _), (x0, _) = box
    for dz, plane in enumerate(labels):
        ys, xs = np.nonzero(plane)
        if not len(ys):
            continue
        k = np.searchsorted(ids, plane[ys, xs])
        order = np.argsort(k, kind="stable")  # each id's pixels together, rows still ascending
        k, ys, xs = k[order], ys[order] + y0, xs[order] + x0
        start = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
        end = np.r_[start[1:], len(k)] - 1
        here, counts = k[start], np.diff(np.r_[start, len(k)])
        voxels[here] += counts
        sums[here] += np.stack([counts * (z0 + dz), np.add.reduceat(ys, start), np.add.reduceat(xs, start)], axis=1)
        plane_low = np.stack([np.full(len(here), z0 + dz), ys[start], np.minimum.reduceat(xs, start)], axis=1)
        plane_high = np.stack([np.full(len(here), z0 + dz), ys[end], np.maximum.reduceat(xs, start)], axis=1)
        low[here], high[here] = np.minimum(low[here], plane_low), np.maximum(high[here], plane_high)
    return MeasurePartial(ids, voxels, sums, low, high)


def _physical(voxels: int, centre: np.ndarray, voxel_size, unit: str | None) -> list:
    """The `volume, z, y, x, unit` cells of a row, as `ObjectMeasures` writes them; an axis of unknown
    size (None) leaves its coordinate and the volume empty."""
    if voxel_size is None or all(s is None for s in voxel_size):
        return ["", "", "", "", ""]
    known = [s is not None for s in voxel_size]
    size = np.array([s if s is not None else np.nan for s in voxel_size], float)
    volume = float(f"{voxels * np.prod(size):.6g}") if all(known) else ""
    return [volume, *(float(f"{c:.6g}") if k else "" for c, k in zip(centre * size, known)), unit or ""]


def merge_measures(partials: list[MeasurePartial], voxel_size=None, unit: str | None = None) -> list[list]:
    """The instances table from every block's `MeasurePartial`: `MEASURE_COLUMNS` rows (id, voxels,
    first_slice, last_slice, centroid_z/y/x in voxels, volume, z, y, x in `unit`), one per id, by id, as
    `emunet.core.objects.ObjectMeasures` gives them for the whole volume. `voxel_size` (z, y, x) may be
    None or hold None for an axis of unknown size."""
    if not partials:
        return []
    ids = np.concatenate([p.ids for p in partials])
    cells, where = np.unique(ids, return_inverse=True)
    voxels = np.bincount(where, np.concatenate([p.voxels for p in partials]), len(cells)).astype(np.int64)
    sums = np.zeros((len(cells), 3), np.int64)
    np.add.at(sums, where, np.concatenate([p.sums for p in partials]))
    low, high = np.full((len(cells), 3), np.iinfo(np.int64).max), np.full((len(cells), 3), -1, np.int64)
    np.minimum.at(low, where, np.concatenate([p.low for p in partials]))
    np.maximum.at(high, where, np.concatenate([p.high for p in partials]))
    rows = []
    for i, cell in enumerate(cells):
        centre = sums[i].astype(float) / voxels[i]
        rows.append([int(cell), int(voxels[i]), int(low[i, 0]), int(high[i, 0]),
                     *(round(float(c), 2) for c in centre), *_physical(voxels[i], centre, voxel_size, unit)])
    return rows
