"""Fine-tuning: training that starts from a logged model's weights (`init_model`, a `models:/` or `runs:/`
URI) instead of a random initialisation, optionally with the encoder frozen for the first epochs.

The architecture comes from the model (`emunet.core.model.spec_of` reads it from the layers): config
fields left at their defaults take the model's values, and a field set to something else is refused
before training, since those weights cannot fill another network. The model is pinned when training
starts: `models:/em-unet@champion` is resolved to the version the alias names then (`em-unet v3`), which
is the lineage recorded with the new model (tag `init_model` of the train run and of the registered
version) and part of the resume backup's key.

A frozen encoder (the contracting path and the bottleneck: `downscale`, `enc*`, `bottleneck*`) keeps the
features learnt on the large data set while the decoder adapts to a few new slices; its BatchNorm layers
then normalise with their stored statistics, as Keras' transfer-learning guide does, so a few batches of
the new sample do not overwrite them. Keras fixes the trainable variables when it traces the training
step, so the step is traced again when the encoder is unfrozen (`FreezeEncoder`).
"""

import dataclasses
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import keras
import mlflow
from mlflow.exceptions import MlflowException

from emunet.core.errors import InputError
from emunet.core.model import UNetSpec, spec_of
from emunet.training.config import TrainConfig

# Fields that decide the shapes of the weights: set to another value than the model's, they are an error.
ARCHITECTURE = ("depth", "base_filters", "input_scale", "batch_norm", "context_slices")
# Fields the model also carries but whose weights load either way (BatchNorm's averaging, the bottleneck's
# dropout rate): left at their defaults they take the model's values, set they are the user's choice.
ADOPTED = ("bn_momentum", "dropout")
ENCODER = re.compile(r"^(downscale|enc\d+_.*|bottleneck_.*)$")
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")


@dataclass(frozen=True)
class InitModel:
    """A source model, loaded: where it came from and its weights by layer name."""

    uri: str  # as the user gave it
    pinned: str  # the URI that was read: models:/<name>/<version> for a registered model
    lineage: str  # what the new model records: "<name> v<version>", or the URI itself (runs:/<run id>/model)
    run_id: str  # the source model's run ("" when unknown)
    spec: UNetSpec
    weights: dict = field(repr=False)  # layer name -> list of arrays


def pin(uri: str) -> tuple[str, str, str]:
    """`(pinned URI, lineage, source run id)` of `uri`. A registered model's alias or version is resolved
    now, so the lineage names the version that was really used even if the alias moves later."""
    found = MODEL_URI.match(uri)
    if found is None:
        run = re.match(r"^runs:/([^/]+)/", uri)
        return uri, uri, run.group(1) if run else ""
    client = mlflow.MlflowClient()
    name = found["name"]
    try:
        version = (client.get_model_version_by_alias(name, found["alias"]) if found["alias"]
                   else client.get_model_version(name, found["version"]))
    except MlflowException as exc:
        raise InputError(f"init_model {uri}: no such registered model version ({exc.message.splitlines()[0][:200]})") from None
    return f"models:/{name}/{version.version}", f"{name} v{version.version}", version.run_id or ""


def load_init_model(uri: str) -> InitModel:
    """Download the model at `uri` (a pyfunc `model` or a `keras_model` artifact) and read its spec and
    weights. Raises `InputError` naming the URI when it cannot be read or is not a U-Net of this project."""
    pinned, lineage, run_id = pin(uri)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=pinned, dst_path=tmp))
        except (MlflowException, OSError) as exc:
            reason = (getattr(exc, "message", None) or str(exc)).strip().splitlines()[0][:200]
            raise InputError(f"init_model {uri}: cannot fetch the model ({reason})") from None
        files = sorted(local.rglob("*.keras")) if local.is_dir() else [local]
        if not files:
            raise InputError(f"init_model {uri}: no Keras model (.keras file) in it; pass runs:/<train run id>/model "
                             f"or models:/<name>/<version>")
        try:
            model = keras.models.load_model(files[0], compile=False, safe_mode=True)
            spec = spec_of(model)
        except ValueError as exc:
            raise InputError(f"init_model {uri}: {str(exc).splitlines()[0][:200]}") from None
        weights = {layer.name: layer.get_weights() for layer in model.layers if layer.weights}
    return InitModel(uri=uri, pinned=pinned, lineage=lineage, run_id=run_id, spec=spec, weights=weights)


def adopt_spec(cfg: TrainConfig, spec: UNetSpec) -> TrainConfig:
    """`cfg` with the model's architecture: fields left at their default (0, or the dataclass default)
    take `spec`'s values; an architecture field set to anything else raises `InputError` (one line: the
    field, both values)."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    filled = {}
    for name in (*ARCHITECTURE, *ADOPTED):
        given, theirs = getattr(cfg, name), getattr(spec, name)
        if given == defaults[name]:
            filled[name] = theirs
        elif given != theirs and name in ARCHITECTURE:
            raise InputError(f"{name}={given} contradicts init_model {cfg.init_model}, which has {name} {theirs}; "
                             f"leave {name} at its default to take the model's, or train without init_model")
    return dataclasses.replace(cfg, **filled)


def load_weights(model: keras.Model, source: InitModel) -> None:
    """Copy the source's weights into `model` layer by layer (call under the strategy's scope: mirrored
    variables are assigned on every replica)."""
    for layer in model.layers:
        if not layer.weights:
            continue
        theirs = source.weights.get(layer.name)
        ours = layer.get_weights()
        if theirs is None or [w.shape for w in theirs] != [w.shape for w in ours]:
            raise InputError(f"init_model {source.uri}: layer {layer.name} does not fit this network "
                             f"({'missing' if theirs is None else [w.shape for w in theirs]} vs {[w.shape for w in ours]})")
        layer.set_weights(theirs)


def set_encoder_trainable(model: keras.Model, trainable: bool) -> list[str]:
    """Make the encoder's layers (`ENCODER`) trainable or not; returns their names."""
    names = [layer.name for layer in model.layers if ENCODER.match(layer.name)]
    for name in names:
        model.get_layer(name).trainable = trainable
    return names


class FreezeEncoder(keras.callbacks.Callback):
    """The encoder frozen during epochs `0 .. epochs - 1`, trainable after. Each change re-traces the
    training step (Keras fixes the trainable variables when it traces it); the optimizer must have been
    built on all the variables beforehand (`fit` does), so that unfreezing finds their Adam moments."""

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs, self.frozen = epochs, None

    def on_epoch_begin(self, epoch, logs=None):
        frozen = epoch < self.epochs
        if frozen == self.frozen:
            return
        set_encoder_trainable(self.model, not frozen)
        self.model.make_train_function(force=True)
        if self.frozen is not None or frozen:
            print(f"epoch {epoch + 1}: encoder {'frozen' if frozen else 'trainable'}", flush=True)
        self.frozen = frozen
