"""Which devices train: one device, or `tf.distribute.MirroredStrategy` over several GPUs."""

import tensorflow as tf

from pipeline.errors import InputError


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


def make_strategy(gpus: str = "", devices: list[str] | None = None) -> tf.distribute.Strategy:
    """MirroredStrategy when more than one device is chosen, else the default (single-device) strategy.

    `devices` overrides GPU discovery (tests pass two logical CPU devices to exercise the mirrored path).
    """
    devices = devices if devices is not None else visible_gpus(gpus)
    if len(devices) > 1:
        return tf.distribute.MirroredStrategy(devices)
    return tf.distribute.get_strategy()
