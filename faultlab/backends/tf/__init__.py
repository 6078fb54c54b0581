"""The TensorFlow backend (Keras 3, tf.distribute). Importing this package does not import
TensorFlow: its modules do, through ``runtime`` (which configures TF before it initialises).

Modules (the torch backend has the same names for the same jobs): ``runtime`` (quiet import,
logical CPU devices, threads, determinism), ``trainer`` (TFTrainer under a strategy),
``models``, ``variables`` (bulk variable reads and assigns), ``injector`` and ``kernels``,
``adapter`` (the checkpoint adapter), ``checkpointers`` (tf.train.CheckpointManager baselines),
``loops`` (crash-test training loops) and ``keras_api`` (the Keras-native user API).
"""

from __future__ import annotations

import os

from faultlab.backends.base import Backend, OperandTable, TrainerBase
from faultlab.workloads.base import WorkloadConfig


class TFBackend(Backend):
    """A trainer is expensive to build (tracing the instrumented step takes tens of seconds
    for a ResNet), so the last one built is kept and handed out again for the same
    configuration, reset to the initial state a fresh build would have (bit-identical: the
    initial weights are a function of the seed, the optimizer state starts at zero)."""

    name = "tf"
    checkpointers = {"tf-sync": "faultlab.backends.tf.checkpointers:TFCheckpoint",
                     "tf-async": "faultlab.backends.tf.checkpointers:TFAsyncCheckpoint"}
    crash_loops = {"keras-mlp": "faultlab.backends.tf.loops:keras_loop"}

    def __init__(self):
        self._last: tuple | None = None

    def build_trainer(self, config: WorkloadConfig) -> TrainerBase:
        from faultlab.backends.tf.trainer import TFTrainer
        key = config.key()
        if self._last is not None and self._last[0] == key:
            trainer, initial = self._last[1], self._last[2]
            trainer.set_state(initial)
            trainer.injector.disarm()
            trainer.signal_spec = None
            trainer.lr_scale = 1.0
            return trainer
        self._last = None
        trainer = TFTrainer(config)
        self._last = (key, trainer, trainer.get_state())
        return trainer

    def new_trainer(self, config: WorkloadConfig) -> TrainerBase:
        from faultlab.backends.tf.trainer import TFTrainer
        return TFTrainer(config)

    def operand_shapes(self, config: WorkloadConfig) -> OperandTable:
        from faultlab.backends.tf.trainer import operand_shapes
        return operand_shapes(config)

    def configure(self, threads: int) -> None:
        # read by runtime.configure_runtime() when TF initialises in this process
        os.environ["OMP_NUM_THREADS"] = str(threads)
        from faultlab.backends.tf.runtime import configure_runtime
        configure_runtime()

    def checkpoint_adapter(self) -> type:
        from faultlab.backends.tf.adapter import TFCheckpointAdapter
        return TFCheckpointAdapter


BACKEND = TFBackend()
