"""Sparse labels (issue 5): what `ignore_label` is worth on real data. VNC mitochondria (stack1, slices 0-15
train, 16-19 held out, as `bench/time_to_quality.py`), with only every `--every`-th training slice annotated
(0, 4, 8, 12): trained twice under the same time budget with the default recipe, and scored on the
annotated held-out slices 16, 17 and 19 with full-slice inference (the served pyfunc).

    python bench/sparse_labels.py                  # 5 minutes per arm
    python bench/sparse_labels.py --minutes 2 --every 4 --seed 1

- ignore: the other training slices' labels are the ignore value (255): the loss never sees them and the
  sampler draws crops from the annotated slices only.
- background: the same slices left as background (0), what a user without `ignore_label` would do: the
  network is told that the mitochondria of 12 of the 16 training slices are not there.

In both arms held-out slice 18, which VNC leaves unlabelled, is marked with the ignore value, so that both
validate (and so keep their best epoch) on the same annotated voxels; the arms differ only in the
unannotated training slices. Printed: pixel Dice, IoU, precision, recall and object F1 of both, side by side.
"""

import argparse
import os
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

from bench.time_to_quality import DATASETS, object_figures, scores  # noqa: E402
from emunet.core.io import read_mask, read_volume  # noqa: E402
from emunet.core.normalize import stack_stats  # noqa: E402
from pipeline.preprocess import PreprocessConfig, preprocess, unlabelled_slices  # noqa: E402
from pipeline.train import TrainConfig, train  # noqa: E402

IGNORE = 255
ARMS = ("ignore", "background")


def sparse_labels(labels: np.ndarray, train_stop: int, every: int, fill: int) -> np.ndarray:
    """`(Z, H, W)` uint8 labels with only training slices `0, every, 2 every, ...` (below `train_stop`)
    annotated, the other training slices set to `fill`, and slices with no labelled pixel (VNC's 18) set
    to `IGNORE`."""
    out = labels.astype(np.uint8).copy()
    out[[z for z in range(train_stop) if z % every]] = fill
    out[[z for z in unlabelled_slices(labels) if z >= train_stop]] = IGNORE
    return out


def run_arm(arm: str, image_path: Path, labels: np.ndarray, every: int, minutes: float, folder: Path,
            held_out: list[int], seed: int = 0) -> dict:
    a = int(DATASETS["vnc"]["val_slices"].split(":")[0])
    path = folder / f"labels_{arm}.tif"
    tifffile.imwrite(path, sparse_labels(labels, a, every, IGNORE if arm == "ignore" else 0), photometric="minisblack")
    prepared = preprocess(PreprocessConfig(images=str(image_path), labels=str(path),
                                           val_slices=DATASETS["vnc"]["val_slices"], ignore_label=IGNORE))
    start = time.perf_counter()
    result = train(TrainConfig(dataset_uri=prepared["dataset_uri"], max_minutes=minutes, seed=seed))
    trained = time.perf_counter() - start
    segmenter = mlflow.pyfunc.load_model(result["model_uri"]).unwrap_python_model()
    image = read_volume(image_path)
    low, high = stack_stats(image)
    prob = segmenter.segment(image[held_out], low, high, output="probability")
    truth = labels[held_out] > 0
    figures = scores("vnc", prob >= 0.5, truth)
    figures["object_f1"] = object_figures(prob, truth)["watershed"]["object_f1"]
    print(f"{arm}: {result['epochs']} epochs in {trained / 60:.1f} min, best val_dice {result['val_dice']:.4f}; "
          "held-out " + "  ".join(f"{k} {v:.4f}" for k, v in figures.items()), flush=True)
    return {**figures, "epochs": result["epochs"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0, help="training budget of each arm")
    parser.add_argument("--every", type=int, default=4, help="annotate every n-th training slice")
    parser.add_argument("--seed", type=int, default=0, help="training seed of both arms")
    args = parser.parse_args()
    image_path, labels_path = DATASETS["vnc"]["images"], DATASETS["vnc"]["labels"]
    if not image_path.exists():
        sys.exit(f"{image_path} is absent (the shared EM datasets are not beside this checkout)")
    labels = read_mask(labels_path, read_volume(image_path).shape, image_path)
    a, b = (int(v) for v in DATASETS["vnc"]["val_slices"].split(":"))
    held_out = [z for z in range(a, b) if z not in unlabelled_slices(labels)]
    annotated = [z for z in range(a) if z % args.every == 0]
    print(f"VNC mitochondria: training slices {', '.join(map(str, annotated))} of 0-{a - 1} annotated; held-out "
          f"slices {', '.join(map(str, held_out))}; {args.minutes} min per arm", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        mlflow.set_tracking_uri(f"sqlite:///{Path(tmp) / 'mlflow.db'}")
        mlflow.set_experiment("sparse-labels")
        figures = {arm: run_arm(arm, image_path, labels, args.every, args.minutes, Path(tmp), held_out, args.seed)
                   for arm in ARMS}
    print(f"\nheld-out slices {', '.join(map(str, held_out))}, {args.minutes} min each:")
    print(f"{'':12}" + "".join(f"{arm:>12}" for arm in ARMS))
    for key in ("dice", "iou", "precision", "recall", "object_f1", "epochs"):
        print(f"{key:12}" + "".join(f"{figures[arm][key]:>12.4f}" if key != "epochs" else f"{figures[arm][key]:>12}"
                                    for arm in ARMS))


if __name__ == "__main__":
    main()
