"""Built-in crash-test training loops on TensorFlow / Keras 3 (``--workload keras-mlp``).
TensorFlow is not fork-safe once initialised: each loop is built in its training process."""

from __future__ import annotations

import random

import numpy as np

from faultlab.crash.loops import Sampler


class KerasLoop:
    """A Keras 3 loop whose every step depends on carried state: BatchNorm, dropout (a Keras
    SeedGenerator), Adam, input noise from a tf.random.Generator, batches from a sampler on
    NumPy's global generator and a coin from Python's random; the TF adapter saves it all.
    Importing faultlab's TF backend enables op determinism."""

    def __init__(self):
        from faultlab.backends.tf import trainer as tf_trainer  # noqa: F401  (op determinism)
        import keras
        from faultlab.backends.tf.runtime import tf
        from faultlab.backends.tf.adapter import TFCheckpointAdapter
        try:
            tf.config.threading.set_intra_op_parallelism_threads(1)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:
            pass                             # TF was initialised before (power-loss mode)
        keras.utils.set_random_seed(1)
        np.random.seed(2)
        random.seed(3)
        gen = np.random.RandomState(4)
        self.x = gen.standard_normal((256, 16)).astype(np.float32)
        self.y = (self.x[:, :4].sum(1) > 0).astype(np.int64)
        self.model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32),
                                       keras.layers.BatchNormalization(),
                                       keras.layers.ReLU(), keras.layers.Dropout(0.2),
                                       keras.layers.Dense(2)])
        self.opt = keras.optimizers.Adam(3e-3)
        self.opt.build(self.model.trainable_variables)
        self.noise = tf.random.Generator.from_seed(5)
        self.sampler = Sampler(len(self.y), 16)
        self.adapter = TFCheckpointAdapter(self.model, self.opt, data=self.sampler,
                                           generators={"noise": self.noise})
        self._tf = tf
        self._train = tf.function(self._train_step)

    def _train_step(self, x, y, sign):
        tf = self._tf
        x = sign * x + 0.05 * self.noise.normal(tf.shape(x))
        tvars = self.model.trainable_variables
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=y, logits=self.model(x, training=True)))
        self.opt.apply_gradients(zip(tape.gradient(loss, tvars), tvars))

    def step(self, k: int) -> None:
        idx = self.sampler.next()
        sign = -1.0 if random.random() < 0.5 else 1.0
        self._train(self._tf.constant(self.x[idx]), self._tf.constant(self.y[idx]),
                    self._tf.constant(sign))

    def capture(self, step: int):
        return self.adapter.capture(step, data_position=step)

    def restore(self, state, meta) -> None:
        self.adapter.restore(state, meta)


def keras_loop() -> KerasLoop:
    return KerasLoop()


# TensorFlow is not fork-safe once initialised: the zygote must not build this loop; every
# training process imports TF itself (seconds per restart instead of milliseconds).
keras_loop.fork_safe = False
