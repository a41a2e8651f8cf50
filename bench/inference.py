"""Inference benchmark (issues 4 and 15): slices/s of our tiled, batched inference against a naive loop of
`model.predict` one whole slice at a time, on the same model in the same run; the time per slice with
and without the instance step of `output="labels"` (seeded watershed + linking through the slices); then
the peak resident memory of the `predict` entry point on a large synthetic stack.

The instance step's cost depends on what it is given: a fresh network's probabilities are a haze around
0.5 with no structure, so it is also timed on probability maps shaped like a trained model's, the
dataset's own labels blurred (Gaussian, sigma 2 px) so that cells are sure in the middle and unsure at
their borders.

    python bench/inference.py                        # ISBI 30 x 512 x 512, VNC 20 x 1024 x 1024, 200 x 2048 x 2048
    python bench/inference.py --memory_slices 20     # a shorter memory run
    python bench/inference.py --memory_slices 0      # speed only

Speed does not depend on the weights, so the model is a freshly built 8-filter, depth-4 U-Net unless
`--model_uri` names a logged one. Prints one line per figure.
"""

import argparse
import os
import resource
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

from emunet.core.model import UNetSpec, build_unet  # noqa: E402
from emunet.core.normalize import normalize, stack_stats  # noqa: E402
from emunet.inference.segmenter import compiled_forward, log_segmenter  # noqa: E402
from emunet.inference.instances import label_instances  # noqa: E402
from emunet.inference.tiling import predict_probabilities  # noqa: E402

SHARED = ROOT.parent / "shared" / "datasets"
STACKS = {"isbi 30x512x512": SHARED / "isbi2012" / "train-volume.tif",
          "vnc 20x1024x1024": SHARED / "vnc" / "stack1-raw.tif"}
LABELS = {"isbi 30x512x512": SHARED / "isbi2012" / "train-labels.tif",
          "vnc 20x1024x1024": SHARED / "vnc" / "stack1-mitochondria.tif"}


def naive(model, stack, low, high):
    return np.stack([model.predict(normalize(s, low, high)[None, ..., None], verbose=0)[0, ..., 0] for s in stack])


def timed(fn, *args, repeat=2):
    fn(*args)  # warm-up: graph tracing for this shape
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - start)
    return best


def speed(model, spec, naive_too: bool = True):
    for name, path in STACKS.items():
        if not path.exists():
            print(f"{name}: skipped, {path} is absent")
            continue
        stack = tifffile.imread(path)
        low, high = stack_stats(stack)
        forward = compiled_forward(model)  # what the pyfunc segmenter runs
        ours = timed(lambda: predict_probabilities(forward, stack, low, high, multiple=2**spec.depth))
        n = stack.shape[0]
        if naive_too:
            base = timed(lambda: naive(model, stack, low, high))
            print(f"{name}: ours {n / ours:.2f} slices/s, naive model.predict loop {n / base:.2f} slices/s, "
                  f"ratio {base / ours:.2f}x", flush=True)
        else:
            print(f"{name}: ours {n / ours:.2f} slices/s", flush=True)
        probs = predict_probabilities(forward, stack, low, high, multiple=2**spec.depth)
        maps = {"this model's probabilities": probs}
        if LABELS[name].exists():
            import cv2
            maps["blurred labels"] = np.stack([cv2.GaussianBlur((t > 0).astype(np.float32), (0, 0), 2.0)
                                               for t in tifffile.imread(LABELS[name])[:n]])
        for what, prob in maps.items():
            step = timed(lambda: label_instances(prob, 0.5, 0.9, 20))
            print(f"{name}: instance step on {what}: {1000 * step / n:.1f} ms a slice against "
                  f"{1000 * ours / n:.1f} ms of inference: +{100 * step / ours:.1f} % "
                  f"({int(label_instances(prob, 0.5, 0.9, 20).max())} objects; target: at most +20 %)", flush=True)


def memory(model, slices: int):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = tmp / "big.tif"
        rng = np.random.default_rng(0)
        page = rng.integers(0, 255, (2048, 2048), dtype=np.uint8)
        with tifffile.TiffWriter(path) as tif:
            for z in range(slices):
                tif.write(np.roll(page, z * 7, axis=1), contiguous=True, photometric="minisblack")
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        mlflow.set_tracking_uri(uri)
        with mlflow.start_run() as run:
            model.save(tmp / "unet.keras")
            log_segmenter(tmp / "unet.keras", {"multiple_of": 16})
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT)}
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "serving.predict", "--model_uri", f"runs:/{run.info.run_id}/model",
                               "--input", str(path), "--output_dir", str(tmp / "out")], env=env, cwd=tmp,
                              capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        out = tifffile.TiffFile(tmp / "out" / "big_mask.tif")
        print(f"predict on {slices} x 2048 x 2048 uint8 ({path.stat().st_size / 1e9:.2f} GB): peak resident memory "
              f"{peak_mb:.0f} MB, {seconds:.0f} s, {len(out.pages)} mask slices written")
        out.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_uri", default="", help="a logged pyfunc segmenter; default: a fresh 8-filter, depth-4 U-Net")
    parser.add_argument("--memory_slices", type=int, default=200, help="0: skip the memory run")
    parser.add_argument("--no_speed", action="store_true", help="skip the speed comparison")
    parser.add_argument("--base_filters", type=int, default=8, help="of the fresh U-Net (16: the `fast` preset's)")
    parser.add_argument("--no_naive", action="store_true", help="skip the naive loop (instance step and ours only)")
    args = parser.parse_args()
    spec = UNetSpec(depth=4, base_filters=args.base_filters)
    if args.model_uri:
        segmenter = mlflow.pyfunc.load_model(args.model_uri).unwrap_python_model()
        model, spec = segmenter.keras_model, UNetSpec(**segmenter.meta.get("spec", {}))
    else:
        model = build_unet(spec)
    print(f"model: {model.count_params():,} parameters, depth {spec.depth}, {spec.base_filters} base filters")
    if not args.no_speed:
        speed(model, spec, naive_too=not args.no_naive)
    if args.memory_slices:
        memory(model, args.memory_slices)


if __name__ == "__main__":
    main()
