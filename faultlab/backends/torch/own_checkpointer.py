"""Checkpoints for a PyTorch training loop the user keeps: the engine and the torch adapter as
one object (published as ``faultlab.torch.Checkpointer``).

    ckpt = Checkpointer("run.ckpt", every=50, model=model, optimizer=opt, scheduler=sched,
                        data=sampler, extra={"hidden": hidden})
    start = ckpt.resume()                     # the step to go on from; 0 on a fresh start
    for step in range(start, total):
        ...                                   # the user's own forward, backward, opt.step()
        ckpt.step(step + 1)                   # steps done so far; saves every 50
    ckpt.close()                              # (or `with Checkpointer(...) as ckpt:`)

Nothing is mapped here: the session's state is :class:`TorchCheckpointAdapter`'s (model,
optimizer, scheduler, GradScaler, global and extra generators, data state, extras, step) and
it is persisted by a :class:`CheckpointEngine` through the adapter's ``save()``. What this
adds: saving when due, the stall of every save (``stats``), one-call resume that checks the
model before anything changes, a data position or extras kept in the user's own dicts and
restored into them, a resumed DataLoader that does not draw one seed too many, failures of
background saves raised in the loop, and one-line CheckpointErrors for misuse when the object
is built.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from faultlab.backends.torch.adapter import TorchCheckpointAdapter
from faultlab.checkpointing.api import SaveFuture
from faultlab.checkpointing.engine import CheckpointEngine
from faultlab.checkpointing.recovery import recover
from faultlab.errors import CheckpointError, printable
from faultlab.replay.own_loop import stateful as _stateful
from faultlab.replay.own_loop import whole as _whole

__all__ = ["CheckpointStats", "Checkpointer"]

MODES = ("copy", "overlap", "cow")


@dataclass(frozen=True)
class CheckpointStats:
    """What checkpointing cost the training loop so far.

    stall_s: how long each save held the loop up, in the order of the saves: its save() call
    (in ``step()``), plus in mode "overlap" what the next optimizer step waited for its
    staging. persist_s: from each save's start until it was durable (None while in flight or
    failed). cow_step_extra_s (mode "cow"): what optimizer steps run while a save was
    unwritten took beyond a plain step's mean (the copy-on-write updates), an estimate kept
    apart from the stall."""

    saves: int
    durable: int
    failed: int
    last_saved_step: int | None
    last_durable_step: int | None
    stall_s: tuple[float, ...]
    persist_s: tuple[float | None, ...]
    cow_step_extra_s: float = 0.0

    @property
    def total_stall_s(self) -> float:
        return sum(self.stall_s)

    @property
    def mean_stall_s(self) -> float:
        return self.total_stall_s / self.saves if self.saves else 0.0

    @property
    def max_stall_s(self) -> float:
        return max(self.stall_s, default=0.0)

    def __str__(self) -> str:
        cow = (f"; copy-on-write optimizer steps {self.cow_step_extra_s * 1e3:.1f} ms slower"
               if self.cow_step_extra_s else "")
        return (f"{self.saves} save(s), {self.durable} durable, {self.failed} failed; stall "
                f"{self.mean_stall_s * 1e3:.2f} ms per save (max {self.max_stall_s * 1e3:.2f}"
                f" ms), {self.total_stall_s * 1e3:.1f} ms in all{cow}")


def _host_side(model):
    """The object whose state_dict is `model`'s: its open faultlab.torch.Offload, if any."""
    off = getattr(model, "_faultlab_offload", None)
    return model if off is None else off


class Checkpointer:
    """Save a torch training session every `every` steps through the checkpoint engine, and
    resume it in one call (module docstring for the loop).

    path: the checkpoint file (one file; its directory must exist). every: steps between
    saves. model: an nn.Module or a dict of them; optimizer, scheduler, scaler: one or a dict
    (scheduler: any object with state_dict()); data: the data position -- a sampler or loader
    with state_dict() / load_state_dict() (torchdata's StatefulDataLoader), or a dict of the
    user's own (epoch, batch, offset...), saved by content and restored into the same dict.
    A torch DataLoader given as data= has its own generator saved too, and the first iterator
    it creates after a resume draws no seed (docs/checkpointing.md, "In your own PyTorch
    loop").
    extra: a dict of further state (a recurrent hidden state, a running average), saved by
    content at each save (``step(extra=...)`` updates it) and restored into the same dict:
    tensors are copied into the dict's own tensors when shape and dtype match, so a variable
    the loop holds is restored too. generators: extra named generators (a DataLoader's
    torch.Generator, numpy, random.Random); rng: also the global torch, CUDA, NumPy and Python
    generators (default), so a resumed run is bit-identical.

    mode: "copy" (default: save() copies the state into the engine's staging pool and
    returns; the engine persists it while training goes on), "overlap" (the copy runs behind
    the next forward and backward pass; the optimizer waits only if it has not finished), or
    "cow" (CPU tensors: nothing is copied, the next optimizer steps update the frozen tensors
    copy-on-write). "overlap" and "cow" require that parameters and optimizer state change
    only inside optimizer.step() until the save is written (docs/checkpointing.md).
    keep, max_in_flight and the other keyword arguments (chunk_bytes, pool_bytes, writers,
    slot_bytes) are the engine's.
    """

    def __init__(self, path: str | os.PathLike, every: int, *, model, optimizer=None,
                 scheduler=None, scaler=None, data=None, extra: MutableMapping | None = None,
                 generators: Mapping[str, Any] | None = None, rng: bool = True,
                 mode: str = "copy", keep: int = 2, max_in_flight: int = 2,
                 **engine_options):
        self.path = _check_path(path)
        every = _whole(every)
        if every is None or every < 1:
            raise CheckpointError(f"Checkpointer(every={every!r}): every must be a whole number "
                                  "of steps, at least 1")
        if mode not in MODES:
            raise CheckpointError(f"Checkpointer(mode={mode!r}): mode must be one of "
                                  f"{', '.join(MODES)}")
        _check_objects(model, "model", lambda o: isinstance(o, torch.nn.Module),
                       "a torch.nn.Module", required=True)
        _check_objects(optimizer, "optimizer", lambda o: isinstance(o, torch.optim.Optimizer),
                       "a torch.optim.Optimizer")
        _check_objects(scheduler, "scheduler", _stateful, "an object with state_dict() and "
                       "load_state_dict() (a torch.optim.lr_scheduler)")
        _check_objects(scaler, "scaler", _stateful, "a torch.amp.GradScaler")
        self._position: MutableMapping | None = None
        if isinstance(data, Mapping):
            if not isinstance(data, MutableMapping):
                raise CheckpointError(f"Checkpointer(data=...): a {type(data).__name__} cannot "
                                      "be restored in place; pass a dict")
            self._position, data = data, None
        elif data is not None and not _stateful(data):
            raise CheckpointError(f"Checkpointer(data=...): a {type(data).__name__} has no "
                                  "state_dict() / load_state_dict(); pass a stateful sampler or "
                                  "loader (torchdata's StatefulDataLoader) or a dict of your own "
                                  "data position")
        if extra is not None and not isinstance(extra, MutableMapping):
            raise CheckpointError(f"Checkpointer(extra=...) must be a dict, not "
                                  f"{type(extra).__name__}")
        self._extra: MutableMapping = {} if extra is None else extra
        self._loader = data if isinstance(data, torch.utils.data.DataLoader) else None
        loader_gen = getattr(self._loader, "generator", None)
        if isinstance(loader_gen, torch.Generator) and \
                all(g is not loader_gen for g in (generators or {}).values()):
            # the loader's own generator draws its shuffles and seeds: part of the state
            generators = {**(generators or {}), "data.generator": loader_gen}
        self.every, self.mode = every, mode
        try:
            self.engine = CheckpointEngine(self.path, keep=keep, max_in_flight=max_in_flight,
                                           **engine_options)
        except TypeError as e:
            raise CheckpointError(f"Checkpointer: bad engine option: {e}") from None
        # an offloaded model (faultlab.torch.Offload) holds its values in host copies: the
        # adapter saves and restores those (the offload's state_dict / load_state_dict)
        model = ({k: _host_side(v) for k, v in model.items()} if isinstance(model, Mapping)
                 else _host_side(model))
        try:
            self.adapter = TorchCheckpointAdapter(model, optimizer, scaler, scheduler=scheduler,
                                                  data=data, generators=generators, rng=rng)
        except BaseException:
            self.engine.close()
            raise
        # commits of an earlier run: training must resume() from them, not overwrite them
        self._earlier = max((c.step for c in self.engine.committed()), default=None)
        self._step = 0
        self._resumed = False
        self._started = False
        self._closed = False
        self._last_future: SaveFuture | None = None
        self._pending: list[SaveFuture] = []
        self._lock = threading.Lock()
        self._stall: list[float] = []
        self._persist: list[float | None] = []
        self._durable = self._failed = 0
        self._waited = 0.0                # adapter.overlap_wait_s already counted
        self._last_saved: int | None = None
        self._last_durable: int | None = None

    # -- the loop ---------------------------------------------------------------------------

    def resume(self) -> int:
        """Restore the newest intact checkpoint into the objects given at construction (and
        into the `data` / `extra` dicts) and return its step, the number of steps done; 0 when
        the file holds none. A checkpoint that does not fit the model is a one-line
        CheckpointError naming the missing and unexpected keys, raised before anything
        changes."""
        self._check_open()
        if self._started:
            raise CheckpointError("Checkpointer.resume() must come before the first step()")
        res = self.adapter.resume(self._load)
        self._resumed = True
        if res is None:
            self._step = 0
            return 0
        if self._position is not None and res.data_position is not None:
            _restore_into(self._position, res.data_position)
        _restore_into(self._extra, res.extra)
        if self._loader is not None:
            _first_iterator_draws_nothing(self._loader)
        self._step = self._last_saved = res.step
        return res.step

    def step(self, step: int | None = None, *, extra: Mapping | None = None):
        """Count one training step done (call it after the optimizer step); save when `every`
        divides the number of steps done. `step`: that number (checked: in
        ``for step in range(start, n)`` it is ``step + 1``); default: one more than the last.
        extra: values to update the `extra` dict with before saving (e.g. the new hidden
        state). Returns the save's future (``.wait()`` until durable) or None. Raises the
        CheckpointError of an earlier save that failed in the background."""
        self._check_open()
        if self._earlier is not None and not self._resumed:
            raise CheckpointError(f"{printable(self.path)} holds checkpoints of an earlier run "
                                  f"(up to step {self._earlier}): call ckpt.resume() before "
                                  "training, or delete the file to start over")
        if step is None:
            step = self._step + 1
        elif _whole(step) is None or _whole(step) <= self._step:
            raise CheckpointError(f"ckpt.step({step!r}) after {self._step} step(s): pass the "
                                  "number of steps done so far (in `for step in range(start, "
                                  "n)`: ckpt.step(step + 1)), or nothing")
        step = _whole(step)
        self._started = True
        previous, self._step = self._step, step
        self._absorb_optimizer_wait()
        if extra:
            self._extra.update(extra)
        self._raise_failures()
        if step // self.every > previous // self.every:
            return self._save()
        return None

    def save(self, *, extra: Mapping | None = None):
        """Save now, at the current step, whether due or not (e.g. at the end of training);
        returns the save's future (the last one when this step is already saved)."""
        self._check_open()
        if extra:
            self._extra.update(extra)
        self._raise_failures()
        if self._last_saved == self._step and self._last_future is not None:
            return self._last_future
        return self._save()

    def _save(self):
        step = self._step
        self._absorb_optimizer_wait()
        t0 = time.perf_counter()
        future = self.adapter.save(self.engine, step, data_position=self._position,
                                   extra=self._extra, overlap=self.mode == "overlap",
                                   cow=self.mode == "cow")
        stall = time.perf_counter() - t0
        with self._lock:
            index = len(self._stall)
            self._stall.append(stall)
            self._persist.append(None)
            self._last_saved = step
            self._pending.append(future)
        self._last_future = future

        def finished(f: SaveFuture) -> None:
            failed = f.error is not None     # reported by step() / wait() / close()
            with self._lock:
                if failed:
                    self._failed += 1
                else:
                    self._durable += 1
                    self._persist[index] = (f.finished_at or time.perf_counter()) - t0
                    self._last_durable = max(step, self._last_durable or 0)
        future.add_done_callback(finished)
        return future

    def _raise_failures(self) -> None:
        with self._lock:
            done = [f for f in self._pending if f.done()]
            self._pending = [f for f in self._pending if not f.done()]
        for f in done:
            if f.error is not None:          # (reading it counts it as reported)
                raise f.error

    def wait(self) -> None:
        """Block until every save so far is durable (raises a failed save's CheckpointError)."""
        self._check_open()
        self.adapter.wait_staged()
        with self._lock:
            pending = list(self._pending)
        for f in pending:
            f.join()
        self._raise_failures()

    def close(self) -> None:
        """Wait for the last save to be durable, then release the file and the optimizer
        hooks (idempotent). Raises the CheckpointError of a save that failed unreported."""
        if self._closed:
            return
        self._closed = True
        try:
            self.adapter.close()
            with self._lock:
                pending = list(self._pending)
            for f in pending:
                f.join()
            self._raise_failures()
        finally:
            self.engine.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            try:
                self.close()
            except CheckpointError:
                pass                     # do not mask the exception already propagating

    # -- what it reports --------------------------------------------------------------------

    @property
    def stats(self) -> CheckpointStats:
        self._absorb_optimizer_wait()
        cow = self.adapter.cow_stats
        plain_mean = cow["mean_optimizer_step_s"]["plain"]
        cow_n, cow_s = cow["optimizer_steps"]["cow"], cow["optimizer_step_s"]["cow"]
        extra = max(0.0, cow_s - cow_n * plain_mean) if cow_n and plain_mean else 0.0
        with self._lock:
            return CheckpointStats(len(self._stall), self._durable, self._failed,
                                   self._last_saved, self._last_durable, tuple(self._stall),
                                   tuple(self._persist), extra)

    def _absorb_optimizer_wait(self) -> None:
        """Add what optimizer steps waited for overlapped staging to the last save's stall."""
        waited = self.adapter.overlap_wait_s
        if waited != self._waited:
            with self._lock:
                if self._stall:
                    self._stall[-1] += waited - self._waited
            self._waited = waited

    @property
    def steps_done(self) -> int:
        """The number of steps counted so far (the resumed step plus step() calls)."""
        return self._step

    @property
    def extra(self) -> MutableMapping:
        """The extra state dict (the one given, or the Checkpointer's own)."""
        return self._extra

    def __repr__(self) -> str:
        return (f"<Checkpointer {printable(self.path)} every={self.every} mode={self.mode} "
                f"step={self._step}{' closed' if self._closed else ''}>")

    # -- internals --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError(f"Checkpointer of {printable(self.path)} is closed")

    def _load(self):
        restored = recover(self.path)
        self._check_fits(restored.state, restored.meta)
        return restored

    def _check_fits(self, state: Mapping, meta: Mapping) -> None:
        """One-line CheckpointError, before anything changes, unless the checkpoint's models
        and optimizers fit the live ones (keys, shapes, param group sizes)."""
        where = printable(self.path)
        saved_models = meta.get("models") if isinstance(meta, Mapping) else None
        if not isinstance(saved_models, Mapping):
            return                        # the adapter reports what is wrong
        for name, module in self.adapter.models.items():
            tree = saved_models.get(name)
            if not isinstance(tree, Mapping) or "__dict__" in tree:
                continue
            live = module.state_dict()
            missing = [k for k in live if k not in tree]
            unexpected = [k for k in tree if k not in live]
            shapes = []
            for k, v in live.items():
                ref = tree.get(k)
                if isinstance(v, torch.Tensor) and isinstance(ref, Mapping) \
                        and "__tensor__" in ref and ref["__tensor__"] in state:
                    saved = tuple(state[ref["__tensor__"]].shape)
                    if saved != tuple(v.shape):
                        shapes.append(f"{k} checkpoint {list(saved)}, model {list(v.shape)}")
            parts = []
            if missing:
                parts.append(f"missing key(s) {_names(missing)} (in the model, not in the "
                             "checkpoint)")
            if unexpected:
                parts.append(f"unexpected key(s) {_names(unexpected)} (in the checkpoint, not "
                             "in the model)")
            if shapes:
                parts.append(f"shape mismatch: {_names(shapes)}")
            if parts:
                raise CheckpointError(f"{where} does not fit {name}: " + "; ".join(parts))
        saved_opts = meta.get("optimizers")
        if not isinstance(saved_opts, Mapping):
            return
        for name, opt in self.adapter.optimizers.items():
            groups = (saved_opts.get(name) or {}).get("param_groups")
            if not isinstance(groups, list):
                continue
            have = [len(g.get("params", ())) if isinstance(g, Mapping) else None for g in groups]
            want = [len(g["params"]) for g in opt.param_groups]
            if have != want:
                raise CheckpointError(f"{where} does not fit {name}: its parameter groups hold "
                                      f"{have} parameters, the optimizer's {want}")


def _first_iterator_draws_nothing(loader) -> None:
    """A torch DataLoader draws a seed from its generator (the global torch generator when it
    has none) each time it creates an iterator. The first iterator a restored loader creates
    replaces the one the interrupted run was in the middle of, for which that run drew
    nothing at this point: that creation must leave the generator as the checkpoint left it,
    or the resumed run is one draw ahead (other dropout masks, other shuffles). Later
    iterators draw as usual."""
    make = getattr(loader, "_get_iterator", None)
    if not callable(make):
        return

    def first_iterator():
        try:
            del loader._get_iterator          # back to the class's method
        except AttributeError:
            pass
        gen = loader.generator
        state = torch.get_rng_state() if gen is None else gen.get_state()
        try:
            return make()
        finally:
            if gen is None:
                torch.set_rng_state(state)
            else:
                gen.set_state(state)

    loader._get_iterator = first_iterator


def _check_objects(obj, kind: str, ok, what: str, required: bool = False) -> None:
    if obj is None:
        if required:
            raise CheckpointError(f"Checkpointer needs {kind}= ({what}, or a dict of them)")
        return
    items = obj.items() if isinstance(obj, Mapping) else [(None, obj)]
    for key, value in items:
        if not ok(value):
            name = kind if key is None else f"{kind}[{key!r}]"
            raise CheckpointError(f"Checkpointer({name}=...) must be {what} (or a dict of "
                                  f"them), not {type(value).__name__}")


def _check_path(path) -> Path:
    try:
        p = Path(path)
    except TypeError:
        raise CheckpointError(f"Checkpointer(path=...) must be a file path, not "
                              f"{type(path).__name__}") from None
    shown = printable(p)
    if p.is_dir():
        raise CheckpointError(f"checkpoint path {shown} is a directory; give a file in it, "
                              f"such as {printable(p / 'run.ckpt')}")
    parent = p.parent
    if not parent.is_dir():
        raise CheckpointError(f"checkpoint path {shown}: directory {printable(parent)} does not "
                              "exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"checkpoint path {shown}: directory {printable(parent)} is not "
                              "writable")
    return p


def _names(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(printable(i) for i in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _restore_into(live, saved):
    """Put a restored value into the user's own container: dicts in place (each key the
    checkpoint holds; keys it lacks keep their values), tensors copied into a live tensor of
    the same shape and dtype (or moved to its device), tuples and lists item by item;
    returns the value to keep."""
    if isinstance(live, MutableMapping) and isinstance(saved, Mapping):
        for k, v in saved.items():
            live[k] = _restore_into(live.get(k), v)
        return live
    if isinstance(live, torch.Tensor) and isinstance(saved, torch.Tensor):
        if live.shape == saved.shape and live.dtype == saved.dtype and not live.is_inference():
            with torch.no_grad():
                live.copy_(saved)
            return live
        return saved.to(live.device)
    if isinstance(live, (tuple, list)) and isinstance(saved, (tuple, list)) \
            and len(live) == len(saved):
        items = [_restore_into(a, b) for a, b in zip(live, saved)]
        if isinstance(live, list):
            live[:] = items
            return live
        return type(saved)(items)
    return saved
