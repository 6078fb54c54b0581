"""NumPy reference for the value-corruption kernels: the executable specification.

Every framework kernel must agree with :func:`apply_reference` bit for bit (NaN payloads
included). The arithmetic is therefore defined down to the rounding of each step:

* Format conversions round to nearest, ties to even, with subnormals and overflow to +-Inf.
  A conversion between fp16/bf16 and anything else goes through float32 (fp64 -> fp16 rounds
  twice, exactly as ``torch.Tensor.to`` does); fp32 <-> fp64 converts directly.
* A NaN converts to the NaN of the target format with the same sign, the leading payload bits
  kept (shifted into the target's mantissa) and the quiet bit set (IEEE 754 "convert quiets a
  signalling NaN"). This is spelled out because hardware disagrees (x86 F16C, AVX512-BF16,
  CUDA intrinsics and NumPy each treat NaN payloads differently).
* SCALE / DEGRADE on a NaN keeps the NaN (quiet bit set); a NaN created by the product
  (Inf * 0) is the positive canonical quiet NaN. The NAN model writes that canonical NaN too.
* fp16 / bf16 arithmetic is float32 arithmetic, the result rounded once to the format
  (SCALE: float32(x) * float32(factor); INT8 emulation: see below).
* INT8 layout on a float tensor (symmetric per-tensor quantisation) is computed in float32
  (float64 for fp64 tensors), like the fp32 scales of real int8 pipelines:
  scale = max(|x| over finite x) / 127, or 1 when that is 0 or no element is finite;
  q = clip(rint(x / scale), -127, 127) (NaN -> 0, +-Inf -> +-127) as int8; corrupt q's bits;
  the new value is float(q) * scale rounded once to the tensor's dtype. Only the hit
  elements change: the rest of the tensor is not quantised.
* SET / RANDOM values (float64) are converted like any fp64 value; into int8 they are rounded
  half to even and clipped to -128..127 (NaN / Inf raise SpecError). SCALE on int8:
  clip(rint(float32(x) * float32(factor)), -128, 127).
* COPY reads the original values; an element listed twice in the index takes its last entry.

NumPy has no bfloat16: bf16 tensors are uint16 arrays of bit patterns, here and in the results.
"""

from __future__ import annotations

import numpy as np

from faultlab.errors import SpecError
from faultlab.bits import (DTYPE_LAYOUT, FLOAT_FORMATS, LAYOUT_BITS, NP_DTYPES, UINT,  # noqa: F401
                           BitLayout, bits_to_float, bits_to_np, canonical_nan, convert_bits,
                           exp_mask, np_to_bits, quiet_bit)
from faultlab.faults import Corruption, ValueModel

__all__ = ["bits_to_float", "apply_reference", "convert_bits", "replacement_bits",
           "dedupe_last", "FLOAT_FORMATS", "NP_DTYPES", "UINT", "canonical_nan",
           "quiet_bit"]

def dedupe_last(index: np.ndarray) -> np.ndarray:
    """Positions in `index` to keep so that each element is hit once, by its last entry
    (in ascending order of position, so duplicate-free input keeps its order)."""
    index = np.asarray(index, dtype=np.int64)
    if index.size < 2:
        return np.arange(index.size)
    _, first_rev = np.unique(index[::-1], return_index=True)
    keep = index.size - 1 - first_rev
    keep.sort()
    return keep


def replacement_bits(c: Corruption, dtype: str, keep: np.ndarray) -> np.ndarray:
    """SET / RANDOM / ZERO / NAN / POS_INF / NEG_INF: the new values as the dtype's bits
    (uint of the tensor's layout) for the corruption entries `keep`."""
    native = DTYPE_LAYOUT[dtype]
    n = keep.size
    m = c.model
    if native is BitLayout.INT8:
        if m is ValueModel.ZERO:
            return np.zeros(n, dtype=np.uint8)
        if m in (ValueModel.NAN, ValueModel.POS_INF, ValueModel.NEG_INF):
            raise SpecError(f"value model {m.value} cannot be written into an int8 tensor")
        vals = _values(c)[keep]
        if not np.isfinite(vals).all():
            raise SpecError("NaN or Inf replacement values cannot be written into an int8 tensor")
        return np.clip(np.rint(vals), -128, 127).astype(np.int8).view(np.uint8)
    u = UINT[native]
    if m is ValueModel.ZERO:
        return np.zeros(n, dtype=u)
    if m is ValueModel.NAN:
        return np.full(n, canonical_nan(native), dtype=u)
    if m in (ValueModel.POS_INF, ValueModel.NEG_INF):
        sign = (1 << (LAYOUT_BITS[native] - 1)) if m is ValueModel.NEG_INF else 0
        return np.full(n, sign | exp_mask(native), dtype=u)
    vals = np.ascontiguousarray(_values(c)[keep], dtype=np.float64)
    return convert_bits(vals.view(np.uint64), BitLayout.FP64, native)


def _values(c: Corruption) -> np.ndarray:
    if c.values is None:
        raise SpecError(f"value model {c.model.value} needs replacement values")
    vals = np.asarray(c.values, dtype=np.float64).reshape(-1)
    if vals.size != np.asarray(c.index).size:
        raise SpecError(f"{vals.size} replacement values for {np.asarray(c.index).size} positions")
    return vals


def _bitop(bits: np.ndarray, masks: np.ndarray, c: Corruption) -> np.ndarray:
    masks = masks.astype(bits.dtype)
    if c.model is ValueModel.BITFLIP:
        return bits ^ masks
    if c.stuck == 1:
        return bits | masks
    return bits & ~masks


def _work(bits: np.ndarray, native: BitLayout) -> np.ndarray:
    """Tensor bits as work values: float64 for fp64, float32 otherwise (exact)."""
    v = bits_to_np(bits, native)
    return v if native is BitLayout.FP64 else v.astype(np.float32)


def _quantised_bitop(nb: np.ndarray, sel: np.ndarray, masks: np.ndarray, c: Corruption,
                     native: BitLayout) -> np.ndarray:
    """INT8 layout on a float tensor: symmetric per-tensor quantisation, flip q, dequantise."""
    wt = np.float64 if native is BitLayout.FP64 else np.float32
    with np.errstate(all="ignore"):
        xall = _work(nb, native)
        fin = np.isfinite(xall)
        amax = np.abs(xall[fin]).max() if fin.any() else wt(0)
        scale = wt(amax) / wt(127)
        if scale == 0:
            scale = wt(1)
        r = xall[sel] / scale
        q = np.where(np.isnan(r), 0, np.clip(np.rint(r), -127, 127)).astype(np.int8)
        q = _bitop(q.view(np.uint8), masks, c).view(np.int8)
        return np_to_bits(q.astype(wt) * scale, native)


def _scaled(nb_sel: np.ndarray, factor: float, dtype: str) -> np.ndarray:
    native = DTYPE_LAYOUT[dtype]
    with np.errstate(all="ignore"):
        if native is BitLayout.INT8:
            r = nb_sel.view(np.int8).astype(np.float32) * np.float32(factor)
            r = np.where(np.isnan(r), 0, np.clip(np.rint(r), -128, 127))
            return r.astype(np.int8).view(np.uint8)
        wt = np.float64 if native is BitLayout.FP64 else np.float32
        r = _work(nb_sel, native) * wt(factor)
        out = np_to_bits(r, native)
    u = UINT[native]
    was_nan = np.isnan(bits_to_np(nb_sel, native))
    out = np.where(np.isnan(r), u(canonical_nan(native)), out)
    return np.where(was_nan, nb_sel | u(quiet_bit(native)), out).astype(u)


def apply_reference(x: np.ndarray, c: Corruption, dtype: str) -> np.ndarray:
    """Apply corruption `c` to the flat tensor `x` of dtype name `dtype`; return a new array
    of the same dtype in which only the elements at `c.index` differ (see module docstring;
    an element listed twice takes its last entry, computed from the original values)."""
    if dtype not in DTYPE_LAYOUT:
        raise SpecError(f"cannot corrupt a tensor of dtype {dtype}")
    x = np.asarray(x)
    if x.dtype != NP_DTYPES[dtype]:
        raise TypeError(f"a {dtype} tensor must be given as a {NP_DTYPES[dtype]} array, "
                        f"got {x.dtype}")
    native = DTYPE_LAYOUT[dtype]
    layout = BitLayout(c.layout)
    if layout is BitLayout.NATIVE:
        layout = native
    model = ValueModel(c.model)
    nb = np.ascontiguousarray(x).reshape(-1).view(UINT[native])
    index = np.asarray(c.index, dtype=np.int64).reshape(-1)
    if index.size and (index.min() < 0 or index.max() >= nb.size):
        raise SpecError(f"corruption index out of range for a tensor of {nb.size} elements")
    keep = dedupe_last(index)
    sel = index[keep]

    if model in (ValueModel.BITFLIP, ValueModel.STUCK_AT):
        if c.masks is None:
            raise SpecError(f"value model {model.value} needs bit masks")
        masks = np.asarray(c.masks, dtype=np.uint64).reshape(-1)[keep]
        if layout is native:
            new = _bitop(nb[sel], masks, c)
        elif native is BitLayout.INT8:
            raise SpecError(f"an int8 tensor cannot be corrupted in the {layout.value} layout")
        elif layout is BitLayout.INT8:
            new = _quantised_bitop(nb, sel, masks, c, native)
        else:
            lb = _bitop(convert_bits(nb[sel], native, layout), masks, c)
            new = convert_bits(lb, layout, native)
    elif model is ValueModel.COPY:
        if c.src is None:
            raise SpecError("value model copy needs source indices")
        src = np.asarray(c.src, dtype=np.int64).reshape(-1)[keep]
        if src.size and (src.min() < 0 or src.max() >= nb.size):
            raise SpecError(f"copy source out of range for a tensor of {nb.size} elements")
        new = nb[src]
    elif model in (ValueModel.SCALE, ValueModel.DEGRADE):
        new = _scaled(nb[sel], float(c.factor), dtype)
    else:
        new = replacement_bits(c, dtype, keep)

    out = nb.copy()
    out[sel] = new
    return out.view(NP_DTYPES[dtype])
