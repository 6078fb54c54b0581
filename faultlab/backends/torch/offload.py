"""Offloaded training (STRONGHOLD, ZeRO-Offload) and the host_state site (docs/offload.md).

`offload = window:N`: every parameter's master copy, its gradient and the optimizer state live
in a host store (pinned where CUDA is present); the optimizer (the workload's own, Adam for the
built-ins) steps the host copies. The model's own parameters are the device side: their
storages are released (resized to 0 bytes, as FSDP frees its unsharded parameters) except for a
window of at most N layers, which a prefetch thread fills from the host store ahead of use, in
the order of the forward and backward passes (module forward and full-backward pre-hooks ask
for a layer; the order of the previous pass tells the thread what comes next). A layer's weight
gradient goes back to the host as soon as autograd has accumulated it, and the device copy is
dropped. Because the storages keep their identity, tensors autograd saved for backward (a
weight, a transposed view of it) read whatever the window has put there when backward reaches
the layer.

On a CPU the "device" and the host are both CPU memory, but every step above is real: separate
tensors, a bounded window, a thread copying ahead, released storages. Training is bit-identical
to the run without offload (the same kernels on the same values; tests/torch/test_offload.py).

Checkpoints read the host store where it lies: get_state returns NumPy views of the master
weights and optimizer state (no copy). The next write to a lent tensor (the host optimizer
step, set_state, a host_state fault) is copy-on-write (faultlab.backends.torch.cow): it goes to
a new storage, and the one the views read stays as it was until the last view is dropped.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from faultlab.backends.torch.cow import CowGuard, storage_ptr
from faultlab.backends.torch.injector import (canonical_shape, dtype_name, opt_target, remap,
                                              weight_perm)
from faultlab.backends.torch.kernels import prepare
from faultlab.backends.torch.trainer import (TorchTrainer, _bit_sum, _view,
                                              load_optimizer_state)
from faultlab.bits import bit_sum, key_weight
from faultlab.errors import SpecError
from faultlab.faults import FaultSpec, Site

ABSENT, FETCHING, PRESENT = 0, 1, 2


@dataclass
class Unit:
    """A layer that moves as one: its device parameters and their host master copies."""

    name: str
    module: nn.Module
    params: list[nn.Parameter]
    host: list[nn.Parameter]
    nbytes: int = 0


def offload_units(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], list[nn.Parameter]]:
    """(units, pinned): the modules that own parameters directly (a unit takes its whole
    subtree's parameters), named as layer_map names layers, in registration (forward) order;
    and the parameters no unit owns (the root's own, e.g. a position table), which stay on the
    device."""
    units, taken = [], set()
    for name, mod in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in taken):
            continue
        if any(True for _ in mod.parameters(recurse=False)):
            units.append((name.replace(".", "_"), mod))
            taken.add(name)
    owned = {id(p) for _, m in units for p in m.parameters()}
    return units, [p for p in model.parameters() if id(p) not in owned]


def _prefetch_loop(ref: weakref.ref, cv: threading.Condition) -> None:
    """The prefetch thread: serve the window's queue; wake up now and then while idle to notice
    a window that was closed or collected."""
    while True:
        w = ref()
        if w is None or w._stop:
            return
        if w._serve():
            continue
        with cv:
            idle = not w.queue and not w._stop
            del w
            if idle:
                cv.wait(timeout=2.0)


def _release(p: torch.Tensor) -> None:
    p.untyped_storage().resize_(0)


class Window:
    """Which units are on the device: at most `n` present or being fetched. The consumer (the
    training thread) asks for a unit before it is used (acquire) and is the only one that
    releases; the prefetch thread copies host -> device for the units queued ahead."""

    def __init__(self, units: list[Unit], n: int, on_arrive=None):
        self.units, self.n, self.on_arrive = units, n, on_arrive
        self.state = [ABSENT] * len(units)
        self.lru: OrderedDict[int, None] = OrderedDict()    # present units, oldest first
        self.queue: deque[tuple[int, int]] = deque()
        self.cv = threading.Condition()
        self.replica = 0
        self.training = True
        self._learned: dict[bool, list[int]] = {}
        self._record: list[int] = []
        self._schedule: list[int] = []
        self._cursor = 0
        self.used_bytes = self.peak_bytes = 0
        self.fetches = self.sync_fetches = 0
        self._error: BaseException | None = None
        self._stop = False
        # the thread holds the window only weakly, so a trainer nobody uses any more (the
        # runner keeps one live model per process) is collected and its thread ends
        self._thread = threading.Thread(target=_prefetch_loop, args=(weakref.ref(self), self.cv),
                                        daemon=True, name="offload-prefetch")
        self._thread.start()

    # --- the prefetch thread -----------------------------------------------------------------

    def _serve(self) -> bool:
        """Fetch the next queued unit (the prefetch thread); False when there is none."""
        with self.cv:
            if self._stop or not self.queue:
                return False
            u, replica = self.queue.popleft()
        try:
            self._fetch(u, replica)
        except BaseException as e:   # noqa: BLE001 - surfaced to the training thread
            with self.cv:
                self._error = e
                self.cv.notify_all()
            return True
        with self.cv:
            self.state[u] = PRESENT
            self.lru[u] = None
            self.cv.notify_all()
        return True

    def _fetch(self, u: int, replica: int) -> None:
        """Host -> device: give the unit's released storages their bytes back and copy the
        masters in (a cudaMemcpyAsync from pinned memory on a side stream on a GPU)."""
        unit = self.units[u]
        with torch.no_grad():
            for p, h in zip(unit.params, unit.host):
                p.untyped_storage().resize_(h.numel() * h.element_size())
                p.data.copy_(h)      # .data: the parameter's version counter is not bumped
        self.fetches += 1
        if self.on_arrive is not None:
            self.on_arrive(u, replica)

    # --- the training thread -----------------------------------------------------------------

    def _raise(self) -> None:
        if self._error is not None:
            e, self._error = self._error, None
            raise e

    def _take(self, u: int) -> None:
        self.state[u] = FETCHING
        self.used_bytes += self.units[u].nbytes
        self.peak_bytes = max(self.peak_bytes, self.used_bytes)

    def _evict(self, u: int) -> None:
        for p in self.units[u].params:
            _release(p)
        self.state[u] = ABSENT
        self.lru.pop(u, None)
        self.used_bytes -= self.units[u].nbytes

    def _used(self) -> int:
        return sum(s != ABSENT for s in self.state)

    def _make_room(self, protect: set[int], wait: bool) -> bool:
        """Free a slot by releasing the least recently used present unit outside `protect`;
        with `wait`, wait for a fetch to land when every slot is in flight."""
        while self._used() >= self.n:
            victim = next((v for v in self.lru if v not in protect), None)
            if victim is not None:
                self._evict(victim)
            elif wait and any(s == FETCHING for s in self.state):
                self.cv.wait()
                self._raise()
            else:
                return False
        return True

    def begin_pass(self, replica: int, training: bool) -> None:
        """A forward (and backward) pass starts: the learned order of the last pass of this
        kind is the prefetch schedule (first pass: forward order, then reversed)."""
        with self.cv:
            self._raise()
            self._close_pass()
            self.replica, self.training = replica, training
            fwd = list(range(len(self.units)))
            self._schedule = self._learned.get(training) or (fwd + fwd[::-1] if training
                                                             else fwd)
            self._cursor = 0
            self._record = []
            self._ahead(None)

    def _close_pass(self) -> None:
        if self._record:
            self._learned[self.training] = self._record
            self._record = []

    def acquire(self, u: int) -> None:
        """Make unit `u` present before it is used (waits for its prefetch, or copies it now
        when it was not foreseen) and queue the units the schedule names next."""
        sync = False
        with self.cv:
            self._raise()
            if not self._record or self._record[-1] != u:
                self._record.append(u)
            # the prefetch cursor follows the last pass's order; a unit off it leaves it be
            with contextlib.suppress(ValueError):
                self._cursor = self._schedule.index(u, self._cursor) + 1
            if self.state[u] == ABSENT:
                self._make_room({u}, wait=True)
                self._take(u)
                sync = True
            else:
                while self.state[u] != PRESENT:
                    self.cv.wait()
                    self._raise()
        if sync:
            self._fetch(u, self.replica)
            with self.cv:
                self.state[u] = PRESENT
                self.sync_fetches += 1
        with self.cv:
            self.lru[u] = None
            self.lru.move_to_end(u)
            self._ahead(u)

    def _ahead(self, u: int | None) -> None:
        ahead: list[int] = []
        for v in self._schedule[self._cursor:]:
            if len(ahead) >= self.n - (u is not None):
                break
            if v != u and v not in ahead:
                ahead.append(v)
        protect = set(ahead) | ({u} if u is not None else set())
        for v in ahead:
            if self.state[v] != ABSENT:
                continue
            if not self._make_room(protect, wait=False):
                break
            self._take(v)
            self.queue.append((v, self.replica))
            self.cv.notify_all()

    def drop(self, u: int) -> None:
        """Release unit `u` now (waiting for its fetch in flight), so its next use copies it."""
        with self.cv:
            while self.state[u] == FETCHING:
                self.cv.wait()
                self._raise()
            if self.state[u] == PRESENT:
                self._evict(u)

    def finish(self) -> None:
        """Wait for the fetches in flight and release every unit (after the host optimizer
        step the device copies are stale)."""
        with self.cv:
            while any(s == FETCHING for s in self.state):
                self.cv.wait()
                if self._error is not None:
                    break
            self.queue.clear()
            self._close_pass()
            for u, s in enumerate(self.state):
                if s != ABSENT:
                    self._evict(u)
            self._raise()

    def close(self) -> None:
        with self.cv:
            self._stop = True
            self.cv.notify_all()


@dataclass
class _Armed:
    fault: FaultSpec
    step: int
    cache: dict = field(default_factory=dict)


def corrupt_host(a: _Armed, t: torch.Tensor) -> None:
    """Apply an armed host_state fault to `t` in place (a weight-shaped tensor in torch's
    layout; the fault's positions are canonical: HWIO, (in, out)); resolved once per shape."""
    key = (tuple(t.shape), t.dtype)
    tc = a.cache.get(key)
    perm = weight_perm(t.dim())
    if tc is None:
        canon = canonical_shape(t.shape, perm)
        c = a.fault.resolve(canon, dtype_name(t), a.step)
        src = remap(c.src, canon, perm) if c.src is not None else None
        tc = a.cache[key] = prepare(c, t, index=remap(c.index, canon, perm), src=src)
    with torch.no_grad():
        tc.apply_(t)


def host_copy(p: nn.Parameter, pinned: bool, host_of: dict) -> nn.Parameter:
    """p's host master copy (in pinned memory when `pinned`), recorded in host_of[id(p)]."""
    t = torch.empty(p.shape, dtype=p.dtype, pin_memory=pinned)
    with torch.no_grad():
        t.copy_(p)
    h = nn.Parameter(t, requires_grad=p.requires_grad)
    host_of[id(p)] = h
    return h


def start_pass(owner, replica: int, training: bool, unit_of) -> None:
    """What a replica's forward pass starts with, for the trainer and for a user's loop
    (own_offload.Offload): `owner` has the `window`, the pinned parameters (`_pinned`, their
    host copies in `_host_of`), the `_armed` faults and `_tainted`; unit_of(fault): the unit
    a transit fault's layer is in. A corrupted arrival never outlives its replica's pass;
    pinned parameters are refreshed from their host copies; a layer in transit this pass is
    dropped, so that it arrives (and is corrupted) in its forward."""
    if owner._tainted:
        owner.window.finish()
        owner._tainted = False
    with torch.no_grad():
        for p in owner._pinned:
            p.copy_(owner._host_of[id(p)])
    for a in owner._armed:
        f = a.fault
        if f.tensor == "transit" and f.replica == replica:
            owner.window.drop(unit_of(f))
    owner.window.begin_pass(replica, training)


class OffloadTrainer(TorchTrainer):
    """TorchTrainer with the offloaded state of `config.offload` (see the module docstring)."""

    def __init__(self, config):
        super().__init__(config)
        model = self.model
        pinned = torch.cuda.is_available()
        units, self._pinned = offload_units(model)
        self.units: list[Unit] = []
        self._host_of: dict[int, nn.Parameter] = {}
        for name, mod in units:
            params = list(mod.parameters())
            host = [self._host_copy(p, pinned) for p in params]
            self.units.append(Unit(name, mod, params, host,
                                   sum(p.numel() * p.element_size() for p in params)))
        for p in self._pinned:
            self._host_copy(p, pinned)
        # the host optimizer over the masters, in the model's parameter order (the same
        # state_dict indices as the run without offload)
        self.host_params = [self._host_of[id(p)] for p in model.parameters()]
        self.optimizer = self.wl.make_optimizer(self.host_params, config.lr)
        self.injector.optimizer = self.optimizer
        self.copies = self.injector.copies = None      # param / opt_state faults are refused
        self._unit_of = {id(m): i for i, (_, m) in enumerate(units)}
        # layer (layer_map name) -> its unit, for host_state faults
        self.layer_unit = {}
        for lname, mod in self.layers.items():
            for i, u in enumerate(self.units):
                if mod is u.module or any(mod is c for c in u.module.modules()):
                    self.layer_unit[lname] = i
        self.guard = CowGuard(min_bytes=0, policy="redirect")
        self._lent: list[torch.Tensor] = []
        self._snaps: list = []
        self._armed: list[_Armed] = []
        self._tainted = False
        arrived = weakref.WeakMethod(self._arrived)
        self.window = Window(self.units, config.offload_window,
                             lambda u, r: arrived()(u, r))
        for u in self.units:
            for p in u.params:
                _release(p)
        # a tensor's post-accumulate-grad hooks live in C++, where the garbage collector does
        # not see the cycle a strong reference to the trainer would make
        back = weakref.WeakMethod(self._grad_back)
        self._hooks = [model.register_forward_pre_hook(self._begin_pass, prepend=True)]
        for i, u in enumerate(self.units):
            self._hooks.append(u.module.register_forward_pre_hook(
                lambda m, args, i=i: self.window.acquire(i), prepend=True))
            self._hooks.append(u.module.register_full_backward_pre_hook(
                lambda m, g, i=i: self.window.acquire(i), prepend=True))
            for p, h in zip(u.params, u.host):
                self._hooks.append(p.register_post_accumulate_grad_hook(
                    lambda p, h=h, i=i: back()(p, h, i)))
        for p in self._pinned:          # not offloaded, but its gradient and update are the host's
            self._hooks.append(p.register_post_accumulate_grad_hook(
                lambda p, h=self._host_of[id(p)]: back()(p, h, -1)))
        self._step_fn = self.optimizer.step
        self.optimizer.step = self._host_step

    def _host_copy(self, p: nn.Parameter, pinned: bool) -> nn.Parameter:
        return host_copy(p, pinned, self._host_of)

    def close(self) -> None:
        self.window.close()

    # --- the step ----------------------------------------------------------------------------

    def _begin_pass(self, model, args) -> None:
        start_pass(self, self.injector.replica, model.training, lambda f: self.layer_unit[f.layer])

    def train_step(self, step: int, faults=()):
        host = [f for f in faults if f.site is Site.HOST_STATE]
        for f in host:
            self.check_host_fault(f)
        self._armed = [_Armed(f, step) for f in host]
        try:
            with self.mutating():
                for a in self._armed:
                    if (a.fault.tensor or "weight") in ("weight", "bias"):
                        self._corrupt(a, self._master(a.fault))
            return super().train_step(step, [f for f in faults if f.site is not Site.HOST_STATE])
        finally:
            self._armed = []
            self.window.finish()
            self._tainted = False

    def _host_step(self, *args, **kwargs):
        """The optimizer step on the host copies: every device copy is released first, and a
        tensor a checkpoint still reads is updated copy-on-write."""
        self.window.finish()
        moments = [a for a in self._armed if a.fault.tensor in ("m", "v")]
        with self.mutating():
            created = []
            for a in moments:
                p = self._master(a.fault, "weight")
                st = self.optimizer.state.get(p)
                if st:
                    self._corrupt(a, self._slot(a, st))
                else:
                    created.append(a)
            out = self._step_fn(*args, **kwargs)
            for a in created:                    # state this step created is hit after it
                self._corrupt(a, self._slot(a, self.optimizer.state.get(
                    self._master(a.fault, "weight"), {})))
        return out

    def _slot(self, a: _Armed, st) -> torch.Tensor:
        _, slot = opt_target(a.fault.tensor)
        if slot not in st:
            raise SpecError(f"optimizer {type(self.optimizer).__name__} has no '{slot}' state "
                            f"for {a.fault.layer} at step {a.step}", "tensor")
        return st[slot]

    def _master(self, f: FaultSpec, which: str | None = None) -> nn.Parameter:
        mod = self.layers[f.layer]
        name = which or ("bias" if f.tensor == "bias" else "weight")
        return self._host_of[id(getattr(mod, name))]

    def _corrupt(self, a: _Armed, t: torch.Tensor) -> None:
        corrupt_host(a, t)

    def _arrived(self, u: int, replica: int) -> None:
        """A unit landed on the device: a `transit` fault of this replica corrupts the copy."""
        for a in self._armed:
            f = a.fault
            if f.tensor == "transit" and f.replica == replica and self.layer_unit.get(
                    f.layer) == u:
                self._corrupt(a, self.layers[f.layer].weight.data)
                self._tainted = True

    def _grad_back(self, p: nn.Parameter, h: nn.Parameter, u: int) -> None:
        """Device -> host: the accumulated gradient of this pass is copied into the host
        store (added to what earlier replicas sent) and the device gradient is dropped."""
        g = p.grad
        t = torch.empty_like(h)
        with torch.no_grad():
            t.copy_(g)
            for a in self._armed:
                f = a.fault
                if (f.tensor == "grad" and f.replica == self.injector.replica
                        and self.layer_unit.get(f.layer) == u
                        and self.layers[f.layer].weight is p):
                    self._corrupt(a, t)
            if h.grad is None:
                h.grad = t
            else:
                h.grad.add_(t)
        p.grad = None

    def check_host_fault(self, f: FaultSpec) -> None:
        from faultlab.backends.base import check_host_fault
        from faultlab.faults import check_layer
        check_host_fault(f, self.config)
        check_layer(f, self.layer_unit)

    def evaluate(self):
        try:
            return super().evaluate()
        finally:
            self.window.finish()

    # --- copy-on-write for lent host tensors ---------------------------------------------------

    @contextlib.contextmanager
    def mutating(self):
        """Writes to the host store: tensors lent to a checkpoint (get_state) are frozen and
        written out of place, so the views a borrowed save reads never change."""
        if self._lent:
            self._snaps.append(self.guard.freeze(self._lent))
            self._lent = []
        if not self._snaps:
            yield
            return
        with self.guard.updating():
            yield
        keep = []
        for s in self._snaps:       # released once every lent tensor moved to a new storage
            if all(storage_ptr(e.owner) != e.ptr for e in s.entries):
                s.release()
            else:
                keep.append(s)
        self._snaps = keep

    def _lend(self, t: torch.Tensor) -> np.ndarray:
        """A view of a host tensor for a checkpoint (t.detach(): its own TensorImpl keeps the
        storage alive when the live tensor moves on copy-on-write)."""
        if self.guard.eligible(t):
            self._lent.append(t)
            return t.detach().numpy()
        return t.detach().numpy().copy()

    # --- state: read where it lies -------------------------------------------------------------

    def _state_arrays(self) -> dict[str, np.ndarray]:
        out = {}
        for k, v in self.model.state_dict(keep_vars=True).items():
            h = self._host_of.get(id(v))
            out[f"model/{k}"] = (self._lend(h) if h is not None
                                 else v.detach().cpu().numpy().copy())
        for i, st in self.optimizer.state_dict()["state"].items():
            for k, v in st.items():
                out[f"optim/{i}/{k}"] = (self._lend(v) if isinstance(v, torch.Tensor)
                                         else np.asarray(v))
        return out

    def full_checksum(self) -> int:
        if self._carry:
            return super(TorchTrainer, self).full_checksum()
        total = 0
        for k, v in self.model.state_dict(keep_vars=True).items():
            total += key_weight(f"model/{k}") * _bit_sum(self._host_of.get(id(v), v))
        for i, st in self.optimizer.state_dict()["state"].items():
            for k, v in st.items():
                total += key_weight(f"optim/{i}/{k}") * (
                    _bit_sum(v) if isinstance(v, torch.Tensor) else bit_sum(np.asarray(v)))
        return total & ((1 << 64) - 1)

    def _load_arrays(self, state) -> None:
        """Copy a state into the host store (copy-on-write for lent tensors) and the buffers."""
        self.window.finish()
        live = self.model.state_dict(keep_vars=True)
        want = {k[6:]: v for k, v in state.items() if k.startswith("model/")}
        if set(want) != set(live):
            missing = sorted(set(live) ^ set(want))
            raise SpecError(f"the state restored does not match workload "
                            f"{self.config.workload}: model/{missing[0]}")
        with self.mutating():
            with torch.no_grad():
                for k, v in want.items():
                    t = self._host_of.get(id(live[k]), live[k])
                    t.copy_(_view(v).reshape(t.shape))
            load_optimizer_state(self.optimizer, state)

    # --- detector signals read the host store ------------------------------------------------

    def _pre_step_signals(self, replica_losses):
        spec = self.signal_spec
        if not spec.grads and not (spec.history and self.optimizer.state):
            return replica_losses, None
        grads = [h.grad for h in self.host_params if h.grad is not None]
        return replica_losses, torch.stack(torch._foreach_norm(grads)) if grads else None

    def _moments(self):
        if self._kernel_names is None:
            self._kernel_names = {id(self._host_of[id(p)]): n for n, p in self._kernel_params()}
        st = self.optimizer.state
        return [(self._kernel_names.get(id(h)), st[h]["exp_avg"]) for h in self.host_params
                if h in st and "exp_avg" in st[h]]

    def _param_norm(self) -> torch.Tensor:
        return torch.stack(torch._foreach_norm(self.host_params)).sum()

    def _replica_checksums(self) -> list[int]:
        from faultlab.backends.torch.replicas import checksum
        return [checksum(self.host_params)]


def host_operands(config, model: nn.Module, table: dict) -> None:
    """Add the host_state operand (weight-shaped; the bias through "bias") to every layer of an
    offloaded workload's operand table, and check the window leaves a layer outside it."""
    from faultlab.backends.torch.models import layer_map
    units, _ = offload_units(model)
    n = config.offload_window
    if n >= len(units):
        raise SpecError(f"offload {config.offload} keeps all {len(units)} layers of "
                        f"{config.workload} on the device (none outside the window): choose "
                        f"window:1..window:{len(units) - 1}", "offload")
    for name, mod in layer_map(model).items():
        entry = table.setdefault(name, {})
        w = mod.weight
        entry[Site.HOST_STATE] = (canonical_shape(w.shape, weight_perm(w.dim())), dtype_name(w))
