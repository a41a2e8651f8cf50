"""Larger than memory (issue 16): peak resident memory of the `predict` entry point on a 1 GB and an 8 GB
synthetic OME-Zarr volume, and slices/s from OME-Zarr against the same volume as TIFF.

1. Memory. Two uint8 OME-Zarr volumes of 1024 x 1024 slices in chunks of 16 x 512 x 512, one 8 times
   deeper than the other (1 GiB and 8 GiB), segmented by a tiny fresh U-Net (4 base filters, depth 2,
   working at 1/4 of the resolution) so that the run measures the pipeline (reading, tiling, instances,
   writing OME-Zarr results), not the network. Each `predict` runs in its own process; its peak RSS is the figure. Target: the larger within
   10 % of the smaller.
2. Speed. The default network (the `fast` preset's 16 filters, depth 4) on a 64 x 1024 x 1024 volume
   stored as OME-Zarr and as TIFF, in that order and again in reverse; slices/s of each (best of two).
   Target: OME-Zarr within 10 % of TIFF.

    python bench/predict_memory.py                     # both (the 8 GiB run takes a while on 2 cores)
    python bench/predict_memory.py --small_slices 64 --ratio 4    # a quick look: 64 MiB against 256 MiB
    python bench/predict_memory.py --no_speed

Volumes are written to a temporary folder (`--tmp`, default the system's) and removed afterwards.
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
import tifffile  # noqa: E402

from emunet.core.model import UNetSpec, build_unet, multiple_of  # noqa: E402
from emunet.core.omezarr import SliceWriter, create_image, open_image  # noqa: E402
from emunet.core.synthetic import synthetic_stack  # noqa: E402
from emunet.inference.segmenter import log_segmenter  # noqa: E402

SIDE = 1024
CHUNKS = (16, 512, 512)
# Peak RSS of a process, read by its parent after it ended (Linux: kB).
PEAK = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def slices(count: int):
    """`count` synthetic EM-like slices (cells and membranes): one block of 16, shifted slice by slice."""
    block, _ = synthetic_stack(7, 0, (16, SIDE, SIDE))
    for z in range(count):
        yield np.roll(block[z % 16], 3 * (z // 16), axis=1)


def write_zarr(path: Path, count: int) -> None:
    create_image(path, (count, SIDE, SIDE), np.uint8, CHUNKS, voxel_size=(30.0, 8.0, 8.0), unit="nm")
    with SliceWriter(open_image(path)) as write:
        for z, page in enumerate(slices(count)):
            write(z, page)


def write_tiff(path: Path, count: int) -> None:
    with tifffile.TiffWriter(path) as tif:
        for page in slices(count):
            tif.write(page, contiguous=True, photometric="minisblack")


def log_model(spec: UNetSpec, folder: Path, uri: str) -> str:
    """A fresh U-Net of `spec` logged as our pyfunc in the store at `uri`; returns its model URI."""
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run() as run:
        build_unet(spec).save(folder / f"unet{spec.base_filters}.keras")
        log_segmenter(folder / f"unet{spec.base_filters}.keras", {"multiple_of": multiple_of(spec)})
    return f"runs:/{run.info.run_id}/model"


def run_predict(model_uri: str, uri: str, source: Path, out: Path) -> tuple[float, float]:
    """`python -m serving.predict` in a process of its own: `(peak RSS in MiB, seconds)`."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK, sys.executable, "-m", "serving.predict", "--model_uri", model_uri,
                           "--input", str(source), "--output_dir", str(out)], env=env, cwd=out.parent,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return int(proc.stdout.strip().splitlines()[-1]) / 1024, seconds


def memory(tmp: Path, uri: str, small: int, ratio: int) -> None:
    model_uri = log_model(UNetSpec(depth=2, base_filters=4, input_scale=4), tmp, uri)
    peaks = {}
    for count in (small, small * ratio):
        path = tmp / f"vol{count}.ome.zarr"
        write_zarr(path, count)
        peak, seconds = run_predict(model_uri, uri, path, tmp / f"out{count}")
        written = open_image(tmp / f"out{count}" / f"vol{count}_mask.ome.zarr")
        assert written.shape == (count, SIDE, SIDE)
        gib = count * SIDE * SIDE / 2**30
        print(f"predict, tiny U-Net, OME-Zarr {count} x {SIDE} x {SIDE} uint8 ({gib:.2f} GiB): peak RSS {peak:.0f} MiB, "
              f"{seconds:.0f} s ({count / seconds:.1f} slices/s)", flush=True)
        peaks[count] = peak
        for leftover in (path, tmp / f"out{count}"):
            subprocess.run(["rm", "-rf", str(leftover)], check=True)
    a, b = peaks[small], peaks[small * ratio]
    print(f"peak RSS, {ratio}x the volume: {b:.0f} MiB against {a:.0f} MiB, ratio {b / a:.3f} "
          f"(target: within 10 %, i.e. <= 1.10)", flush=True)


def speed(tmp: Path, uri: str, count: int) -> None:
    model_uri = log_model(UNetSpec(depth=4, base_filters=16), tmp, uri)
    sources = {"tiff": tmp / "speed.tif", "ome-zarr": tmp / "speed.ome.zarr"}
    write_tiff(sources["tiff"], count)
    write_zarr(sources["ome-zarr"], count)
    best = {k: float("inf") for k in sources}
    for order in (("ome-zarr", "tiff"), ("tiff", "ome-zarr")):
        for kind in order:
            out = tmp / f"speed-{kind}"
            _, seconds = run_predict(model_uri, uri, sources[kind], out)
            best[kind] = min(best[kind], seconds)
            subprocess.run(["rm", "-rf", str(out)], check=True)
    rates = {k: count / s for k, s in best.items()}
    print(f"predict, default U-Net (16 filters, depth 4), {count} x {SIDE} x {SIDE}: TIFF {rates['tiff']:.2f} "
          f"slices/s, OME-Zarr {rates['ome-zarr']:.2f} slices/s, ratio {rates['ome-zarr'] / rates['tiff']:.3f} "
          f"(target: >= 0.90; whole process, model loading included)", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small_slices", type=int, default=1024, help="slices of the smaller volume (1024: 1 GiB)")
    parser.add_argument("--ratio", type=int, default=8, help="the larger volume is this many times deeper")
    parser.add_argument("--speed_slices", type=int, default=64)
    parser.add_argument("--no_memory", action="store_true")
    parser.add_argument("--no_speed", action="store_true")
    parser.add_argument("--tmp", default=None, help="folder for the volumes (needs (1 + ratio) x small GiB free)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        if not args.no_memory:
            memory(tmp, uri, args.small_slices, args.ratio)
        if not args.no_speed:
            speed(tmp, uri, args.speed_slices)


if __name__ == "__main__":
    main()
