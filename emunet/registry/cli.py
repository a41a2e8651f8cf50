"""Command lines from config dataclasses, and the one place where errors about the user's data or
parameters become one line `error: <message>` and exit code 2.

Flags are the dataclass fields (snake_case, as in MLproject), so defaults are defined once: in the
dataclass. Entry points are `python -m pipeline.<step> --field value ...`.
"""

import argparse
import dataclasses
import logging
import os
import sys
import traceback
from typing import Callable

from emunet.core.errors import InputError

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
# MLflow error codes that mean "the user asked for something that is not there or not valid".
USER_ERROR_CODES = ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST")
DEBUG_ENV = "EM_UNET_DEBUG"  # set to 1 to see the traceback behind an `error:` line


def _parse_bool(text: str) -> bool:
    if text.lower() in TRUE:
        return True
    if text.lower() in FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_int(text: str) -> int:
    """Whole numbers, also as MLflow writes float parameters (`9.0`); `2.5` is refused."""
    try:
        number = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not number.is_integer():
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    return int(number)


def _parse_float(text: str) -> float:
    try:
        number = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return number


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other user error (argparse prints usage first)
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parse_config(cls, argv: list[str] | None = None):
    """Build an instance of the frozen dataclass `cls` from `--field value` flags."""
    parser = _Parser(description=cls.__doc__)
    for f in dataclasses.fields(cls):
        type_name = f.type if isinstance(f.type, str) else f.type.__name__
        kind = {"bool": _parse_bool, "int": _parse_int, "float": _parse_float}.get(type_name, str)
        parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=f"default: {f.default!r}")
    return cls(**vars(parser.parse_args(argv)))


def user_error(exc: BaseException) -> str | None:
    """The one-line message for an error about the user's data or parameters, None for anything else (a
    bug, which keeps its traceback). Pure functions raise `InputError` (a `ValueError`) or `ValueError`
    with a message naming the value; the file system raises `OSError` naming the path."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, (InputError, ValueError)):
        text = str(exc)
    elif isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        text = f"{where}{exc.strerror or exc}"
    elif isinstance(exc, MlflowException) and exc.error_code in USER_ERROR_CODES:
        text = exc.message
    else:
        return None
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " ".join(lines)[:1000] or type(exc).__name__


def run_entry(step: Callable, cls, argv: list[str] | None = None) -> None:
    """Parse flags into `cls`, check the tracking store, run `step(cfg)`. An error about the user's data
    or parameters (`user_error`), from whichever function raised it, prints `error: <message>` and exits
    2; with EM_UNET_DEBUG=1 its traceback is printed too.

    The MLflow run opened by the step is closed as FAILED by its context manager before we get here.
    TensorFlow's C++ start-up chatter is silenced by TF_CPP_MIN_LOG_LEVEL in the MLproject commands: it
    must be set before TensorFlow is imported, which entry modules do at import time, before this runs.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = parse_config(cls, argv)
    try:
        from emunet.registry.tracking import check_tracking  # MLflow is imported by the entry module already

        check_tracking()  # before any work: an unreachable store must not cost a training
        step(cfg)
    except Exception as exc:
        message = user_error(exc)
        if message is None:
            raise
        if os.environ.get(DEBUG_ENV) == "1":
            traceback.print_exc()
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
