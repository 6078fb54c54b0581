"""Framework-free inputs shared by the kernel tests (the conformance suite,
tests/backends/test_backend_kernels.py, which loads this file through its `bitcases` fixture;
torch only: tests/torch/test_kernels.py; TensorFlow only: tests/tf/test_kernels.py): dtypes,
tensors full of special values, hypothesis settings."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from faultlab.faults import DTYPE_LAYOUT, BitLayout
from faultlab.injectors.reference import convert_bits

DTYPES = ["float32", "float16", "bfloat16", "float64", "int8"]
FLOAT_DTYPES = DTYPES[:4]
FLOAT_LAYOUTS = [BitLayout.FP32, BitLayout.FP16, BitLayout.BF16, BitLayout.FP64]
UINT = {"float32": np.uint32, "float16": np.uint16, "bfloat16": np.uint16,
        "float64": np.uint64, "int8": np.uint8}
NP = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16,
      "float64": np.float64, "int8": np.int8}
# (exponent bits, mantissa bits) per float dtype
FMT = {"float16": (5, 10), "bfloat16": (8, 7), "float32": (8, 23), "float64": (11, 52)}


def specials(dtype: str) -> np.ndarray:
    """Bit patterns of a dtype's special values: +-0, subnormals, max/min finite, Inf, NaNs."""
    if dtype == "int8":
        return np.array([0, 1, 0xFF, 0x7F, 0x80, 0x81, 0xFE], dtype=np.uint64)
    e, m = FMT[dtype]
    w = 1 + e + m
    sign = 1 << (w - 1)
    inf = ((1 << e) - 1) << m
    quiet = 1 << (m - 1)
    one = ((1 << (e - 1)) - 1) << m
    pats = [0, 1, (1 << m) - 1, 1 << m, inf - 1, inf, inf | quiet, inf | 1, inf | (quiet - 1),
            inf | quiet | 0x5, inf | ((1 << m) - 1), one, one | 1, one + (1 << m)]
    return np.array(pats + [p | sign for p in pats], dtype=np.uint64)


def make_tensor(dtype: str, n: int, seed: int) -> np.ndarray:
    """A flat array of `dtype` (uint16 bits for bf16): random bit patterns, ordinary values
    over many magnitudes, and special values."""
    rng = np.random.default_rng(seed)
    u = UINT[dtype]
    w = np.dtype(u).itemsize * 8
    raw = rng.integers(0, np.uint64(2 ** w - 1), size=n, dtype=np.uint64, endpoint=True)
    kind = rng.integers(0, 3, size=n)
    if dtype == "int8":
        ordinary = rng.integers(-128, 128, size=n).astype(np.int8).view(np.uint8).astype(np.uint64)
    else:
        vals = rng.standard_normal(n) * 10.0 ** rng.uniform(-8, 8, size=n)
        ordinary = convert_bits(vals.view(np.uint64), BitLayout.FP64,
                                DTYPE_LAYOUT[dtype]).astype(np.uint64)
    special = rng.choice(specials(dtype), size=n)
    bits = np.where(kind == 0, raw, np.where(kind == 1, ordinary, special)).astype(u)
    return bits if dtype == "bfloat16" else bits.view(NP[dtype])


def np_bits(x: np.ndarray, dtype: str) -> np.ndarray:
    return np.ascontiguousarray(x).view(UINT[dtype])


def layouts_for(dtype: str) -> list[BitLayout]:
    return [BitLayout.INT8] if dtype == "int8" else FLOAT_LAYOUTS + [BitLayout.INT8]


def pick_index(rng, n: int, k: int) -> np.ndarray:
    return rng.choice(n, size=min(k, n), replace=False).astype(np.int64)


_BASE = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def cfg(n: int) -> settings:
    return settings(_BASE, max_examples=n)


@st.composite
def dtype_layout(draw, dtypes=DTYPES):
    dtype = draw(st.sampled_from(dtypes))
    return dtype, draw(st.sampled_from(layouts_for(dtype)))
