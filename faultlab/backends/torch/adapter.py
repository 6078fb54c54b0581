"""Framework adapters: a training session's whole state <-> {name: numpy array} + JSON meta.

The checkpoint engine and the baselines store only flat NumPy states (no framework import).
An adapter turns a framework's training session into such a state and back, exactly:

    adapter = TorchCheckpointAdapter(model, optimizer, scaler=scaler, data=sampler)
    state, meta = adapter.capture(step, data_position=pos)      # arrays + JSON meta
    handle = engine.save(step, state, meta)                    # or adapter.save(engine, step)
    ...
    resume = adapter.restore(*recover(path)[1:])               # -> Resume(step, position, extra)

What a torch capture holds: every tensor of `model.state_dict()` (parameters, buffers, extra
state), the optimizer's state and param groups, the GradScaler's state, the torch CPU and CUDA
generators, NumPy's and Python's global generators, any named extra generators, the data
position (a JSON value, or the state of a stateful sampler / loader) and the step. A run killed
and resumed from a checkpoint any number of times therefore ends bit-identical to an
uninterrupted one (tests/checkpointing/test_adapters.py, test_crash_campaign.py).

CUDA tensors are copied into pinned host buffers with non_blocking copies, all enqueued before
one synchronisation, so the device-to-host transfers pipeline; the buffers are reused between
captures. CPU tensors are not copied at all: the arrays are views of the live tensors, valid
until training changes them (every checkpointer copies or writes a state before save()
returns). `save(..., overlap=True)` hides even that copy behind the next forward/backward pass,
as CheckFreq does: the optimizer waits (a step pre-hook) only if staging has not finished by
the time it would change the parameters.

TensorFlow: `adapter_for("tf")` is `tf_adapter.TFCheckpointAdapter` (Keras 3 variables,
optimizer variables, tf.random.Generator / Keras SeedGenerator states, the global generators,
data position and step), with the same interface.
"""

from __future__ import annotations

import importlib
import json
import math
import queue
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np

from faultlab.errors import CheckpointError, FaultlabError

ADAPTER_FORMAT = 1

# -- the framework-independent interface -----------------------------------------------------


class Resume(NamedTuple):
    """What a restore hands back to the training loop: where to go on from."""

    step: int
    data_position: Any
    extra: dict


class CheckpointAdapter(Protocol):
    """A framework's training session as a flat state (the interface every adapter has)."""

    def capture(self, step: int, *, data_position: Any = None,
                extra: Mapping | None = None) -> tuple[dict[str, np.ndarray], dict]:
        """The session's state after `step` steps, as (arrays, JSON meta)."""

    def restore(self, state: Mapping[str, np.ndarray], meta: Mapping) -> Resume:
        """Put a captured state back, bit for bit; return where training goes on."""


class AdapterBase:
    """What every adapter derives from its capture() / restore(): save() and resume()."""

    #: capture() returns snapshots that training never changes (TF's copy-on-write
    #: variables): a checkpointer that can write borrowed arrays gets them uncopied
    immutable_capture = False

    def save(self, checkpointer, step: int, *, data_position: Any = None,
             extra: Mapping | None = None):
        """capture() and checkpointer.save(); returns the checkpointer's handle."""
        state, meta = self.capture(step, data_position=data_position, extra=extra)
        if self.immutable_capture and getattr(checkpointer, "borrows", False):
            return checkpointer.save(step, state, meta, borrowed=True)
        return checkpointer.save(step, state, meta)

    def resume(self, loader: Callable[[], Any]) -> Resume | None:
        """Restore from `loader()` (e.g. `lambda: recover(path)`), returning None when there
        is no checkpoint yet (a loader raising CheckpointError "no checkpoint file"/"no
        committed checkpoint" is treated as none; any other error propagates)."""
        try:
            restored = loader()
        except CheckpointError as e:
            if str(e).startswith(("no checkpoint file", "no committed checkpoint")):
                return None
            raise
        if restored is None:
            return None
        _, state, meta = restored
        return self.restore(state, meta)


def check_adapter_meta(meta, framework: str) -> None:
    """One-line CheckpointError unless `meta` is an adapter state of `framework`."""
    if not isinstance(meta, Mapping) or meta.get("faultlab_adapter") is None:
        raise CheckpointError("checkpoint was not written by a faultlab adapter "
                              "(no adapter metadata)")
    if meta["faultlab_adapter"] != ADAPTER_FORMAT or meta.get("framework") != framework:
        raise CheckpointError(f"checkpoint holds a {meta.get('framework')} adapter state "
                              f"of format {meta['faultlab_adapter']}, not {framework} format "
                              f"{ADAPTER_FORMAT}")


_ADAPTERS: dict[str, str] = {
    "torch": "faultlab.backends.torch.adapter:TorchCheckpointAdapter",
    "tf": "faultlab.backends.tf.adapter:TFCheckpointAdapter",
}


def register_adapter(framework: str, target: str) -> None:
    """Make `adapter_for(framework)` return the class named `module:attribute`."""
    _ADAPTERS[framework] = target


def adapter_for(framework: str) -> type:
    """The adapter class of a framework ("torch", "tf"); one-line FaultlabError if missing."""
    target = _ADAPTERS.get(framework)
    if target is None:
        raise FaultlabError(f"no checkpoint adapter for framework {framework!r} "
                            f"(known: {', '.join(sorted(_ADAPTERS))})")
    module, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ModuleNotFoundError as e:
        raise FaultlabError(f"checkpoint adapter for {framework} needs {e.name}: "
                            f"pip install 'faultlab[{framework}]'") from None


# -- encoding Python values as JSON plus arrays ----------------------------------------------

_TAGS = ("__tensor__", "__ndarray__", "__tuple__", "__float__", "__dict__", "__bytes__",
         "__dtype__", "__device__")


class _Encoder:
    """Turns nested Python values into JSON, moving every tensor / array into `arrays`.

    Tagged JSON keeps what plain JSON would lose: tuples, non-finite floats, non-string dict
    keys, bytes, torch dtypes and devices. Tensors become arrays named by their path.
    """

    def __init__(self, to_array: Callable[[str, Any], tuple[np.ndarray, dict]]):
        self.arrays: dict[str, np.ndarray] = {}
        self._to_array = to_array

    def encode(self, value, path: str):
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, float):
            return value if math.isfinite(value) else {"__float__": repr(value)}
        if isinstance(value, np.ndarray) or _is_tensor(value):
            if path in self.arrays:
                raise CheckpointError(f"two values would be stored as {path!r}")
            arr, ref = self._to_array(path, value)
            self.arrays[path] = arr
            return ref
        if isinstance(value, np.generic):
            if path in self.arrays:
                raise CheckpointError(f"two values would be stored as {path!r}")
            self.arrays[path] = np.asarray(value)
            return {"__ndarray__": path, "scalar": True}
        if isinstance(value, tuple):
            return {"__tuple__": [self.encode(v, f"{path}/{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [self.encode(v, f"{path}/{i}") for i, v in enumerate(value)]
        if isinstance(value, Mapping):
            plain = all(isinstance(k, str) and k not in _TAGS for k in value)
            if plain:
                return {k: self.encode(v, f"{path}/{k}") for k, v in value.items()}
            return {"__dict__": [[self.encode(k, f"{path}/key{i}"),
                                  self.encode(v, f"{path}/{_key_name(k, i)}")]
                                 for i, (k, v) in enumerate(value.items())]}
        if isinstance(value, (bytes, bytearray)):
            return {"__bytes__": bytes(value).hex()}
        torch = _torch_or_none()
        if torch is not None and isinstance(value, torch.dtype):
            return {"__dtype__": str(value).removeprefix("torch.")}
        if torch is not None and isinstance(value, torch.device):
            return {"__device__": str(value)}
        raise CheckpointError(f"cannot checkpoint {path!r}: a {type(value).__name__} is not a "
                              "tensor, array, number, string, list, tuple or dict")


def _key_name(key, i: int) -> str:
    return str(key) if isinstance(key, (int, str)) else f"item{i}"


def _decode(value, arrays: Mapping[str, np.ndarray], from_array: Callable[[np.ndarray, dict], Any]):
    if isinstance(value, list):
        return [_decode(v, arrays, from_array) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value or "__ndarray__" in value:
        name = value.get("__tensor__", value.get("__ndarray__"))
        if name not in arrays:
            raise CheckpointError(f"checkpoint lacks array {name!r} that its metadata names")
        arr = arrays[name]
        if "__ndarray__" in value:
            return arr[()] if value.get("scalar") else _writable(arr)
        return from_array(arr, value)
    if "__tuple__" in value:
        return tuple(_decode(v, arrays, from_array) for v in value["__tuple__"])
    if "__float__" in value:
        return float(value["__float__"])
    if "__dict__" in value:
        return {_decode(k, arrays, from_array): _decode(v, arrays, from_array)
                for k, v in value["__dict__"]}
    if "__bytes__" in value:
        return bytes.fromhex(value["__bytes__"])
    if "__dtype__" in value:
        return getattr(_torch(), value["__dtype__"])
    if "__device__" in value:
        return _torch().device(value["__device__"])
    return {k: _decode(v, arrays, from_array) for k, v in value.items()}


def _writable(arr: np.ndarray) -> np.ndarray:
    return arr if arr.flags.writeable else np.array(arr)


# -- global random number generators (framework-free parts) ----------------------------------

def capture_python_numpy_rng() -> tuple[dict[str, np.ndarray], dict]:
    """Python's and NumPy's global generators, exactly (Mersenne Twister words and all)."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    arrays = {"rng/python": np.array(words, dtype=np.uint32),
              "rng/numpy/keys": np.array(keys, dtype=np.uint32),
              "rng/numpy/cached_gaussian": np.array(cached, dtype=np.float64)}
    meta = {"python": {"version": version, "gauss_next": gauss},
            "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss)}}
    return arrays, meta


def restore_python_numpy_rng(state: Mapping[str, np.ndarray], meta: Mapping) -> None:
    py, npm = meta["python"], meta["numpy"]
    random.setstate((py["version"], tuple(int(w) for w in state["rng/python"]),
                     py["gauss_next"]))
    np.random.set_state((npm["kind"], np.array(state["rng/numpy/keys"], dtype=np.uint32),
                         npm["pos"], npm["has_gauss"],
                         float(state["rng/numpy/cached_gaussian"])))


def _generator_state(gen) -> tuple[np.ndarray | None, Any]:
    """(array, JSON) state of an extra generator: torch.Generator, numpy Generator / RandomState
    or random.Random."""
    torch = _torch_or_none()
    if torch is not None and isinstance(gen, torch.Generator):
        return gen.get_state().numpy().copy(), {"kind": "torch", "device": str(gen.device)}
    if isinstance(gen, np.random.Generator):
        return None, {"kind": "numpy", "state": gen.bit_generator.state}
    if isinstance(gen, np.random.RandomState):
        kind, keys, pos, has_gauss, cached = gen.get_state(legacy=True)
        return np.array(keys, dtype=np.uint32), {"kind": "randomstate", "pos": int(pos),
                                                 "has_gauss": int(has_gauss),
                                                 "cached": float(cached).hex()}
    if isinstance(gen, random.Random):
        version, words, gauss = gen.getstate()
        return np.array(words, dtype=np.uint32), {"kind": "python", "version": version,
                                                  "gauss_next": gauss}
    raise CheckpointError(f"cannot checkpoint a generator of type {type(gen).__name__}")


def capture_generators(generators: Mapping[str, Any], arrays: dict,
                       state_of: Callable = _generator_state) -> dict:
    """Add the named generators' array states to `arrays` (as `generator/NAME`); return their
    JSON states. state_of(gen) -> (array or None, JSON)."""
    out = {}
    for name, gen in generators.items():
        arr, info = state_of(gen)
        if arr is not None:
            arrays[f"generator/{name}"] = arr
        out[name] = info
    return out


def _set_generator_state(gen, arr: np.ndarray | None, info: Mapping) -> None:
    kind = info["kind"]
    if kind == "torch":
        gen.set_state(_torch().from_numpy(np.array(arr, dtype=np.uint8)))
    elif kind == "numpy":
        gen.bit_generator.state = info["state"]
    elif kind == "randomstate":
        gen.set_state(("MT19937", np.array(arr, dtype=np.uint32), info["pos"],
                       info["has_gauss"], float.fromhex(info["cached"])))
    elif kind == "python":
        gen.setstate((info["version"], tuple(int(w) for w in arr), info["gauss_next"]))
    else:
        raise CheckpointError(f"unknown generator kind {kind!r} in checkpoint")


# -- torch --------------------------------------------------------------------------------------

def _torch_or_none():
    import sys
    return sys.modules.get("torch")


def _torch():
    try:
        import torch
    except ImportError:
        raise FaultlabError("the torch checkpoint adapter needs torch: "
                            "pip install 'faultlab[torch]'") from None
    return torch


def _is_tensor(value) -> bool:
    torch = _torch_or_none()
    return torch is not None and isinstance(value, torch.Tensor)


# torch dtypes NumPy has no type for travel as unsigned integers of the same width.
_VIEW_AS = {"bfloat16": "uint16", "float8_e4m3fn": "uint8", "float8_e5m2": "uint8",
            "float8_e4m3fnuz": "uint8", "float8_e5m2fnuz": "uint8", "float8_e8m0fnu": "uint8",
            "complex32": "int32", "chalf": "int32"}


class _Stager:
    """Pinned host buffers for device tensors, reused across captures (name -> buffer)."""

    def __init__(self):
        self._buffers: dict[str, Any] = {}
        self.devices: set = set()

    def host_copy(self, name: str, t):
        """Enqueue a non_blocking device-to-host copy into a pinned buffer; return the buffer.

        The buffer is valid only after `synchronize()`: all copies of one capture are
        enqueued first so that they pipeline, then waited for once.
        """
        torch = _torch()
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
        torch = _torch()
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


def tensor_to_array(t, name: str = "", stager: _Stager | None = None, copy: bool = False):
    """A torch tensor as (numpy array, JSON ref). CPU tensors are viewed, not copied (unless
    copy=True); device tensors go through `stager`'s pinned buffers (or a blocking copy)."""
    torch = _torch()
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
    torch = _torch()
    arr = _writable(np.asarray(arr))
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    t = torch.from_numpy(arr)
    dtype = (ref or {}).get("dtype")
    if dtype is not None:
        t = t.view(getattr(torch, dtype))
    if device is not None:
        t = t.to(device)
    return t


class OverlapHandle:
    """The future of a `save(..., overlap=True)`: staging runs behind the next forward and
    backward pass; wait() waits for staging and then for the checkpoint to be durable."""

    def __init__(self, step: int):
        self.step = step
        self._staged = threading.Event()
        self._inner = None
        self._error: BaseException | None = None

    def staged(self) -> bool:
        return self._staged.is_set()

    def wait_staged(self) -> None:
        self._staged.wait()
        if self._error is not None:
            raise self._error

    def wait(self, timeout: float | None = None):
        self.wait_staged()
        return self._inner.wait(timeout)

    def done(self) -> bool:
        return self._staged.is_set() and (self._error is not None or self._inner.done())

    @property
    def inner(self):
        """The checkpointer's own handle (None until staging has finished)."""
        return self._inner

    def add_done_callback(self, fn) -> None:
        self.wait_staged()
        self._inner.add_done_callback(lambda _h: fn(self))

    @property
    def error(self):
        if self._error is not None:
            return self._error
        return None if self._inner is None else self._inner.error


class TorchCheckpointAdapter(AdapterBase):
    """A torch training session's complete state as a flat checkpoint (see module docstring).

    model: an nn.Module or a dict of them. optimizer: an optimizer or a dict of them.
    scaler: a torch.amp.GradScaler (its state is saved whether enabled or not).
    scheduler: a learning-rate scheduler or a dict of them.
    data: an object with state_dict() / load_state_dict() (a stateful sampler or loader),
    saved beside the explicit `data_position` that capture() takes.
    generators: extra named generators (torch.Generator, numpy Generator / RandomState,
    random.Random), e.g. a DataLoader's.
    rng: also save the global generators (torch CPU and CUDA, NumPy, Python).
    cow_min_bytes: in save(cow=True), tensors smaller than this are copied, not frozen
    (default 64 KiB: tracking costs more than copying them). cow_policy: what an optimizer
    step does while a cow save is unwritten: "redirect" (run it under the copy-on-write mode),
    "copy" (give the frozen tensors copies first), "auto" (whichever is cheaper: copying for
    a few MB of frozen state, redirecting for more).
    """

    def __init__(self, model=None, optimizer=None, scaler=None, *, scheduler=None, data=None,
                 generators: Mapping[str, Any] | None = None, rng: bool = True,
                 cow_min_bytes: int | None = None, cow_policy: str = "auto"):
        self._torch = _torch()
        self.models = _named(model, "model")
        self.optimizers = _named(optimizer, "optimizer")
        self.schedulers = _named(scheduler, "scheduler")
        self.scaler = scaler
        self.data = data
        self.generators = dict(generators or {})
        self.rng = rng
        self._stager = _Stager()
        self._pending: OverlapHandle | None = None
        self.overlap_wait_s = 0.0        # time optimizer steps waited for overlapped staging
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._hooks = [h for opt in self.optimizers.values()
                       for h in (opt.register_step_pre_hook(self._before_optimizer_step),
                                 opt.register_step_post_hook(self._after_optimizer_step))]
        from faultlab.backends.torch.cow import CowGuard, storage_ptr
        self._storage_ptr = storage_ptr
        self._cow = CowGuard() if cow_min_bytes is None else CowGuard(cow_min_bytes)
        self.cow_policy = cow_policy
        self._step_kind = "plain"
        self._cow_mode = None
        self._step_t0 = 0.0
        self._step_times = {"plain": [0.0, 0], "cow": [0.0, 0]}   # optimizer steps: total s, count

    # -- capture ------------------------------------------------------------------------

    def capture(self, step: int, *, data_position: Any = None, extra: Mapping | None = None,
                copy: bool = False) -> tuple[dict[str, np.ndarray], dict]:
        """The state after `step` steps as (arrays, JSON meta).

        CPU arrays are views of the live tensors unless copy=True (every checkpointer copies
        or writes them before its save() returns); device tensors are copied into reused
        pinned buffers, valid until the next capture.
        """
        self.wait_staged()
        arrays, meta = self._capture(step, data_position, extra, copy=copy, overlap=False)
        self._stager.synchronize()
        return arrays, meta

    def _capture(self, step, data_position, extra, *, copy: bool, overlap: bool,
                 freeze: list | None = None):
        """overlap: buffers are copied now (the next forward pass changes them); parameters
        and optimizer state stay live views for the staging thread. freeze (a list): the
        same, and the parameters and optimizer state tensors that copy-on-write can guard are
        appended to it and stay views; the others are copied (as are device tensors, into
        fresh host memory: the reused pinned buffers would change under a borrowed save)."""
        torch = self._torch
        step = int(step)
        stager = self._stager if freeze is None else None
        overlap = overlap or freeze is not None

        # Only parameters and optimizer state may stay live views while an overlapped save
        # stages (the optimizer's pre-hook guards them); anything else is copied now.
        guarded = tuple(f"{n}/" for n in (*self.models, *self.optimizers))
        owners = self._cow_owners() if freeze is not None else {}

        def to_array(path, value):
            c = copy or (overlap and not path.startswith(guarded))
            if isinstance(value, np.ndarray):
                return (value.copy() if c else value), {"__ndarray__": path}
            if freeze is not None and not c:
                owner = owners.get(self._storage_ptr(value)) if value.device.type == "cpu" else None
                if owner is not None and owner.shape == value.shape and owner.stride() == value.stride() \
                        and self._cow.eligible(owner):
                    freeze.append(owner)
                else:
                    c = True
            return tensor_to_array(value, path, stager, copy=c)

        enc = _Encoder(to_array)
        meta: dict = {"faultlab_adapter": ADAPTER_FORMAT, "framework": "torch", "step": step}
        models = {}
        for name, m in self.models.items():
            sd = m.state_dict(keep_vars=overlap)
            if overlap:
                # buffers change in the next forward pass (BatchNorm statistics): copied
                # now, while parameters wait for the optimizer's pre-hook (or copy-on-write).
                # (keep_vars: a plain state_dict holds detached aliases, never the Parameter.)
                params = {id(p) for p in m.parameters()}
                sd = {k: (v.detach() if id(v) in params else
                          v.detach().clone() if v.device.type == "cpu" else v.detach())
                      if _is_tensor(v) else v for k, v in sd.items()}
            models[name] = enc.encode(dict(sd), f"{name}")
        meta["models"] = models
        meta["optimizers"] = {name: enc.encode(opt.state_dict(), name)
                              for name, opt in self.optimizers.items()}
        meta["schedulers"] = {name: enc.encode(sch.state_dict(), name)
                              for name, sch in self.schedulers.items()}
        if self.scaler is not None:
            meta["scaler"] = enc.encode(self.scaler.state_dict(), "scaler")
        if self.data is not None:
            meta["data_state"] = enc.encode(self.data.state_dict(), "data")
        meta["data_position"] = enc.encode(data_position, "position")
        meta["extra"] = enc.encode(dict(extra or {}), "extra")
        arrays = enc.arrays
        if self.rng:
            py_np, rng_meta = capture_python_numpy_rng()
            arrays.update(py_np)
            arrays["rng/torch"] = torch.get_rng_state().numpy()
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                for i, s in enumerate(torch.cuda.get_rng_state_all()):
                    arrays[f"rng/cuda/{i}"] = s.numpy()
                rng_meta["cuda_devices"] = torch.cuda.device_count()
            meta["rng"] = rng_meta
        meta["generators"] = capture_generators(self.generators, arrays)
        _check_meta(meta)
        return arrays, meta

    def _cow_owners(self) -> dict:
        """storage address -> the live tensor object owning it (parameters, optimizer state)."""
        owners = {}
        for m in self.models.values():
            for p in m.parameters():
                owners[self._storage_ptr(p)] = p
        for opt in self.optimizers.values():
            for st in opt.state.values():
                for v in st.values():
                    if _is_tensor(v):
                        owners[self._storage_ptr(v)] = v
        return owners

    def save(self, checkpointer, step: int, *, data_position: Any = None,
             extra: Mapping | None = None, overlap: bool = False, cow: bool = False):
        """capture() and checkpointer.save(); returns the checkpointer's handle.

        cow=True (a CheckpointEngine only; CPU tensors): nothing is copied. Parameters and
        optimizer state are frozen and written by the engine where they are (a borrowed
        save); the next optimizer steps update frozen tensors out of place, copy-on-write
        (faultlab.backends.torch.cow), until the engine has written them. Buffers, RNG states
        and small tensors are copied now. Same contract as overlap: until the save is
        written, change parameters and optimizer state only in optimizer.step().

        overlap=True returns at once (an OverlapHandle): RNG states, buffers and metadata are
        taken now; parameters and optimizer state are staged by a background thread while
        training runs the next forward and backward pass, and each optimizer's step waits
        (pre-hook) until staging is done. Requires that parameters and optimizer state change
        only inside optimizer.step() until then.
        """
        if cow:
            return self._save_cow(checkpointer, int(step), data_position, extra)
        if not overlap:
            state, meta = self.capture(step, data_position=data_position, extra=extra)
            return checkpointer.save(step, state, meta)
        self.wait_staged()
        state, meta = self._capture(step, data_position, extra, copy=False, overlap=True)
        events = self._stager.record()
        handle = OverlapHandle(int(step))
        self._pending = handle

        if self._worker is None:
            # One long-lived thread: starting a thread per save would make save() wait for
            # the new thread to take the GIL and hand it back (a switch interval or more).
            self._worker = threading.Thread(target=self._stage_loop, daemon=True,
                                            name="ckpt-overlap-stage")
            self._worker.start()
        self._jobs.put((handle, events, checkpointer, int(step), state, meta))
        return handle

    def _save_cow(self, checkpointer, step: int, data_position, extra):
        if not getattr(checkpointer, "borrows", False):
            raise CheckpointError(f"save(cow=True) needs a checkpointer that writes borrowed "
                                  f"arrays (CheckpointEngine), not {type(checkpointer).__name__}")
        self.wait_staged()
        frozen: list = []
        state, meta = self._capture(step, data_position, extra, copy=False, overlap=True,
                                    freeze=frozen)
        snap = self._cow.freeze(frozen)

        def verify():
            msg = snap.modified()
            snap.release()             # everything is written: updates may go in place again
            return msg
        try:
            handle = checkpointer.save(step, state, meta, borrowed=True, verify=verify)
        except BaseException:
            snap.release()
            raise
        handle.add_done_callback(lambda _h: snap.release())
        return handle

    def _stage_loop(self) -> None:
        while True:
            handle, events, checkpointer, step, state, meta = self._jobs.get()
            try:
                self._stager.synchronize(events)
                handle._inner = checkpointer.save(step, state, meta)
            except BaseException as e:            # surfaced by wait_staged() / wait()
                handle._error = e
            finally:
                handle._staged.set()

    def wait_staged(self) -> None:
        """Block until an overlapped save has finished staging (re-raises its failure)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.wait_staged()

    def _before_optimizer_step(self, optimizer, args, kwargs):
        if self._pending is not None:
            t0 = time.perf_counter()
            self.wait_staged()
            self.overlap_wait_s += time.perf_counter() - t0
        self._leave_cow()                    # (left over if a previous step raised)
        self._step_t0 = time.perf_counter()
        self._step_kind = "plain"
        if self._cow.active:                 # storages of a save in flight are frozen
            self._step_kind = "cow"
            self._cow_mode = self._cow.begin_update(
                sum(len(g["params"]) for g in optimizer.param_groups))

    def _after_optimizer_step(self, optimizer, args, kwargs):
        dt = time.perf_counter() - self._step_t0
        kind = self._step_kind
        self._step_times[kind][0] += dt
        self._step_times[kind][1] += 1
        self._leave_cow()

    def _leave_cow(self) -> None:
        mode, self._cow_mode = self._cow_mode, None
        if mode is not None:
            mode.__exit__(None, None, None)

    @property
    def cow_min_bytes(self) -> int:
        """save(cow=True) copies tensors smaller than this instead of freezing them."""
        return self._cow.min_bytes

    @cow_min_bytes.setter
    def cow_min_bytes(self, value: int) -> None:
        self._cow.min_bytes = int(value)

    @property
    def cow_policy(self) -> str:
        return self._cow.policy

    @cow_policy.setter
    def cow_policy(self, value: str) -> None:
        if value not in ("auto", "redirect", "copy"):
            raise CheckpointError(f"cow_policy must be auto, redirect or copy, not {value!r}")
        self._cow.policy = value

    @property
    def cow_stats(self) -> dict:
        """Copy-on-write counters: updates redirected out of place (recycled: into a buffer
        a finished save gave back), bytes copied by the fallback, alias writes that waited."""
        c = self._cow
        mean = {k: (t / n if n else None) for k, (t, n) in self._step_times.items()}
        return {"redirected": c.redirected, "recycled": c.recycled,
                "copied_bytes": c.copied_bytes, "waits": c.waits,
                "optimizer_steps": {k: n for k, (_, n) in self._step_times.items()},
                "optimizer_step_s": {k: t for k, (t, _) in self._step_times.items()},
                "mean_optimizer_step_s": mean}

    def close(self) -> None:
        """Wait for staging and remove the optimizer hooks."""
        self.wait_staged()
        self._leave_cow()
        self._cow.drop_spares()
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @property
    def staging_bytes(self) -> int:
        """Pinned host memory held for device tensors."""
        return self._stager.nbytes

    # -- restore ------------------------------------------------------------------------

    def restore(self, state: Mapping[str, np.ndarray], meta: Mapping) -> Resume:
        """Load a captured state into the model, optimizer, scaler, data and generators."""
        torch = self._torch
        self.wait_staged()
        check_adapter_meta(meta, "torch")

        missing = sorted(n for n in _required_arrays(meta) if n not in state)
        if missing:                  # checked before anything is changed
            raise CheckpointError(f"checkpoint lacks {len(missing)} array(s) its metadata "
                                  f"names: {missing[:5]}")

        def from_array(arr, ref):
            return array_to_tensor(arr, ref)

        def decode(tree):
            return _decode(tree, state, from_array)

        try:
            _check_names(meta["models"], self.models, "model")
            _check_names(meta["optimizers"], self.optimizers, "optimizer")
            for name, m in self.models.items():
                sd = decode(meta["models"][name])
                try:
                    m.load_state_dict(sd, strict=True)
                except (RuntimeError, ValueError) as e:
                    raise CheckpointError(f"checkpoint does not fit {name}: "
                                          f"{_one_line(e)}") from None
            for name, opt in self.optimizers.items():
                try:
                    opt.load_state_dict(decode(meta["optimizers"][name]))
                except (RuntimeError, ValueError, KeyError) as e:
                    raise CheckpointError(f"checkpoint does not fit {name}: "
                                          f"{_one_line(e)}") from None
            _check_names(meta.get("schedulers", {}), self.schedulers, "scheduler")
            for name, sch in self.schedulers.items():
                sch.load_state_dict(decode(meta["schedulers"][name]))
            if self.scaler is not None:
                if "scaler" not in meta:
                    raise CheckpointError("checkpoint holds no GradScaler state")
                self.scaler.load_state_dict(decode(meta["scaler"]))
            if self.data is not None:
                if "data_state" not in meta:
                    raise CheckpointError("checkpoint holds no data loader state")
                self.data.load_state_dict(decode(meta["data_state"]))
            if self.rng:
                if "rng" not in meta:
                    raise CheckpointError("checkpoint holds no random generator states")
                restore_python_numpy_rng(state, meta["rng"])
                torch.set_rng_state(torch.from_numpy(np.array(state["rng/torch"],
                                                              dtype=np.uint8)))
                n_cuda = meta["rng"].get("cuda_devices", 0)
                if n_cuda and torch.cuda.is_available():
                    torch.cuda.set_rng_state_all(
                        [torch.from_numpy(np.array(state[f"rng/cuda/{i}"], dtype=np.uint8))
                         for i in range(min(n_cuda, torch.cuda.device_count()))])
            for name, gen in self.generators.items():
                info = meta.get("generators", {}).get(name)
                if info is None:
                    raise CheckpointError(f"checkpoint holds no state of generator {name!r}")
                _set_generator_state(gen, state.get(f"generator/{name}"), info)
            position = decode(meta.get("data_position"))
            extra = decode(meta.get("extra", {}))
        except KeyError as e:
            raise CheckpointError(f"checkpoint is incomplete: missing {e}") from None
        return Resume(int(meta["step"]), position, extra)


def _required_arrays(meta: Mapping) -> set[str]:
    """Every array name an adapter's metadata refers to."""
    names: set[str] = set()

    def walk(v):
        if isinstance(v, dict):
            for tag in ("__tensor__", "__ndarray__"):
                if tag in v:
                    names.add(v[tag])
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    for key in ("models", "optimizers", "schedulers", "scaler", "data_state", "data_position",
                "extra"):
        walk(meta.get(key))
    if "rng" in meta:
        names |= {"rng/python", "rng/numpy/keys", "rng/numpy/cached_gaussian", "rng/torch"}
    for name, info in meta.get("generators", {}).items():
        if info.get("kind") != "numpy":
            names.add(f"generator/{name}")
    return names


def _named(obj, kind: str) -> dict:
    if obj is None:
        return {}
    if isinstance(obj, Mapping):
        return {f"{kind}/{k}": v for k, v in obj.items()}
    return {kind: obj}


def _check_names(saved: Mapping, live: Mapping, kind: str) -> None:
    if set(saved) != set(live):
        raise CheckpointError(f"checkpoint holds {kind}s {sorted(saved)} but the adapter has "
                              f"{sorted(live)}")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _check_meta(meta: dict) -> None:
    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"adapter metadata is not JSON-serialisable: {e}") from None


@dataclass
class TrainerAdapter:
    """A faultlab TorchTrainer (workloads/torch_trainer.py) behind the adapter interface:
    model and optimizer of the trainer plus the global generators; data position = step."""

    trainer: Any

    def __post_init__(self):
        self.adapter = TorchCheckpointAdapter(self.trainer.model, self.trainer.optimizer)

    def capture(self, step, *, data_position=None, extra=None):
        return self.adapter.capture(step, data_position=step if data_position is None
                                    else data_position, extra=extra)

    def restore(self, state, meta) -> Resume:
        return self.adapter.restore(state, meta)
