"""Built-in Keras 3 models with exactly the torch models' layer names (see backends/torch/models.py):
the ISCA'23 artifact's ResNet-18, an MLP, a small causal transformer LM.

Every model is a flat functional model of standard Keras layers (Conv2D with 'same' padding,
Dense, Embedding, LayerNormalization) plus two small layers of our own:

* :class:`OnePassBatchNorm` -- BatchNorm as the fused kernels of an fp32 accelerator compute
  it: one-pass batch moments (var = E[x^2] - E[x]^2, clamped at 0) in float32, Keras' momentum
  0.9 and epsilon 1e-3, the moving statistics averaged over replicas (a MirroredVariable with
  MEAN aggregation, assigned in the replica context). Keras' own BatchNormalization computes
  two-pass moments (tf.nn.moments: mean of squared differences), under which the artifact's
  ImmediateINFsNaNs example (one 2.87e24 in a conv output) gives an infinite variance and a
  finite output instead of the accelerator's Inf - Inf = NaN.
* :class:`StatelessDropout` -- dropout whose mask is a pure function of (seed, step, replica,
  layer), so a run restored from a checkpoint replays the same masks.

Positions are the canonical layout, which is Keras' own (NHWC activations, HWIO conv kernels,
(in, out) dense kernels, (vocab, width) embeddings): nothing is remapped.
"""

from __future__ import annotations

import contextlib
import math
import threading

import numpy as np
from faultlab.backends.tf.runtime import tf
import keras

_SEED = threading.local()


@contextlib.contextmanager
def dropout_seed(seed: tf.Tensor):
    """Inside a (replica) function: dropout layers draw their masks from `seed` (int64 [2]),
    salted with the layer's index. Thread-local: MirroredStrategy traces each replica in its
    own thread."""
    prev = getattr(_SEED, "seed", None)
    _SEED.seed = seed
    try:
        yield
    finally:
        _SEED.seed = prev


class StatelessDropout(keras.layers.Layer):
    """Dropout with a mask drawn from the seed given by :func:`dropout_seed` (see module)."""

    def __init__(self, rate: float, salt: int, **kw):
        super().__init__(**kw)
        self.rate, self.salt = float(rate), int(salt)

    def call(self, x, training=None):
        if not training or self.rate <= 0:
            return x
        seed = getattr(_SEED, "seed", None)
        if seed is None:
            raise RuntimeError("StatelessDropout in training needs faultlab's dropout_seed()")
        s = tf.cast(seed, tf.int64) + tf.constant([0, 1_000_003], tf.int64) * self.salt
        return tf.nn.experimental.stateless_dropout(x, self.rate, seed=s)

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "salt": self.salt}


class OnePassBatchNorm(keras.layers.Layer):
    """BatchNorm with one-pass fp32 moments (see the module docstring)."""

    def __init__(self, momentum: float = 0.9, epsilon: float = 1e-3, **kw):
        super().__init__(**kw)
        self.momentum, self.epsilon = float(momentum), float(epsilon)

    def build(self, input_shape):
        c = int(input_shape[-1])
        self.gamma = self.add_weight(shape=(c,), initializer="ones", name="gamma")
        self.beta = self.add_weight(shape=(c,), initializer="zeros", name="beta")
        self.moving_mean = self.add_weight(shape=(c,), initializer="zeros", name="moving_mean",
                                           trainable=False, aggregation="mean")
        self.moving_variance = self.add_weight(shape=(c,), initializer="ones",
                                               name="moving_variance", trainable=False,
                                               aggregation="mean")

    def call(self, x, training=None):
        axes = list(range(len(x.shape) - 1))
        if training:
            mean = tf.reduce_mean(x, axis=axes)
            var = tf.reduce_mean(x * x, axis=axes) - mean * mean
            var = tf.where(var < 0, tf.zeros_like(var), var)   # clamp, keeping a NaN a NaN
            m = self.momentum
            self.moving_mean.assign(self.moving_mean * m + mean * (1.0 - m))
            self.moving_variance.assign(self.moving_variance * m + var * (1.0 - m))
        else:
            mean, var = self.moving_mean, self.moving_variance
        inv = tf.math.rsqrt(var + self.epsilon) * self.gamma
        return x * inv + (self.beta - mean * inv)

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum, "epsilon": self.epsilon}


class CausalSelfAttention(keras.layers.Layer):
    """Multi-head causal attention over a fused qkv projection (no weights of its own: the
    projections are the Dense layers block_{i}_attn_qkv / block_{i}_attn_out)."""

    def __init__(self, heads: int, **kw):
        super().__init__(**kw)
        self.heads = int(heads)

    def call(self, qkv):
        n, t = tf.shape(qkv)[0], tf.shape(qkv)[1]
        d = qkv.shape[-1] // 3
        hd = d // self.heads
        q, k, v = tf.split(qkv, 3, axis=-1)

        def heads(z):
            return tf.transpose(tf.reshape(z, [n, t, self.heads, hd]), [0, 2, 1, 3])
        q, k, v = heads(q), heads(k), heads(v)
        att = tf.matmul(q, k, transpose_b=True) / math.sqrt(hd)
        causal = tf.linalg.band_part(tf.ones([t, t], tf.bool), -1, 0)
        att = tf.nn.softmax(tf.where(causal, att, tf.constant(-np.inf, att.dtype)), axis=-1)
        out = tf.transpose(tf.matmul(att, v), [0, 2, 1, 3])
        return tf.reshape(out, [n, t, d])

    def get_config(self):
        return {**super().get_config(), "heads": self.heads}


class PositionEmbedding(keras.layers.Layer):
    """Learned positions added to the token embeddings (torch's `pos` parameter; not an
    injectable layer, as in torch)."""

    def __init__(self, seq: int, **kw):
        super().__init__(**kw)
        self.seq = int(seq)

    def build(self, input_shape):
        self.pos = self.add_weight(shape=(self.seq, int(input_shape[-1])), initializer="zeros",
                                   name="pos")

    def call(self, x):
        return x + self.pos[: tf.shape(x)[1]]

    def get_config(self):
        return {**super().get_config(), "seq": self.seq}


# --- the models ----------------------------------------------------------------------------------

def _conv(filters: int, kernel: int, stride: int, name: str):
    return keras.layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=name)


def resnet18(width: int = 64, classes: int = 10, size: int = 32, channels: int = 3,
             dropout: float = 0.1) -> keras.Model:
    """The artifact's ResNet-18 (reference/isca_ae/README.md), the torch ResNet18's names."""
    salt = iter(range(1, 1000))
    relu = keras.layers.ReLU
    inp = keras.Input((size, size, channels), name="image")
    x = _conv(width, 7, 2, "conv1")(inp)
    x = relu()(OnePassBatchNorm(name="bn1")(x))
    cin = width
    for stage, mult in enumerate((1, 2, 4, 8), start=1):
        cout = width * mult
        for b in range(2):
            stride = 2 if stage > 1 and b == 0 else 1
            p = f"basicblock_{stage}_basic_{b}_"
            h = relu()(OnePassBatchNorm(name=p + "bn1")(_conv(cout, 3, stride, p + "conv1")(x)))
            if dropout > 0:
                h = StatelessDropout(dropout, next(salt), name=p + "dropout")(h)
            h = OnePassBatchNorm(name=p + "bn2")(_conv(cout, 3, 1, p + "conv2")(h))
            if stride != 1 or cin != cout:
                s = OnePassBatchNorm(name=p + "downsample_bn")(_conv(cout, 1, stride,
                                                                     p + "downsample")(x))
            else:
                s = x
            x = relu()(keras.layers.Add()([h, s]))
            cin = cout
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(classes, name="dense")(x), name="resnet18")


def mlp(size: int = 8, width: int = 64, classes: int = 10, channels: int = 1) -> keras.Model:
    inp = keras.Input((size, size, channels), name="image")
    x = keras.layers.Flatten()(inp)
    x = keras.layers.ReLU()(keras.layers.Dense(width, name="dense_1")(x))
    x = keras.layers.ReLU()(keras.layers.Dense(width, name="dense_2")(x))
    return keras.Model(inp, keras.layers.Dense(classes, name="dense_3")(x), name="mlp")


def transformer(vocab: int, d: int = 64, seq: int = 32, blocks: int = 2,
                heads: int = 4) -> keras.Model:
    """2-block causal LM with the torch TransformerLM's layer names."""
    inp = keras.Input((seq,), dtype="int64", name="tokens")
    x = keras.layers.Embedding(vocab, d, name="embed")(inp)
    x = PositionEmbedding(seq, name="pos")(x)
    for i in range(blocks):
        p = f"block_{i}_"
        h = keras.layers.LayerNormalization(epsilon=1e-5, name=p + "ln1")(x)
        h = keras.layers.Dense(3 * d, name=p + "attn_qkv")(h)
        h = CausalSelfAttention(heads, name=p + "attn")(h)
        x = keras.layers.Add()([x, keras.layers.Dense(d, name=p + "attn_out")(h)])
        h = keras.layers.LayerNormalization(epsilon=1e-5, name=p + "ln2")(x)
        h = keras.layers.Dense(4 * d, name=p + "mlp_fc1")(h)
        h = keras.layers.Activation(lambda z: keras.activations.gelu(z, approximate=False),
                                    name=p + "gelu")(h)
        x = keras.layers.Add()([x, keras.layers.Dense(d, name=p + "mlp_fc2")(h)])
    x = keras.layers.LayerNormalization(epsilon=1e-5, name="ln_f")(x)
    return keras.Model(inp, keras.layers.Dense(vocab, name="lm_head")(x), name="transformer")
