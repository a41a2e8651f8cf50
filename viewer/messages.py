"""Error messages fit for the page: one line, no traceback, no file system paths of the server."""

import re

# An absolute POSIX or Windows path, or a file:// URI: what a server's error messages leak.
_PATH = re.compile(r"(file://)?(/[\w.~@+-]+){2,}/?|[A-Za-z]:\\[^\s'\"]+")
MAX_LENGTH = 300


def short_error(exc: BaseException) -> str:
    """`TypeName: first line of the message`, with paths replaced by `…` and cut at `MAX_LENGTH`."""
    lines = str(getattr(exc, "message", "") or exc).strip().splitlines()
    if not lines:
        return type(exc).__name__
    text = _PATH.sub("…", lines[0])
    return f"{type(exc).__name__}: {text[:MAX_LENGTH]}"
