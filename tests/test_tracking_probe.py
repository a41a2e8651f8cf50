"""An unreachable or misconfigured tracking store stops every entry point within seconds, before any
work, with one line that names the URI and the fix (exit code 2), instead of MLflow's minutes of retries."""

import time

import mlflow
import pytest

from emunet.core.errors import InputError
from emunet.registry.tracking import check_tracking
from tests.conftest import free_port, run_module


@pytest.mark.parametrize("module, args", [
    ("pipeline.train", ["--dataset_uri", "nowhere"]),
    ("pipeline.preprocess", []),
    ("serving.predict", ["--input", "stack.tif"]),
    ("pipeline.main", []),
])
def test_entry_points_fail_fast_on_a_closed_tracking_server(module, args, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = run_module(module, *args, cwd=tmp_path, env_uri=uri, timeout=120)
    seconds = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-2000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and uri in error[0] and "MLFLOW_TRACKING_URI" in error[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert seconds < 60, seconds  # process start and imports included; MLflow alone retries for minutes
    assert not (tmp_path / ".em-unet-checkpoints").exists()  # nothing was started


def test_a_closed_database_port_fails_in_seconds(monkeypatch):
    uri = f"postgresql://user:secret@127.0.0.1:{free_port()}/mlflow"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    started = time.monotonic()
    try:
        with pytest.raises(InputError, match="cannot use the MLflow tracking store postgresql://user:\\*\\*\\*@") as error:
            check_tracking()
        assert "secret" not in str(error.value)  # the password is not printed
    finally:
        mlflow.set_tracking_uri(None)
    assert time.monotonic() - started < 15  # MLflow's own engine retries for about 100 s


def test_a_malformed_uri_is_named(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "htp:/mlflow-host:5000")
    mlflow.set_tracking_uri("htp:/mlflow-host:5000")
    try:
        with pytest.raises(InputError, match="htp:/mlflow-host:5000.*MLFLOW_TRACKING_URI"):
            check_tracking()
    finally:
        mlflow.set_tracking_uri(None)


def test_a_working_store_passes_and_leaves_the_environment_as_it_was(store, monkeypatch):
    """A reachable store passes in seconds; the probe's short HTTP timeouts are only for the probe: the
    retries a long training relies on are what they were before (here: a value the user had set)."""
    import os
    import sqlite3

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    started = time.monotonic()
    check_tracking()
    assert time.monotonic() - started < 15
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "7" and "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ
    tables = sqlite3.connect(store.removeprefix("sqlite:///")).execute("SELECT name FROM sqlite_master").fetchall()
    assert ("experiments",) in tables  # the probe opened (and so created) the real store
