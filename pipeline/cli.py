"""Command lines from config dataclasses, and the one place where user errors become one line + exit 2.

Flags are the dataclass fields (snake_case, as in MLproject), so defaults are defined once: in the
dataclass. Entry points are `python -m pipeline.<step> --field value ...`.
"""

import argparse
import dataclasses
import logging
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


def parse_config(cls, argv: list[str] | None = None):
    """Build an instance of the frozen dataclass `cls` from `--field value` flags."""
    parser = argparse.ArgumentParser(description=cls.__doc__)
    for f in dataclasses.fields(cls):
        type_name = f.type if isinstance(f.type, str) else f.type.__name__
        kind = {"bool": _parse_bool, "int": int, "float": float}.get(type_name, str)
        parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=f"default: {f.default!r}")
    return cls(**vars(parser.parse_args(argv)))


def run_entry(step: Callable, cls, argv: list[str] | None = None) -> None:
    """Parse flags into `cls`, check the tracking store, run `step(cfg)`; an `InputError` prints
    `error: <message>` and exits 2.

    The MLflow run opened by the step is closed as FAILED by its context manager before we get here.
    TensorFlow's C++ start-up chatter is silenced by TF_CPP_MIN_LOG_LEVEL in the MLproject commands: it
    must be set before TensorFlow is imported, which entry modules do at import time, before this runs.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = parse_config(cls, argv)
    try:
        from pipeline.tracking import check_tracking  # MLflow is imported by the entry module already

        check_tracking()  # before any work: an unreachable store must not cost a training
        step(cfg)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
