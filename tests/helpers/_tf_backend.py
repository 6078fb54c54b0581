"""The conformance suite's TensorFlow adapter: how the shared tests run a kernel, an
instrumented two-replica network, a training trial and a checkpointed session on TF. The
torch adapter (_torch_backend.py) has the same names."""

from __future__ import annotations

import json

import faultlab.backends.tf.trainer  # noqa: F401  (configures TF's runtime before first use)
from faultlab.backends.tf.runtime import tf

import keras
import numpy as np

from faultlab.backends import load_backend
from faultlab.backends.tf import kernels as K
from faultlab.backends.tf.injector import TFInjector
from faultlab.backends.tf.keras_api import cpu_devices
from faultlab.backends.tf.models import OnePassBatchNorm

NAME = "tf"
BACKEND = load_backend(NAME)

#: hypothesis examples per kernel property (every TF kernel call is an eager op dispatch)
EXAMPLES = {"single_bit": 150, "k_bit": 100, "set": 120, "replacement": 100, "scale": 200}

TF = {"float32": tf.float32, "float16": tf.float16, "bfloat16": tf.bfloat16,
      "float64": tf.float64, "int8": tf.int8}
TF_UINT = {"float32": tf.uint32, "float16": tf.uint16, "bfloat16": tf.uint16,
           "float64": tf.uint64, "int8": tf.uint8}


def _ubits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x).view(np.dtype(f"u{x.dtype.itemsize}"))


def to_tf(x: np.ndarray, dtype: str):
    """A NumPy array of `dtype` (bf16 as uint16 bits) as a TF tensor, bit for bit."""
    return tf.bitcast(tf.constant(_ubits(x)), TF[dtype])


def bits(t, dtype: str) -> np.ndarray:
    return tf.bitcast(t, TF_UINT[dtype]).numpy()


# --- kernels ----------------------------------------------------------------------------------

def kernel_outputs(x: np.ndarray, c, dtype: str) -> dict[str, np.ndarray]:
    """The bits the TF kernel gives for corruption `c` on `x` (it must leave its input
    alone). The fixed-size (XLA) mode is cross-checked in tests/tf/test_kernels.py."""
    t = to_tf(x, dtype)
    out = bits(K.apply(t, K.prepare(c, dtype)), dtype)
    assert (bits(t, dtype) == _ubits(x)).all(), "apply modified its input"
    return {"apply": out}


# TF's own float arithmetic flushes subnormals and its casts are not the kernels' contract,
# so the reference alone judges the set and scale models here
native_set = None
native_scale = None


# --- an instrumented two-replica network ------------------------------------------------------

def _model(batchnorm: bool = False):
    """conv (3x3, stride 2, 'same', no bias) -> [BatchNorm] -> ReLU -> conv2 (3x3, 'same') ->
    dense."""
    inp = keras.Input((8, 8, 2))
    c1 = keras.layers.Conv2D(4, 3, 2, padding="same", use_bias=False, name="conv")(inp)
    a1 = keras.layers.ReLU()(OnePassBatchNorm(name="bn")(c1) if batchnorm else c1)
    c2 = keras.layers.Conv2D(4, 3, 1, padding="same", name="conv2")(a1)
    logits = keras.layers.Dense(5, name="dense")(keras.layers.Flatten()(c2))
    return keras.Model(inp, [c1, a1, c2, logits])


class InjectorHarness:
    """A 2-replica MirroredStrategy step; `run` returns each replica's activations, parameter
    gradients (after weight-gradient faults, by variable path) and input gradient."""

    R, B = 2, 3

    def __init__(self, batchnorm: bool = False):
        self.strategy = tf.distribute.MirroredStrategy(cpu_devices(self.R))
        keras.utils.set_random_seed(3)
        with self.strategy.scope():
            self.model = _model(batchnorm)
        self.inj = TFInjector(self.model, self.strategy, None,
                              tf.TensorSpec((self.B, 8, 8, 2), tf.float32))
        self.tvars = self.model.trainable_variables
        rng = np.random.default_rng(0)
        self.x = rng.normal(size=(self.R * self.B, 8, 8, 2)).astype(np.float32)
        self.y = rng.integers(0, 5, size=self.R * self.B)
        model, inj, tvars = self.model, self.inj, self.tvars

        def replica_fn(x, y):
            with inj.replica():
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    c1, a1, c2, logits = model(x, training=True)
                    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                        labels=y, logits=logits))
                grads = tape.gradient(loss, list(tvars) + [x])
                gv = inj.corrupt_gradients(grads[:-1], tvars)
            return c1, a1, c2, logits, gv, grads[-1]

        @tf.function(autograph=False)
        def step(x, y):
            return self.strategy.run(replica_fn, args=(x, y))
        self.step = step

    def _dist(self, a):
        B = self.B
        return self.strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(a[ctx.replica_id_in_sync_group * B:
                                      (ctx.replica_id_in_sync_group + 1) * B]))

    def kernel(self, layer: str) -> np.ndarray:
        return self.model.get_layer(layer).kernel.numpy()

    def run(self, faults=(), step=0) -> list[dict]:
        self.inj.arm(list(faults), step)
        try:
            out = self.step(self._dist(self.x), self._dist(self.y))
        finally:
            self.inj.disarm()
        local = [self.strategy.experimental_local_results(o) for o in out[:4]]
        grads = [self.strategy.experimental_local_results(g) for g in out[4]]
        dx = self.strategy.experimental_local_results(out[5])
        names = [v.path for v in self.tvars]
        return [{"c1": local[0][r].numpy(), "a1": local[1][r].numpy(),
                 "c2": local[2][r].numpy(), "logits": local[3][r].numpy(),
                 "g": {n: g[r].numpy() for n, g in zip(names, grads)},
                 "dx": dx[r].numpy()} for r in range(self.R)]


# --- a checkpointed training session ----------------------------------------------------------

class CheckpointSession:
    """A small Keras model (BatchNorm, dropout) trained by Adam on inputs with noise from a
    tf.random.Generator; `adapter` is the backend's checkpoint adapter over the model, the
    optimizer and the generator (and the global RNGs); `batch` is the data position."""

    def __init__(self, seed: int = 0):
        keras.utils.set_random_seed(seed)
        self.model = keras.Sequential([
            keras.Input((6,)), keras.layers.Dense(8), keras.layers.BatchNormalization(),
            keras.layers.ReLU(), keras.layers.Dropout(0.25), keras.layers.Dense(3)])
        self.opt = keras.optimizers.Adam(1e-2)        # built by the first step or restore
        self.noise = tf.random.Generator.from_seed(seed + 1)
        self.data = np.random.RandomState(4).standard_normal((64, 6)).astype(np.float32)
        self.adapter = BACKEND.checkpoint_adapter()(self.model, self.opt,
                                                    generators={"noise": self.noise})
        self.batch = 0
        self._step = None

    def _train(self, x, y):
        x = x + 0.1 * self.noise.normal(tf.shape(x))
        tvars = self.model.trainable_variables
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=y, logits=self.model(x, training=True)))
        self.opt.apply_gradients(zip(tape.gradient(loss, tvars), tvars))

    def step(self) -> None:
        if self._step is None:
            self._step = tf.function(self._train)
        idx = np.arange(self.batch * 8, self.batch * 8 + 8) % 64
        self.batch += 1
        self._step(tf.constant(self.data[idx]), tf.constant((idx % 3).astype(np.int64)))

    def fingerprint(self) -> tuple[dict, str]:
        """Everything that decides the following steps, as bytes."""
        state, meta = self.adapter.capture(self.batch)
        return ({k: (v.dtype.str, v.shape, v.tobytes()) for k, v in state.items()},
                json.dumps(meta, sort_keys=True))
