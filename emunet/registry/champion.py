"""The registry's `champion` alias only ever moves to a better model, even when two `evaluate` runs finish
at the same moment.

Comparing with the champion and moving the alias is one step under a lock where the store allows one:
a file lock beside a SQLite database or a file store, a PostgreSQL advisory lock for a `postgresql://`
store. An `http(s)://` tracking server offers clients no lock, so there the alias is set, re-read after
a pause, and the comparison settles against whatever another run put there meanwhile; the read and the
set are two calls apart, so a late set by a worse run is caught by the better run's re-read.

Scores are compared on one metric (`metric`, a version tag such as `test_object_f1` or `test_dice`;
higher is better) and on the same evaluation data only (the `data_fingerprint` of the held-out stacks).
A champion scored on other data, or without that metric, is re-scored on this data by the caller's
`rescore` and the result is kept as its tag `<metric>.<fingerprint>`, so it is not re-scored again.
"""

import contextlib
import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from emunet.core.files import file_lock
from emunet.registry.tracking import sqlite_path

SETTLE_SECONDS = 2.0  # a server store: how long after its own set a run re-reads the alias
MAX_ROUNDS = 10


# What `champion` is chosen on, and what training keeps its best epoch by: higher is better for each.
# object_f1 by default: users count and measure cells, and a model can keep a pixel Dice of 0.96 while it
# merges touching cells (issue 15: Dice 0.957, object F1 0.39).
CHAMPION_METRICS = ("object_f1", "dice", "iou", "mean_matched_iou", "pixel_accuracy", "object_f1_3d", "ap50_3d",
                    "ap75_3d", "rand_fscore_3d")
PIXEL_CHAMPION_METRICS = ("dice", "iou", "pixel_accuracy")  # measurable on sparse labels too
DEFAULT_CHAMPION_METRIC = "object_f1"
DEFAULT_METRIC = f"test_{DEFAULT_CHAMPION_METRIC}"  # the version tag compared
AUTO = "auto"
# `champion_metric=auto` where cells are found in 3-D: on the medulla cube (bench/volume_cells.py) the
# per-slice scores (Dice, object F1) ranked epochs whose 3-D cells were worse, Dice even an epoch that
# called nearly everything foreground (87 % of the cube is cell interior).
AUTO_3D_METRIC = "object_f1_3d"
# ... and where the labels are dense tissue (cells tiling the volume, segmented over every voxel): the
# connectomics benchmarks' own ranking (SNEMI3D, CREMI). Ranked by 3-D object F1, the medulla's volume
# recipe scored an adapted Rand error of 0.145, 0.160 and 0.207 in three runs (objects over the
# foreground) and 0.375 in one (the dense step): epochs with better matched objects had more merges.
AUTO_DENSE_METRIC = "rand_fscore_3d"


def choose_champion_metric(name: str, in_3d: bool, dense: bool = False) -> str:
    """The metric `name` stands for: itself, or for "auto" where the data's cells are found in 3-D
    (`in_3d`: `emunet.core.dataset.seen_in_3d`) `AUTO_DENSE_METRIC` for dense instance labels (`dense`:
    `emunet.core.dataset.dense_instances`) and `AUTO_3D_METRIC` for others, else `DEFAULT_CHAMPION_METRIC`."""
    if name != AUTO:
        return name
    if not in_3d:
        return DEFAULT_CHAMPION_METRIC
    return AUTO_DENSE_METRIC if dense else AUTO_3D_METRIC


@contextlib.contextmanager
def _postgres_lock(uri: str, name: str):
    import sqlalchemy

    key = int.from_bytes(hashlib.sha256(f"em-unet champion {name}".encode()).digest()[:8], "big", signed=True)
    engine = sqlalchemy.create_engine(uri)
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
    finally:
        engine.dispose()


@contextlib.contextmanager
def registry_lock(uri: str, name: str):
    """Yield True while holding a lock that serialises champion moves of registered model `name` on the
    store at `uri`; yield False (holding nothing) where the store offers no lock (a tracking server)."""
    scheme = urlparse(uri).scheme.split("+")[0]
    if scheme == "sqlite":
        path = sqlite_path(uri)
        with file_lock(f"{path}.champion.lock") if path is not None else contextlib.nullcontext():
            yield True
    elif scheme in ("", "file"):
        root = Path(urlparse(uri).path if scheme == "file" else uri or "mlruns")
        with file_lock(root / ".champion.lock"):
            yield True
    elif scheme == "postgresql":
        with _postgres_lock(uri, name):
            yield True
    else:
        yield False


def _champion(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def score_on(client: MlflowClient, version, fingerprint: str, rescore: Callable[[str], float],
             metric: str = DEFAULT_METRIC) -> float:
    """`metric` of a registered `version` on the evaluation data `fingerprint`: its own tag when it was
    evaluated there, a kept re-score, or `rescore(version number)` (then kept as a tag)."""
    tags = version.tags or {}
    if tags.get("data_fingerprint") == fingerprint and metric in tags:
        return float(tags[metric])
    key = f"{metric}.{fingerprint}"
    if key in tags:
        return float(tags[key])
    print(f"champion v{version.version} was scored on other data; scoring it on this data", flush=True)
    score = float(rescore(version.version))
    client.set_model_version_tag(version.name, version.version, key, repr(score))
    return score


def promote_if_better(client: MlflowClient, uri: str, name: str, alias: str, version: str, score: float,
                      fingerprint: str, rescore: Callable[[str], float], settle: float = SETTLE_SECONDS,
                      lock: bool = True, metric: str = DEFAULT_METRIC) -> tuple[bool, str | None, float | None]:
    """Move `alias` of `name` to `version` (scored `score` of `metric` on `fingerprint`) if there is no
    champion or the champion scores lower on the same data. Returns `(promoted, the champion it was
    compared with, its score)`. `lock=False` skips the store lock (to exercise the server path on a local
    store)."""
    with registry_lock(uri, name) if lock else contextlib.nullcontext(False) as locked:
        compared, best = None, None
        for _ in range(MAX_ROUNDS):
            champion = _champion(client, name, alias)
            if champion is not None and str(champion.version) == str(version):  # ours (a settle round)
                return True, compared, best
            if champion is not None:
                compared, best = str(champion.version), score_on(client, champion, fingerprint, rescore, metric)
                if score <= best:
                    return False, compared, best
                again = _champion(client, name, alias)  # scoring may have taken a while: still that one?
                if again is None or str(again.version) != compared:
                    continue
            client.set_registered_model_alias(name, alias, str(version))
            if locked:
                return True, compared, best
            time.sleep(settle)  # a server: let a concurrent set land, then look again
        raise MlflowException(f"the alias {alias} of {name} kept moving for {MAX_ROUNDS} rounds; run evaluate again")
