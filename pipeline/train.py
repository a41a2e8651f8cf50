"""`train` entry point: a U-Net trained on the dataset artifact's training stacks, validated every epoch on
the held-out stacks' full slices, logged to MLflow as a Keras model and as the stack-segmenting pyfunc.

    python -m pipeline.train --dataset_uri runs:/<preprocess run>/dataset --preset fast --max_minutes 5

The config and presets are `emunet.training.config`, the plan derived from the data (working resolution,
crop) `emunet.training.plan`, and the loop `emunet.training.loop`; this module wires them to MLflow.
"""

import json
import tempfile
from dataclasses import asdict
from pathlib import Path

import keras
import mlflow

from emunet.registry.cli import run_entry
from emunet.core.dataset import read_manifest
from emunet.core.model import UNetSpec
from emunet.registry.tracking import local_artifact, log_config
from emunet.inference.segmenter import log_segmenter, model_requirements
from emunet.training.checkpoint import Backup, backup_dir, checkpoint_key
from emunet.training.config import PRESETS, TrainConfig, batch_sizes, resolve, resolve_precision
from emunet.training.distribute import cluster_config, is_chief, make_strategy
from emunet.training.finetune import adopt_spec, load_init_model
from emunet.training.loop import fit, train_run
from emunet.training.plan import make_plan

__all__ = ["TrainConfig", "train"]


def train(cfg: TrainConfig, devices: list[str] | None = None) -> dict:
    """Run the step: returns `{"run_id", "model_uri", "val_dice", "epochs", "model", "fit_model"}`: `model`
    is the float32 Keras model holding the best weights, `fit_model` the one trained under the distribution
    strategy with the last weights (both for in-process callers). On a worker that is not the chief, run_id
    and model_uri are None: only the chief logs.

    `devices` (tests) forces MirroredStrategy over the given devices, e.g. two logical CPUs. With
    `TF_CONFIG` set, this process is one worker of a MultiWorkerMirroredStrategy cluster.

    After every epoch the state is backed up (`emunet.training.checkpoint`); run again after a kill, the
    same config on the same data continues from the last completed epoch in the same MLflow run, with the
    same batches, learning rates and best epoch as a run that was never interrupted. The time budget
    counts the completed epochs of all attempts. The backup is deleted when the run has finished.
    """
    crop_from_preset = not cfg.crop_size
    # Fine-tuning: the model's architecture fills the fields left at their defaults before the preset does.
    source = load_init_model(cfg.init_model) if cfg.init_model else None
    cfg = resolve(adopt_spec(cfg, source.spec) if source else cfg)
    cluster = cluster_config()  # before anything else: a TF_CONFIG that does not parse fails here
    dataset_dir = local_artifact(cfg.dataset_uri, "dataset")
    manifest = read_manifest(dataset_dir)
    cfg, plan = make_plan(cfg, crop_from_preset, dataset_dir, manifest)
    strategy = make_strategy(cfg.gpus, devices, cluster)
    replicas = strategy.num_replicas_in_sync
    per_replica, global_batch = batch_sizes(cfg, replicas)
    chief = is_chief(cluster)
    policy = resolve_precision(cfg.precision)
    spec = UNetSpec(depth=cfg.depth, base_filters=cfg.base_filters, batch_norm=cfg.batch_norm, dropout=cfg.dropout,
                    bn_momentum=cfg.bn_momentum, sync_batch_norm=replicas > 1, input_scale=cfg.input_scale,
                    context_slices=cfg.context_slices)
    # Linear scaling rule (Goyal et al. 2017): the rate grows with the global batch, from the recipe's
    # rate for one replica's batch; the warm-up is what makes large multiples stable.
    peak_rate = cfg.learning_rate * global_batch / cfg.batch_size
    keras.utils.set_random_seed(cfg.seed)
    # The pinned source (models:/em-unet/3, not @champion): if the alias moves, it is another training.
    key = checkpoint_key({**asdict(cfg), "init_model": source.pinned if source else ""},
                         manifest.get("content_hash", ""), replicas)
    with Backup(backup_dir(cfg.checkpoint_dir, key, cluster), key) as backup, \
            train_run(cfg, backup, chief, strategy, cluster) as (run, resumed):
        if chief:
            # The resolved recipe too: under `mlflow run -e train` the preset placeholders (0) are logged.
            log_config(cfg, replicas=replicas, global_batch_size=global_batch, per_replica_batch=per_replica,
                       peak_learning_rate=peak_rate, dtype_policy=policy,
                       thinnest_structure_px=plan["thinnest_structure_px"], predict_planes=plan["planes"],
                       crop_planes=plan["crop_planes"], chosen_context_slices=plan["context_slices"],
                       chosen_champion_metric=plan["champion_metric"], predict_grow_over_all=plan["grow_over_all"],
                       recipe=json.dumps({k: getattr(cfg, k) for k in (*PRESETS[cfg.preset], "input_scale")}))
            mlflow.log_dict(plan, "plan.json")
            mlflow.set_tag("data_fingerprint", manifest["eval_fingerprint"])
            if source is not None:  # the lineage: evaluate copies it onto the registered version
                mlflow.set_tags({"init_model": source.lineage, "init_run_id": source.run_id})
        eval_model, fit_model, state = fit(cfg, spec, dataset_dir, manifest, strategy, (per_replica, global_batch),
                                           peak_rate, policy, backup, run, resumed, chief, cluster, source,
                                           grow_over_all=plan["grow_over_all"])
        result = {"run_id": None, "model_uri": None, "val_dice": state.best_dice, "epochs": state.next_epoch,
                  "model": eval_model, "fit_model": fit_model}
        with tempfile.TemporaryDirectory() as tmp:
            # Every worker saves (TensorFlow's rule for multi-worker training); only the chief's copy is logged.
            keras_path = Path(tmp) / "unet.keras"
            eval_model.save(keras_path)
            if chief:
                mlflow.log_metrics({"best_val_dice": state.best_dice, f"best_val_{cfg.champion_metric}": state.best_score,
                                    "best_epoch": state.best_epoch, "epochs_trained": state.next_epoch})
                # context_slices: what every caller must stack as channels (emunet.inference.context).
                # grow_over_all: what `grow_over_all=auto` gives at predict (dense instance labels: True).
                meta = {"multiple_of": plan["multiple_of"], "context_slices": cfg.context_slices, "planes": plan["planes"],
                        "grow_over_all": plan["grow_over_all"],
                        "spec": asdict(spec), "crop_size": cfg.crop_size,
                        "data_fingerprint": manifest["eval_fingerprint"],
                        **({"init_model": source.lineage} if source else {})}
                log_segmenter(keras_path, meta, name="model")
                mlflow.keras.log_model(eval_model, name="keras_model", pip_requirements=model_requirements())
                result.update(run_id=run.info.run_id, model_uri=f"runs:/{run.info.run_id}/model")
        backup.remove()  # inside the run: a kill before this line resumes (and finishes) the same run
        return result


if __name__ == "__main__":
    run_entry(train, TrainConfig)
