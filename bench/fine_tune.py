"""Fine-tuning from the lab's model (issue 6): a model trained on VNC membranes, fine-tuned on ISBI 2012
with 3 annotated slices for a few minutes, against training from scratch on the same slices for the same
minutes; both scored on the held-out ISBI slices 24-29 with full-slice inference (the served pyfunc).

    python bench/fine_tune.py                                   # VNC 5 min, then 3 + 3 min on ISBI
    python bench/fine_tune.py --source_minutes 5 --minutes 3 --slices 0,10,20 --freeze_encoder_epochs 2

1. Source: the default recipe on VNC stack 1 (`../shared/datasets/vnc/stack1-raw.tif`), labels
   `stack1-membranes.tif`, slices 0-15 train, 16-19 validate, for `--source_minutes`.
2. Fine-tuned: `init_model` = that model, on ISBI slices `--slices` only (default 0, 10, 20: spread over
   the 24 slices before the held-out block), for `--minutes`; with `--freeze_encoder_epochs` N > 0 a
   third arm does the same with the encoder frozen for its first N epochs.
3. From scratch: the same slices, the same recipe and minutes, random initialisation.

Polarity: both label stacks are 0 / 255, but ISBI's 255 is the cell interior (78 % of pixels) and VNC's
255 the membrane (20 %). The foreground here is the cell interior in both (VNC's labels inverted), as in
`time_to_quality.py`, so the source model already answers ISBI's question. Figures are
`time_to_quality`'s for ISBI: Dice of the cell interior (the foreground), of the membrane, and their mean
(the issue-3 figure), plus object F1 (`output="labels"`, cell interiors per slice). Every arm validates
(and keeps its best epoch) on the held-out slices, as `time_to_quality.py` does; the runs are sequential
in one process, so they share the machine alike. The VNC model on ISBI without fine-tuning is printed too.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one line per download, not a bar
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import mlflow  # noqa: E402
import numpy as np  # noqa: E402

from emunet.core.dataset import write_dataset  # noqa: E402
from emunet.core.io import read_mask, read_volume  # noqa: E402
from emunet.core.normalize import stack_stats  # noqa: E402
from pipeline.train import TrainConfig, train  # noqa: E402
from time_to_quality import DATASETS, SHARED, object_figures, scores  # noqa: E402

VNC = dict(images=SHARED / "vnc" / "stack1-raw.tif", labels=SHARED / "vnc" / "stack1-membranes.tif", val_slices="16:20")
ISBI = DATASETS["isbi"]
HELD_OUT = (24, 30)  # ISBI slices 24-29, as time_to_quality.py


def load(dataset: dict, invert: bool) -> tuple[np.ndarray, np.ndarray, float, float]:
    """`(image, cell-interior mask, low, high)` of a stack; `invert` for labels whose 255 is the membrane."""
    image = read_volume(Path(dataset["images"]))
    mask = read_mask(Path(dataset["labels"]), image.shape, Path(dataset["images"]))
    return image, (1 - mask if invert else mask).astype(np.uint8), *stack_stats(image)


def make_dataset(folder: Path, image, mask, low, high, train_slices: list[int], val: tuple[int, int]) -> str:
    """A dataset artifact of a training stack (the given slices) and a validation block, both normalised
    with the whole stack's window (as preprocess does for a single stack)."""
    a, b = val
    write_dataset(folder, [
        dict(name="train", split="train", image=np.ascontiguousarray(image[train_slices]),
             mask=np.ascontiguousarray(mask[train_slices]), low=low, high=high, source={"slices": train_slices}),
        dict(name="val", split="val", image=np.ascontiguousarray(image[a:b]), mask=np.ascontiguousarray(mask[a:b]),
             low=low, high=high, source={"slices": f"{a}:{b}"}),
    ])
    return str(folder)


def held_out_figures(model_uri: str, isbi) -> dict:
    """ISBI's figures of the model on the held-out slices (full slices, tiled, no TTA)."""
    image, mask, low, high = isbi
    a, b = HELD_OUT
    segmenter = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    prob = segmenter.segment(image[a:b], low, high, output="probability")
    truth = mask[a:b] > 0
    found = object_figures(prob, truth)["watershed"]
    return {**scores("isbi", prob >= 0.5, truth), "object_f1": found["object_f1"]}


def timed_train(label: str, **fields) -> dict:
    start = time.perf_counter()
    result = train(TrainConfig(**fields))
    minutes = (time.perf_counter() - start) / 60
    run = mlflow.get_run(result["run_id"]).data
    speed = np.mean([m.value for m in mlflow.MlflowClient().get_metric_history(result["run_id"], "images_per_sec")])
    print(f"{label}: {result['epochs']} epochs in {minutes:.1f} min ({speed:.1f} images/s), best val_dice "
          f"{result['val_dice']:.4f} at epoch {int(run.metrics['best_epoch']) + 1}", flush=True)
    return {**result, "minutes": minutes, "images_per_sec": float(speed)}


def row(label: str, figures: dict, trained: dict | None) -> str:
    how = f"{trained['epochs']:>3} epochs, {trained['minutes']:.1f} min" if trained else "      (no training on ISBI)"
    return (f"{label:<34} {figures['cell_dice']:.4f}   {figures['membrane_dice']:.4f}   "
            f"{figures['mean_two_class_dice']:.4f}   {figures['object_f1']:.4f}   {how}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source_minutes", type=float, default=5.0, help="training on VNC membranes")
    parser.add_argument("--minutes", type=float, default=3.0, help="each ISBI arm: fine-tuned and from scratch")
    parser.add_argument("--slices", default="0,10,20", help="the annotated ISBI training slices")
    parser.add_argument("--freeze_encoder_epochs", type=int, default=0, help="N > 0: also fine-tune with a frozen encoder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    slices = [int(s) for s in args.slices.split(",")]
    if any(not 0 <= s < HELD_OUT[0] for s in slices):
        parser.error(f"--slices must lie in 0-{HELD_OUT[0] - 1}, before the held-out block; got {args.slices}")
    for path in (VNC["images"], VNC["labels"], ISBI["images"], ISBI["labels"]):
        if not Path(path).exists():
            sys.exit(f"{path} is absent (the shared EM datasets are not beside this checkout)")
    isbi, vnc = load(ISBI, invert=False), load(VNC, invert=True)
    print(f"foreground = cell interior: ISBI {isbi[1].mean():.0%} of pixels, VNC (membranes inverted) {vnc[1].mean():.0%}")
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        mlflow.set_tracking_uri(f"sqlite:///{Path(tmp) / 'mlflow.db'}")
        mlflow.set_experiment("fine-tune")
        a, b = (int(v) for v in VNC["val_slices"].split(":"))
        vnc_data = make_dataset(Path(tmp) / "vnc", *vnc, list(range(a)), (a, b))
        source = timed_train("VNC membranes (source)", dataset_uri=vnc_data, max_minutes=args.source_minutes,
                             seed=args.seed)
        isbi_data = make_dataset(Path(tmp) / "isbi", *isbi, slices, HELD_OUT)
        arms = {"VNC model, no fine-tuning": (None, {}),
                f"fine-tuned from VNC, {len(slices)} slices": ("tuned", {"init_model": source["model_uri"]}),
                f"from scratch, {len(slices)} slices": ("scratch", {})}
        if args.freeze_encoder_epochs:
            arms[f"fine-tuned, encoder frozen {args.freeze_encoder_epochs} ep."] = (
                "frozen", {"init_model": source["model_uri"], "freeze_encoder_epochs": args.freeze_encoder_epochs})
        results = {}
        for label, (key, fields) in arms.items():
            trained = None if key is None else timed_train(label, dataset_uri=isbi_data, max_minutes=args.minutes,
                                                          seed=args.seed, **fields)
            figures = held_out_figures(trained["model_uri"] if trained else source["model_uri"], isbi)
            results[label] = (figures, trained)
            print(row(label, figures, trained), flush=True)
    print(f"\nISBI held-out slices {HELD_OUT[0]}-{HELD_OUT[1] - 1}; training slices {', '.join(map(str, slices))}; "
          f"source: VNC membranes, {source['epochs']} epochs in {source['minutes']:.1f} min")
    print(f"{'':<34} cell     membrane mean     object F1")
    for label, (figures, trained) in results.items():
        print(row(label, figures, trained))


if __name__ == "__main__":
    main()
