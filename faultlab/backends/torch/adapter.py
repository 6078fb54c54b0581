"""The torch checkpoint adapter: a training session's whole state <-> {name: numpy array} + JSON meta.

The checkpointers store only flat NumPy states; this adapter turns a torch training session
into such a state and back, exactly:

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

The interface and its call order (capture / save / wait_staged / close / resume) are
faultlab.checkpointing.adapter's; nested values are encoded by faultlab.checkpointing.codec,
with the torch types (tensors, dtypes, devices, torch.Generator) registered by this module.
TensorFlow's adapter (faultlab.backends.tf.adapter) has the same interface.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from faultlab.backends.torch.cow import CowGuard, storage_ptr
from faultlab.backends.torch.staging import HostStager, array_to_tensor, tensor_to_array
from faultlab.checkpointing.adapter import (ADAPTER_FORMAT, AdapterBase, Resume,
                                            check_adapter_meta, check_meta_json, check_names,
                                            named)
from faultlab.checkpointing.api import SaveFuture
from faultlab.checkpointing.codec import (Encoder, capture_generators,
                                          capture_python_numpy_rng, decode,
                                          register_array_type, register_generator,
                                          register_value_type, restore_python_numpy_rng,
                                          set_generator_state)
from faultlab.errors import CheckpointError

__all__ = ["OverlapHandle", "Resume", "TorchCheckpointAdapter", "TrainerAdapter"]


# -- the torch types of the value codec --------------------------------------------------------

def _generator_state(gen) -> tuple[np.ndarray, dict]:
    return gen.get_state().numpy().copy(), {"kind": "torch", "device": str(gen.device)}


def _set_generator_state(gen, arr: np.ndarray | None, info: Mapping) -> None:
    gen.set_state(torch.from_numpy(np.array(arr, dtype=np.uint8)))


register_array_type(torch.Tensor)
register_value_type(torch.dtype, "__dtype__", lambda v: str(v).removeprefix("torch."),
                    lambda s: getattr(torch, s))
register_value_type(torch.device, "__device__", str, torch.device)
register_generator(torch.Generator, "torch", _generator_state, _set_generator_state)


class OverlapHandle(SaveFuture):
    """The future of a `save(..., overlap=True)`: staging runs behind the next forward and
    backward pass; wait() waits for staging and then for the checkpoint to be durable.

    A SaveFuture wrapping the checkpointer's own (`inner`, once staging has handed the state
    over): it finishes when the inner future does, or when staging fails; wait() and error
    report the inner future's outcome (or the staging failure) as it does."""

    def __init__(self, step: int):
        super().__init__(step)
        self._staged = threading.Event()
        self._inner: SaveFuture | None = None
        self._stage_error: BaseException | None = None

    def staged(self) -> bool:
        return self._staged.is_set()

    def wait_staged(self) -> None:
        self._staged.wait()
        if self._stage_error is not None:
            raise self._stage_error

    def wait(self, timeout: float | None = None):
        self.wait_staged()
        return self._inner.wait(timeout)

    def done(self) -> bool:
        return self._staged.is_set() and (self._stage_error is not None or self._inner.done())

    @property
    def inner(self) -> SaveFuture | None:
        """The checkpointer's own future (None until staging has finished)."""
        return self._inner

    @property
    def error(self):
        if self._stage_error is not None:
            return self._stage_error
        return None if self._inner is None else self._inner.error

    def handed_over(self, inner: SaveFuture) -> None:
        """Staging is done: the checkpointer's save returned `inner` (called by the stager)."""
        self._inner = inner
        self._staged.set()
        # the outcome stays the inner future's (reading it here would count its failure as
        # seen); this future only finishes with it, running its own callbacks
        inner.add_done_callback(lambda _f: self.finish())

    def staging_failed(self, error: BaseException) -> None:
        """Staging raised `error` (re-raised by wait_staged() and wait())."""
        self._stage_error = error
        self._staged.set()
        self.finish(error=error)

    def __repr__(self) -> str:
        state = "pending" if not self.done() else ("failed" if self.error else "durable")
        return f"<OverlapHandle step={self.step} {state}>"

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
        self.models = named(model, "model")
        self.optimizers = named(optimizer, "optimizer")
        self.schedulers = named(scheduler, "scheduler")
        self.scaler = scaler
        self.data = data
        self.generators = dict(generators or {})
        self.rng = rng
        self._stager = HostStager()
        self._pending: OverlapHandle | None = None
        self.overlap_wait_s = 0.0        # time optimizer steps waited for overlapped staging
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._hooks = [h for opt in self.optimizers.values()
                       for h in (opt.register_step_pre_hook(self._before_optimizer_step),
                                 opt.register_step_post_hook(self._after_optimizer_step))]
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
                owner = owners.get(storage_ptr(value)) if value.device.type == "cpu" else None
                if owner is not None and owner.shape == value.shape and owner.stride() == value.stride() \
                        and self._cow.eligible(owner):
                    freeze.append(owner)
                else:
                    c = True
            return tensor_to_array(value, path, stager, copy=c)

        enc = Encoder(to_array)
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
                      if isinstance(v, torch.Tensor) else v for k, v in sd.items()}
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
        check_meta_json(meta)
        return arrays, meta

    def _cow_owners(self) -> dict:
        """storage address -> the live tensor object owning it (parameters, optimizer state)."""
        owners = {}
        for m in self.models.values():
            for p in m.parameters():
                owners[storage_ptr(p)] = p
        for opt in self.optimizers.values():
            for st in opt.state.values():
                for v in st.values():
                    if isinstance(v, torch.Tensor):
                        owners[storage_ptr(v)] = v
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
                inner = checkpointer.save(step, state, meta)
            except BaseException as e:            # surfaced by wait_staged() / wait()
                handle.staging_failed(e)
            else:
                handle.handed_over(inner)

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

    def cow_tensors(self) -> list:
        """The parameters and optimizer-state tensors a cow save freezes (not copies)."""
        return [t for t in self._cow_owners().values() if self._cow.eligible(t)]

    def cow_freeze(self, tensors: list):
        """Freeze `tensors` as an unwritten cow save does (the next optimizer steps update
        them copy-on-write); returns the snapshot, whose release() ends it (measurements)."""
        return self._cow.freeze(tensors)

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
        self.wait_staged()
        check_adapter_meta(meta, "torch")

        missing = sorted(n for n in _required_arrays(meta) if n not in state)
        if missing:                  # checked before anything is changed
            raise CheckpointError(f"checkpoint lacks {len(missing)} array(s) its metadata "
                                  f"names: {missing[:5]}")

        def from_array(arr, ref):
            return array_to_tensor(arr, ref)

        def unpack(tree):
            return decode(tree, state, from_array)

        try:
            check_names(meta["models"], self.models, "model")
            check_names(meta["optimizers"], self.optimizers, "optimizer")
            for name, m in self.models.items():
                sd = unpack(meta["models"][name])
                try:
                    m.load_state_dict(sd, strict=True)
                except (RuntimeError, ValueError) as e:
                    raise CheckpointError(f"checkpoint does not fit {name}: "
                                          f"{_one_line(e)}") from None
            for name, opt in self.optimizers.items():
                try:
                    opt.load_state_dict(unpack(meta["optimizers"][name]))
                except (RuntimeError, ValueError, KeyError) as e:
                    raise CheckpointError(f"checkpoint does not fit {name}: "
                                          f"{_one_line(e)}") from None
            check_names(meta.get("schedulers", {}), self.schedulers, "scheduler")
            for name, sch in self.schedulers.items():
                sch.load_state_dict(unpack(meta["schedulers"][name]))
            if self.scaler is not None:
                if "scaler" not in meta:
                    raise CheckpointError("checkpoint holds no GradScaler state")
                self.scaler.load_state_dict(unpack(meta["scaler"]))
            if self.data is not None:
                if "data_state" not in meta:
                    raise CheckpointError("checkpoint holds no data loader state")
                self.data.load_state_dict(unpack(meta["data_state"]))
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
                set_generator_state(gen, state.get(f"generator/{name}"), info)
            position = unpack(meta.get("data_position"))
            extra = unpack(meta.get("extra", {}))
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


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


@dataclass
class TrainerAdapter:
    """A faultlab TorchTrainer (backends/torch/trainer.py) behind the adapter interface:
    model and optimizer of the trainer plus the global generators; data position = step."""

    trainer: Any

    def __post_init__(self):
        self.adapter = TorchCheckpointAdapter(self.trainer.model, self.trainer.optimizer)

    def capture(self, step, *, data_position=None, extra=None):
        return self.adapter.capture(step, data_position=step if data_position is None
                                    else data_position, extra=extra)

    def restore(self, state, meta) -> Resume:
        return self.adapter.restore(state, meta)
