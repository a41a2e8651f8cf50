"""Chunked arrays (Zarr, HDF5, MRC memory maps) as `Volume`s: their spatial axes, and the chunks a read will
touch checked for presence (an interrupted copy reads as holes otherwise; `emunet.core.io`)."""

import os
from pathlib import Path

import numpy as np

from emunet.core.errors import InputError
from emunet.core.io.volume import Volume, check_fits, read_dtype


def _spatial_axes(shape: tuple, names: list[str] | None, path) -> list:
    """For each stored axis, its name ("z", "y", "x") or 0 (a size-1 axis to drop). Named axes (OME-Zarr,
    ilastik) must include y and x, and any other axis must have size 1: more than one channel or time point
    is refused, as colour TIFFs are. Unnamed axes (plain arrays) lose their leading size-1 axes and what is
    left is read as (Y, X) or (Z, Y, X)."""
    if names is None:
        drop = 0
        while len(shape) - drop > 3 and shape[drop] == 1:
            drop += 1
        if len(shape) - drop not in (2, 3):
            raise InputError(f"{path}: expected a 2-D image or a (Z, H, W) stack but found shape {tuple(shape)}")
        return [0] * drop + list("zyx"[3 - (len(shape) - drop):])
    names = [str(n).lower() for n in names]
    if len(names) != len(shape) or not {"y", "x"} <= set(names) or len(set(names)) != len(names):
        raise InputError(f"{path}: expected axes including y and x, one for each of the shape's {len(shape)} "
                         f"dimensions, but found axes {names} for shape {tuple(shape)}")
    extra = {n: size for n, size in zip(names, shape) if n not in ("z", "y", "x") and size > 1}
    if extra:
        what = {"c": "channels", "t": "time points"}
        found = ", ".join(f"{size} {what.get(n, 'values along ' + n)}" for n, size in extra.items())
        raise InputError(f"{path}: expected a grayscale stack (Z, H, W) but found shape {tuple(shape)} with axes "
                         f"{''.join(names)!r} ({found}); save one channel and time point as its own image")
    return [n if n in ("z", "y", "x") else 0 for n in names]


def _chunk_keys(directory: Path) -> set[str]:
    """Every file under an array's folder as a `/`-joined relative key: one walk of the folder (nested for
    `/` separators, flat for `.`), metadata files left out."""
    keys = set()
    for root, _, files in os.walk(directory):
        rel = os.path.relpath(root, directory)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        keys.update(prefix + f for f in files if f not in (".zarray", ".zattrs", ".zgroup", "zarr.json"))
    return keys


FEW_CHUNKS = 256  # up to this many chunks (a tile, a Spark task's block) are looked up one by one, not listed


def _chunk_checker(array, axes: list, sparse: bool):
    """For a local Zarr array not written sparse: `((zs, ys, xs)) -> (missing, total, first missing keys,
    fill value)` over the stored chunks (shards when sharded) that the block meets; None otherwise."""
    root = getattr(getattr(array, "store", None), "root", None)
    if root is None or sparse or bool(dict(array.attrs).get(SPARSE_ATTR)) or not array.ndim:
        return None
    directory = Path(root) / array.path if array.path else Path(root)
    grid = tuple(int(c) for c in (getattr(array, "shards", None) or array.chunks))
    encode = array.metadata.encode_chunk_key
    listing = {}

    def check(block: tuple) -> tuple:
        spans = dict(zip("zyx", block))
        ranges = []
        for name, n, c in zip(axes, array.shape, grid):
            span = spans.get(name, slice(0, 1)) if name else slice(0, 1)
            ranges.append(range(span.start // c, -(-min(span.stop, n) // c)))
        total = int(np.prod([len(r) for r in ranges]))
        if total <= FEW_CHUNKS and "keys" not in listing:  # a small block of a big array: ask for its keys only
            present = None
        else:
            if "keys" not in listing:  # one walk of the folder per opened volume
                listing["keys"] = _chunk_keys(directory)
            present = listing["keys"]
        first, missing = [], 0
        for coords in np.ndindex(*[len(r) for r in ranges]):
            key = encode(tuple(r[i] for r, i in zip(ranges, coords)))
            if (key not in present) if present is not None else not (directory / key).is_file():
                missing += 1
                if len(first) < 3:
                    first.append(key)
        return missing, total, first, array.fill_value

    return check


def _array_volume(path, array, names: list[str] | None = None, copy: bool = False, close=lambda: None,
                  sparse: bool = False, **calibration) -> Volume:
    """A `Volume` over anything indexed like numpy with slices (a Zarr array, an HDF5 dataset, a memmap), read
    block by block. `copy` detaches blocks from a memory map that `close` unmaps."""
    axes = _spatial_axes(tuple(array.shape), names, path)
    kept = [n for n in axes if n]
    order = [kept.index(n) for n in "zyx" if n in kept]
    sizes = dict(zip(axes, array.shape))
    shape = (sizes.get("z", 1), sizes["y"], sizes["x"])
    dtype = read_dtype(np.dtype(array.dtype).newbyteorder("="), path)
    if min(shape) == 0:
        raise InputError(f"{path}: the stack is empty (shape {tuple(array.shape)})")
    check_fits(path, shape[1:], dtype, "one slice of the header", "crop the slices")

    def read_block(a: int, b: int, ys: slice = slice(None), xs: slice = slice(None)) -> np.ndarray:
        key = tuple({"z": slice(a, b), "y": ys, "x": xs}.get(n, 0) for n in axes)
        try:
            out = np.asarray(array[key]).transpose(order)
        except Exception as exc:  # a corrupt chunk, a truncated file: codec errors, OSError, ...
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            which = f"slice {a}" if b - a == 1 else f"slices {a}-{b - 1}"
            raise InputError(f"{path}: {which} is not readable, the data may be truncated or "
                             f"corrupt ({reason})") from None
        if "z" not in sizes:  # a 2-D image is slice 0
            out = out[None][a:b]
        return np.array(out, dtype) if copy else out.astype(dtype, copy=False)

    stored = getattr(array, "chunks", None)
    chunks = dict(zip(axes, stored)) if isinstance(stored, tuple) and len(stored) == len(axes) else None
    checker = _chunk_checker(array, axes, sparse) if type(array).__module__.startswith("zarr") else None
    return Volume(Path(str(path)), shape, dtype, lambda a, b: read_block(a, b), close=close,
                  read_block=read_block, chunks=tuple(chunks.get(n, 1) for n in "zyx") if chunks else None,
                  missing_chunks=checker, **calibration)
SPARSE_ATTR = "sparse_chunks"  # an array (or image group) attribute: absent chunks are the fill value by design
