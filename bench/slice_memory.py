"""What one slice costs to segment (issue 21): peak resident memory that predict's per-slice path adds,
per pixel of the slice, measured on square uint8 slices of a few sizes.

The path measured is predict's own (`serving.predict.predict_stack`, through the one segmentation path
`emunet.inference.segment.segment_volume`, objects per slice): the slice read from a TIFF, normalised
to float32, mirror-padded, cut into tiles whose outputs are blended into Gaussian-weighted sums and
weights, the probabilities, the mask, the instances (`emunet.inference.instances.slice_instances`:
connected components, seeds, watershed), their 3-D ids, and the writers (`result_files`). The network is a
tiny fresh U-Net (4 base filters, depth 2) so that the figure is the pipeline's, not the network's: a
forward pass holds at most `MAX_BATCH_PIXELS` pixels whatever the slice size, so the network adds a fixed
amount, not an amount per pixel.

Each size runs in a process of its own: it segments a 1024 x 1024 slice first (TensorFlow loaded, the
forward pass compiled for the 1024 tile every size uses), then resets the kernel's peak-RSS mark
(`/proc/self/clear_refs`), segments the measured slice and reads the new peak (`VmHWM`). Two variants:
`plain` (predict's defaults: mask and objects tables) and `full` (also probabilities, instance labels and
scoring against a label slice: the most predict does per slice). And two networks: the tiny U-Net, and an
'identity' one whose probabilities are the image (the watershed on most of the slice: the costly case).

    python bench/slice_memory.py                         # 2048, 4096, 8192 (20-30 minutes on 2 cores)
    python bench/slice_memory.py --sizes 1024 2048 --seeds 0 1 2 -1 --variants plain

Prints, per size and variant, the added peak and bytes per pixel beside the slice's own bytes (1 per
pixel), then the slope between the two largest sizes; `emunet.inference.preflight` takes the larger of the
slope and the settled per-pixel figures (BYTES_PER_PIXEL, SCORED_BYTES_PER_PIXEL for `full`). Small
slices understate it (memory the warm-up freed stays resident and is reused, and arrays under glibc's
mmap threshold come from the heap); from 4096 x 4096 on, every per-slice array is mapped and unmapped
on its own, and the slope is the cost of one more pixel.
"""

import argparse
import gc
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import tifffile  # noqa: E402

WARM = 1024


def status_kib(field: str) -> int:
    """A `VmRSS` / `VmHWM` line of /proc/self/status, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def write_inputs(folder: Path, side: int) -> tuple[Path, Path]:
    """A `side` x `side` uint8 EM-like slice (a synthetic 1024 slice tiled) and its cell mask, as TIFFs."""
    from emunet.core.synthetic import synthetic_stack

    image, mask = synthetic_stack(7, 0, (1, WARM, WARM))
    reps = -(-side // WARM)
    image, mask = (np.tile(a[0], (reps, reps))[:side, :side] for a in (image, mask))
    paths = folder / f"slice{side}.tif", folder / f"slice{side}_gt.tif"
    tifffile.imwrite(paths[0], image[None], photometric="minisblack")
    tifffile.imwrite(paths[1], (mask[None] * 255).astype(np.uint8), photometric="minisblack")
    return paths


def segmenter(seed: int):
    """The segmenter of our pyfunc around a tiny fresh U-Net (weights drawn with `seed`), without MLflow
    (what `StackSegmenter.load_context` sets up). `seed` -1: the 'identity' network, whose probabilities are the normalised image
    itself (the synthetic cells' bright interiors, noisy cores): touching objects with several cores each,
    so the watershed runs on most of the slice, which a fresh network's near-flat output rarely makes it do."""
    import keras

    from emunet.core.model import UNetSpec, build_unet, multiple_of
    from emunet.inference.segment import Segmenter
    from emunet.inference.segmenter import compiled_forward

    keras.utils.set_random_seed(max(seed, 0))
    spec = UNetSpec(depth=2, base_filters=4)
    forward = compiled_forward(build_unet(spec)) if seed >= 0 else lambda tiles: np.asarray(tiles, np.float32)
    return Segmenter(forward, multiple_of(spec))


def child(image: Path, truth: Path, warm: tuple[Path, Path], variant: str, seed: int, out: Path) -> None:
    """Segment `warm`, reset the peak mark, segment `image`; print the added peak in bytes."""
    from emunet.core.io import open_volume
    from emunet.inference.segment import VolumeScores
    from serving.predict import PredictConfig, predict_stack

    full = variant == "full"
    cfg = PredictConfig(save_probability=full, save_labels=full)
    seg = segmenter(seed)

    def run(paths: tuple[Path, Path], name: str) -> None:
        with open_volume(paths[0]) as stack, open_volume(paths[1]) as labels:
            predict_stack(seg, stack, name, cfg, out, labels if full else None, scores=VolumeScores())

    run(warm, "warm")
    gc.collect()
    base = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    run((image, truth), "measured")
    print(f"added {(status_kib('VmHWM') - base) * 1024}")


def measure(image: Path, truth: Path, warm: tuple[Path, Path], variant: str, seed: int, folder: Path) -> int:
    out = folder / f"out-{image.stem}-{variant}-{seed}"
    out.mkdir()
    proc = subprocess.run([sys.executable, __file__, "--child", str(image), str(truth), str(warm[0]), str(warm[1]),
                           variant, str(seed), str(out)], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    subprocess.run(["rm", "-rf", str(out)], check=True)
    return int(proc.stdout.strip().splitlines()[-1].split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--variants", nargs="+", default=["plain", "full"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, -1],
                        help="networks per size: a fresh U-Net's weights drawn with this seed, -1 the 'identity' "
                             "network (see `segmenter`); the largest figure counts, as the instances step costs "
                             "more where the network finds more touching objects")
    parser.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        image, truth, warm_image, warm_truth, variant, seed, out = args.child
        child(Path(image), Path(truth), (Path(warm_image), Path(warm_truth)), variant, int(seed), Path(out))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        warm = write_inputs(folder, WARM)
        slope = {}
        for variant in args.variants:
            added = {}
            for side in sorted(args.sizes):
                paths = write_inputs(folder, side)
                runs = [measure(*paths, warm, variant, seed, folder) for seed in args.seeds]
                added[side], pixels = max(runs), side * side
                print(f"{variant:5s} {side:5d} x {side:<5d} slice {pixels / 2**20:6.1f} MiB (1 B/pixel, uint8): "
                      f"peak +{added[side] / 2**20:7.1f} MiB = {added[side] / pixels:5.1f} B/pixel (largest of "
                      f"{', '.join(f'{r / pixels:.1f} (seed {s})' for s, r in zip(args.seeds, runs))})", flush=True)
            a, b = sorted(args.sizes)[-2:]
            slope[variant] = (added[b] - added[a]) / (b * b - a * a)
            fixed = added[b] - slope[variant] * b * b
            print(f"{variant:5s} slope {a}->{b}: {slope[variant]:.1f} B/pixel, intercept {fixed / 2**20:+.0f} MiB",
                  flush=True)


if __name__ == "__main__":
    main()
