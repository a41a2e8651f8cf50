"""MLflow helpers shared by the entry points: which experiment and run a step logs to, and where
artifacts of earlier steps are found."""

import dataclasses
import os
import re
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from emunet.core.errors import InputError
from emunet.core.files import file_lock

DEFAULT_EXPERIMENT = "em-unet"


@contextmanager
def step_run(step: str, experiment: str = DEFAULT_EXPERIMENT, run_id: str | None = None):
    """Open the MLflow run a step logs to, tagged `step=<step>`.

    - `run_id` given (an interrupted `train` resuming): that run is continued; inside `main` it becomes
      a child of the new parent run.
    - Under `mlflow run` (MLFLOW_RUN_ID set) the step resumes the run the project runner made.
    - Inside `main`, a step is a child run of the active parent run, in the parent's experiment.
    - Run alone, it starts a new run in `experiment`.
    An exception inside the block ends the run as FAILED (MLflow's context manager does that).
    """
    parent = mlflow.active_run()
    if run_id is not None:
        run = mlflow.start_run(run_id=run_id, nested=parent is not None)
        if parent is not None:
            mlflow.set_tag("mlflow.parentRunId", parent.info.run_id)
    elif parent is not None:
        run = mlflow.start_run(run_name=step, nested=True, experiment_id=parent.info.experiment_id)
    elif os.environ.get("MLFLOW_RUN_ID"):
        run = mlflow.start_run()
    else:
        mlflow.set_experiment(experiment)
        run = mlflow.start_run(run_name=step)
    with run:
        mlflow.set_tag("step", step)
        yield run


def local_artifact(uri: str, what: str) -> Path:
    """A local folder for `uri`: itself if it is a folder, else the MLflow artifact downloaded."""
    if not uri:
        raise InputError(f"no {what} given: pass a folder or an MLflow artifact URI (runs:/<run id>/{what})")
    if Path(uri).is_dir():
        return Path(uri)
    if Path(uri).exists():
        raise InputError(f"{uri}: a file, not a {what} folder; pass the folder or runs:/<run id>/{what}")
    if "://" not in uri and ":" not in uri:
        raise InputError(f"{uri}: {what} folder not found")
    try:
        return Path(mlflow.artifacts.download_artifacts(uri))
    except (MlflowException, OSError, ValueError, ImportError) as exc:  # ImportError: s3:// without boto3
        raise InputError(f"{uri}: could not fetch the {what} from MLflow ({exc})") from exc


def load_segmenter(model_uri: str):
    """The segmenter inside a logged pyfunc model (`runs:/`, `models:/` or a local folder)."""
    try:
        return mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    except (MlflowException, OSError, ValueError) as exc:  # ValueError: Keras refusing an unsafe model, a bad URI
        reason = getattr(exc, "message", None) or str(exc)
        raise InputError(f"{model_uri}: cannot load the model ({reason.strip().splitlines()[0][:300]})") from None


def log_config(cfg, **extra) -> None:
    """Log a step's whole config (plus `extra`) as params. Keys already logged are kept: `mlflow run`
    logs the MLproject parameters itself (empty strings as "''"), and MLflow refuses to change a param."""
    params = {**dataclasses.asdict(cfg), **extra}
    logged = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    mlflow.log_params({k: v for k, v in params.items() if k not in logged})


def run_exists(run_id: str) -> bool:
    """Whether `run_id` is a live (not deleted) run of the current tracking store."""
    try:
        return mlflow.get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False


# A probe must answer in seconds: MLflow retries HTTP for minutes by default, and its SQLAlchemy stores
# retry an unreachable database for about 100 s.
PROBE_SECONDS = 5
DATABASES = ("postgresql", "mysql", "mssql")


def _probe_database(uri: str) -> None:
    import sqlalchemy

    timeout = {"postgresql": {"connect_timeout": PROBE_SECONDS}, "mysql": {"connect_timeout": PROBE_SECONDS}}
    engine = sqlalchemy.create_engine(uri, connect_args=timeout.get(uri.split(":")[0].split("+")[0], {}))
    try:
        with engine.connect():
            pass
    finally:
        engine.dispose()


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` tracking URI; None for other stores and in-memory SQLite."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?")[0]
    return None if path in ("", ":memory:") else Path(path)


@contextmanager
def sqlite_creation_lock(uri: str):
    """For a `sqlite:///` store, hold an exclusive lock on `<db>.lock` while MLflow opens it: MLflow creates
    and migrates a new store's tables on first use, and two processes doing that at once leave it
    half-migrated for good (`table _alembic_tmp_latest_metrics already exists`). Other stores: no lock."""
    path = sqlite_path(uri)
    with file_lock(f"{path}.lock") if path is not None else nullcontext():
        yield


def redact(uri: str) -> str:
    """A tracking URI fit to print: a database password becomes `***`."""
    return re.sub(r"://([^:/@]+):[^@/]*@", r"://\1:***@", uri)


def check_tracking() -> None:
    """Fail within seconds, before any work, if the tracking store cannot be used: an `InputError` naming
    the URI, what went wrong and the fix. Call at the start of an entry point."""
    uri = mlflow.get_tracking_uri()
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(PROBE_SECONDS))
    started = time.monotonic()
    try:
        if uri.split(":")[0].split("+")[0] in DATABASES:
            _probe_database(uri)
        with sqlite_creation_lock(uri):
            mlflow.MlflowClient().search_experiments(max_results=1)
    except Exception as exc:
        reason = (str(getattr(exc, "message", "") or exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        shown = redact(uri)  # never print a database password
        raise InputError(f"cannot use the MLflow tracking store {shown} ({reason.replace(uri, shown)}; after "
                         f"{time.monotonic() - started:.1f} s): start that server or database, or set "
                         f"MLFLOW_TRACKING_URI to one that works (e.g. sqlite:///mlflow.db)") from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
