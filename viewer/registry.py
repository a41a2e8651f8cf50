"""The model picker's view of an MLflow registry: which tracking stores the viewer may open, which
registered models and versions they hold, what a version was trained with, how it scored, and where its
run is. Plain functions of a tracking URI and an `MlflowClient`; no Streamlit, so they are tested against a
real SQLite store.

The stores come from the server's configuration, never from the page: loading a model imports its code
and reads its files on the viewer's host, so a visitor must not be able to point the viewer at a store
of their choosing. `streamlit run viewer/app.py -- --stores URI[,URI...]`, else the environment variable
EM_UNET_VIEWER_STORES, else MLFLOW_TRACKING_URI, else `sqlite:///mlflow.db`.
"""

import argparse
import os
from dataclasses import dataclass, field
from urllib.parse import urlparse

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from emunet.core.errors import InputError
from emunet.registry.tracking import sqlite_path

# Where `mlflow run .` writes when MLFLOW_TRACKING_URI is unset (MLflow's default store, in the cwd).
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_MODEL = "em-unet"
DEFAULT_ALIAS = "champion"
# The README's first command: what a user with an empty registry runs to get a model.
TRAIN_COMMAND = "mlflow run . --env-manager local --experiment-name em-unet"
# Training params worth a glance; the full list is one click away in the run.
KEY_PARAMS = ("preset", "crop_size", "base_filters", "depth", "loss", "epochs", "batch_size", "learning_rate")


STORES_ENV = "EM_UNET_VIEWER_STORES"


def default_tracking_uri(environ=None) -> str:
    """MLFLOW_TRACKING_URI if set (the store the pipeline wrote to), else MLflow's default store."""
    environ = os.environ if environ is None else environ
    return environ.get("MLFLOW_TRACKING_URI", "").strip() or DEFAULT_TRACKING_URI


def configured_stores(argv: list[str] | None = None, environ=None) -> list[str]:
    """The tracking URIs this viewer may open, in the order the page offers them: `--stores` (comma-
    separated, after `--` on the `streamlit run` line), else EM_UNET_VIEWER_STORES, else the default."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--stores", default="")
    given = parser.parse_known_args(argv if argv is not None else [])[0].stores or environ.get(STORES_ENV, "")
    stores = list(dict.fromkeys(u.strip() for u in given.split(",") if u.strip()))
    return stores or [default_tracking_uri(environ)]


def allowed(uri: str, stores: list[str]) -> str:
    """`uri` if it is one of the configured `stores`; an `InputError` otherwise, before anything opens it."""
    if uri not in stores:
        raise InputError("this viewer opens only the tracking stores its server was started with "
                         f"(--stores or {STORES_ENV}); the one asked for is not among them")
    return uri


def missing_sqlite_file(uri: str) -> str | None:
    """The database file of a `sqlite:///` URI if it does not exist, else None.

    Opening a missing SQLite store would create an empty one, so the viewer asks first."""
    path = sqlite_path(uri)
    return None if path is None or path.exists() else str(path)


def client_for(uri: str) -> MlflowClient:
    """A client bound to `uri` for both tracking and registry (no global MLflow state is touched)."""
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def list_models(client: MlflowClient) -> list[str]:
    """Registered model names, `em-unet` first, then alphabetical."""
    names = sorted(m.name for m in client.search_registered_models())
    return sorted(names, key=lambda n: n != DEFAULT_MODEL)


def version_choices(client: MlflowClient, name: str) -> dict[str, str]:
    """What the version picker offers, each with the version number it names: aliases as `@alias`
    (`@champion` first), then version numbers, newest first. `{"@champion": "2", "3": "3", "2": "2", ...}`"""
    model = client.get_registered_model(name)
    aliases = dict(model.aliases or {})
    versions = sorted((int(v.version) for v in client.search_model_versions(f"name='{name}'")), reverse=True)
    choices = {f"@{a}": str(aliases[a]) for a in sorted(aliases, key=lambda a: (a != DEFAULT_ALIAS, a))}
    return {**choices, **{str(v): str(v) for v in versions}}


def choice_label(choice: str, version: str) -> str:
    """How the picker shows a choice: `@champion (v2)` or `v3`."""
    return f"{choice} (v{version})" if choice.startswith("@") else f"v{version}"


def resolve_version(client: MlflowClient, name: str, choice: str):
    """The `ModelVersion` that `choice` (`@alias` or a version number) names. Raises `InputError`."""
    try:
        if choice.startswith("@"):
            return client.get_model_version_by_alias(name, choice[1:])
        return client.get_model_version(name, str(int(choice)))
    except (MlflowException, ValueError) as exc:
        raise InputError(f"model {name!r} has no version or alias {choice!r}") from exc


def run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """A URL of the run in the MLflow UI: on the tracking server itself, or on the `mlflow ui` that
    serves a local store (port 5000)."""
    base = tracking_uri.rstrip("/") if is_server(tracking_uri) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def is_server(tracking_uri: str) -> bool:
    """True for a tracking server (it serves its own UI); False for a local store, which needs `mlflow ui`."""
    return urlparse(tracking_uri).scheme in ("http", "https")


@dataclass(frozen=True)
class VersionInfo:
    """What the page shows about one registered model version."""

    name: str
    version: str
    aliases: tuple[str, ...]
    run_id: str
    run_link: str
    test_metrics: dict = field(default_factory=dict)  # test_* metrics of the evaluate run, if any
    params: dict = field(default_factory=dict)  # the training run's params
    lineage: str = ""  # the model it was fine-tuned from ("em-unet v3", or a runs:/ URI); "" = trained from scratch

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}" + "".join(f" @{a}" for a in self.aliases)


def describe(client: MlflowClient, tracking_uri: str, name: str, choice: str) -> VersionInfo:
    """Everything about the version `choice` names: its training params (from the run that logged the
    model), its `test_*` metrics (from the evaluate run that registered it, tag `eval_run_id`) and the
    model it was fine-tuned from (tag `init_model`)."""
    version = resolve_version(client, name, choice)
    params, link, metrics = {}, "", {}
    lineage = (version.tags or {}).get("init_model", "")
    if version.run_id:
        run = client.get_run(version.run_id)
        params = dict(run.data.params)
        lineage = lineage or run.data.tags.get("init_model", "")  # registered by hand, not by evaluate
        link = run_link(tracking_uri, run.info.experiment_id, version.run_id)
    eval_run_id = (version.tags or {}).get("eval_run_id")
    if eval_run_id:
        try:
            metrics = {k: v for k, v in client.get_run(eval_run_id).data.metrics.items() if k.startswith("test_")}
        except MlflowException:
            metrics = {}
    if not metrics and "test_dice" in (version.tags or {}):
        metrics = {"test_dice": float(version.tags["test_dice"])}
    return VersionInfo(name=name, version=str(version.version), aliases=tuple(version.aliases or ()),
                       run_id=version.run_id or "", run_link=link, test_metrics=metrics, params=params,
                       lineage=lineage)


def load_pyfunc(tracking_uri: str, name: str, version: str, stores: list[str]):
    """The pyfunc model of `name` version `version` in the store at `tracking_uri`, which must be one of
    the configured `stores` (loading a model runs its code on this host).

    The artifacts are fetched through a client bound to that store, so several sessions looking at
    different stores do not race on MLflow's global tracking URI."""
    client = client_for(allowed(tracking_uri, stores))
    source = client.get_model_version_download_uri(name, version)
    local = mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=tracking_uri)
    return mlflow.pyfunc.load_model(local)
