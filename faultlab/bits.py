"""Bit layouts and the float <-> bit-pattern codec every kernel and the fault model share.

A leaf: it imports nothing of faultlab but its errors. Conversions follow the rules spelled out
in :mod:`faultlab.injectors.reference` (round to nearest even through float32, NaN payloads
kept and quieted); NumPy has no bfloat16, so bf16 values are uint16 bit patterns here.
"""

from __future__ import annotations

import enum

import numpy as np

from faultlab.errors import SpecError

__all__ = ["BitLayout", "LAYOUT_BITS", "DTYPE_LAYOUT", "FLOAT_FORMATS", "UINT", "NP_DTYPES",
           "quiet_bit", "exp_mask", "canonical_nan", "bits_to_float", "bits_to_np", "np_to_bits",
           "convert_bits", "bit_sum", "key_weight", "state_checksum"]


class BitLayout(str, enum.Enum):
    """Bit layout the value is corrupted in. NATIVE: the tensor's own dtype; a float layout on
    a wider tensor emulates a reduced-precision datapath (cast, corrupt, cast back); INT8 on a
    float tensor emulates symmetric per-tensor int8 quantisation."""

    NATIVE = "native"
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    FP64 = "fp64"
    INT8 = "int8"


#: bit width of each concrete layout
LAYOUT_BITS = {BitLayout.FP32: 32, BitLayout.FP16: 16, BitLayout.BF16: 16, BitLayout.FP64: 64,
               BitLayout.INT8: 8}
#: dtype names the kernels accept, mapped to their layout
DTYPE_LAYOUT = {"float32": BitLayout.FP32, "float16": BitLayout.FP16,
                "bfloat16": BitLayout.BF16, "float64": BitLayout.FP64, "int8": BitLayout.INT8}


#: (exponent bits, mantissa bits) of each float layout
FLOAT_FORMATS = {BitLayout.FP16: (5, 10), BitLayout.BF16: (8, 7), BitLayout.FP32: (8, 23),
                 BitLayout.FP64: (11, 52)}
#: unsigned integer type holding one value of each layout
UINT = {BitLayout.FP16: np.uint16, BitLayout.BF16: np.uint16, BitLayout.FP32: np.uint32,
        BitLayout.FP64: np.uint64, BitLayout.INT8: np.uint8}
#: the NumPy array dtype holding a tensor of each dtype name
NP_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
             "bfloat16": np.dtype(np.uint16), "float64": np.dtype(np.float64),
             "int8": np.dtype(np.int8)}

_FLOAT = (BitLayout.FP16, BitLayout.BF16, BitLayout.FP32, BitLayout.FP64)


def quiet_bit(layout: BitLayout) -> int:
    return 1 << (FLOAT_FORMATS[layout][1] - 1)


def exp_mask(layout: BitLayout) -> int:
    e, m = FLOAT_FORMATS[layout]
    return ((1 << e) - 1) << m


def canonical_nan(layout: BitLayout) -> int:
    """Bit pattern of the positive quiet NaN with a zero payload."""
    return exp_mask(layout) | quiet_bit(layout)


def bits_to_float(raw: np.ndarray, layout: BitLayout) -> np.ndarray:
    """Interpret the low LAYOUT_BITS[layout] bits of each uint64 as a value of `layout`;
    return the values as float64 (NaN and Inf preserved; INT8 is a signed byte)."""
    layout = BitLayout(layout)
    raw = np.asarray(raw, dtype=np.uint64)
    if layout is BitLayout.FP64:
        return raw.view(np.float64).copy()
    if layout is BitLayout.INT8:
        return (raw & np.uint64(0xFF)).astype(np.uint8).view(np.int8).astype(np.float64)
    if layout not in LAYOUT_BITS:
        raise SpecError(f"no concrete bit layout {layout.value}")
    width = LAYOUT_BITS[layout]
    low = (raw & np.uint64((1 << width) - 1)).astype(UINT[layout])
    with np.errstate(invalid="ignore"):
        return bits_to_np(low, layout).astype(np.float64)


def bits_to_np(bits: np.ndarray, layout: BitLayout) -> np.ndarray:
    """Bits of a float layout as a NumPy float array (bf16 widened exactly to float32)."""
    if layout is BitLayout.BF16:
        return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return bits.view({BitLayout.FP16: np.float16, BitLayout.FP32: np.float32,
                      BitLayout.FP64: np.float64}[layout])


def _f32_to_bf16_bits(v: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits, round to nearest even (NaN lanes are patched by the caller)."""
    u = v.view(np.uint32).astype(np.uint64)
    u = (u + np.uint64(0x7FFF) + ((u >> np.uint64(16)) & np.uint64(1))) >> np.uint64(16)
    return (u & np.uint64(0xFFFF)).astype(np.uint16)


def np_to_bits(v: np.ndarray, layout: BitLayout) -> np.ndarray:
    """A float32 (or float64 for FP64/FP32) array rounded into `layout`, as bits."""
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        if layout is BitLayout.FP64:
            return v.astype(np.float64).view(np.uint64)
        if layout is BitLayout.FP32:
            return v.astype(np.float32).view(np.uint32)
        v32 = v.astype(np.float32)
        if layout is BitLayout.FP16:
            return v32.astype(np.float16).view(np.uint16)
        return _f32_to_bf16_bits(v32)


def _nan_bits(bits: np.ndarray, src: BitLayout, dst: BitLayout) -> np.ndarray:
    """The NaN of `dst` that the NaN `bits` of `src` converts to (sign, payload, quiet bit)."""
    ws, wd = LAYOUT_BITS[src], LAYOUT_BITS[dst]
    ms, md = FLOAT_FORMATS[src][1], FLOAT_FORMATS[dst][1]
    b = bits.astype(np.uint64)
    sign = b >> np.uint64(ws - 1)
    mant = b & np.uint64((1 << ms) - 1)
    mant = mant << np.uint64(md - ms) if md >= ms else mant >> np.uint64(ms - md)
    out = (sign << np.uint64(wd - 1)) | np.uint64(canonical_nan(dst)) | mant
    return out.astype(UINT[dst])


def convert_bits(bits: np.ndarray, src: BitLayout, dst: BitLayout) -> np.ndarray:
    """Convert values between float layouts, bits in and bits out (see module docstring)."""
    if src is dst:
        return bits.copy()
    v = bits_to_np(bits, src)
    if not {src, dst} <= {BitLayout.FP32, BitLayout.FP64}:
        with np.errstate(over="ignore", invalid="ignore", under="ignore"):
            v = v.astype(np.float32)
    out = np_to_bits(v, dst)
    nan = np.isnan(v)
    if nan.any():
        out = np.where(nan, _nan_bits(bits, src, dst), out)
    return out


# --- exact state checksums -----------------------------------------------------------------------

_SIGNED = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}
_MASK64 = (1 << 64) - 1


def bit_sum(a: np.ndarray) -> int:
    """The sum of an array's elements' bit patterns read as signed integers of their width,
    modulo 2**64: equal arrays give equal sums, and one flipped bit always changes it (by
    +-2**k). Frameworks compute the same sum on their own tensors (view as intN, sum in int64)."""
    a = np.ascontiguousarray(a)
    ints = a.view(_SIGNED.get(a.itemsize, np.int8))
    return int(ints.sum(dtype=np.int64)) & _MASK64


def key_weight(key: str) -> int:
    """An odd 64-bit weight per state key (from its CRC32), so the same bits under another key
    (a replica's own copy, a renamed tensor) change the checksum."""
    import zlib
    c = zlib.crc32(key.encode())
    return ((c << 32) | zlib.crc32(key.encode()[::-1]) | 1) & _MASK64


def state_checksum(state) -> int:
    """An exact, order-independent checksum of a trainer state ({key: array}): the sum over its
    keys of key_weight(key) * bit_sum(array), modulo 2**64. The golden run records it after
    every step; a trial whose state gives the golden run's checksum at the same step after its
    last fault has converged back to it bit for bit (runner/session.py's early decision)."""
    total = 0
    for k, a in state.items():
        total += key_weight(k) * bit_sum(np.asarray(a))
    return total & _MASK64
