"""What the processor can do fast, and the numeric precision that follows from it.

Recent Xeons (Sapphire Rapids and later: AMX-BF16; Cooper Lake: AVX512-BF16) multiply bfloat16 several
times faster than float32 (2048^2 matmul on the 2-core test machine: 295 GFLOP/s float32, 1514 bfloat16),
and trained U-Nets score held-out slices nearly the same in bfloat16 (Dice within 0.003, object F1 within
0.003 on ISBI, one more object of 85 on VNC; mean probability difference 0.001 or less, largest 0.02-0.08:
bench/precision_quality.py). So "auto" precision is bfloat16 where
the CPU has those units, mixed_float16 where a GPU is visible (tensor cores), float32 elsewhere.

Nothing here imports TensorFlow: reading /proc/cpuinfo must stay cheap, and whether a GPU is visible is
the caller's question (`gpu=`), answered by whichever framework it already runs.
"""

import os
from pathlib import Path

from emunet.core.errors import InputError

CPUINFO = Path("/proc/cpuinfo")
# The flags (Linux names) of units that multiply bfloat16 natively.
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# "bfloat16" runs every op in bfloat16 where the engine can (OpenVINO) or under Keras' mixed_bfloat16
# policy (variables float32, compute bfloat16); the mixed_ names are Keras' policies, accepted as synonyms.
PRECISIONS = ("auto", "float32", "bfloat16", "mixed_bfloat16", "mixed_float16")


def _cpuinfo_text() -> str:
    try:
        return CPUINFO.read_text()
    except OSError:  # not Linux: no flags known, so nothing is assumed
        return ""


def cpu_features(text: str | None = None) -> frozenset:
    """The CPU's feature flags (lower case, e.g. `avx512f`, `amx_bf16`) from /proc/cpuinfo's `flags`
    lines, or from `text` in that format. Empty where there is no such file."""
    text = _cpuinfo_text() if text is None else text
    flags = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / ARM
            flags.update(value.lower().split())
    return frozenset(flags)


def has_bf16_units(features=None) -> bool:
    """Whether the CPU multiplies bfloat16 natively (AMX-BF16 or AVX512-BF16)."""
    features = cpu_features() if features is None else features
    return any(flag in features for flag in BF16_FLAGS)


def cpu_model(text: str | None = None) -> str:
    """The CPU's model name from /proc/cpuinfo (or `text`); "unknown" when it does not say."""
    text = _cpuinfo_text() if text is None else text
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return value.strip()
    return "unknown"


def resolve_precision(choice: str = "auto", features=None, gpu: bool = False) -> str:
    """The precision to run in: `choice` itself when explicit (one of `PRECISIONS`; the Keras policy
    `mixed_bfloat16` becomes "bfloat16"), and for "auto": "mixed_float16" when `gpu` (a GPU is visible),
    "bfloat16" when the CPU (`features`, default this machine's) has bfloat16 units, else "float32".
    Raises `InputError` for an unknown choice."""
    if choice not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {choice!r}")
    if choice == "mixed_bfloat16":
        return "bfloat16"
    if choice != "auto":
        return choice
    if gpu:
        return "mixed_float16"
    return "bfloat16" if has_bf16_units(features) else "float32"


def cpu_count() -> int:
    """CPUs this process may run on (its affinity, which a container or `taskset` narrows)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
