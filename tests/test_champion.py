"""The `champion` alias moves only to a better model, also when two evaluations finish at the same moment:
two real `python -m pipeline.evaluate` processes on one SQLite store, and the settle path of a tracking
server (no lock) with a deterministic interleaving of two threads."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from emunet.registry.champion import promote_if_better, registry_lock
from pipeline.evaluate import EvaluateConfig, evaluate
from tests.conftest import ROOT


@pytest.mark.slow
def test_two_evaluations_at_once_promote_one_version(world, tmp_path):
    """The champion was scored on other data, so each evaluation re-scores it (seconds) before comparing.
    Both used to read the old champion, both found themselves better and both moved the alias: two
    versions reported "new champion", and whichever set it last won, better or not. Under the store's
    lock the second compares with the first's result: exactly one promotion, and the alias on it."""
    from tests.test_viewer_app import log_untrained_model

    name = "race"
    untrained = log_untrained_model()
    # The rule is Dice: the tiny test models find no cell as its own object yet (object F1 0 for both).
    evaluate(EvaluateConfig(model_uri=untrained, dataset_uri=str(world["other"]), registered_model=name,
                            champion_metric="dice"))
    env_uri = world["uri"]
    args = ["-m", "pipeline.evaluate", "--model_uri", world["trained"]["model_uri"], "--dataset_uri",
            str(world["data"]), "--registered_model", name, "--champion_metric", "dice"]
    procs = [subprocess.Popen([sys.executable, *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=run_env(env_uri)) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-2000:] + outputs[1][-2000:]
    verdicts = [next(line for line in out.splitlines() if line.startswith(f"registered {name} v")) for out in outputs]
    promoted = [v for v in verdicts if v.endswith("new champion") or "new champion (" in v]
    assert len(promoted) == 1, verdicts
    client = MlflowClient()
    champion = client.get_model_version_by_alias(name, "champion").version
    assert f"v{champion}:" in promoted[0], (champion, verdicts)


def run_env(uri: str) -> dict:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("MLFLOW_RUN_ID", None)
    return env


def test_without_a_lock_the_alias_settles_on_the_better_version(world):
    """A tracking server offers no lock: each run sets the alias, waits, re-reads it and settles against
    what another run put there. Interleaving forced by a slow re-scoring: the worse run (0.80) reads the
    old champion first and sets the alias first; the better run (0.90) must end as champion, and the worse
    one must report that it was not promoted."""
    client = MlflowClient()
    name = "settle"
    versions = [mlflow.register_model(world["trained"]["model_uri"], name).version for _ in range(3)]
    old, worse, better = versions
    client.set_model_version_tag(name, old, "test_dice", "0.5")
    client.set_model_version_tag(name, old, "data_fingerprint", "other-data")
    for version, score in ((worse, 0.8), (better, 0.9)):
        client.set_model_version_tag(name, version, "test_dice", repr(score))
        client.set_model_version_tag(name, version, "data_fingerprint", "this-data")
    client.set_registered_model_alias(name, "champion", old)

    def slow_rescore(version):  # the old champion on this data: takes a while, as a real re-scoring does
        time.sleep(1.0)
        return 0.5

    results = {}

    def run(version, score, delay):
        time.sleep(delay)
        results[version] = promote_if_better(MlflowClient(), world["uri"], name, "champion", version, score, "this-data",
                                             slow_rescore, settle=0.6, lock=False, metric="test_dice")

    threads = [threading.Thread(target=run, args=(worse, 0.8, 0.0)), threading.Thread(target=run, args=(better, 0.9, 0.3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert client.get_model_version_by_alias(name, "champion").version == better
    assert results[better][0] is True and results[worse][0] is False, results


def test_the_store_lock_serialises_champion_moves(tmp_path):
    """Two holders of the same SQLite store's champion lock never overlap (it is what makes the compare and
    the move one step)."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    spans = []

    def hold():
        with registry_lock(uri, "m") as locked:
            assert locked
            start = time.monotonic()
            time.sleep(0.3)
            spans.append((start, time.monotonic()))

    threads = [threading.Thread(target=hold) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spans.sort()
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])), spans
    with registry_lock("http://mlflow:5000", "m") as locked:
        assert locked is False  # a server: no lock, the settle loop instead


def test_the_champion_is_chosen_on_the_champion_metric_and_a_missing_score_is_measured_once(world):
    """A model with the better Dice that merges touching cells (object F1 0.39) must not stay champion
    against one that finds the cells (0.85) when the rule is object F1; it does when the rule is Dice. A
    champion registered before object scores existed has no `test_object_f1`: it is re-scored on this data
    once, and the score is kept as a tag."""
    client = MlflowClient()
    name = "by-metric"
    old, new = (str(mlflow.register_model(world["trained"]["model_uri"], name).version) for _ in range(2))
    for version, dice, f1 in ((old, 0.96, 0.39), (new, 0.95, 0.85)):
        client.set_model_version_tag(name, version, "test_dice", repr(dice))
        client.set_model_version_tag(name, version, "test_object_f1", repr(f1))
        client.set_model_version_tag(name, version, "data_fingerprint", "this-data")
    client.set_registered_model_alias(name, "champion", old)
    refuse = lambda version: pytest.fail("a champion with a score on this data must not be re-scored")  # noqa: E731
    assert promote_if_better(client, world["uri"], name, "champion", new, 0.95, "this-data", refuse,
                             metric="test_dice")[0] is False
    assert promote_if_better(client, world["uri"], name, "champion", new, 0.85, "this-data", refuse,
                             metric="test_object_f1")[:3] == (True, old, 0.39)
    assert str(client.get_model_version_by_alias(name, "champion").version) == new
    client.delete_model_version_tag(name, new, "test_object_f1")  # as a version from before object scores
    third = str(mlflow.register_model(world["trained"]["model_uri"], name).version)
    calls = []
    for _ in range(2):
        result = promote_if_better(client, world["uri"], name, "champion", third, 0.5, "this-data",
                                   lambda version: calls.append(str(version)) or 0.7, metric="test_object_f1")
        assert result == (False, new, 0.7)
    assert calls == [new] and client.get_model_version(name, new).tags["test_object_f1.this-data"] == "0.7"
