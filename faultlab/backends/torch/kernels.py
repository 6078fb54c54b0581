"""Vectorised torch execution of a :class:`~faultlab.faults.Corruption`.

:func:`prepare` converts a corruption once into device tensors; :meth:`TorchCorruption.apply`
then runs entirely on the tensor's device (no host synchronisation), bit-identical to
:func:`faultlab.injectors.reference.apply_reference` (the specification of every rounding and
NaN rule). Everything that does not depend on the tensor's data (replacement values, masks,
the scale factor) is computed on the host in :func:`prepare` with the reference code itself.
"""

from __future__ import annotations

import numpy as np
import torch

from faultlab.errors import SpecError
from faultlab.faults import DTYPE_LAYOUT, LAYOUT_BITS, BitLayout, Corruption, ValueModel
from faultlab.injectors.reference import (FLOAT_FORMATS, UINT, canonical_nan, dedupe_last, quiet_bit,
                                 replacement_bits)

__all__ = ["TorchCorruption", "prepare", "TORCH_DTYPE_NAMES"]

#: torch dtype -> dtype name the kernels use
TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16",
                     torch.bfloat16: "bfloat16", torch.float64: "float64", torch.int8: "int8"}
_FLOAT_DTYPE = {BitLayout.FP16: torch.float16, BitLayout.BF16: torch.bfloat16,
                BitLayout.FP32: torch.float32, BitLayout.FP64: torch.float64}
_INT_DTYPE = {BitLayout.FP16: torch.int16, BitLayout.BF16: torch.int16,
              BitLayout.FP32: torch.int32, BitLayout.FP64: torch.int64, BitLayout.INT8: torch.int8}
_SIGNED_NP = {8: np.int8, 16: np.int16, 32: np.int32, 64: np.int64}
_REPLACE = (ValueModel.SET, ValueModel.RANDOM, ValueModel.ZERO, ValueModel.NAN,
            ValueModel.POS_INF, ValueModel.NEG_INF)


def _min_signed(layout: BitLayout) -> int:
    return -(1 << (LAYOUT_BITS[layout] - 1))


def _signed_bits(bits: np.ndarray, layout: BitLayout, device) -> torch.Tensor:
    """Unsigned NumPy bit patterns as a signed torch integer tensor of the layout's width."""
    w = LAYOUT_BITS[layout]
    arr = np.ascontiguousarray(np.asarray(bits).astype(UINT[layout]).view(_SIGNED_NP[w]))
    return torch.from_numpy(arr).to(device)


def _nan_bits(v: torch.Tensor, src: BitLayout, dst: BitLayout) -> torch.Tensor:
    """For each value of `src` (read as NaN): the signed bits of the `dst` NaN it converts to."""
    ms, md = FLOAT_FORMATS[src][1], FLOAT_FORMATS[dst][1]
    b = v.view(_INT_DTYPE[src])
    mant = b & ((1 << ms) - 1)
    if md >= ms:
        mant = mant.to(_INT_DTYPE[dst]) << (md - ms)
    else:
        mant = (mant >> (ms - md)).to(_INT_DTYPE[dst])
    low = mant | canonical_nan(dst)
    return torch.where(b < 0, low | _min_signed(dst), low)


def _convert(v: torch.Tensor, src: BitLayout, dst: BitLayout) -> torch.Tensor:
    """Float layout conversion, as reference.convert_bits (RNE via float32; NaN rule)."""
    if src is dst:
        return v
    if {src, dst} <= {BitLayout.FP32, BitLayout.FP64}:
        out = v.to(_FLOAT_DTYPE[dst])
    else:
        out = v.to(torch.float32).to(_FLOAT_DTYPE[dst])
    bits = torch.where(torch.isnan(v), _nan_bits(v, src, dst), out.view(_INT_DTYPE[dst]))
    return bits.view(_FLOAT_DTYPE[dst])


class TorchCorruption:
    """A corruption bound to a dtype and device; build with :func:`prepare`."""

    def __init__(self, c: Corruption, dtype: torch.dtype, device: torch.device,
                 index: np.ndarray, src: np.ndarray | None):
        if dtype not in TORCH_DTYPE_NAMES:
            raise SpecError(f"cannot corrupt a tensor of dtype {dtype}")
        self.dtype_name = TORCH_DTYPE_NAMES[dtype]
        self.dtype, self.device = dtype, torch.device(device)
        self.model = ValueModel(c.model)
        self.native = DTYPE_LAYOUT[self.dtype_name]
        layout = BitLayout(c.layout)
        self.layout = self.native if layout is BitLayout.NATIVE else layout
        self.stuck = int(c.stuck)
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        if index.size and index.min() < 0:
            raise SpecError("negative corruption index")
        keep = dedupe_last(index)
        self.size = int(keep.size)
        self._max_index = int(index.max()) if index.size else -1
        self.index = torch.from_numpy(np.ascontiguousarray(index[keep])).to(self.device)
        self.src = self.masks = self.values = self.factor = self._c127 = None
        m, dev = self.model, self.device

        if m in (ValueModel.BITFLIP, ValueModel.STUCK_AT):
            if c.masks is None:
                raise SpecError(f"value model {m.value} needs bit masks")
            if self.native is BitLayout.INT8 and self.layout is not BitLayout.INT8:
                raise SpecError(f"an int8 tensor cannot be corrupted in the "
                                f"{self.layout.value} layout")
            masks = np.asarray(c.masks, dtype=np.uint64).reshape(-1)[keep]
            self.masks = _signed_bits(masks, self.layout, dev)
            if self.layout is BitLayout.INT8 and self.native is not BitLayout.INT8:
                wt = torch.float64 if self.native is BitLayout.FP64 else torch.float32
                self._c127 = torch.tensor(127, dtype=wt, device=dev)
        elif m is ValueModel.COPY:
            if src is None:
                raise SpecError("value model copy needs source indices")
            s = np.asarray(src, dtype=np.int64).reshape(-1)[keep]
            if s.size and s.min() < 0:
                raise SpecError("negative copy source index")
            self._max_index = max(self._max_index, int(s.max()) if s.size else -1)
            self.src = torch.from_numpy(np.ascontiguousarray(s)).to(dev)
        elif m in (ValueModel.SCALE, ValueModel.DEGRADE):
            if self.native is BitLayout.FP64:
                self.factor = torch.tensor(float(c.factor), dtype=torch.float64, device=dev)
            else:  # float32(factor), rounded on the host exactly as the reference does
                with np.errstate(over="ignore"):
                    f32 = np.float32(c.factor)
                self.factor = torch.tensor(float(f32), dtype=torch.float32, device=dev)
        elif m in _REPLACE:
            bits = replacement_bits(c, self.dtype_name, keep)
            self.values = _signed_bits(bits, self.native, dev).view(dtype)
        else:  # pragma: no cover - every model is handled above
            raise SpecError(f"unsupported value model {m.value}")

    # --- execution ---------------------------------------------------------------------

    def _check(self, t: torch.Tensor) -> None:
        if t.dtype != self.dtype:
            raise SpecError(f"corruption prepared for {self.dtype}, applied to {t.dtype}")
        if self._max_index >= t.numel():
            raise SpecError(f"corruption index {self._max_index} out of range for a tensor "
                            f"of {t.numel()} elements")

    def _bitop(self, bits: torch.Tensor) -> torch.Tensor:
        if self.model is ValueModel.BITFLIP:
            return bits ^ self.masks
        if self.stuck == 1:
            return bits | self.masks
        return bits & ~self.masks

    def _quantised(self, flat: torch.Tensor) -> torch.Tensor:
        wt = self._c127.dtype
        xall = flat.to(wt)
        amax = torch.where(torch.isfinite(xall), xall.abs(), torch.zeros_like(xall)).amax()
        scale = amax / self._c127  # a device tensor: true division on CUDA too
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        r = xall.index_select(0, self.index) / scale
        q = torch.where(torch.isnan(r), torch.zeros_like(r), torch.round(r).clamp(-127, 127))
        q = self._bitop(q.to(torch.int8))
        return (q.to(wt) * scale).to(self.dtype)

    def _scaled(self, v: torch.Tensor) -> torch.Tensor:
        if self.native is BitLayout.INT8:
            r = v.to(torch.float32) * self.factor
            r = torch.where(torch.isnan(r), torch.zeros_like(r), torch.round(r).clamp(-128, 127))
            return r.to(torch.int8)
        r = v.to(self.factor.dtype) * self.factor
        ib = _INT_DTYPE[self.native]
        bits = r.to(self.dtype).view(ib)
        bits = torch.where(torch.isnan(r), torch.full_like(bits, canonical_nan(self.native)), bits)
        bits = torch.where(torch.isnan(v), v.view(ib) | quiet_bit(self.native), bits)
        return bits.view(self.dtype)

    def _new_values(self, flat: torch.Tensor) -> torch.Tensor:
        """The new values at self.index, computed from the unmodified flat tensor."""
        m = self.model
        if self.values is not None:
            return self.values
        if m is ValueModel.COPY:
            return flat.index_select(0, self.src)
        v = flat.index_select(0, self.index)
        if m in (ValueModel.SCALE, ValueModel.DEGRADE):
            return self._scaled(v)
        if self.layout is self.native:
            return self._bitop(v.view(_INT_DTYPE[self.native])).view(self.dtype)
        if self.layout is BitLayout.INT8:
            return self._quantised(flat)
        y = _convert(v, self.native, self.layout)
        y = self._bitop(y.view(_INT_DTYPE[self.layout])).view(_FLOAT_DTYPE[self.layout])
        return _convert(y, self.layout, self.native)

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        """A new contiguous tensor equal to `t` except at the corrupted elements (flat
        row-major indices). Autograd sees the corrupted elements as constants."""
        self._check(t)
        out = t.clone(memory_format=torch.contiguous_format)
        with torch.no_grad():
            new = self._new_values(out.detach().view(-1))
        out.view(-1).index_put_((self.index,), new)
        return out

    def apply_(self, t: torch.Tensor) -> torch.Tensor:
        """Corrupt `t` in place (its storage; for stored parameters and optimizer state,
        outside autograd). Returns `t`."""
        self._check(t)
        with torch.no_grad():
            if t.is_contiguous():
                flat = t.detach().view(-1)
                flat.index_put_((self.index,), self._new_values(flat))
            else:
                t.detach().copy_(self.apply(t.detach()))
        return t

    __call__ = apply

    def __repr__(self) -> str:
        return (f"TorchCorruption({self.model.value}, {self.layout.value} on "
                f"{self.dtype_name}, {self.size} elements, {self.device})")


def prepare(c: Corruption, tensor_like: torch.Tensor, index: np.ndarray | None = None,
            src: np.ndarray | None = None) -> TorchCorruption:
    """Bind corruption `c` to the dtype and device of `tensor_like`. `index` / `src` replace
    c.index / c.src (flat indices into the tensor as the backend stores it)."""
    return TorchCorruption(c, tensor_like.dtype, tensor_like.device,
                           c.index if index is None else index,
                           c.src if src is None else src)
