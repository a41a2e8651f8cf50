"""Same answers in bfloat16 (issue 24): trained models scored on held-out slices in float32 and bfloat16,
and a bfloat16-trained model against a float32-trained one under the same time budget, in one run.

    python bench/precision_quality.py                         # ISBI and VNC, 10 minutes per training
    python bench/precision_quality.py --minutes 3             # shorter trainings (the budget is printed)
    python bench/precision_quality.py --datasets vnc --minutes 3

1. Inference precision, same weights. Each trained model segments its held-out slices with the served
   pyfunc (tiles, blending, normalisation: `StackSegmenter.segment`) on three engines: TensorFlow float32
   (the reference), OpenVINO float32 and OpenVINO bfloat16 (what `precision=auto` serves on a CPU with
   bfloat16 units). Printed for each against the reference: the largest and mean |probability
   difference|, Dice and object F1 (the pipeline's own scoring, `emunet.inference.segment`, as
   `bench/time_to_quality.py` scores) and their differences. Target: probabilities within 0.02, Dice and
   object F1 within 0.003.
2. Training precision, same data and budget. ISBI is trained twice with the default recipe, once in
   float32 and once in mixed_bfloat16, each for `--minutes` of wall time, one after the other; both are
   scored on the same held-out slices with the same engines. Printed: epochs done, training images/s,
   held-out Dice and object F1 of each. Target: bfloat16 reaches float32's quality in the same time.
   VNC is trained once, in float32 (a model trained where bfloat16 does not pay, served where it does).

Held out as in `bench/time_to_quality.py`: ISBI slices 24-29 (figure: the cell interior's Dice, and the
mean two-class Dice), VNC stack1's annotated held-out slices 16, 17 and 19 (mitochondria). Objects: the
4-connected components of the labels in each slice against what `output="labels"` finds (seeded
watershed), matched one to one at IoU >= 0.5. The machine is shared: trainings run one after the other,
so a busier moment costs one arm epochs; the images/s printed for each show it.
"""

import argparse
import os
from collections import Counter
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mlflow  # noqa: E402
import numpy as np  # noqa: E402

from bench.time_to_quality import DATASETS, scored, scores  # noqa: E402
from emunet.core.hardware import BF16_FLAGS, cpu_features, cpu_model  # noqa: E402
from emunet.core.io import read_mask, read_volume  # noqa: E402
from emunet.core.normalize import stack_stats  # noqa: E402
from emunet.inference.engines import cpu_count  # noqa: E402
from pipeline.preprocess import PreprocessConfig, preprocess, unlabelled_slices  # noqa: E402
from pipeline.train import TrainConfig, train  # noqa: E402

# (engine, precision) of each way of serving; the first is the reference the others are compared with.
SERVINGS = {"TF float32": ("tensorflow", "float32"), "OpenVINO float32": ("openvino", "float32"),
            "OpenVINO bfloat16": ("openvino", "bfloat16")}
TARGETS = {"prob_max": 0.02, "dice": 0.003, "object_f1": 0.003}
# What each dataset's models are trained in: ISBI both ways (part 2), VNC in float32.
TRAININGS = {"isbi": ("float32", "mixed_bfloat16"), "vnc": ("float32",)}


def held_out(name: str) -> tuple:
    """`(image, low, high, slices, truth)`: the source stack, its intensity window (as preprocess
    computes it), the held-out slices that are annotated and their `(Z, H, W)` bool truth."""
    dataset = DATASETS[name]
    image = read_volume(Path(dataset["images"]))
    labels = read_mask(Path(dataset["labels"]), image.shape, Path(dataset["images"]))
    a, b = (int(v) for v in dataset["val_slices"].split(":"))
    unlabelled = set(unlabelled_slices(labels))
    slices = [z for z in range(a, b) if z not in unlabelled]
    low, high = stack_stats(image)
    return image, low, high, slices, labels[slices] > 0


def quality(name: str, prob: np.ndarray, truth: np.ndarray) -> dict:
    """Dice and object F1 with the pipeline's own scoring (default params: threshold 0.5, seeded
    watershed); for ISBI also the mean two-class Dice of `bench/time_to_quality.py`."""
    pooled = scored(prob, truth)
    metrics = pooled.metrics()
    out = {"dice": metrics["dice"], "object_f1": metrics["object_f1"]}
    if name == "isbi":
        out["mean_two_class_dice"] = scores(name, prob, truth)["mean_two_class_dice"]
    # how many objects one F1 step is: a 0.003 tolerance is less than one object among a hundred
    out.update({f"objects_{k}": pooled.objects.counts[k] for k in ("matched", "predicted", "true")})
    return out


def shown(values: dict, signed: bool = False) -> str:
    return "  ".join(f"{k} {v:+d}" if isinstance(v, int) and signed else f"{k} {v}" if isinstance(v, int)
                     else f"{k} {v:+.4f}" if signed else f"{k} {v:.4f}" for k, v in values.items())


def train_model(prepared: dict, minutes: float, precision: str, seed: int) -> dict:
    """Train the default recipe for `minutes` in `precision`; the segmenter, epochs and images/s."""
    start = time.perf_counter()
    result = train(TrainConfig(dataset_uri=prepared["dataset_uri"], max_minutes=minutes, precision=precision,
                               seed=seed))
    seconds = time.perf_counter() - start
    params = mlflow.get_run(result["run_id"]).data.params
    images = result["epochs"] * int(params["steps_per_epoch"]) * int(params["global_batch_size"])
    return {"segmenter": mlflow.pyfunc.load_model(result["model_uri"]).unwrap_python_model(),
            "epochs": result["epochs"], "images_per_sec": images / seconds, "minutes": seconds / 60,
            "policy": params["dtype_policy"], "val_dice": result["val_dice"]}


def convolutions_run_in(forward) -> str:
    """For an OpenVINO forward, how many of its compiled convolutions run in each precision (bfloat16
    keeps the encoder's first blocks in float32: `engines.encoder_in_float32`)."""
    compiled = getattr(forward, "_compiled", None)
    if not compiled:
        return ""
    runtime = next(iter(compiled.values()))[0].get_runtime_model()
    kinds = Counter(op.get_rt_info()["runtimePrecision"].astype(str) for op in runtime.get_ordered_ops()
                    if op.get_rt_info()["layerType"].astype(str) in ("Convolution", "Deconvolution"))
    return "  (convolutions run in " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) + ")"


def compare_servings(name: str, label: str, segmenter, data: tuple) -> dict:
    """Held-out figures of one model on each serving (`SERVINGS`), printed against the first."""
    image, low, high, slices, truth = data
    probs, figures = {}, {}
    for serving, (engine, precision) in SERVINGS.items():
        start = time.perf_counter()
        probs[serving] = segmenter.segment(image[slices], low, high, output="probability", engine=engine,
                                           precision=precision)
        seconds = time.perf_counter() - start  # includes the conversion and compilation of the engine
        figures[serving] = quality(name, probs[serving], truth)
        print(f"  {label}, {serving:18s} ({seconds:5.1f} s with compilation): {shown(figures[serving])}"
              f"{convolutions_run_in(segmenter.forwards.get((engine, precision)))}", flush=True)
    reference = next(iter(SERVINGS))
    for serving in list(SERVINGS)[1:]:
        diff = np.abs(probs[serving] - probs[reference])
        deltas = {k: figures[serving][k] - figures[reference][k] for k in figures[reference]}
        met = (diff.max() <= TARGETS["prob_max"] and abs(deltas["dice"]) <= TARGETS["dice"]
               and abs(deltas["object_f1"]) <= TARGETS["object_f1"])
        print(f"  {label}, {serving} - {reference}: prob. diff max {diff.max():.4f} mean {diff.mean():.5f}  " +
              shown({f"d{k}": v for k, v in deltas.items()}, signed=True) +
              f"  (targets: max {TARGETS['prob_max']}, Dice and object F1 within {TARGETS['dice']}: "
              f"{'met' if met else 'NOT met'})", flush=True)
    return figures


def run_dataset(name: str, minutes: float, seed: int) -> None:
    dataset = DATASETS[name]
    data = held_out(name)
    print(f"\n{name}: held-out slices {', '.join(map(str, data[3]))}, {minutes} min of training each, "
          f"default recipe", flush=True)
    prepared = preprocess(PreprocessConfig(images=str(dataset["images"]), labels=str(dataset["labels"]),
                                           val_slices=dataset["val_slices"]))
    trained = {}
    for precision in TRAININGS[name]:
        model = train_model(prepared, minutes, precision, seed)
        print(f"{name}, trained in {model['policy']}: {model['epochs']} epochs in {model['minutes']:.1f} min "
              f"({model['images_per_sec']:.1f} images/s), best val_dice {model['val_dice']:.4f}", flush=True)
        trained[precision] = (model, compare_servings(name, f"trained in {model['policy']}", model["segmenter"], data))
        model.pop("segmenter")
    if len(trained) < 2:
        return
    (f32, f32_figures), (bf16, bf16_figures) = trained["float32"], trained["mixed_bfloat16"]
    print(f"{name}: trained in mixed_bfloat16 against float32, {minutes} min each (same data, same seed):", flush=True)
    for serving in SERVINGS:
        deltas = {k: bf16_figures[serving][k] - f32_figures[serving][k] for k in f32_figures[serving]}
        reached = deltas["dice"] >= -TARGETS["dice"] and deltas["object_f1"] >= -TARGETS["object_f1"]
        print(f"  scored with {serving:18s}: epochs {bf16['epochs']} vs {f32['epochs']}, " +
              "  ".join(f"{k} {bf16_figures[serving][k]:.4f} vs {f32_figures[serving][k]:.4f} ({v:+.4f})"
                        for k, v in deltas.items() if not k.startswith("objects_")) +
              f"  (target: bfloat16 at float32's quality, within {TARGETS['dice']}: "
              f"{'met' if reached else 'NOT met'})", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-time budget of each training")
    parser.add_argument("--datasets", default="isbi,vnc")
    parser.add_argument("--seed", type=int, default=0, help="training seed of every model")
    args = parser.parse_args()
    features = cpu_features()
    print(f"CPU: {cpu_model()}, {cpu_count()} CPUs for this process; " +
          ", ".join(f"{flag} {'yes' if flag in features else 'no'}" for flag in (*BF16_FLAGS, "amx_tile", "avx512f")),
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        mlflow.set_tracking_uri(f"sqlite:///{Path(tmp) / 'mlflow.db'}")
        mlflow.set_experiment("precision-quality")
        for name in args.datasets.split(","):
            if not DATASETS[name]["images"].exists():
                print(f"{name}: skipped, {DATASETS[name]['images']} is absent")
                continue
            run_dataset(name, args.minutes, args.seed)


if __name__ == "__main__":
    main()
