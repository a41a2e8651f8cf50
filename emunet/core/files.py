"""Writing files so that nothing half-written ever looks finished.

Every result is first written to a temporary sibling whose name is unique to the writing process and
attempt (`cells_mask.tif.4242-9f3a1c2e.partial`), then renamed onto its final name in one step: a killed
run leaves only `.partial` files, and two writers of the same result (a retried or speculative Spark task)
never write into the same file. With `durable`, the data and the rename are flushed to disk first, so
a power cut cannot leave a final name pointing at missing data.
"""

import contextlib
import os
import shutil
import uuid
from pathlib import Path

from filelock import FileLock

from emunet.core.errors import InputError

PARTIAL = ".partial"


def partial_path(target: str | Path) -> Path:
    """A sibling of `target` that no other process or attempt uses: `<name>.<pid>-<random>.partial`."""
    target = Path(target)
    return target.with_name(f"{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{PARTIAL}")


def fsync_path(path: str | Path) -> None:
    """Flush a file's data, or a folder's entries (a rename in it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    """Remove a file or a folder tree that this project wrote; a missing path is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_write(target: str | Path, durable: bool = False):
    """Yield a fresh temporary path beside `target` (nothing exists there yet: write a file or make a
    folder). When the block ends without an error it is renamed onto `target`; on an error it is removed
    and `target` is left as it was. A folder written so replaces a folder at `target` (its caller checks
    first that it may: an earlier result of ours); a file never replaces a folder. `durable` fsyncs the
    data and the rename."""
    target = Path(target)
    tmp = partial_path(target)
    try:
        yield tmp
        if durable:
            for path in (tmp.rglob("*") if tmp.is_dir() else ()):
                fsync_path(path)
            fsync_path(tmp)
        if target.is_dir() and not target.is_symlink():
            if not tmp.is_dir():
                raise InputError(f"{target} is a folder; a result file never replaces a folder (move it away)")
            old = partial_path(target)  # an earlier result folder (its caller checked it may go): aside, then gone
            os.replace(target, old)
            os.replace(tmp, target)
            remove(old)
        else:
            os.replace(tmp, target)
        if durable:
            fsync_path(target.parent)
    except BaseException:
        remove(tmp)
        raise


@contextlib.contextmanager
def atomic_writes(targets: dict[str, Path]):
    """`atomic_write` for several files that belong together (a mask, its probabilities, its table):
    yields `{key: temporary path}`; all are renamed when the block succeeds, none when it fails."""
    with contextlib.ExitStack() as stack:
        yield {key: stack.enter_context(atomic_write(path)) for key, path in targets.items()}


def output_folder(path: str | Path, what: str = "output_dir") -> Path:
    """Make sure `path` is a folder results can be written into (made if missing). Raises `InputError`
    when it is a file, or cannot be made or written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{what} {path} exists and is a file, not a folder; pass a folder to write into")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{what} {path}: cannot make the folder ({exc.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputError(f"{what} {path}: the folder is not writable")
    return path


@contextlib.contextmanager
def file_lock(path: str | Path, blocking: bool = True):
    """Hold an exclusive lock on `path` (made if missing, left in place) for the block: other processes,
    and other threads, wait. A killed holder releases it. With `blocking=False`, a lock held elsewhere
    raises `TimeoutError` at once instead of waiting. Portable (the `filelock` package: flock on Linux and
    macOS, LockFileEx on Windows). Taking a lock this thread already holds raises `RuntimeError` rather
    than waiting for ever."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path, blocking=blocking):
        yield
