"""Precision follows the processor: bfloat16 where the CPU has bfloat16 units, float32 where it has not,
mixed_float16 on a GPU; explicit choices pass through; a model trained in mixed_bfloat16 loads as float32."""

import numpy as np
import pytest

from emunet.core.errors import InputError
from emunet.core.hardware import cpu_features, cpu_model, has_bf16_units, resolve_precision

SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8
"""
SKYLAKE = """processor\t: 0
model name\t: Intel(R) Xeon(R) Gold 6130
flags\t\t: fpu sse sse2 avx avx2 avx512f avx512bw avx512_vnni
"""
ONLY_AMX = "flags\t: sse2 avx2 amx_bf16\n"


def test_features_and_model_read_from_cpuinfo_text():
    features = cpu_features(SAPPHIRE_RAPIDS)
    assert {"amx_bf16", "avx512_bf16", "avx512f"} <= features and "model" not in features
    assert cpu_model(SAPPHIRE_RAPIDS) == "Intel(R) Xeon(R) Platinum 8480+"
    assert cpu_model("flags: sse2\n") == "unknown"
    assert has_bf16_units(features) and has_bf16_units(cpu_features(ONLY_AMX))
    assert not has_bf16_units(cpu_features(SKYLAKE)) and not has_bf16_units(frozenset())


def test_auto_is_bfloat16_only_with_bf16_units_and_mixed_float16_on_gpu():
    assert resolve_precision("auto", cpu_features(ONLY_AMX)) == "bfloat16"
    assert resolve_precision("auto", cpu_features(SAPPHIRE_RAPIDS)) == "bfloat16"
    assert resolve_precision("auto", cpu_features(SKYLAKE)) == "float32"
    assert resolve_precision("auto", cpu_features(SAPPHIRE_RAPIDS), gpu=True) == "mixed_float16"
    assert resolve_precision("auto", cpu_features(SKYLAKE), gpu=True) == "mixed_float16"


def test_explicit_choices_pass_through_and_unknown_ones_are_refused():
    assert resolve_precision("float32", cpu_features(SAPPHIRE_RAPIDS)) == "float32"
    assert resolve_precision("bfloat16", cpu_features(SKYLAKE)) == "bfloat16"
    assert resolve_precision("mixed_bfloat16", cpu_features(SKYLAKE)) == "bfloat16"
    assert resolve_precision("mixed_float16", cpu_features(SKYLAKE)) == "mixed_float16"
    with pytest.raises(InputError, match="precision must be one of .* got 'float8'"):
        resolve_precision("float8")


def test_training_auto_policy_follows_the_cpu():
    from emunet.training.config import resolve_precision as training_policy

    assert training_policy("auto", cpu_features(SAPPHIRE_RAPIDS)) == "mixed_bfloat16"
    assert training_policy("auto", cpu_features(SKYLAKE)) == "float32"
    assert training_policy("float32", cpu_features(SAPPHIRE_RAPIDS)) == "float32"


def test_model_trained_in_mixed_bfloat16_loads_and_predicts_in_float32_and_back(tmp_path, rng):
    import keras

    from emunet.core.losses import get_loss
    from emunet.core.model import UNetSpec, build_unet
    from emunet.inference.engines import make_forward
    from emunet.training.config import dtype_policy

    spec = UNetSpec(depth=2, base_filters=4)
    x = rng.random((4, 32, 32, 1)).astype(np.float32)
    y = (x > 0.5).astype(np.float32)
    with dtype_policy("mixed_bfloat16"):
        trained = build_unet(spec)
        trained.compile(keras.optimizers.Adam(1e-2), get_loss("bce_dice"))
        trained.fit(x, y, epochs=2, batch_size=4, verbose=0)
    assert trained.layers[1].compute_dtype == "bfloat16" and trained.output.dtype == "float32"
    trained.save(tmp_path / "bf16.keras")
    loaded = keras.models.load_model(tmp_path / "bf16.keras", compile=False)
    # the float32 copy as training logs it: same weights, float32 compute
    plain = build_unet(spec)
    plain.set_weights(loaded.get_weights())
    assert all(w.dtype == np.float32 for w in plain.get_weights())
    reference = plain.predict(x, verbose=0)
    f32 = make_forward(plain, engine="tensorflow", precision="float32")
    assert f32.precision == "float32"
    np.testing.assert_allclose(f32(x), reference, atol=1e-5)
    # and back: the float32 model run in bfloat16 agrees with the bfloat16-trained one
    bf16 = make_forward(plain, engine="tensorflow", precision="bfloat16")
    out = bf16(x)
    assert bf16.precision == "bfloat16" and out.dtype == np.float32 and out.shape == (4, 32, 32, 1)
    assert np.abs(out - np.asarray(loaded.predict(x, verbose=0), np.float32)).max() < 0.02
    assert np.abs(out - reference).max() < 0.02


def test_training_runs_and_logs_the_resolved_policy(world):
    """The session's tiny model was trained with precision=auto: on a CPU with bfloat16 units that is
    mixed_bfloat16, end to end (fit, validation on the float32 copy, logging), and the param says so."""
    import mlflow

    from emunet.core.hardware import has_bf16_units
    from emunet.inference.engines import gpu_visible
    from emunet.training.config import resolve_precision as training_policy

    params = mlflow.get_run(world["trained"]["run_id"]).data.params
    assert params["precision"] == "auto"
    assert params["dtype_policy"] == training_policy("auto")
    if not gpu_visible():
        assert params["dtype_policy"] == ("mixed_bfloat16" if has_bf16_units() else "float32")
    assert 0 <= float(mlflow.get_run(world["trained"]["run_id"]).data.metrics["best_val_dice"]) <= 1
