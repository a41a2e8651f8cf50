"""Training throughput (issue 3): images/s of a preset through our whole input pipeline (PatchDataset:
crops, rotation, elastic and intensity augmentation in worker processes reading memory-mapped stacks)
against a bare Keras loop of the same model on in-memory arrays with no augmentation, in the same run;
then the augmentation alone, in patches/s, in the training process and in 1, 2 and 4 worker processes.

    python bench/train_throughput.py                                  # paper preset, 464 x 464, CPU
    python bench/train_throughput.py --crop 512 --precision mixed_float16 --jit_compile true --steps 50  # GPU
    python bench/train_throughput.py --preset fast --crop 128 --steps 20 --compare_precision   # issue 24

Target: pipeline / bare >= 0.95 (the input pipeline costs under 5 %). On a 2-core CPU the augmentation
workers share the cores with training, so the ratio there measures that competition too.

`--compare_precision` (issue 24): images/s of the bare training step in float32 and in mixed_bfloat16
(what `precision=auto` picks on a CPU with AMX-BF16 or AVX512-BF16 units) in the same run, alternated and
each one's best kept. Target: mixed_bfloat16 / float32 >= 1.4.
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

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter  # noqa: E402

from emunet.core.dataset import read_manifest, stacks_in, write_dataset  # noqa: E402
from emunet.training.loader import PatchDataset  # noqa: E402
from emunet.core.losses import get_loss  # noqa: E402
from emunet.core.hardware import BF16_FLAGS, cpu_features, cpu_model  # noqa: E402
from emunet.core.model import UNetSpec, build_unet  # noqa: E402
from emunet.core.synthetic import synthetic_stack  # noqa: E402
from emunet.training.config import PRESETS, JIT_CHOICES, dtype_policy, resolve_precision  # noqa: E402


class EpochTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.started)


def make_dataset(folder: Path, crop: int) -> list:
    side = max(512, crop + 64)
    stacks = [dict(name=f"s{i}", split="val" if i == 3 else "train", image=image, mask=mask)
              for i, (image, mask) in enumerate(synthetic_stack(0, i, (8, side, side)) for i in range(4))]
    write_dataset(folder, stacks)
    return stacks_in(read_manifest(folder), "train")


def images_per_second(model, data, steps: int, batch: int, **fit_args) -> float:
    timer = EpochTimer()
    model.fit(data, epochs=2, steps_per_epoch=steps, callbacks=[timer], verbose=0, **fit_args)
    return steps * batch / timer.seconds[-1]  # the first epoch compiles; the second is timed


def precision_speedup(spec: UNetSpec, recipe: dict, crop: int, batch: int, steps: int, jit_compile: str) -> None:
    """Bare training steps (in-memory crops, no augmentation) in float32 against mixed_bfloat16."""
    features = cpu_features()
    print(f"CPU: {cpu_model()}; bfloat16 units: {', '.join(f for f in BF16_FLAGS if f in features) or 'none'}; "
          f"precision=auto trains in {resolve_precision('auto')}", flush=True)
    rng = np.random.default_rng(0)
    x = rng.random((batch * steps, crop, crop, 1), np.float32)
    y = (rng.random(x.shape) > 0.5).astype(np.float32)
    models = {}
    for policy in ("float32", "mixed_bfloat16"):
        with dtype_policy(policy):
            models[policy] = build_unet(spec)
            models[policy].compile(keras.optimizers.Adam(recipe["learning_rate"]), get_loss("bce_dice"),
                                   jit_compile=JIT_CHOICES[jit_compile])
    rates = dict.fromkeys(models, 0.0)
    for _ in range(2):  # alternated, each one's best: a slow moment of a shared machine does not decide
        for policy, model in models.items():
            rates[policy] = max(rates[policy], images_per_second(model, x, steps, batch, y=y, batch_size=batch))
    print(f"training step, {spec.base_filters} base filters, depth {spec.depth}, {crop} x {crop} crops, batch {batch}, "
          f"jit_compile {jit_compile}: float32 {rates['float32']:.3g} images/s, mixed_bfloat16 "
          f"{rates['mixed_bfloat16']:.3g} images/s, ratio {rates['mixed_bfloat16'] / rates['float32']:.2f}x "
          f"(target >= 1.4x)", flush=True)


def augmentation_rate(folder: Path, stacks, crop: int, batch: int, workers: int, batches: int) -> float:
    """Patches/s through Keras' enqueuer; `workers` 0 = in the consuming process (what workers=1 trains with)."""
    data = PatchDataset(folder, stacks, batch, crop, batches, seed=1, workers=max(1, workers))
    data.use_multiprocessing = workers > 0  # one worker process too, to see how processes scale
    adapter = PyDatasetAdapter(data, shuffle=False)
    adapter.on_epoch_begin()
    iterator = adapter.get_numpy_iterator()
    next(iterator)  # pool start-up and the first batch are not throughput
    start = time.perf_counter()
    count = sum(1 for _ in iterator)
    seconds = time.perf_counter() - start
    adapter.on_epoch_end()
    return count * batch / seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--crop", type=int, default=464)
    parser.add_argument("--batch_size", type=int, default=0, help="default: the preset's")
    parser.add_argument("--steps", type=int, default=6, help="timed training steps")
    parser.add_argument("--workers", type=int, default=2, help="augmentation processes while training")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--jit_compile", default="auto")
    parser.add_argument("--augmentation_only", action="store_true", help="skip the training comparison")
    parser.add_argument("--compare_precision", action="store_true",
                        help="only float32 against mixed_bfloat16 training steps (issue 24)")
    args = parser.parse_args()
    recipe = PRESETS[args.preset]
    batch = args.batch_size or recipe["batch_size"]
    spec = UNetSpec(depth=recipe["depth"], base_filters=recipe["base_filters"])
    if args.compare_precision:
        precision_speedup(spec, recipe, args.crop, batch, args.steps, args.jit_compile)
        return
    policy = resolve_precision(args.precision)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "dataset"
        stacks = make_dataset(folder, args.crop)
        if not args.augmentation_only:
            with dtype_policy(policy):
                model = build_unet(spec)
                model.compile(keras.optimizers.Adam(recipe["learning_rate"]), get_loss("bce_dice"),
                              jit_compile=JIT_CHOICES[args.jit_compile])
            print(f"{args.preset} preset: {model.count_params():,} parameters, {args.crop} x {args.crop} crops, "
                  f"batch {batch}, {policy}, jit_compile {args.jit_compile}", flush=True)
            # Bare loop: fixed crops held in memory, no augmentation, no workers.
            rng = np.random.default_rng(0)
            x = rng.random((batch * args.steps, args.crop, args.crop, 1), np.float32)
            y = (rng.random(x.shape) > 0.5).astype(np.float32)
            # Alternate the two and keep each one's best, so that a slow moment of a shared machine does not
            # decide the ratio.
            bare, ours = 0.0, 0.0
            for _ in range(2):
                bare = max(bare, images_per_second(model, x, args.steps, batch, y=y, batch_size=batch))
                data = PatchDataset(folder, stacks, batch, args.crop, args.steps, seed=0, workers=args.workers)
                ours = max(ours, images_per_second(model, data, args.steps, batch))
            print(f"training: ours {ours:.3g} images/s ({args.workers} augmentation workers), bare Keras loop on "
                  f"in-memory arrays {bare:.3g} images/s, ratio {ours / bare:.3f} (target >= 0.95)", flush=True)
        for workers in (0, 1, 2, 4):
            rate = augmentation_rate(folder, stacks, args.crop, batch, workers, batches=64)
            where = f"{workers} worker process(es)" if workers else "in the training process"
            print(f"augmentation alone, {where}: {rate:.1f} patches/s of {args.crop} x {args.crop}", flush=True)


if __name__ == "__main__":
    main()
