"""One OME-Zarr volume through `predict_spark` on Spark `local[2]` and through single-process `predict` in
the same run (issue 25): the same cells up to their numbering, and both throughputs.

A uint8 volume of synthetic cells (a synthetic EM stack of 512 x 512 slices, each copy mirrored
differently, so cells run across the copies' borders) is written as OME-Zarr in a temporary folder and
segmented with instance labels by a tiny U-Net trained for seconds on synthetic data (the tests'
TINY_TRAIN; `bench/big_slice.py`'s), once by `python -m serving.predict_spark --master local[2]` (blocks in
z, y and x, ids stitched across tasks) and once by `python -m serving.predict` (slice by slice). Each is
timed as the user sees it (the process's wall time, interpreter, model and Spark start included). The
label volumes are compared a slice at a time: their contingency (pairs of ids that share a voxel) is
one-to-one when the cells are the same up to renumbering; the same for the objects of each slice (an id's
pixels in one slice), which tells a difference of the slices' objects from one of their links; and
Spark's objects of each slice are linked again in one process by `SliceLinker` (whole slices), which
gives Spark's cells exactly when the blocks' summed counts link as whole slices do. The masks are
compared voxel by voxel.

    python bench/spark_volume.py --memory_gb 2                             # 64 x 2048 x 2048
    python bench/spark_volume.py --shape 16,1024,1024 --memory_gb 0.3      # a quick look, y split too

Measured (2 shared cores, load 1-3, 2026-12-01, blocks as planned after issue 25's whole-slice change),
`--memory_gb 2`: 4 blocks of 16 x 2048 x 2048; Spark 216 s (1.24 M voxels/s), one process 127 s (2.11 M
voxels/s), 0.59x; masks identical; cells 74423 both, one-to-one; instances tables equal but for the ids;
objects of each slice 86377 both, one-to-one. Before that change:

Measured (2 shared cores, everything under `nice -n 19`, load 6-8, 2026-12-01), `--memory_gb 2`: 32 blocks of
up to 16 x 512 x 1024; Spark 1608 s (0.17 M voxels/s), one process 280 s (0.96 M voxels/s), 0.17x; masks
identical; cells 74423 (predict) and 74713 (Spark), 74835 pairs: not one-to-one; objects of each slice
86377 and 86822, 86822 pairs: every object of Spark lies in one of predict's, 445 more pieces of predict's
objects cut at block faces (the tiny model's objects are large and ragged). The earlier run, before
`stitch.link_tables` (blocks linked their own slices; load 5-7): 767 s and 95 s; cells 74419 and 74784,
75125 pairs. `--shape 16,1024,1024 --memory_gb 0.6` (same conditions): 4 blocks of 16 x 512 x 512, 237 s
and 52 s, masks identical, cells 1412 and 1419, 1421 pairs; objects of each slice 1614 and 1626 (12 more
pieces: the same blocks in one process cut only the one object of half to two thirds of each slice);
Spark's objects linked again by `SliceLinker`: the same 1419 cells, so every remaining difference comes
from those pieces. `--shape 8,512,512 --chunks 4,256,256 --chunk_slices 4 --memory_gb 0.06`: 4 blocks,
masks identical, 48 cells one-to-one, objects of each slice one-to-one (58), instances tables equal but for
the ids.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from emunet.core.hardware import BF16_FLAGS, cpu_features, cpu_model  # noqa: E402
from emunet.core.synthetic import synthetic_stack  # noqa: E402

PATCH = 512
SLAB = 8  # slices compared at a time


def write_volume(path: Path, shape: tuple[int, int, int], chunks: tuple[int, int, int]) -> None:
    """A uint8 OME-Zarr volume of `shape` in `chunks` of synthetic cells, written a patch at a time."""
    from emunet.core.omezarr import create_image, open_image

    patch = synthetic_stack(11, 0, (shape[0], PATCH, PATCH))[0]
    create_image(path, shape, np.uint8, chunks, (0.05, 0.01, 0.01), "µm")  # serial sections: 2-D objects
    out = open_image(path)
    for i, y in enumerate(range(0, shape[1], PATCH)):
        for j, x in enumerate(range(0, shape[2], PATCH)):
            view = patch[:, ::-1] if i % 2 else patch
            view = view[:, :, ::-1] if j % 2 else view
            out[:, y:y + PATCH, x:x + PATCH] = view[:, :shape[1] - y, :shape[2] - x]


def run(command: list[str], env: dict, cwd: Path, log: Path) -> float:
    """Run `command`; its wall seconds, or exit with the end of its output when it fails."""
    start = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT).returncode
    if code:
        raise SystemExit(log.read_text()[-4000:])
    return time.perf_counter() - start


def _counts(pairs: set) -> dict:
    """Ids (or objects) in each of two labellings and their pairs sharing a voxel, from the pairs `(..., a, b)`."""
    cells = [p for p in pairs if p[-2] and p[-1]]
    return {"first": len({p[:-1] for p in pairs if p[-2]}), "second": len({(*p[:-2], p[-1]) for p in pairs if p[-1]}),
            "pairs": len(cells), "background_mismatch": len(pairs) - len(cells)}


def compare(first: Path, second: Path, depth: int) -> tuple[dict, dict]:
    """Ids of two label images (`<name>_labels.ome.zarr`) compared a slice at a time: counts of ids in each
    and of the pairs of ids that share a voxel (one-to-one: as many pairs as ids in each); the same for the
    objects of each slice (an id's pixels in one slice: with 2-D objects, one object found in that slice),
    which tells a difference of the slices' objects from one of their links."""
    from emunet.core.io import open_volume

    objects = set()
    with open_volume(first) as a, open_volume(second) as b:
        for z in range(0, depth, SLAB):
            left, right = np.asarray(a[z:z + SLAB]).astype(np.int64), np.asarray(b[z:z + SLAB]).astype(np.int64)
            for k, (one, two) in enumerate(zip(left, right)):
                keys = np.unique(one.ravel() * (2**32) + two.ravel())
                objects.update(zip([z + k] * len(keys), (keys >> 32).tolist(), (keys & (2**32 - 1)).tolist()))
    objects = {p for p in objects if p[1] or p[2]}
    return _counts({p[1:] for p in objects}), _counts(objects)


def relinked(labels: Path, depth: int) -> dict:
    """The cells of a label image against its slices' objects (each id's pixels in a slice) linked again
    in one process by `SliceLinker` on whole slices: `_counts` of the two (one-to-one: the ids are those
    links, whatever blocks counted them)."""
    from emunet.core.io import open_volume
    from emunet.inference.instances import SliceLinker

    linker, pairs = SliceLinker(), set()
    with open_volume(labels) as volume:
        for z in range(depth):
            ids = np.asarray(volume[z]).astype(np.int64)
            keys = np.unique(ids.ravel() * (2**32) + linker.ids(ids).ravel())
            pairs.update(zip((keys >> 32).tolist(), (keys & (2**32 - 1)).tolist()))
    pairs.discard((0, 0))
    return _counts(pairs)


def masks_differ(first: Path, second: Path, depth: int) -> int:
    from emunet.core.io import open_volume

    differ = 0
    with open_volume(first) as a, open_volume(second) as b:
        for z in range(0, depth, SLAB):
            differ += int((np.asarray(a[z:z + SLAB]) != np.asarray(b[z:z + SLAB])).sum())
    return differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="64,2048,2048", help="z,y,x of the volume")
    parser.add_argument("--chunks", default="16,512,512", help="z,y,x chunks of the volume (the blocks keep them)")
    parser.add_argument("--chunk_slices", type=int, default=16, help="predict_spark: most slices of a block")
    parser.add_argument("--memory_gb", type=float, default=0.0, help="predict_spark: a block's budget (0: default)")
    parser.add_argument("--tmp", default=None)
    args = parser.parse_args()
    shape = tuple(int(n) for n in args.shape.split(","))
    chunks = tuple(int(n) for n in args.chunks.split(","))
    from bench.big_slice import tiny_model
    from emunet.inference.engines import cpu_count

    features = cpu_features()
    flags = ", ".join(f"{flag} {'yes' if flag in features else 'no'}" for flag in (*BF16_FLAGS, "amx_tile", "avx512f"))
    print(f"CPU: {cpu_model()}, {cpu_count()} CPUs for this process; {flags}", flush=True)
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="spark-volume-") as tmp:
        tmp = Path(tmp)
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        model_uri = tiny_model(tmp, uri)
        source = tmp / "volume.ome.zarr"
        write_volume(source, shape, chunks)
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT), "PYSPARK_PYTHON": sys.executable}
        common = ["--model_uri", model_uri, "--input", str(source), "--save_labels", "true"]
        spark_s = run([sys.executable, "-m", "serving.predict_spark", *common, "--output_dir", str(tmp / "spark"),
                       "--master", "local[2]", "--chunk_slices", str(args.chunk_slices), "--memory_gb",
                       str(args.memory_gb)], env, tmp, tmp / "spark.log")
        one_s = run([sys.executable, "-m", "serving.predict", *common, "--output_dir", str(tmp / "one")], env, tmp,
                    tmp / "one.log")
        plan = [line for line in (tmp / "spark.log").read_text().replace("\r", "\n").splitlines()
                if line.startswith("volume: ")]
        found, per_slice = compare(tmp / "one" / "volume_labels.ome.zarr", tmp / "spark" / "volume_labels.ome.zarr",
                                   shape[0])
        again = relinked(tmp / "spark" / "volume_labels.ome.zarr", shape[0])
        differ = masks_differ(tmp / "one" / "volume_mask.ome.zarr", tmp / "spark" / "volume_mask.ome.zarr", shape[0])
        rows = [sorted(line.split(",")[1:] for line in open(tmp / out / "volume_instances.csv").read().splitlines()[1:])
                for out in ("one", "spark")]
        voxels = int(np.prod(shape))
        one_to_one, slices_one_to_one = (f["first"] == f["second"] == f["pairs"] and not f["background_mismatch"]
                                         for f in (found, per_slice))
        print(f"volume {shape[0]} x {shape[1]} x {shape[2]} uint8 OME-Zarr in chunks {chunks}, tiny U-Net, labels")
        print(f"  predict_spark local[2]: {plan[0] if plan else ''}; {spark_s:.0f} s, {voxels / spark_s / 1e6:.2f} M voxels/s")
        print(f"  predict (one process): {one_s:.0f} s, {voxels / one_s / 1e6:.2f} M voxels/s; "
              f"Spark / one process {one_s / spark_s:.2f}x")
        print(f"  masks: {differ} voxels differ; cells: predict {found['first']}, Spark {found['second']}, "
              f"pairs sharing voxels {found['pairs']} (+{found['background_mismatch']} with background): "
              f"{'one-to-one, same cells up to renumbering' if one_to_one else 'NOT one-to-one'}; "
              f"instances tables {'equal' if rows[0] == rows[1] else 'differ'} but for the ids")
        print(f"  objects of each slice: predict {per_slice['first']}, Spark {per_slice['second']}, pairs "
              f"{per_slice['pairs']} (+{per_slice['background_mismatch']} with background): "
              f"{'one-to-one' if slices_one_to_one else 'NOT one-to-one'}")
        print(f"  Spark's objects of each slice linked again by SliceLinker on whole slices: {again['first']} cells, "
              f"{again['second']} linked, {again['pairs']} pairs: "
              f"{'the same cells' if again['first'] == again['second'] == again['pairs'] else 'NOT the same'}")


if __name__ == "__main__":
    main()
