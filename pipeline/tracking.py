"""MLflow helpers shared by the entry points: which experiment and run a step logs to, and where
artifacts of earlier steps are found."""

import dataclasses
import os
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from pipeline.errors import InputError

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
    if "://" not in uri and ":" not in uri:
        raise InputError(f"{uri}: {what} folder not found")
    try:
        return Path(mlflow.artifacts.download_artifacts(uri))
    except Exception as exc:
        raise InputError(f"{uri}: could not fetch the {what} from MLflow ({exc})") from exc


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
