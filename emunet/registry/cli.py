"""Command lines from config dataclasses, and the one place where errors about the user's data or
parameters become one line `error: <message>` and exit code 2. Everything else is a bug: it keeps Python's
traceback and exit code 1, so that it can be reported, instead of passing for the user's mistake.

Flags are the dataclass fields (snake_case, as in MLproject), so defaults are defined once: in the
dataclass. Entry points are `python -m pipeline.<step> --field value ...`.
"""

import argparse
import dataclasses
import errno
import logging
import os
import sys
import traceback
from typing import Callable

from emunet.core.errors import InputError

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
# MLflow error codes that mean "the user asked for something that is not there or not valid".
USER_ERROR_CODES = ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST")
# OSErrors without a file name that are still the user's file system to fix: a full disk or quota, a file
# larger than the file system allows, a read-only mount, missing permissions (a write to an open file
# reports ENOSPC without naming it).
USER_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM)
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
    values = vars(parser.parse_args(argv))
    try:
        return cls(**values)
    except InputError as exc:  # a config that checks a field itself (TrainConfig's context_slices)
        parser.error(str(exc))


def _os_error_text(exc: OSError) -> str | None:
    """The message of an OSError about the user's files (a path, a full disk, a permission), else None:
    a connection reset or a bad file descriptor is no path the user can fix."""
    if not exc.filename and exc.errno not in USER_ERRNOS:
        return None
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or exc}"


def user_error(exc: BaseException) -> str | None:
    """The one-line message for an error the user can fix, None for anything else (a bug, which keeps its
    traceback). User errors are: `InputError` (the project's own checks, naming the value that was wrong),
    an `OSError` about the user's files (a path, a full disk, a permission), and an `MlflowException` whose
    code says that what was asked for does not exist or is not valid. A plain `ValueError` is a bug: NumPy,
    Keras and our own internal assertions raise it, and its message would read as the user's fault."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, InputError):
        text = str(exc)
    elif isinstance(exc, OSError):
        text = _os_error_text(exc)
    elif isinstance(exc, MlflowException) and exc.error_code in USER_ERROR_CODES:
        text = exc.message
    else:
        text = None
    if text is None:
        return None
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " ".join(lines)[:1000] or type(exc).__name__


def run_entry(step: Callable, cls, argv: list[str] | None = None) -> None:
    """Parse flags into `cls`, check the tracking store, run `step(cfg)`. An error about the user's data
    or parameters (`user_error`), from whichever function raised it, prints `error: <message>` and exits
    2; with EM_UNET_DEBUG=1 its traceback is printed too. Any other exception is a bug: it propagates, and
    Python prints its traceback and exits 1.

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
