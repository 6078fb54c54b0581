"""Copy-on-write snapshots of torch CPU tensors: a checkpoint that copies nothing.

A checkpoint only needs the parameters and optimizer state to stay as they were until they are
written. Instead of copying them (what every snapshot does: CheckFreq, torch.distributed
.checkpoint's staging, this engine's own staging pool), `CowGuard.freeze` records their
storages as frozen and the checkpoint engine writes straight from them (a borrowed save). The
next optimizer step runs under `CowGuard.updating()`, a TorchDispatchMode: an in-place update
of a frozen tensor is run out of place instead -- into a recycled buffer through the op's
out= variant, or through its functional variant -- and the tensor is re-pointed at the result
with set_(). The checkpoint keeps the old storage and training goes on with the new one: no
byte is copied, and the update reads and writes as much memory as it does in place. Storages
the checkpoint has finished with are recycled as the next update's out= buffers, so a steady
run allocates (and page-faults) nothing. In-place and out-of-place kernels are the same
kernels, so training is bit-identical either way (tests/checkpointing/test_cow.py).

Which tensors: CPU, dense, contiguous, owning their whole storage, at least `min_bytes` (64
KiB); anything else is copied at save time (small tensors cost less to copy than to track).

What is redirected: in-place ops whose only written argument is the tensor itself (add_,
lerp_, addcdiv_, mul_, copy_, ...) and in-place foreach ops (_foreach_add_, ... as in the
foreach optimizers), when called on the very tensor object that was frozen (the Parameter, the
optimizer's state tensor). Any other write to a frozen storage -- through an alias (a view,
`.data`, view_as_real for complex parameters) or an op with several written arguments (fused
optimizers) -- first gives the frozen tensor a copy of itself (counted in `copied_bytes`): slower,
never wrong.

Outside optimizer steps nothing is intercepted. A write there to a frozen tensor that is not a
copy-on-write (e.g. `with torch.no_grad(): p.clamp_(...)` before the save is written) is caught
before the commit by the tensors' version counters, and that checkpoint is refused rather than
committed torn; writes through `.data` have no version counter and are not caught (the same
contract as the adapter's overlap mode: between save() and the next optimizer step, change
parameters and optimizer state only in optimizer.step()).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode


MIN_BYTES = 64 << 10


def storage_ptr(t) -> int:
    """The address of a tensor's storage: tensors that view one storage share it."""
    return t.untyped_storage().data_ptr()


@dataclass
class _Frozen:
    owner: torch.Tensor            # the live tensor (Parameter, optimizer state tensor)
    alias: torch.Tensor            # owner.detach() at freeze time: keeps the old storage
    ptr: int
    version: int


@dataclass
class Snapshot:
    """The tensors one save froze; release() once the save no longer reads them."""

    guard: CowGuard
    entries: list[_Frozen] = field(default_factory=list)
    released: bool = False

    def modified(self) -> str | None:
        """A message if a frozen tensor was changed in place without copy-on-write."""
        for e in self.entries:
            # the version first, then the storage: a copy-on-write swaps the storage before
            # the version counter moves, so a swap under way never reads as a modification
            version = e.alias._version
            if version != e.version and storage_ptr(e.owner) == e.ptr:
                return (f"a tensor of shape {tuple(e.owner.shape)} was changed in place outside "
                        "optimizer.step() while its checkpoint was being written")
        return None

    def release(self) -> None:
        self.guard._release(self)


def _owns_storage(t: torch.Tensor) -> bool:
    return (t.device.type == "cpu" and t.layout == torch.strided and t.is_contiguous()
            and t.storage_offset() == 0 and not t.is_conj() and not t.is_neg()
            and t.untyped_storage().nbytes() == t.numel() * t.element_size())


class CowGuard:
    """Frozen storages of saves in flight, and the copy-on-write mode that protects them."""

    def __init__(self, min_bytes: int = MIN_BYTES, policy: str = "auto"):
        self.min_bytes = min_bytes
        self.policy = policy                   # see TorchCheckpointAdapter(cow_policy=)
        self._frozen: dict[int, int] = {}      # storage data_ptr -> saves holding it
        self._owners: dict[int, int] = {}      # id(owner tensor) -> storage data_ptr
        self._owner_objs: dict[int, torch.Tensor] = {}
        self._spares: dict[tuple, list[torch.Tensor]] = {}
        self._spare_bytes = 0                  # bytes held in _spares
        self._snap_bytes = 0                   # the largest snapshot so far
        self._lock = threading.Lock()
        self._released = threading.Condition(self._lock)
        self.waits = 0                         # writes through an alias that waited
        self.redirected = 0                    # in-place updates run out of place
        self.copied_bytes = 0                  # frozen tensors copied first (fallback)
        self.recycled = 0                      # updates written into a recycled buffer

    def eligible(self, t: torch.Tensor) -> bool:
        return _owns_storage(t) and t.numel() * t.element_size() >= self.min_bytes

    @property
    def active(self) -> bool:
        return bool(self._frozen)

    def freeze(self, tensors) -> Snapshot:
        """Freeze the storages of `tensors` (each eligible) until the snapshot is released."""
        snap = Snapshot(self)
        with self._lock:
            self._snap_bytes = max(self._snap_bytes, sum(t.numel() * t.element_size()
                                                         for t in tensors))
            for t in tensors:
                ptr = storage_ptr(t)
                alias = t.detach()
                snap.entries.append(_Frozen(t, alias, ptr, alias._version))
                self._frozen[ptr] = self._frozen.get(ptr, 0) + 1
                self._owners[id(t)] = ptr
                self._owner_objs[id(t)] = t
        return snap

    def _release(self, snap: Snapshot) -> None:
        with self._lock:
            if snap.released:
                return
            snap.released = True
            for e in snap.entries:
                left = self._frozen.get(e.ptr, 0) - 1
                if left > 0:
                    self._frozen[e.ptr] = left
                    continue
                self._frozen.pop(e.ptr, None)
                if self._owners.get(id(e.owner)) == e.ptr:
                    del self._owners[id(e.owner)]
                    del self._owner_objs[id(e.owner)]
                if storage_ptr(e.owner) != e.ptr and _unshared(e.alias):
                    # the owner moved on and nobody else holds the old storage (a view the
                    # user kept would see it overwritten): free for the next update (kept:
                    # at most one snapshot's worth, what the next save's updates will need)
                    spare_bytes = e.alias.numel() * e.alias.element_size()
                    if self._spare_bytes + spare_bytes <= max(self._snap_bytes, 0):
                        self._spares.setdefault(_shape_key(e.alias), []).append(e.alias)
                        self._spare_bytes += spare_bytes
            snap.entries = []
            self._released.notify_all()

    def _take_spare(self, like: torch.Tensor) -> torch.Tensor | None:
        with self._lock:
            spares = self._spares.get(_shape_key(like))
            if not spares:
                return None
            spare = spares.pop()
            self._spare_bytes -= spare.numel() * spare.element_size()
            return spare

    def drop_spares(self) -> None:
        """Free the recycled buffers (one snapshot's worth at most)."""
        with self._lock:
            self._spares.clear()
            self._spare_bytes = 0

    def frozen_bytes(self) -> int:
        """Bytes of frozen storages the live tensors still point at (what a copy would move)."""
        with self._lock:
            return sum(t.untyped_storage().nbytes() for oid, t in self._owner_objs.items()
                       if storage_ptr(t) == self._owners[oid] and storage_ptr(t) in self._frozen)

    def cheaper_to_copy(self, n_params: int, copy_bps: float = 4e9,
                        dispatch_s_per_param: float = 1e-4) -> bool:
        """Whether giving the frozen tensors copies of themselves now costs less than running
        the coming optimizer step under the copy-on-write mode, whose Python dispatch costs
        about 10 ops x 10 us per parameter (small models: many small tensors, few bytes)."""
        return self.frozen_bytes() / copy_bps < n_params * dispatch_s_per_param

    def copy_off_all(self) -> None:
        """Re-point every live tensor still on a frozen storage at a copy of it (into a
        recycled buffer where one fits), so that the next step may update in place."""
        with self._lock:
            owners = [t for oid, t in self._owner_objs.items()
                      if storage_ptr(t) == self._owners[oid] and storage_ptr(t) in self._frozen]
        with torch.no_grad():
            for t in owners:
                new = self._take_spare(t)
                if new is None:
                    new = t.clone(memory_format=torch.contiguous_format)
                else:
                    new.copy_(t)
                    self.recycled += 1
                t.set_(new)
                self.copied_bytes += t.untyped_storage().nbytes()

    def begin_update(self, n_params: int) -> _CopyOnWrite | None:
        """Make the coming optimizer step safe for the frozen storages, by `policy`: give
        them copies now ("copy", or "auto" when that is cheaper), or return the entered
        copy-on-write mode ("redirect", "auto" otherwise) for the caller to exit after it."""
        if self.policy == "copy" or (self.policy == "auto" and self.cheaper_to_copy(n_params)):
            self.copy_off_all()              # a few MB: copying beats dispatching every op
            return None
        mode = self.updating()
        mode.__enter__()
        return mode

    def updating(self) -> _CopyOnWrite:
        """The mode to run an optimizer step under while storages are frozen."""
        return _CopyOnWrite(self)

    # -- inside the mode ------------------------------------------------------------------

    def _is_frozen_owner(self, t) -> bool:
        return isinstance(t, torch.Tensor) and self._owners.get(id(t)) == storage_ptr(t) \
            and storage_ptr(t) in self._frozen

    def _is_frozen(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t.device.type == "cpu" and storage_ptr(t) in self._frozen

    def dispatch(self, func, args, kwargs):
        written = _written_args(func)
        if not written or not self._frozen:
            return func(*args, **kwargs)
        values = [_arg(args, kwargs, pos, name) for pos, name, _ in written]
        flat = [t for v in values for t in (v if isinstance(v, (list, tuple)) else [v])]
        if not any(self._is_frozen(t) for t in flat):
            return func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if len(written) == 1 and written[0][1] == "self" and name.endswith("_"):
            if not written[0][2] and self._is_frozen_owner(args[0]):
                if self._out_of_place(func, args, kwargs):
                    return args[0]
            elif written[0][2] and all(self._is_frozen_owner(t) or not self._is_frozen(t)
                                       for t in args[0]):
                if self._foreach_out_of_place(func, args, kwargs):
                    return None
        # fallback: give every frozen tensor written here a copy of itself, then run the op
        for t in flat:
            if self._is_frozen(t):
                self._copy_off(t)
        return func(*args, **kwargs)

    def _out_of_place(self, func, args, kwargs) -> bool:
        target = args[0]
        new = None
        spare = self._take_spare(target)
        if spare is not None:
            packet = getattr(torch.ops.aten, func.overloadpacket.__name__[:-1], None)
            out_op = _out_overload(packet, func._overloadname) if packet is not None else None
            if out_op is not None:
                try:
                    new = out_op(*args, **kwargs, out=spare)
                    self.recycled += 1
                except (RuntimeError, TypeError):
                    new = None
        if new is None:
            new = _functional(func, args, kwargs)
        if not _fits(new, target):
            return False
        target.set_(new)
        self.redirected += 1
        return True

    def _foreach_out_of_place(self, func, args, kwargs) -> bool:
        new, targets = _functional(func, args, kwargs), args[0]
        if not (isinstance(new, (list, tuple)) and len(new) == len(targets)
                and all(_fits(n, t) for n, t in zip(new, targets))):
            return False
        for t, n in zip(targets, new):
            t.set_(n)
        self.redirected += len(targets)
        return True

    def _copy_off(self, t: torch.Tensor) -> None:
        """Make a write to a frozen storage safe the slow way. The owner itself: re-point it
        at a copy of itself (the checkpoint keeps the old storage). An alias (a view, .data):
        the write must reach the owner's storage, so wait until every save reading that
        storage has been written."""
        if self._is_frozen_owner(t):
            self.copied_bytes += t.untyped_storage().nbytes()
            t.set_(t.clone(memory_format=torch.contiguous_format))
            return
        ptr = storage_ptr(t)
        with self._released:
            self.waits += 1
            self._released.notify_all()      # (lets a test see that a write is waiting)
            while ptr in self._frozen:
                self._released.wait()


class _CopyOnWrite(TorchDispatchMode):
    def __init__(self, guard: CowGuard):
        super().__init__()
        self.guard = guard

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self.guard.dispatch(func, args, kwargs or {})


def _functional(func, args, kwargs):
    """The result of the functional variant of in-place op `func` (aten.X_.ov -> aten.X.ov)
    on the same arguments, or None if there is none or it refuses them."""
    packet = getattr(torch.ops.aten, func.overloadpacket.__name__[:-1], None)
    op = getattr(packet, func._overloadname, None) if packet is not None else None
    if op is None:
        return None
    try:
        return op(*args, **kwargs)
    except (RuntimeError, TypeError):
        return None


def _fits(new, target: torch.Tensor) -> bool:
    """Whether `new` can take `target`'s place (what the in-place op would have produced)."""
    return (isinstance(new, torch.Tensor) and new.dtype == target.dtype
            and new.shape == target.shape and new.is_contiguous())


def _unshared(alias: torch.Tensor) -> bool:
    """Whether `alias` is the only tensor left on its storage (the count also includes the
    storage object made to ask). Without the count, nothing is recycled."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return False
    return count(alias.untyped_storage()._cdata) <= 2


def _shape_key(t: torch.Tensor) -> tuple:
    return (t.dtype, tuple(t.shape))


_WRITTEN: dict = {}


def _written_args(func) -> tuple:
    """(position, name, is_list) of the arguments an op writes to (cached per overload)."""
    w = _WRITTEN.get(func)
    if w is None:
        w = tuple((i, a.name, str(a.type).startswith("List"))
                  for i, a in enumerate(func._schema.arguments)
                  if a.alias_info is not None and a.alias_info.is_write)
        _WRITTEN[func] = w
    return w


def _arg(args, kwargs, pos: int, name: str):
    return args[pos] if pos < len(args) else kwargs.get(name)


_OUT: dict = {}


def _out_overload(packet, overload: str):
    key = (packet, overload)
    if key not in _OUT:
        found = None
        for cand in ((f"{overload}_out", "out") if overload != "default" else ("out",)):
            op = getattr(packet, cand, None)
            if op is not None and any(a.name == "out" and a.kwarg_only
                                      for a in op._schema.arguments):
                found = op
                break
        _OUT[key] = found
    return _OUT[key]
