"""Cells in volumes (issue 23): the medulla FIB-SEM cube (isotropic 10 nm, 525 touching neurons as ids),
z 200-249 held out, the same training budget for today's 2-D recipe and the volume recipe, scored in 3-D
against the neuron ids by the pipeline's own scores (`emunet.inference.segment`), in one run.

    python bench/volume_cells.py                       # 10 minutes per arm
    python bench/volume_cells.py --minutes 3 --arms 2d,3d

Both arms train on the same dataset artifact (`label_kind=instances`: the cells' interiors, voxels on an id
change set to background in 3-D, as the voxel size is isotropic; the ids kept for scoring).
- `2d`: one slice in (`context_slices=0`, `planes=xy`, `champion_metric=object_f1`), objects found per
  slice and linked through the slices (`instances=2d`): the recipe before issue 23.
- `3d`: the defaults (every `auto`), which on this isotropic cube of dense instance labels give the volume
  recipe: the neighbouring slices as channels (`context_slices=auto`: 1), trained on the slices and asked
  about the xy, xz and yz planes (`planes=auto`), the best epoch by the 3-D Rand F-score of the dense step
  (`champion_metric=auto` for dense instance labels; on the medulla, 87 % of voxels are cell interior: an
  all-foreground network has a Dice of 0.93 and per-slice objects are often none), objects found in 3-D (`instances=auto`), scored twice: over the
  foreground (cores and dips), and over every voxel (`grow_over_all`: fragments agglomerated by the mean
  probability of their shared surfaces, as connectomics tools label dense tissue), which is what
  `grow_over_all=auto` gives a model of dense instance labels (the line marked "default").
- `3d-ortho`: as `3d`, but trained on the xy, xz and yz planes alike (`planes=ortho`).
The `2d` arm's probabilities are also scored through the 3-D dense step, which separates what the
network gains from what the instance step gains.
Scores (3-D, whole objects; every true voxel scored, a true voxel in no predicted object is a segment of
its own; true fragments under `min_object_size` voxels left out): `vi_split_3d`, `vi_merge_3d`,
`adapted_rand_error_3d`, `object_f1_3d`, `ap50_3d`; and the per-slice pixel Dice and object F1.
Targets: VI (split + merge) of `3d` at least 30 % below `2d`'s, adapted Rand error at most 0.15.
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

from emunet.core.hardware import BF16_FLAGS, cpu_features, cpu_model  # noqa: E402
from emunet.core.io import read_volume  # noqa: E402
from emunet.inference.params import DEFAULTS  # noqa: E402
from emunet.inference.segment import Truth, score_volume, segment_probabilities  # noqa: E402
from pipeline.preprocess import PreprocessConfig, preprocess  # noqa: E402
from pipeline.train import TrainConfig, train  # noqa: E402

MEDULLA = ROOT.parent / "shared" / "datasets" / "medulla"
HELD_OUT = (200, 250)
SEGMENTERS = {}  # model uri -> its loaded segmenter (the engine compiled once, as in a serving process)
KEYS = ("vi_split_3d", "vi_merge_3d", "adapted_rand_error_3d", "object_f1_3d", "ap50_3d", "dice", "object_f1")


def held_out_probabilities(model_uri: str, volume: np.ndarray, **changes) -> np.ndarray:
    """Probabilities of the held-out slices, each with its real neighbours (and planes through them) from
    the whole volume, as the served model gives them (`changes`: other params)."""
    from emunet.core.normalize import stack_stats

    segmenter = SEGMENTERS.get(model_uri) or SEGMENTERS.setdefault(
        model_uri, mlflow.pyfunc.load_model(model_uri).unwrap_python_model())
    low, high = stack_stats(volume)
    params = DEFAULTS.replace(low=low, high=high, **changes)
    a, b = HELD_OUT
    return np.stack(list(segmenter.probabilities(volume, params, a, b)))


def scores(probs: np.ndarray, ids: np.ndarray, **changes) -> dict:
    params = DEFAULTS.replace(**changes)
    pooled = score_volume(segment_probabilities(probs, params, Truth.of_labels(ids, "instances"),
                                                voxel_size=(10.0, 10.0, 10.0)), scores=None)
    return pooled.metrics()


def show(label: str, figures: dict) -> None:
    vi = figures["vi_split_3d"] + figures["vi_merge_3d"]
    print(f"  {label}: VI {vi:.3f} (split {figures['vi_split_3d']:.3f}, merge {figures['vi_merge_3d']:.3f})  "
          + "  ".join(f"{k} {figures[k]:.4f}" for k in KEYS[2:]), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--arms", default="2d,3d", help="of 2d, 3d, 3d-ortho (see above)")
    parser.add_argument("--context_slices", default="auto")
    parser.add_argument("--planes", default="auto", help="planes of the 3d arm: auto, xy or ortho")
    parser.add_argument("--champion_metric", default="auto",
                        help="the 3d arm's best-epoch rule (the 2d arm: per-slice object F1, the rule before issue 23)")
    parser.add_argument("--save_probabilities", default="",
                        help="folder for each arm's held-out probabilities (`<arm>_prob.npy`, float16)")
    args = parser.parse_args()
    saved = Path(args.save_probabilities).resolve() if args.save_probabilities else None  # before the chdir
    if not MEDULLA.exists():
        print(f"skipped: {MEDULLA} is absent")
        return
    features = cpu_features()
    print(f"CPU: {cpu_model()}; {os.cpu_count()} cores; bfloat16 units: "
          f"{', '.join(f for f in BF16_FLAGS if f in features) or 'none'}; load {os.getloadavg()[0]:.1f}", flush=True)
    volume = read_volume(MEDULLA / "volume.tif")
    ids = read_volume(MEDULLA / "neurons.tif")[HELD_OUT[0]:HELD_OUT[1]]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        mlflow.set_tracking_uri(f"sqlite:///{Path(tmp) / 'mlflow.db'}")
        mlflow.set_experiment("volume-cells")
        data = preprocess(PreprocessConfig(images=str(MEDULLA / "volume.tif"), labels=str(MEDULLA / "neurons.tif"),
                                           label_kind="instances", val_slices=f"{HELD_OUT[0]}:{HELD_OUT[1]}"))
        for arm in args.arms.split(","):
            context = 0 if arm == "2d" else args.context_slices
            planes = {"2d": "xy", "3d-ortho": "ortho"}.get(arm, args.planes)
            rule = {"champion_metric": "object_f1" if arm == "2d" else args.champion_metric}
            start = time.perf_counter()
            trained = train(TrainConfig(dataset_uri=data["dataset_uri"], max_minutes=args.minutes,
                                        context_slices=context, planes=planes, **rule))
            seconds = time.perf_counter() - start
            probs = held_out_probabilities(trained["model_uri"], volume)  # warms the engine up
            begin = time.perf_counter()
            probs = held_out_probabilities(trained["model_uri"], volume)
            per_slice = (time.perf_counter() - begin) / probs.shape[0]
            if saved:
                saved.mkdir(parents=True, exist_ok=True)
                np.save(saved / f"{arm}_prob.npy", probs.astype(np.float16))
            chosen = mlflow.get_run(trained["run_id"]).data.params
            grows = chosen["predict_grow_over_all"] == "True"
            print(f"{arm} (context_slices {context}: {chosen['chosen_context_slices']}, planes {planes}: "
                  f"{chosen['predict_planes']}, champion_metric {rule['champion_metric']}: "
                  f"{chosen['chosen_champion_metric']}, grow_over_all auto: {grows}): "
                  f"{trained['epochs']} epochs in {seconds / 60:.1f} min "
                  f"({seconds / max(1, trained['epochs']):.1f} s an epoch), inference {per_slice * 1000:.0f} ms a slice",
                  flush=True)
            if arm == "2d":
                begin = time.perf_counter()
                held_out_probabilities(trained["model_uri"], volume, engine="tensorflow", precision="float32")
                print(f"  the same slices with TensorFlow in float32 (the engine before issue 24): "
                      f"{(time.perf_counter() - begin) / probs.shape[0] * 1000:.0f} ms a slice", flush=True)
                results[arm] = scores(probs, ids, instances="2d")
                show("objects per slice, linked", results[arm])
                show("(its probabilities through the 3-D dense step)", scores(probs, ids, instances="3d",
                                                                               grow_over_all=True))
            else:
                both = {grow: scores(probs, ids, instances="3d", grow_over_all=grow) for grow in (False, True)}
                show(f"3-D, over the foreground{' (default)' if not grows else ''}", both[False])
                show(f"3-D, over every voxel (agglomerated){' (default)' if grows else ''}", both[True])
                results[arm] = both[grows]  # what predict gives this model by default
    for arm in sorted(set(results) - {"2d"}) if "2d" in results else []:
        vi = {k: results[k]["vi_split_3d"] + results[k]["vi_merge_3d"] for k in ("2d", arm)}
        drop = 1 - vi[arm] / vi["2d"]
        print(f"VI {arm} {vi[arm]:.3f} vs 2d {vi['2d']:.3f} (same run): {drop:.0%} lower; target 30 %: "
              f"{'met' if drop >= 0.3 else 'NOT met'}. adapted Rand error {arm} "
              f"{results[arm]['adapted_rand_error_3d']:.3f}; target 0.15: "
              f"{'met' if results[arm]['adapted_rand_error_3d'] <= 0.15 else 'NOT met'}", flush=True)


if __name__ == "__main__":
    main()
