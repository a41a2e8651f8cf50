"""The resume backup of a training run: what `train` writes after every epoch so that a killed run,
started again with the same command, continues from its last completed epoch in the same MLflow run.

```
.em-unet-checkpoints/<key>/       default place: in the working directory, <key> hashes config + data
  state.json                      the pointer, replaced atomically last: epoch, run id, counters, best dice
  epoch-<n>/model.weights.h5      weights and optimizer state after epoch n (Keras `save_weights`)
  epoch-<n>/best.npz              the best epoch's weights so far
  lock                            held (file_lock) while a process trains from this folder
  worker-1/ ...                   the same for each other worker of a multi-worker cluster
```
An epoch's folder is written in full and flushed to disk before `state.json` names it, and `state.json`
is written to a temporary name, flushed and renamed: a kill or a power cut at any moment leaves the
previous epoch's backup intact.
"""

import contextlib
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np

from emunet.core.errors import InputError
from emunet.core.files import atomic_write, file_lock, fsync_path, remove
from emunet.training.distribute import is_chief
from emunet.training.state import TrainingState

DEFAULT_ROOT = ".em-unet-checkpoints"
STATE = "state.json"
# Config fields that do not change what is trained: the same command with another value still resumes.
NOT_IN_KEY = ("dataset_uri", "workers", "checkpoint_dir")
WORKER_FOLDER = re.compile(r"^(worker|chief)-\d+$")


def checkpoint_key(config: dict, data_hash: str, replicas: int) -> str:
    """16 hex digits naming a training: its resolved config (without `NOT_IN_KEY`), the dataset's content
    hash (the same data under another URI, e.g. a new preprocess run of `main`, is the same training) and
    the number of replicas (the batches depend on it)."""
    parts = {k: v for k, v in config.items() if k not in NOT_IN_KEY}
    text = json.dumps({"config": parts, "data": data_hash, "replicas": replicas}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def backup_dir(checkpoint_dir: str, key: str, cluster: dict | None = None) -> Path:
    """Where this process keeps its backup: `checkpoint_dir` if given, else `.em-unet-checkpoints/<key>` in
    the working directory; a worker of a cluster other than the chief uses its own `<type>-<index>`
    subfolder (every worker saves, and they must not overwrite each other)."""
    folder = Path(checkpoint_dir) if checkpoint_dir else Path.cwd() / DEFAULT_ROOT / key
    if cluster is not None:
        if not is_chief(cluster):
            task = cluster["task"]
            folder = folder / f"{task['type']}-{task['index']}"
    return folder


class Backup:
    """The backup folder of one training process. Use as a context manager: it holds the folder's lock,
    so two processes cannot train from (and overwrite) the same backup at once."""

    def __init__(self, folder: str | Path, key: str):
        self.folder, self.key = Path(folder), key
        self._lock = None

    def __enter__(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        lock = contextlib.ExitStack()
        try:
            lock.enter_context(file_lock(self.folder / "lock", blocking=False))
        except TimeoutError:
            raise InputError(f"another training with the same configuration is running from {self.folder}; "
                             f"wait for it to finish, or pass checkpoint_dir to keep this one apart") from None
        self._lock = lock
        return self

    def __exit__(self, *exc):
        if self._lock is not None:
            self._lock.close()  # releases the lock; a killed process releases it too
            self._lock = None

    def load(self) -> tuple[TrainingState, Path] | None:
        """The last complete backup as `(state, path of the weights and optimizer state)`, or None.
        Raises `InputError` when the folder holds the backup of another training."""
        path = self.folder / STATE
        if not path.is_file():
            return None
        try:  # checkpoint_dir is the user's: its state.json may be another tool's, or hand-edited
            data = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: not a training backup ({exc}); delete it or pass another checkpoint_dir") from None
        key = data.get("key") if isinstance(data, dict) else None
        if key != self.key:
            raise InputError(f"{self.folder} holds the backup of another training (key {key}, this "
                             f"one is {self.key}); delete the folder or pass another checkpoint_dir")
        epoch_dir = self.folder / data["folder"]
        with np.load(epoch_dir / "best.npz") as best:
            best_weights = [best[f"arr_{i}"] for i in range(len(best.files))]
        return TrainingState.from_json(data, best_weights), epoch_dir / "model.weights.h5"

    def save(self, state: TrainingState, model) -> None:
        """Write the backup after an epoch: `model`'s weights and optimizer state, the state's best
        weights, then `state.json` naming them. Everything is on disk before the pointer moves."""
        name = f"epoch-{state.next_epoch}"
        epoch_dir = self.folder / name
        shutil.rmtree(epoch_dir, ignore_errors=True)  # a leftover of a kill during an earlier write
        epoch_dir.mkdir(parents=True)
        model.save_weights(epoch_dir / "model.weights.h5")
        np.savez(epoch_dir / "best.npz", *state.best_weights)
        for path in (epoch_dir / "model.weights.h5", epoch_dir / "best.npz", epoch_dir, self.folder):
            fsync_path(path)
        with atomic_write(self.folder / STATE, durable=True) as tmp:
            tmp.write_text(json.dumps({**state.to_json(), "key": self.key, "folder": name}, indent=1))
        for old in self.folder.glob("epoch-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)

    def remove(self) -> None:
        """Delete this process's backup after a successful finish (other workers' subfolders are theirs)."""
        (self.folder / STATE).unlink(missing_ok=True)
        for old in [*self.folder.glob("epoch-*"), *self.folder.glob(f"{STATE}.*.partial")]:
            remove(old)
        (self.folder / "lock").unlink(missing_ok=True)
        # Empty folders that backups made: this one, the chief's (from a worker's subfolder), and the
        # default root. Only if empty: another worker's backup or another training's stays.
        folders = [self.folder]
        if WORKER_FOLDER.match(self.folder.name):
            folders.append(self.folder.parent)
        if folders[-1].parent.name == DEFAULT_ROOT:
            folders.append(folders[-1].parent)
        for folder in folders:
            try:
                folder.rmdir()
            except OSError:
                break
