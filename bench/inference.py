"""Inference benchmark (issues 4, 15 and 24). First the engines (issue 24): the CPU and its bfloat16 units,
TensorFlow's float32 and bfloat16 matmul peaks in this process, then the same network on each engine and
precision (TF + XLA float32 and mixed_bfloat16, ONNX Runtime float32, OpenVINO float32, bfloat16 as served
(the encoder's first blocks in float32: `engines.encoder_in_float32`) and bfloat16 in every layer) in
ms/slice, slices/s and GFLOP/s with its largest and mean probability difference from TF float32, at
512 x 512 and 1024 x 1024; BatchNorm folded into the convolutions against left to the engine; and the
whole tiled path (`iter_probabilities`: normalisation, tiles, blending) with each engine against a plain
TF float32 forward of the same weights in batches of 4 (target: >= 3.5x). Then slices/s of our tiled,
batched inference against a naive loop of `model.predict` one whole slice at a time, on the same model
in the same run; the time per slice with and without the instance step of `output="labels"` (all that
the pyfunc does after the network: the one path's masks, seeded watershed, linking through the slices,
the ids stacked; the slices labelled in threads, as served, and one at a time in this thread, as before;
and the network and the step together in the served order, sharing the CPUs); then the peak resident
memory of the `predict` entry point on a large synthetic stack.

The instance step's cost depends on what it is given: a fresh network's probabilities are a haze around
0.5 with no structure, so it is also timed on probability maps shaped like a trained model's, the
dataset's own labels blurred (Gaussian, sigma 2 px) so that cells are sure in the middle and unsure at
their borders.

Measured (issue 24, item 5; the default network run by OpenVINO in bfloat16 on the shared 2-core Xeon with
AMX-BF16, under `nice -n 19` at a load of 4-8, `--memory_slices 0 --no_naive --no_engines`, three runs):
the instance step on the blurred labels +20.9, +15.5 and +17.7 % of inference at 512 x 512 (ISBI: 35.7,
25.0 and 20.8 ms a slice against 171, 161 and 117 ms), +3.4, +3.2 and +4.3 % at 1024 x 1024 (VNC: 26.6,
34.1 and 22.7 ms against 774, 1056 and 529 ms: the load slows the two-thread network far more than the
one-thread step; quiet, the network ran such a slice in 98 ms). Target (at most +20 %) met in two of the
three runs at 512, in all at 1024. On a fresh network's probabilities the step depends on what its
random weights give: +4.8 to +114 % (a haze with cores everywhere floods most of the slice, the
watershed's time, as before). Then the slices labelled (and their links counted) in threads, two on the
2 cores (load 1.7-1.8, a neighbour slowing the network to 68 ms a slice against 28 ms on a quiet
machine the same hour): ISBI's blurred labels 17.0 ms a slice against 23.8 one at a time (1.4x), +25.1 %
of inference alone, +22.4 % for network and step in the served order; VNC 42.0 against 42.5 ms (sparse
slices: little to share), +10.9 %. On the quiet machine, one at a time: 12.4 ms against 27.8 ms
(+44.7 %): the faster the network, the larger the share; target **not met** there.

    python bench/inference.py                        # ISBI 30 x 512 x 512, VNC 20 x 1024 x 1024, 200 x 2048 x 2048
    python bench/inference.py --memory_slices 20     # a shorter memory run
    python bench/inference.py --memory_slices 0      # speed only
    python bench/inference.py --no_speed --memory_slices 0   # engines only (issue 24)
    python bench/inference.py --no_speed --memory_slices 0 --sides 512   # engines at 512 x 512 only

Speed does not depend on the weights, so the model is a freshly built 16-filter, depth-4 U-Net (the
`fast` preset's; issues 4 and 15 were measured with `--base_filters 8`) unless `--model_uri` names a
logged one. Prints one line per figure. Only figures of the same run compare: the machine is shared.
"""

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import tifffile  # noqa: E402

from emunet.core.hardware import BF16_FLAGS, cpu_features, cpu_model  # noqa: E402
from emunet.core.model import UNetSpec, build_unet, spec_of  # noqa: E402
from emunet.core.normalize import normalize, stack_stats  # noqa: E402
from emunet.inference.segmenter import compiled_forward, log_segmenter  # noqa: E402
from emunet.inference.instances import label_instances  # noqa: E402
from emunet.inference.params import DEFAULTS  # noqa: E402
from emunet.inference.segment import segment_probabilities  # noqa: E402
from emunet.inference.engines import OpenVINOForward, TensorFlowForward, cpu_count, make_forward  # noqa: E402
from emunet.inference.tiling import MAX_BATCH_PIXELS, iter_probabilities, predict_probabilities  # noqa: E402

SHARED = ROOT.parent / "shared" / "datasets"
STACKS = {"isbi 30x512x512": SHARED / "isbi2012" / "train-volume.tif",
          "vnc 20x1024x1024": SHARED / "vnc" / "stack1-raw.tif"}
LABELS = {"isbi 30x512x512": SHARED / "isbi2012" / "train-labels.tif",
          "vnc 20x1024x1024": SHARED / "vnc" / "stack1-mitochondria.tif"}


def naive(model, stack, low, high):
    return np.stack([model.predict(normalize(s, low, high)[None, ..., None], verbose=0)[0, ..., 0] for s in stack])


def served_labels(probs) -> np.ndarray:
    """The instance step as the pyfunc's `output="labels"` runs it after the network, on `(Z, H, W)`
    probabilities (or the slices' maps as they come): the one path's masks, objects of each slice (`slice_instances`) and their ids through
    the slices (`SliceLinker`), with the default parameters, stacked as the pyfunc returns them."""
    return np.stack([r.ids for r in segment_probabilities(probs, DEFAULTS)], dtype=np.int32)


def one_at_a_time(probs: np.ndarray) -> np.ndarray:
    """`served_labels`' ids with each slice labelled and linked in turn in this thread (`workers=1`)."""
    return label_instances(probs, DEFAULTS.threshold, DEFAULTS.seed_threshold, DEFAULTS.min_object_size, workers=1)


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
        forward = make_forward(model)  # what the pyfunc segmenter runs: engine and precision "auto"
        print(f"{name}: network on {forward.engine} in {forward.precision}", flush=True)
        forward(np.zeros((1, *stack.shape[1:], 1), np.float32))  # compiled before the clock starts
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
        # The step against inference timed in turns (`round_robin`), so that a busy moment of a shared
        # machine does not fall on one of them only: the instance step runs on one core, the network on all.
        network = lambda: iter_probabilities(forward, stack, low, high, multiple=2**spec.depth)  # noqa: E731
        jobs = {"inference": lambda: np.stack(list(network())),
                **{what: (lambda p=prob: served_labels(p)) for what, prob in maps.items()},
                # The served order: each slice's objects found as the network hands it over (the step's
                # threads and the network's share the CPUs), the maps given in place of the network's.
                **{f"whole path on {what}": (lambda p=prob: served_labels(q for _, q in zip(network(), p)))
                   for what, prob in maps.items()},
                **{f"one at a time on {what}": (lambda p=prob: one_at_a_time(p)) for what, prob in maps.items()}}
        times, outputs = round_robin(jobs, rounds=3)
        inference = times["inference"]
        for what in maps:
            step, whole = times[what], times[f"whole path on {what}"]
            print(f"{name}: instance step on {what}: {1000 * step / n:.1f} ms a slice against "
                  f"{1000 * inference / n:.1f} ms of inference: +{100 * step / inference:.1f} % "
                  f"({int(outputs[what].max())} objects; target: at most +20 %); network and step in the served "
                  f"order {1000 * whole / n:.1f} ms a slice: {100 * (whole - inference) / inference:+.1f} %; the step "
                  f"one slice at a time (as before issue 24's threads) {1000 * times[f'one at a time on {what}'] / n:.1f} "
                  f"ms a slice", flush=True)
            assert np.array_equal(outputs[f"one at a time on {what}"], outputs[what])


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


# --- engines and precision (issue 24) ---

def matmul_peak(dtype: str, n: int = 2048, repeat: int = 10) -> float:
    """GFLOP/s of TensorFlow's best n x n matmul in `dtype` (oneDNN: AMX / AVX512-BF16 for bfloat16)."""
    import tensorflow as tf

    a = tf.cast(tf.random.uniform((n, n)), dtype)
    b = tf.cast(tf.random.uniform((n, n)), dtype)
    graph = tf.function(lambda: tf.reduce_sum(tf.cast(tf.matmul(a, b)[0, :1], tf.float32)))
    graph()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        graph().numpy()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def network_flops(model, height: int, width: int) -> float:
    """Multiply-adds x 2 of one `(height, width)` slice through the convolutions, from the layer shapes."""
    import keras

    static = keras.models.clone_model(model, input_tensors=keras.Input((height, width, model.input_shape[-1])))
    flops = 0
    for layer in static.layers:
        if isinstance(layer, keras.layers.Conv2DTranspose):  # every input pixel feeds k x k outputs
            cin, cout = layer.input.shape[-1], layer.filters
            flops += 2 * np.prod(layer.kernel_size) * cin * cout * np.prod(layer.input.shape[1:3])
        elif isinstance(layer, keras.layers.Conv2D):
            cin, cout = layer.input.shape[-1], layer.filters
            flops += 2 * np.prod(layer.kernel_size) * cin * cout * np.prod(layer.output.shape[1:3])
    return float(flops)


def fold_batch_norm(model):
    """The same U-Net without BatchNorm layers: each `<block>_bn<i>` folded into `<block>_conv<i>`'s kernel
    and a bias (kernel x gamma / sqrt(var + eps), beta - mean x gamma / sqrt(var + eps))."""
    import dataclasses

    spec = spec_of(model)
    folded = build_unet(dataclasses.replace(spec, batch_norm=False))
    for layer in folded.layers:
        if not layer.weights:
            continue
        source = model.get_layer(layer.name)
        bn = layer.name.replace("_conv", "_bn")
        if "_conv" in layer.name and bn in {l.name for l in model.layers}:
            gamma, beta, mean, var = (w.numpy() for w in model.get_layer(bn).weights)
            scale = gamma / np.sqrt(var + model.get_layer(bn).epsilon)
            layer.set_weights([source.get_weights()[0] * scale, beta - mean * scale])
        else:
            layer.set_weights(source.get_weights())
    return folded


def onnx_forward(model):
    """ONNX Runtime float32 on all of the process's CPUs, the model exported by tf2onnx (opset 17)."""
    import onnxruntime as ort
    import tensorflow as tf
    import tf2onnx

    signature = [tf.TensorSpec((None, None, None, model.input_shape[-1]), tf.float32, name="image")]
    graph = tf.function(lambda x: model(x, training=False), input_signature=signature)
    proto, _ = tf2onnx.convert.from_function(graph, input_signature=signature, opset=17)
    options = ort.SessionOptions()
    options.intra_op_num_threads = cpu_count()
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {name: np.asarray(batch, np.float32)})[0]


def round_robin(jobs: dict, rounds: int = 3) -> tuple[dict, dict]:
    """Best seconds and last output of each job: all warmed up, then timed in turn `rounds` times, so that
    a slow moment of a shared machine hits every job alike instead of deciding one ratio."""
    outputs = {name: job() for name, job in jobs.items()}  # compilation for this shape
    best = dict.fromkeys(jobs, float("inf"))
    for _ in range(rounds):
        for name, job in jobs.items():
            start = time.perf_counter()
            outputs[name] = job()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, outputs


def load_stack(path: Path, side: int, slices: int) -> np.ndarray:
    """`slices` slices of the dataset at `path`, cropped (or mirrored out) to `side` x `side`."""
    stack = tifffile.imread(path)[:slices]
    stack = np.pad(stack, ((0, 0), (0, max(0, side - stack.shape[1])), (0, max(0, side - stack.shape[2]))),
                   mode="reflect")
    return stack[:, :side, :side]


def compare_engines(model, spec, sides=(512, 1024)):
    features = cpu_features()
    flags = ", ".join(f"{flag} {'yes' if flag in features else 'no'}" for flag in (*BF16_FLAGS, "amx_tile", "avx512f"))
    print(f"CPU: {cpu_model()}, {cpu_count()} CPUs for this process; {flags}", flush=True)
    f32, bf16 = matmul_peak("float32"), matmul_peak("bfloat16")
    print(f"TF 2048^2 matmul peak: float32 {f32:.0f} GFLOP/s, bfloat16 {bf16:.0f} GFLOP/s ({bf16 / f32:.1f}x)",
          flush=True)
    start = time.perf_counter()
    engines = {"TF float32": TensorFlowForward(model, "float32"),
               "TF mixed_bfloat16": TensorFlowForward(model, "bfloat16")}
    try:
        engines["ONNX Runtime float32"] = onnx_forward(model)
    except Exception as exc:  # noqa: BLE001 - a failed export is a figure too
        print(f"ONNX Runtime: export failed ({type(exc).__name__}: {exc})")
    engines["OpenVINO float32"] = OpenVINOForward(model, "float32")
    engines["OpenVINO bfloat16"] = OpenVINOForward(model, "bfloat16")  # the encoder's first blocks in float32
    engines["OpenVINO bfloat16, every layer"] = OpenVINOForward(model, "bfloat16", float32_encoder=False)
    folded = None
    if spec.batch_norm:
        folded = fold_batch_norm(model)
        engines["TF float32, BN folded"] = TensorFlowForward(folded, "float32")
        engines["OpenVINO float32, BN folded"] = OpenVINOForward(folded, "float32")
        engines["OpenVINO bfloat16, BN folded"] = OpenVINOForward(folded, "bfloat16")
    print(f"engines converted in {time.perf_counter() - start:.1f} s", flush=True)
    stacks = {512: SHARED / "isbi2012" / "train-volume.tif", 1024: SHARED / "vnc" / "stack1-raw.tif"}
    for side in sides:
        batch_size = max(1, MAX_BATCH_PIXELS // side**2)  # what the tiler batches at this tile size
        path = stacks[side] if stacks[side].exists() else STACKS["isbi 30x512x512"]
        stack = load_stack(path, side, batch_size)
        low, high = stack_stats(stack)
        batch = normalize(stack, low, high)[..., None]
        flops = network_flops(model, side, side)
        print(f"{side} x {side}, batch {batch_size} ({path.name}), {flops / 1e9:.1f} GFLOP a slice:", flush=True)
        times, outputs = round_robin({name: (lambda f=forward: f(batch)) for name, forward in engines.items()})
        for name in engines:
            seconds = times[name] / batch_size
            diff = np.abs(np.asarray(outputs[name], np.float32) - outputs["TF float32"])
            print(f"  {name:30s} {1000 * seconds:7.1f} ms/slice {1 / seconds:6.2f} slices/s "
                  f"{flops / seconds / 1e9:6.0f} GFLOP/s  {times['TF float32'] / times[name]:4.2f}x TF float32   "
                  f"prob. diff max {diff.max():.4f} mean {diff.mean():.5f}", flush=True)
    if folded is not None:  # what OpenVINO made of BatchNorm: its compiled graph, with and without our fold
        for name in ("OpenVINO bfloat16", "OpenVINO bfloat16, BN folded"):
            compiled = next(iter(engines[name]._compiled.values()))[0]
            kinds = Counter(op.get_rt_info()["layerType"].astype(str) for op in compiled.get_runtime_model().get_ops())
            print(f"{name}: compiled graph of {sum(kinds.values())} nodes: "
                  f"{', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}", flush=True)
    tiled_path(model, {name: engines[name] for name in ("TF float32", "OpenVINO float32", "OpenVINO bfloat16",
                                                         "OpenVINO bfloat16, every layer")}, stacks, sides)


def tiled_path(model, engines: dict, stacks: dict, sides):
    """The whole tiled path with each engine against a plain TF float32 forward in batches of 4."""
    plain = TensorFlowForward(model, "float32")
    for side in sides:
        slices = 30 if side <= 512 else 8  # ISBI's 30 slices; 8 of VNC's at 1024 keep the run under an hour when shared
        path = stacks[side] if stacks[side].exists() else STACKS["isbi 30x512x512"]
        stack = load_stack(path, side, slices)
        low, high = stack_stats(stack)
        multiple = 2**spec_of(model).depth * spec_of(model).input_scale

        def plain_forward():
            return np.concatenate([plain(normalize(stack[z:z + 4], low, high)[..., None])[..., 0]
                                   for z in range(0, len(stack), 4)])

        def tiled(forward):
            return lambda: np.stack(list(iter_probabilities(forward, stack, low, high, multiple=multiple)))

        jobs = {"plain": plain_forward, **{name: tiled(forward) for name, forward in engines.items()}}
        times, outputs = round_robin(jobs, rounds=2)
        print(f"tiled path, {slices} x {side} x {side} ({path.name}): plain TF float32 forward in batches of 4 "
              f"{1000 * times['plain'] / slices:.1f} ms/slice", flush=True)
        for name in engines:
            seconds = times[name]
            diff = np.abs(outputs[name] - outputs["plain"])
            print(f"  iter_probabilities, {name:20s} {1000 * seconds / slices:7.1f} ms/slice {slices / seconds:6.2f} "
                  f"slices/s  speed-up {times['plain'] / seconds:4.2f}x (target >= 3.5x)   prob. diff max "
                  f"{diff.max():.4f} mean {diff.mean():.5f}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_uri", default="",
                        help="a logged pyfunc segmenter; default: a fresh 16-filter, depth-4 U-Net")
    parser.add_argument("--memory_slices", type=int, default=200, help="0: skip the memory run")
    parser.add_argument("--no_speed", action="store_true", help="skip the speed comparison")
    parser.add_argument("--base_filters", type=int, default=16, help="of the fresh U-Net (16: the `fast` preset's)")
    parser.add_argument("--no_engines", action="store_true", help="skip the engine comparison (issue 24)")
    parser.add_argument("--no_naive", action="store_true", help="skip the naive loop (instance step and ours only)")
    parser.add_argument("--sides", default="512,1024", help="slice sides of the engine comparison (512: ISBI, 1024: VNC)")
    args = parser.parse_args()
    spec = UNetSpec(depth=4, base_filters=args.base_filters)
    if args.model_uri:
        segmenter = mlflow.pyfunc.load_model(args.model_uri).unwrap_python_model()
        model, spec = segmenter.keras_model, UNetSpec(**segmenter.meta.get("spec", {}))
    else:
        model = build_unet(spec)
    print(f"model: {model.count_params():,} parameters, depth {spec.depth}, {spec.base_filters} base filters")
    if not args.no_engines:
        compare_engines(model, spec, tuple(int(side) for side in args.sides.split(",")))
    if not args.no_speed:
        speed(model, spec, naive_too=not args.no_naive)
    if args.memory_slices:
        memory(model, args.memory_slices)


if __name__ == "__main__":
    main()
