"""One OME-Zarr volume through `predict_spark` on Spark `local[2]` and through single-process `predict` in
the same run (issue 25): the same cells up to their numbering, and both throughputs.

A uint8 volume of synthetic cells (a synthetic EM stack of 512 x 512 slices, each copy mirrored
differently, so cells run across the copies' borders) is written as OME-Zarr in a temporary folder and
segmented with instance labels by a tiny U-Net trained for seconds on synthetic data (the tests'
TINY_TRAIN; `bench/big_slice.py`'s), once by `python -m serving.predict_spark --master local[2]` (blocks in
z, y and x, ids stitched across tasks) and once by `python -m serving.predict` (slice by slice). Each is
timed as the user sees it (the process's wall time, interpreter, model and Spark start included). The
label volumes are compared a slab at a time: their contingency (pairs of ids that share a voxel) is
one-to-one when the cells are the same up to renumbering; the masks are compared voxel by voxel.

    python bench/spark_volume.py                                  # 64 x 2048 x 2048
    python bench/spark_volume.py --shape 16,1024,1024 --memory_gb 0.25   # a quick look, y and x split too

Measured (2 shared cores, load 5-7, 2026-12-01), `--memory_gb 2`: 32 blocks of up to 16 x 512 x 1024; Spark
767 s (0.35 M voxels/s), one process 95 s (2.83 M voxels/s); masks identical; cells 74419 (predict) and
74784 (Spark), 75125 pairs: not one-to-one. `--shape 8,512,512 --chunks 4,256,256 --chunk_slices 4
--memory_gb 0.06`: 4 blocks, masks identical, 48 cells one-to-one, instances tables equal but for the ids.
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


def compare(first: Path, second: Path, depth: int) -> dict:
    """Ids of two label images (`<name>_labels.ome.zarr`) compared a slab at a time: counts of ids in each
    and of the pairs of ids that share a voxel (one-to-one: as many pairs as ids in each)."""
    from emunet.core.io import open_volume

    pairs = set()
    with open_volume(first) as a, open_volume(second) as b:
        for z in range(0, depth, SLAB):
            left, right = np.asarray(a[z:z + SLAB]).astype(np.int64), np.asarray(b[z:z + SLAB]).astype(np.int64)
            keys = np.unique(left.ravel() * (2**32) + right.ravel())
            pairs.update(zip((keys >> 32).tolist(), (keys & (2**32 - 1)).tolist()))
    pairs.discard((0, 0))
    cells = [p for p in pairs if p[0] and p[1]]
    return {"first": len({a for a, _ in pairs if a}), "second": len({b for _, b in pairs if b}), "pairs": len(cells),
            "background_mismatch": len(pairs) - len(cells)}


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
        found = compare(tmp / "one" / "volume_labels.ome.zarr", tmp / "spark" / "volume_labels.ome.zarr", shape[0])
        differ = masks_differ(tmp / "one" / "volume_mask.ome.zarr", tmp / "spark" / "volume_mask.ome.zarr", shape[0])
        rows = [sorted(line.split(",")[1:] for line in open(tmp / out / "volume_instances.csv").read().splitlines()[1:])
                for out in ("one", "spark")]
        voxels = int(np.prod(shape))
        one_to_one = found["first"] == found["second"] == found["pairs"] and not found["background_mismatch"]
        print(f"volume {shape[0]} x {shape[1]} x {shape[2]} uint8 OME-Zarr in chunks {chunks}, tiny U-Net, labels")
        print(f"  predict_spark local[2]: {plan[0] if plan else ''}; {spark_s:.0f} s, {voxels / spark_s / 1e6:.2f} M voxels/s")
        print(f"  predict (one process): {one_s:.0f} s, {voxels / one_s / 1e6:.2f} M voxels/s; "
              f"Spark / one process {one_s / spark_s:.2f}x")
        print(f"  masks: {differ} voxels differ; cells: predict {found['first']}, Spark {found['second']}, "
              f"pairs sharing voxels {found['pairs']} (+{found['background_mismatch']} with background): "
              f"{'one-to-one, same cells up to renumbering' if one_to_one else 'NOT one-to-one'}; "
              f"instances tables {'equal' if rows[0] == rows[1] else 'differ'} but for the ids")


if __name__ == "__main__":
    main()
