"""The plan of a blockwise segmentation: how large a block may be in a memory budget, how much halo
its labelling needs, and whether a volume needs blocks at all (`emunet.inference.blockwise`).

A block reads its core plus a label halo of `HALO_YX` pixels in y and x (about a cell radius: the
labelling sees the cell across a face as the whole slice does) and of one slice in z (2-D objects: the
block counts the pixels its first slice shares with the slice before, `blocktask.label_slices`) or
`HALO_YX` slices (3-D objects); its
probabilities come from the whole slice's tiles that touch the read box (`blocktask.block_probabilities`,
one forward pass's slices at a time), so its memory is what its read box keeps, the slices it labels at
once and its tile region for one pass (`block_bytes`): whole slices stay whole blocks as long as that
fits, and then no tile is run twice and no object is cut in y or x.
"""

import numpy as np

from emunet.inference.blocks import (MIN_YX, Block, block_shape_for_memory, box_shape, default_memory_budget,
                                     plan_blocks)
from emunet.inference.instances import labelled_at_once
from emunet.inference.params import SegmentParams
from emunet.inference.segment import BYTES_PER_VOXEL_3D, instance_mode
from emunet.inference.tiling import TilePlan, plan_tiles

HALO_YX = 64  # label halo in y and x: about a cell radius (see the module)
# Bytes a pixel of a block's read box holds while its slice is labelled: its probabilities (4) and the
# labelling's temporaries (foreground, components, seeds, flood priorities, the watershed's ids, the
# linker's int64 ids: about 40). `instances.labelled_at_once` slices are labelled at once.
BYTES_PER_PIXEL = 48
# Bytes every voxel of a block's read box holds until the block is done: its probabilities and its
# objects' ids (4 each), their cores' copies where the core is not a contiguous part of the read box (8),
# the overlaps' labels and the objects' tables (measured: 18.7 in all, tests/test_blockwise.py).
KEPT_BYTES_PER_VOXEL = 20
# Bytes a pixel of the block's tile region (the read box plus the tiles around it) holds while its
# probabilities are made, for the slices of one forward pass (`TilePlan.slices_per_pass`): the raw
# image (up to 4), normalised (4), blended sums (4) and weights (4).
TILE_BYTES_PER_PIXEL = 16
# Bytes a pixel of a batch of tiles holds on its way through the network: the tiles stacked (4) and the
# probabilities that come back (4); the network's own activations are the engine's.
BATCH_BYTES_PER_PIXEL = 8
# What each channel after the first adds (a 2.5-D network's neighbouring slices): at most a slice more
# read and normalised (raw up to 4, normalised 4) and the channel's copy in the pass's tile image (4) for
# each slice of the pass, and its share of a batch of tiles (4; measured, tests/test_blockwise.py).
CHANNEL_BYTES_PER_PIXEL = 12
CHANNEL_BATCH_BYTES_PER_PIXEL = 4


def _tile_rows(plan: TilePlan, start: int, stop: int, axis: int) -> list[int]:
    """Starts of the plan's tiles along `axis` (0: y, 1: x) that cover some of `[start, stop)`."""
    side = plan.tile_h if axis == 0 else plan.tile_w
    return sorted({box[axis] for box in plan.boxes if box[axis] < stop and box[axis] + side > start})


def tile_region(plan: TilePlan, read: tuple[tuple[int, int], tuple[int, int]]) -> tuple[tuple[int, int], tuple[int, int]]:
    """The `((y0, y1), (x0, x1))` of the (mirror-padded) slice that the tiles touching `read` cover."""
    ys, xs = _tile_rows(plan, *read[0], 0), _tile_rows(plan, *read[1], 1)
    return (ys[0], ys[-1] + plan.tile_h), (xs[0], xs[-1] + plan.tile_w)


def halo_for(mode: str) -> tuple[int, int, int]:
    """The label halo (z, y, x): one slice in z for linked 2-D objects, `HALO_YX` for 3-D ones."""
    return (HALO_YX if mode == "3d" else 1, HALO_YX, HALO_YX)


def block_bytes(block: Block, tiles: TilePlan, mode: str = "2d", channels: int = 1) -> int:
    """Bytes segmenting `block` holds at most: `TILE_BYTES_PER_PIXEL` of its tile region for a pass's
    slices (`blocktask.block_probabilities` goes pass by pass), a batch of tiles and, for "2d" objects,
    `KEPT_BYTES_PER_VOXEL` of its read box and `BYTES_PER_PIXEL` of the slices labelled at once; for
    "3d" objects, `segment.BYTES_PER_VOXEL_3D` of its read box (the 3-D labelling holds all of it).
    Each input channel after the first (`channels`: a 2.5-D network's) adds `CHANNEL_BYTES_PER_PIXEL` of
    the pass's tile region and `CHANNEL_BATCH_BYTES_PER_PIXEL` of the batch."""
    (y0, y1), (x0, x1) = tile_region(tiles, block.read[1:])
    return _bytes(box_shape(block.read), (y1 - y0) * (x1 - x0), tiles, mode, channels)


def _bytes(read_shape, region: int, tiles: TilePlan, mode: str, channels: int) -> int:
    """`block_bytes` of a block of read box `read_shape` (z, y, x) whose tiles cover `region` pixels."""
    depth, height, width = (int(n) for n in read_shape)
    extra = int(channels) - 1
    making = (min(depth, tiles.slices_per_pass) * region * (TILE_BYTES_PER_PIXEL + extra * CHANNEL_BYTES_PER_PIXEL)
              + tiles.batch * tiles.tile_h * tiles.tile_w * (BATCH_BYTES_PER_PIXEL + extra * CHANNEL_BATCH_BYTES_PER_PIXEL))
    if mode == "3d":
        return making + depth * height * width * BYTES_PER_VOXEL_3D
    at_once = labelled_at_once(height * width, depth)
    return making + height * width * (depth * KEPT_BYTES_PER_VOXEL + at_once * BYTES_PER_PIXEL)


def largest_block_bytes(blocks: list[Block], tiles: TilePlan, mode: str = "2d", channels: int = 1) -> int:
    """No less than the `block_bytes` of every block of a plan (`blocks.plan_blocks`: a grid, every z range
    with every y and x range), without counting each of a plan's thousands: the bytes of a block with
    each axis' longest read range and largest tile region, all of which `block_bytes` grows with. A plan
    whose inner blocks cross a tile's edge has such a block: then it is the largest block's."""
    depth = max(b - a for a, b in {block.read[0] for block in blocks})
    sides, regions = [], []
    for axis, tile in ((1, tiles.tile_h), (2, tiles.tile_w)):
        ranges = {block.read[axis] for block in blocks}
        sides.append(max(b - a for a, b in ranges))
        regions.append(max(rows[-1] + tile - rows[0] for rows in (_tile_rows(tiles, a, b, axis - 1) for a, b in ranges)))
    return _bytes((depth, *sides), regions[0] * regions[1], tiles, mode, channels)


def smallest_block_bytes(shape, tiles: TilePlan, halo, chunks=None, mode: str = "2d", channels: int = 1) -> int:
    """Bytes a `(Z, H, W)` volume needs by blocks at the least: the largest block (`largest_block_bytes`)
    of the plan of the smallest blocks, one slice (or z chunk) deep, `MIN_YX` pixels (or one chunk) a
    side, read with `halo` (a block that crosses a tile's edge holds the tiles on both sides)."""
    blocks = plan_blocks(shape, (1, min(MIN_YX, shape[1]), min(MIN_YX, shape[2])), halo, chunks)
    return largest_block_bytes(blocks, tiles, mode, channels)


def plan_for(shape, params: SegmentParams, multiple: int, budget: float | None = None, block=None,
             halo=None, mode: str = "2d", chunks=None, channels: int = 1) -> tuple[list[Block], TilePlan]:
    """The blocks of a `(Z, H, W)` volume and its slices' tile plan. Without `block`, blocks are as large
    as `budget` bytes allow (default `blocks.default_memory_budget()`) by `block_bytes`: the largest
    blocks `blocks.block_shape_for_memory` gives for the read box, made smaller until their tile regions
    fit too. With `chunks` (z, y, x), block sides are multiples of them (an output's chunks: whole chunks
    per block, as `blocks.plan_blocks` makes them). `channels`: the network's input channels (a 2.5-D
    network's neighbouring slices and the slice)."""
    tiles = plan_tiles(shape[1], shape[2], params.tile_size, multiple, params.overlap, params.batch_size)
    halo = halo_for(mode) if halo is None else tuple(int(h) for h in np.broadcast_to(halo, 3))
    if block is not None:
        return plan_blocks(shape, block, halo, chunks), tiles
    budget = default_memory_budget() if budget is None else budget
    share = float(budget)
    # A first guess by what every read voxel holds (the slices being labelled and the pass's tiles come
    # on top), made smaller until `block_bytes` fits.
    per_voxel = BYTES_PER_VOXEL_3D if mode == "3d" else KEPT_BYTES_PER_VOXEL
    while True:
        try:
            block = block_shape_for_memory(shape, per_voxel, share, halo, chunks)
        except ValueError:
            smallest = smallest_block_bytes(shape, tiles, halo, chunks, mode, channels)
            raise ValueError(f"blocks of a volume of {shape} need at least {smallest / 2**20:.0f} "
                             f"MiB (a {MIN_YX}-pixel block, or one chunk, with its halo and its tiles) but the memory budget is "
                             f"{budget / 2**20:.0f} MiB") from None
        blocks = plan_blocks(shape, block, halo, chunks)
        if largest_block_bytes(blocks, tiles, mode, channels) <= budget:
            return blocks, tiles
        share *= 0.9


def needs_blocks(shape, params: SegmentParams, multiple: int, budget: float, voxel_size=None) -> bool:
    """Whether a `(Z, H, W)` volume must go by blocks to stay within `budget` bytes: one slice's working
    memory (`BYTES_PER_PIXEL` of the padded slice for each slice labelled at once, and
    `TILE_BYTES_PER_PIXEL`) for objects found slice by slice, the volume's (`segment.BYTES_PER_VOXEL_3D` a voxel) for 3-D objects."""
    z_size, height, width = (int(n) for n in shape)
    tiles = plan_tiles(height, width, params.tile_size, multiple, params.overlap, params.batch_size)
    if instance_mode(params, voxel_size) == "3d":
        return z_size * height * width * BYTES_PER_VOXEL_3D > budget
    at_once = labelled_at_once(height * width, z_size)  # slices labelled together (their threads)
    return tiles.pad_h * tiles.pad_w * (at_once * BYTES_PER_PIXEL + TILE_BYTES_PER_PIXEL) > budget
