"""Command lines from config dataclasses, and the one place where user errors become one line + exit 2.

Flags are the dataclass fields (snake_case, as in MLproject), so defaults are defined once: in the
dataclass. Entry points are `python -m pipeline.<step> --field value ...`.
"""

import argparse
import dataclasses
import logging
import os
import sys
from typing import Callable

from pipeline.errors import InputError

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _parse_bool(text: str) -> bool:
    if text.lower() in TRUE:
        return True
    if text.lower() in FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_config(cls, argv: list[str] | None = None, description: str = ""):
    """Build an instance of the frozen dataclass `cls` from `--field value` flags."""
    parser = argparse.ArgumentParser(description=description or cls.__doc__)
    for f in dataclasses.fields(cls):
        type_name = f.type if isinstance(f.type, str) else f.type.__name__
        kind = {"bool": _parse_bool, "int": int, "float": float}.get(type_name, str)
        parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=f"default: {f.default!r}")
    return cls(**vars(parser.parse_args(argv)))


def quiet_tensorflow():
    """Hide TensorFlow's C++ start-up chatter (CUDA probing, CPU feature notes) before it is imported."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.getLogger("absl").setLevel(logging.ERROR)


def run_entry(step: Callable, cls, argv: list[str] | None = None) -> None:
    """Parse flags into `cls`, run `step(cfg)`; an `InputError` prints `error: <message>` and exits 2.

    The MLflow run opened by the step is closed as FAILED by its context manager before we get here.
    """
    quiet_tensorflow()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = parse_config(cls, argv)
    try:
        step(cfg)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
