"""tf.distribute strategies: TPUStrategy, OneDeviceStrategy or MirroredStrategy over GPUs or
logical CPU devices (``$FAULTLAB_TF_STRATEGY``: auto | mirrored | one_device | tpu)."""

from __future__ import annotations

import os

from faultlab.backends.tf.runtime import tf
from faultlab.errors import FaultlabError


def _tpu_strategy():
    """TPUStrategy on the TPU named by the environment (untested here: no TPU on CI)."""
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as e:
        raise FaultlabError(f"no TPU available ({type(e).__name__}: {e})") from None
    return tf.distribute.TPUStrategy(resolver)


def select_strategy(replicas: int, kind: str | None = None):
    """A tf.distribute strategy with `replicas` replicas (see the module docstring)."""
    kind = (kind or os.environ.get("FAULTLAB_TF_STRATEGY", "auto")).strip().lower() or "auto"
    if kind not in ("auto", "mirrored", "one_device", "tpu"):
        raise FaultlabError(f"FAULTLAB_TF_STRATEGY must be auto, mirrored, one_device or tpu, "
                            f"got {kind!r}")
    if kind == "tpu" or (kind == "auto" and (os.environ.get("TPU_NAME")
                                             or os.environ.get("COLAB_TPU_ADDR"))):
        strategy = _tpu_strategy()
        if strategy.num_replicas_in_sync != replicas:
            raise FaultlabError(f"the TPU has {strategy.num_replicas_in_sync} replicas, the "
                                f"workload asks for {replicas}")
        return strategy
    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    if kind == "one_device" or (kind == "auto" and replicas == 1):
        if replicas != 1:
            raise FaultlabError(f"one_device strategy runs 1 replica, the workload asks for "
                                f"{replicas}")
        return tf.distribute.OneDeviceStrategy(gpus[0] if gpus else cpus[0])
    devices = gpus[:replicas] if len(gpus) >= replicas else cpus[:replicas]
    if len(devices) < replicas:
        raise FaultlabError(f"{replicas} replicas need {replicas} devices but this process has "
                            f"{len(cpus)} logical CPU devices: set FAULTLAB_TF_CPU_DEVICES="
                            f"{replicas} before starting faultlab")
    cross = (tf.distribute.ReductionToOneDevice(reduce_to_device=cpus[0])
             if devices[0] in cpus else None)
    return tf.distribute.MirroredStrategy(devices, cross_device_ops=cross)
