"""TensorFlow helpers of the TF kernel tests: NumPy <-> TF bit patterns (the framework-free
inputs are in tests/helpers/_bitcases.py)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from _bitcases import UINT

TF = {"float32": tf.float32, "float16": tf.float16, "bfloat16": tf.bfloat16,
      "float64": tf.float64, "int8": tf.int8}
TF_UINT = {"float32": tf.uint32, "float16": tf.uint16, "bfloat16": tf.uint16,
           "float64": tf.uint64, "int8": tf.uint8}


def to_tf(x: np.ndarray, dtype: str) -> tf.Tensor:
    """A NumPy array of `dtype` (bf16 as uint16 bits) as a TF tensor, bit for bit."""
    return tf.bitcast(tf.constant(np.ascontiguousarray(x).view(UINT[dtype])), TF[dtype])


def tf_bits(t, dtype: str) -> np.ndarray:
    return tf.bitcast(t, TF_UINT[dtype]).numpy()
