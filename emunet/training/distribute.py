"""Which devices train: one device, `MirroredStrategy` over several GPUs of one machine, or
`MultiWorkerMirroredStrategy` over machines when `TF_CONFIG` describes a cluster.

`TF_CONFIG` is TensorFlow's own cluster description, set by a Kubernetes TFJob or a Slurm script:
`{"cluster": {"worker": ["host1:port", "host2:port"]}, "task": {"type": "worker", "index": 0}}`.
Worker 0 (or the task of type "chief") is the chief: it alone logs to MLflow.
"""

import json
import os

import tensorflow as tf

from emunet.core.errors import InputError


def cluster_config(raw: str | None = None) -> dict | None:
    """The parsed and checked `TF_CONFIG` (default: from the environment), or None when it is unset."""
    raw = os.environ.get("TF_CONFIG", "") if raw is None else raw
    if not raw.strip():
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as err:
        raise InputError(f"TF_CONFIG is not valid JSON ({err.msg} at character {err.pos}): {raw[:120]!r}") from None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    task = config.get("task") if isinstance(config, dict) else None
    example = '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}}'
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise InputError(f"TF_CONFIG needs a 'cluster' and a 'task' object, like {example}; got {raw[:120]!r}")
    for kind, addresses in cluster.items():
        if not isinstance(addresses, list) or not all(isinstance(a, str) and ":" in a for a in addresses):
            raise InputError(f"TF_CONFIG cluster.{kind} must be a list of 'host:port' strings, got {addresses!r}")
    kind, index = task.get("type"), task.get("index")
    if kind not in cluster or not isinstance(index, int) or not 0 <= index < len(cluster[kind]):
        raise InputError(f"TF_CONFIG task {task!r} is not in its cluster {cluster!r}")
    return config


def is_chief(config: dict | None) -> bool:
    """Whether this process logs and registers: always without a cluster, else the chief task or, when the
    cluster has none, worker 0 (TensorFlow's rule)."""
    if config is None:
        return True
    task = config["task"]
    if "chief" in config["cluster"]:
        return task["type"] == "chief"
    return task["type"] == "worker" and task["index"] == 0


def visible_gpus(selection: str = "") -> list[str]:
    """Logical GPU names, optionally restricted to `selection` ("0,2": those indices; "" = all)."""
    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    if not selection:
        return gpus
    try:
        wanted = [int(i) for i in selection.split(",")]
    except ValueError:
        raise InputError(f"gpus must be GPU indices like 0,1, got {selection!r}") from None
    missing = [i for i in wanted if i >= len(gpus) or i < 0]
    if missing:
        raise InputError(f"gpus={selection!r} asks for GPU {missing} but {len(gpus)} are visible")
    return [gpus[i] for i in wanted]


def make_strategy(gpus: str = "", devices: list[str] | None = None,
                  cluster: dict | None = None) -> tf.distribute.Strategy:
    """`MultiWorkerMirroredStrategy` when `cluster` (a parsed TF_CONFIG) is given; else MirroredStrategy
    when more than one device is chosen; else the default (single-device) strategy.

    `devices` overrides GPU discovery (tests pass two logical CPU devices to exercise the mirrored path).
    Call this before any other TensorFlow work: the multi-worker strategy must configure the runtime first.
    """
    if cluster is not None:
        return tf.distribute.MultiWorkerMirroredStrategy()
    devices = devices if devices is not None else visible_gpus(gpus)
    if len(devices) > 1:
        return tf.distribute.MirroredStrategy(devices)
    return tf.distribute.get_strategy()


def agree(strategy: tf.distribute.Strategy, value: float) -> float:
    """The mean of `value` over all replicas of all workers, the same number on every worker: a decision
    taken from a local clock (the time budget, the learning-rate progress) must be identical everywhere,
    or one worker would stop while the others wait for it in the next all-reduce. A flag (0 or 1) comes
    back > 0 when any worker raised it. Without several workers, `value` itself."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return value

    per_replica = strategy.experimental_distribute_values_from_function(lambda _: tf.constant(value, tf.float32))
    return float(strategy.reduce("MEAN", per_replica, axis=None))
