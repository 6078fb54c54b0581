"""Torch tensors <-> NumPy arrays for checkpoints: CPU tensors viewed, device tensors copied
into reused pinned host buffers with non_blocking copies (all enqueued, then one wait)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from faultlab.checkpointing.codec import writable
from faultlab.errors import CheckpointError

__all__ = ["HostStager", "array_to_tensor", "tensor_to_array"]


# torch dtypes NumPy has no type for travel as unsigned integers of the same width.
_VIEW_AS = {"bfloat16": "uint16", "float8_e4m3fn": "uint8", "float8_e5m2": "uint8",
            "float8_e4m3fnuz": "uint8", "float8_e5m2fnuz": "uint8", "float8_e8m0fnu": "uint8",
            "complex32": "int32", "chalf": "int32"}


class HostStager:
    """Pinned host buffers for device tensors, reused across captures (name -> buffer)."""

    def __init__(self):
        self._buffers: dict[str, Any] = {}
        self.devices: set = set()

    def host_copy(self, name: str, t):
        """Enqueue a non_blocking device-to-host copy into a pinned buffer; return the buffer.

        The buffer is valid only after `synchronize()`: all copies of one capture are
        enqueued first so that they pipeline, then waited for once.
        """
        buf = self._buffers.get(name)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=torch.cuda.is_available())
            self._buffers[name] = buf
        buf.copy_(t, non_blocking=True)
        self.devices.add(t.device)
        return buf

    def record(self) -> list:
        """Mark the end of this capture's copies on each device's current stream (call in
        the thread that enqueued them: current streams are per thread)."""
        events = []
        for device in self.devices:
            if device.type == "cuda":
                ev = torch.cuda.Event()
                ev.record(torch.cuda.current_stream(device))
                events.append(ev)
        self.devices.clear()
        return events

    def synchronize(self, events: list | None = None) -> None:
        """Wait until the copies are in host memory."""
        for ev in (self.record() if events is None else events):
            ev.synchronize()

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


def tensor_to_array(t, name: str = "", stager: HostStager | None = None, copy: bool = False):
    """A torch tensor as (numpy array, JSON ref). CPU tensors are viewed, not copied (unless
    copy=True); device tensors go through `stager`'s pinned buffers (or a blocking copy)."""
    t = t.detach()
    if t.layout != torch.strided:
        raise CheckpointError(f"cannot checkpoint {name!r}: {t.layout} tensors are not "
                              "supported (convert to dense first)")
    if t.is_quantized:
        raise CheckpointError(f"cannot checkpoint {name!r}: quantized tensors are not supported")
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    ref: dict = {"__tensor__": name}
    if t.device.type != "cpu":
        ref["device"] = str(t.device)
        t = t.contiguous()
        t = stager.host_copy(name, t) if stager is not None else t.to("cpu")
    elif copy:
        t = t.clone(memory_format=torch.contiguous_format)
    else:
        t = t.contiguous()
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype in _VIEW_AS:
        ref["dtype"] = dtype
        t = t.view(getattr(torch, _VIEW_AS[dtype]))
    try:
        arr = t.numpy()
    except (TypeError, RuntimeError) as e:
        raise CheckpointError(f"cannot checkpoint {name!r}: dtype {dtype} ({e})") from None
    return arr, ref


def array_to_tensor(arr: np.ndarray, ref: Mapping | None = None, device=None):
    """The inverse of tensor_to_array (a CPU tensor unless `device` is given)."""
    arr = writable(np.asarray(arr))
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    t = torch.from_numpy(arr)
    dtype = (ref or {}).get("dtype")
    if dtype is not None:
        t = t.view(getattr(torch, dtype))
    if device is not None:
        t = t.to(device)
    return t
