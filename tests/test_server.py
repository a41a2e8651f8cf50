"""A lab's shared tracking server, for real: PostgreSQL (the Debian package's binaries, a throwaway cluster
on 127.0.0.1) behind `mlflow server` with a served artifact store; `main` runs against it over HTTP and the
runs, the registered version and the `champion` alias are checked through the client and in the database.

PostgreSQL refuses to run as root: as root the cluster is made and started as the `postgres` system user
that the Debian package creates (`runuser -u postgres`), in a folder that user owns; otherwise as oneself.
"""

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from tests.conftest import TINY_TRAIN, free_port, run_module

pytestmark = pytest.mark.slow


def postgres_bin() -> Path | None:
    """The folder of `initdb` (and `pg_ctl`, `createdb`): where the one on PATH links to, or else Debian's
    /usr/lib/postgresql/<version>/bin, which is not on PATH (the newest version)."""
    if shutil.which("initdb"):
        return Path(shutil.which("initdb")).resolve().parent
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: float(p.parent.parent.name))
    return found[-1].parent if found else None


def run(cmd: list, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def postgres():
    """A running PostgreSQL with an empty database `mlflow`; yields its SQLAlchemy URI."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries are absent (no initdb); `apt-get install postgresql` (.ci/run does)")
    root = Path(tempfile.mkdtemp(prefix="em-unet-pg-"))  # not under pytest's 0700 tree: `postgres` must enter it
    as_user = []
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("running as root, but there is no `postgres` user to run PostgreSQL as "
                        "(the Debian package creates it: apt-get install postgresql)")
        os.chown(root, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port, data = free_port(), root / "data"
    run([*as_user, bin_dir / "initdb", "-D", data, "-U", "emunet", "--auth=trust", "-E", "UTF8", "--locale=C",
         "--no-sync"], root)
    run([*as_user, bin_dir / "pg_ctl", "-D", data, "-l", root / "postgres.log", "-w",
         "-o", f"-h 127.0.0.1 -p {port} -k {root} -F", "start"], root)  # -F: no fsync, a throwaway cluster
    try:
        run([*as_user, bin_dir / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "emunet", "mlflow"], root)
        yield f"postgresql://emunet@127.0.0.1:{port}/mlflow"
    finally:
        run([*as_user, bin_dir / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"], root, check=False)
        shutil.rmtree(root, ignore_errors=True)


def stop_group(proc: subprocess.Popen) -> None:
    """End a process started with `start_new_session` and whatever it forked (same process group)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=30)
            return
        except subprocess.TimeoutExpired:
            pass


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory):
    """`mlflow server` on the PostgreSQL store, serving artifacts from a folder; yields its URL and folder."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    artifacts, port = folder / "artifacts", free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    with open(folder / "server.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", postgres,
                                 "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
                                 "--workers", "1"], cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: the workers it forks end with it
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180  # creating the schema in a fresh database takes a while on 2 cores
        while True:
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"mlflow server did not come up:\n{(folder / 'server.log').read_text()[-3000:]}")
            time.sleep(1)
        yield {"url": url, "artifacts": artifacts, "postgres": postgres}
    finally:
        stop_group(proc)


@pytest.fixture
def tracking(server, monkeypatch):
    """The server made this process's tracking and registry URI for one test."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server["url"])
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(server["url"])
    mlflow.set_registry_uri(server["url"])
    yield server
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


def test_main_against_a_shared_server_on_postgresql(tracking, tmp_path):
    import psycopg

    tiny = ["--synthetic_stacks", "3", "--synthetic_shape", "4,64,64"]
    for key, value in TINY_TRAIN.items():
        tiny += [f"--{key}", str(value)]
    proc = run_module("pipeline.main", *tiny, cwd=tmp_path, env_uri=tracking["url"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"mlflow ui --backend-store-uri {tracking['url']}" in proc.stdout

    client = MlflowClient(tracking["url"], tracking["url"])
    experiment = client.get_experiment_by_name("em-unet")
    runs = client.search_runs([experiment.experiment_id])
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    children = {r.data.tags["step"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id}
    assert set(children) == {"preprocess", "train", "evaluate"}
    assert all(r.info.status == "FINISHED" for r in children.values())
    assert children["train"].data.params["crop_size"] == "32"
    assert parent[0].data.metrics["test_dice"] == children["evaluate"].data.metrics["test_dice"]

    champion = client.get_model_version_by_alias("em-unet", "champion")
    assert champion.version == "1" and champion.run_id == children["train"].info.run_id
    assert champion.tags["data_fingerprint"] == children["preprocess"].data.tags["data_fingerprint"]

    # The store really is PostgreSQL: the same runs and alias are rows of its tables.
    with psycopg.connect(tracking["postgres"]) as db, db.cursor() as cur:
        cur.execute("SELECT run_uuid, status FROM runs")
        assert dict(cur.fetchall()) == {r.info.run_id: "FINISHED" for r in runs}
        cur.execute("SELECT name, alias, version FROM registered_model_aliases")
        assert cur.fetchall() == [("em-unet", "champion", 1)]

    # Artifacts went through the server into --artifacts-destination; the client wrote nothing locally.
    assert list(tracking["artifacts"].rglob("MLmodel")) and list(tracking["artifacts"].rglob("manifest.json"))
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlartifacts").exists()
    assert children["train"].info.artifact_uri.startswith("mlflow-artifacts:")

    # Another lab member loads the champion through the server alone.
    model = mlflow.pyfunc.load_model("models:/em-unet@champion")
    assert model.predict(np.zeros((2, 40, 40), np.float32)).shape == (2, 40, 40)

