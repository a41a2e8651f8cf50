"""One 16384 x 16384 slice through `predict` by blocks (issue 25): peak resident memory of the predict
process against the slice's own float32 size (1 GiB) and the 2 GB target.

A uint8 slice of synthetic cells (a 2048 x 2048 synthetic EM patch, each copy mirrored differently, so
cells run across the copies' borders) is written as `.npy` (read by blocks, memory-mapped) in a temporary
folder and segmented with `python -m serving.predict` by a tiny U-Net trained for seconds on synthetic
data (the tests' TINY_TRAIN), in a process of its own whose peak RSS its parent reads when it ends
(`getrusage(RUSAGE_CHILDREN)`). Before, a slice and its probabilities had to fit: about 5x the slice's
float32 bytes.

    python bench/big_slice.py                       # 16384 x 16384, memory_gb 1.0
    python bench/big_slice.py --side 4096 --memory_gb 0.1   # a quick look
    python bench/big_slice.py --memory_gb 0.5 --input_format zarr --lean_mask_page

Measured (2 shared cores, 2026-12-01): the TF process with the model loaded holds 1.09 GB before any
block. memory_gb 0.75, .npy: 30 blocks, peak 2.48 GB; memory_gb 0.5, .npy: 56 blocks in 422 s, peak
2.38 GB (blocks 1.57-1.66 GB, the input's memory map growing to the slice's 0.27 GB; the peak is writing
the slice's mask page: `outputs.mask_page` holds a bool and a uint8 copy of the page besides the mask);
memory_gb 0.5, OME-Zarr input and a one-array mask page: peak 1.96 GB (blocks 1.39-1.51 GB).
After merging main (OpenVINO engine): memory_gb 0.5, .npy: 191 s, peak 2.31 GB (blocks 1.46-1.64 GB);
OME-Zarr input and a one-array mask page: 238 s, peak 1.91 GB (blocks 1.34-1.48 GB).
A .npy input mapped anew for each read (its pages no longer stay), blocks through `blocktask`: memory_gb
0.5, .npy: 604 s (machine load 5-6), peak 2.02 GB (blocks 1.28-1.31 GB; the peak at the end, writing the
mask page); with `mask_page` multiplying a bool mask without its `!= 0` copy: 463 s, peak **1.75 GB**
(blocks 1.22-1.28 GB, 1.42 GB while the model loads), 44716 cells: target met.
After the blocks' memory was counted per kept voxel (issue 25; 70 blocks) and slices labelled in threads
(issue 24): memory_gb 0.5, .npy: threads made anew for each block grew the process to a peak of 2.25 GB
(glibc's per-thread arenas keep what they were given; 2.16 GB by the last tenth, from 1.42); with
MALLOC_ARENA_MAX=1, 1.77 GB; with the threads made once per process (and none for a one-slice block):
197 s, peak **1.78 GB** (blocks 1.26-1.31 GB), 44687 cells: target met.
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

import mlflow  # noqa: E402
import numpy as np  # noqa: E402

from emunet.core.synthetic import synthetic_stack  # noqa: E402

TARGET_GB = 2.0
PATCH = 2048
# Peak RSS of a process, read by its parent after it ended (Linux: kB).
PEAK = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


# predict with `outputs.mask_page` making the page in one uint8 array (today: a bool copy, then a uint8
# copy, then the 0/255 product: twice the page more at once).
LEAN = ("import numpy as np, runpy, emunet.inference.outputs as o; "
        "o.mask_page = lambda m: np.multiply(np.asarray(m, bool), np.uint8(255), dtype=np.uint8); "
        "runpy.run_module('serving.predict', run_name='__main__')")


def write_slice(path: Path, side: int) -> None:
    """A `(1, side, side)` uint8 .npy (or, for a `.ome.zarr` path, OME-Zarr in 1024 x 1024 chunks) of
    synthetic cells, written a patch at a time."""
    patch = synthetic_stack(11, 0, (1, PATCH, PATCH))[0][0]
    if path.name.endswith(".ome.zarr"):
        from emunet.core.omezarr import create_image, open_image

        create_image(path, (1, side, side), np.uint8, (1, 1024, 1024))
        out = open_image(path)
    else:
        out = np.lib.format.open_memmap(path, "w+", np.uint8, (1, side, side))
    for i, y in enumerate(range(0, side, PATCH)):
        for j, x in enumerate(range(0, side, PATCH)):
            view = patch[::-1] if i % 2 else patch
            view = view[:, ::-1] if j % 2 else view
            out[0, y:y + PATCH, x:x + PATCH] = view[:side - y, :side - x]
    del out


def tiny_model(folder: Path, uri: str) -> str:
    """A tiny U-Net trained for seconds (the tests' TINY_TRAIN) on synthetic stacks; its model URI."""
    from emunet.core.dataset import write_dataset
    from pipeline.train import TrainConfig, train
    from tests.conftest import TINY_TRAIN

    mlflow.set_tracking_uri(uri)
    stacks = [dict(name=f"s{i}", split="val" if i == 2 else "train", image=image, mask=mask)
              for i, (image, mask) in enumerate(synthetic_stack(0, i, (4, 64, 64)) for i in range(3))]
    write_dataset(folder / "data", stacks)
    os.chdir(folder)
    return train(TrainConfig(dataset_uri=str(folder / "data"), **TINY_TRAIN))["model_uri"]


def poll_rss(proc: subprocess.Popen) -> list[tuple[float, int]]:
    """`(seconds, RSS bytes of the predict process)` every 0.2 s until `proc` (the PEAK wrapper) ends."""
    import psutil

    wrapper, start, out = psutil.Process(proc.pid), time.perf_counter(), []
    while proc.poll() is None:
        try:
            out.append((time.perf_counter() - start, sum(c.memory_info().rss for c in wrapper.children())))
        except psutil.Error:
            pass
        time.sleep(0.2)
    return out or [(0.0, 0)]


def tenths(timeline: list[tuple[float, int]]) -> list[float]:
    """The highest RSS (GB) in each tenth of the run."""
    end = timeline[-1][0] or 1
    return [max([r for t, r in timeline if k * end / 10 <= t <= (k + 1) * end / 10] or [0]) / 1e9 for k in range(10)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=16384)
    parser.add_argument("--memory_gb", type=float, default=1.0, help="predict's block budget (GiB)")
    parser.add_argument("--tmp", default=None)
    parser.add_argument("--input_format", choices=("npy", "zarr"), default="npy",
                        help="npy: memory-mapped (its pages stay in the process); zarr: read by chunks")
    parser.add_argument("--lean_mask_page", action="store_true",
                        help="what if outputs.mask_page made the 0/255 page in one array (now it does)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="big-slice-") as tmp:
        tmp = Path(tmp)
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        model_uri = tiny_model(tmp, uri)
        source = tmp / ("big.npy" if args.input_format == "npy" else "big.ome.zarr")
        write_slice(source, args.side)
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT)}
        start = time.perf_counter()
        entry = ["-c", LEAN] if args.lean_mask_page else ["-m", "serving.predict"]
        proc = subprocess.Popen([sys.executable, "-c", PEAK, sys.executable, *entry, "--output_format", "tif",
                                 "--model_uri", model_uri, "--input", str(source), "--output_dir", str(tmp / "out"),
                                 "--memory_gb", str(args.memory_gb)], env=env, cwd=tmp, stdout=subprocess.PIPE,
                                stderr=open(tmp / "stderr.txt", "w"), text=True)
        timeline = poll_rss(proc)
        stdout, _ = proc.communicate()
        seconds = time.perf_counter() - start
        stderr = (tmp / "stderr.txt").read_text()
        if proc.returncode:
            raise SystemExit(stderr[-3000:])
        bars = [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("big:")]
        peak = int(stdout.strip().splitlines()[-1]) * 1024
        from emunet.core.io import open_volume

        with open_volume(tmp / "out" / "big_mask.tif") as mask:
            assert mask.shape == (1, args.side, args.side)
            foreground = float(np.mean(np.asarray(mask[0:1, ::16, ::16]) > 0))
        rows = sum(1 for _ in open(tmp / "out" / "big_instances.csv")) - 1
        slice_f32 = args.side * args.side * 4
        print(f"predict, tiny U-Net, one {args.side} x {args.side} uint8 slice, memory_gb {args.memory_gb}: "
              f"{bars[-1] if bars else ''}")
        print(f"  {seconds:.0f} s; {rows} cells; foreground {foreground:.2f}")
        top = max(timeline, key=lambda t: t[1])
        print(f"  RSS polled every 0.2 s: highest {top[1] / 1e9:.2f} GB at {top[0]:.0f} s of {timeline[-1][0]:.0f} s; "
              "by tenths of the run: " + " ".join(f"{part:.2f}" for part in tenths(timeline)) + " GB")
        print(f"  peak RSS {peak / 1e9:.2f} GB; the slice's float32 size {slice_f32 / 1e9:.2f} GB; "
              f"target {TARGET_GB:.1f} GB: {'met' if peak <= TARGET_GB * 1e9 else 'NOT met'}")


if __name__ == "__main__":
    main()
