"""faultlab.torch.Protector: detection, rollback and deterministic replay for the PyTorch
training loop a user keeps (docs/torch.md, "Protecting your loop").

    def step_fn(batch):                       # the body of the user's loop, unchanged
        x, y = batch
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        return loss
    prot = faultlab.torch.Protector(model, optimizer, step_fn, batches=loader, data=sampler,
                                    every=10, scheduler=sched, extra=state)
    prot.run(steps)                           # or: for s, b in ...: prot.step(s, b)
    print(prot.report)

Nothing here is a second implementation of detection or recovery. The user's loop is put
behind the trainer contract (:class:`faultlab.backends.base.TrainerBase`) and driven by the
same :class:`faultlab.replay.Protector` that protects faultlab's own trainers: periodic
checkpoints through the :class:`CheckpointEngine` (the session's state captured by
:class:`TorchCheckpointAdapter`: model, optimizer, scheduler, data position, extra state, the
global generators), the built-in detectors (:mod:`faultlab.detectors`), rollback to the newest
committed checkpoint (an older one when the corruption is already in it), replay, transient or
not, and the policies ``stop`` / ``skip`` / ``lower_lr``.

What this module adds is the step: the user's ``step_fn(batch)`` runs unchanged; the batch of
each step comes from ``batches`` (``batch_fn(step)``, or a re-iterable such as a DataLoader,
iterated afresh from the restored data position after a rollback; without a data position,
the epoch's iteration is re-made from the generator states it began with and fast-forwarded),
or, in the
``prot.step(step, batch)`` form, from the batches the protector kept since the checkpoints it
may roll back to; the detector signals are computed here from the model and optimizer with
one host transfer per step (loss, gradient norm taken in an optimizer step pre-hook, the
optimizer's own state, an exact checksum of the parameters' bits, the parameter norm when a
detector asks for it); faults armed on a :class:`faultlab.torch.Injector` fire at their steps,
and on replay only those that live in the hardware (permanent, intermittent) fire again (the
injector's armed list is narrowed to the faults the recovery says fire, for that step only).
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from faultlab.backends.base import StepMetrics
from faultlab.backends.torch.adapter import TorchCheckpointAdapter
from faultlab.detectors import DetectorSuite, Signals
from faultlab.errors import SpecError
from faultlab.replay.own_loop import OwnLoopProtector, OwnLoopTrainer, ProtectionReport
from faultlab.replay.own_loop import stateful as _stateful

__all__ = ["Protector", "ProtectionReport"]

#: modules whose weight's Adam first moment the history bound watches (as TorchTrainer's)
_KERNELS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_INTS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class _LoopTrainer(OwnLoopTrainer):
    """The user's loop behind the trainer contract the recovery Protector drives."""

    def __init__(self, p: "Protector"):
        super().__init__(p)
        self._gnorm = None                 # the gradient norm, taken in the optimizer pre-hook
        self._saved_lr: list | None = None
        self._kernel = {id(m.weight): n for n, m in p.model.named_modules()
                        if isinstance(m, _KERNELS) and isinstance(getattr(m, "weight", None),
                                                                  torch.Tensor)}
        self.params = [q for q in p.model.parameters()]
        self._hooks = [p.optimizer.register_step_pre_hook(self._pre),
                       p.optimizer.register_step_post_hook(self._post)]

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # --- optimizer hooks: the gradient norm the optimizer applies; a policy's lower lr ------

    def _pre(self, optimizer, args, kwargs):
        if self.signal_spec is not None:
            grads = [q.grad for g in optimizer.param_groups for q in g["params"]
                     if q.grad is not None]
            self._gnorm = _norm(grads)
        if self.lr_scale != 1.0:
            self._saved_lr = [g["lr"] for g in optimizer.param_groups]
            for g in optimizer.param_groups:
                g["lr"] = g["lr"] * self.lr_scale

    def _post(self, optimizer, args, kwargs):
        if self._saved_lr is not None:      # the scheduler after the step sees the real lr
            for g, lr in zip(optimizer.param_groups, self._saved_lr):
                g["lr"] = lr
            self._saved_lr = None

    # --- batches: an iteration starts from the global generators' states ---------------

    def _iteration_state(self) -> tuple:
        """A DataLoader draws its base seed, a RandomSampler its shuffle seed, from the
        global generator when it is iterated."""
        return _rng_state(self._cuda())

    @contextlib.contextmanager
    def _generators_at(self, state: tuple | None):
        saved = _rng_state(self._cuda())
        try:
            if state is not None:
                _set_rng_state(state)
            yield
        finally:
            _set_rng_state(saved)

    def _cuda(self) -> list[int]:
        return list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []

    # --- the step ----------------------------------------------------------------------------

    def train_step(self, step: int, faults=()) -> StepMetrics:
        p = self.p
        batch = self._batch(step)
        self._gnorm = None
        with self._faults(step, faults):
            loss = p.step_fn(batch)
        self.next_step = step + 1
        if loss is None:
            raise SpecError("Protector: step_fn(batch) must return the step's loss (a tensor "
                            "or a number), it returned None")
        if isinstance(loss, torch.Tensor) and loss.numel() != 1:
            raise SpecError(f"Protector: step_fn(batch) must return the step's loss, one "
                            f"number; it returned a tensor of shape {tuple(loss.shape)}")
        sig = self._signals(step, loss)
        return StepMetrics(sig.loss, 0.0, sig)

    @contextlib.contextmanager
    def _faults(self, step: int, firing):
        """Only the faults the recovery decided fire now (on replay: those in the hardware)."""
        inj = self.p.injector
        if inj is None:
            yield
            return
        with inj.only(firing), inj.step(step):
            yield

    def _signals(self, step: int, loss) -> Signals:
        """The step's signals, one host transfer: floats as float64 bits beside the int64
        checksum in one tensor, read with one tolist()."""
        spec = self.signal_spec
        dev = self.params[0].device if self.params else torch.device("cpu")
        floats = [loss.detach().reshape(()).to(dev, torch.float64)
                  if isinstance(loss, torch.Tensor) else
                  torch.tensor(float(loss), dtype=torch.float64, device=dev)]
        gnorm = self._gnorm
        if gnorm is None and (spec.grads or spec.history):   # no optimizer.step() seen
            grads = [q.grad for q in self.params if q.grad is not None]
            gnorm = _norm(grads)
        if gnorm is not None:
            floats.append(gnorm.to(dev, torch.float64))
        moments = self._moments() if spec.history else []
        if moments:
            floats += [n.to(dev, torch.float64)
                       for n in torch._foreach_norm([m for _, m in moments])]
        if spec.params:
            floats.append(torch.stack([n.to(dev, torch.float64) for n in
                                       torch._foreach_norm(self.params)]).sum())
        sums = [_bit_sum(q).to(dev) for q in self.params]
        csum = (torch.stack(sums).sum() if sums else torch.zeros((), dtype=torch.int64)).to(dev)
        raw = torch.cat([torch.stack(floats).view(torch.int64), csum.reshape(1)]).tolist()
        vals = np.array(raw[:-1], dtype=np.int64).view(np.float64).tolist()
        checksum = raw[-1] % (1 << 64)
        self._note_checksum(step, checksum)
        i = 1
        grad_norm = vals[i] if gnorm is not None else 0.0
        i += gnorm is not None
        m_max, m_other = {}, 0.0
        for (name, m), v in zip(moments, vals[i:i + len(moments)]):
            if name is None:
                m_other = v if (v != v or m_other != m_other) else max(m_other, v)
            elif v > spec.bound or v != v:
                m_max[name] = float(m.abs().amax())       # exact, rare (a second transfer)
            else:
                m_max[name] = v
        i += len(moments)
        return Signals(step=step, loss=vals[0], replica_loss=[vals[0]], grad_norm=grad_norm,
                       m_max=m_max, m_other=m_other,
                       param_norm=vals[i] if spec.params else None,
                       replica_checksums=[checksum] if spec.replicas else None)

    def _moments(self) -> list[tuple[str | None, torch.Tensor]]:
        """(kernel name or None, tensor) for the optimizer's state: the Adam-family first
        moment of a Linear / Conv weight goes to the history bound under its module path;
        every other state tensor (second moments, momentum buffers, Adagrad sums...) only
        to the non-finite check."""
        out = []
        st = self.p.optimizer.state
        for q in self.params:
            for k, v in st.get(q, {}).items():
                if isinstance(v, torch.Tensor) and v.dim() > 0 and v.is_floating_point():
                    out.append((self._kernel.get(id(q)) if k == "exp_avg" else None, v))
        return out

    # --- state --------------------------------------------------------------------------------

    def _capture(self, step: int) -> tuple[dict, dict]:
        """Copies: the engine writes them borrowed."""
        p = self.p
        return p.adapter.capture(step, data_position=p.get_position(), extra=p.extra,
                                 copy=True)

    def _restore_extra(self, live: MutableMapping, saved: Mapping) -> None:
        _restore_into(live, saved)


class Protector(OwnLoopProtector):
    """Detection every step, rollback and deterministic replay for your own training loop.

    model, optimizer: yours. step_fn(batch) -> loss: runs one training step on one batch
    (forward, backward, optimizer.step(), scheduler.step() if you step it there) and returns
    the loss (a tensor or a number); carried state (a recurrent hidden state) is read from
    and written to the `extra` dict.

    batches: where the batch of each step comes from for run() and for replays:
    ``batch_fn(step)``, or a re-iterable (a DataLoader, your own iterable) that is iterated
    afresh after a rollback, from the data position restored (without `data`, the epoch's
    iteration is re-made from the generator states it began with and fast-forwarded). Leave
    it out to hand batches in with ``prot.step(step, batch)``; the protector then keeps the
    batches since the second newest checkpoint for replays and never rewinds your data
    position.

    data: your data position -- an object with state_dict() / load_state_dict() (a sampler,
    torchdata's StatefulDataLoader), a dict of your own (restored in place), or a (get, set)
    pair of callables. scheduler: a learning-rate scheduler (or a dict of them). extra: a
    dict of further state (tensors, numbers, tuples of them), restored in place.
    every: steps between checkpoints. directory: where the checkpoint files go (default: a
    temporary directory removed by close()). policy: what to do when the anomaly is not
    transient (it recurs when the steps are re-run): "stop" (default), "skip" (drop the
    step's update, at most 3 in a row), "lower_lr" (re-run it with the learning rate x0.1).
    detectors: names of built-in detectors (default nonfinite, history, spike) or a
    DetectorSuite; thresholds: their thresholds (bound=, z=, window=, warmup=, tol=).
    injector: a faultlab.torch.Injector whose armed faults fire at their steps (transient
    ones only the first time a step runs). generators: extra named generators to restore
    (a DataLoader's torch.Generator...); the global torch, CUDA, NumPy and Python generators
    are always restored, so replays are bit-identical.

    Building it installs optimizer step hooks and draws no random numbers; close() (or
    ``with``) removes them and the temporary checkpoints.
    """

    _ITERABLE_HINT = "the loader or iterable itself"
    _ITERABLE_EXAMPLE = "a DataLoader"
    _DATA_HINT = "a stateful sampler or loader, a dict of your own, or a (get, set) pair"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 step_fn: Callable[[Any], Any], *, batches=None, data=None, every: int = 10,
                 directory: str | os.PathLike | None = None, scheduler=None,
                 extra: MutableMapping | None = None, policy: str = "stop",
                 detectors: Iterable[str] | DetectorSuite | None = None, injector=None,
                 generators: Mapping[str, Any] | None = None, **thresholds):
        if not isinstance(model, nn.Module):
            raise SpecError(f"Protector needs the torch.nn.Module you train, got "
                            f"{type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise SpecError(f"Protector needs your torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        if getattr(model, "_faultlab_offload", None) is not None:
            raise SpecError("Protector does not take an offloaded model (faultlab.torch."
                            "Offload): its detectors read the model's parameters, which hold "
                            "no values between steps; close() the Offload to protect the loop")
        mine = {id(q) for q in model.parameters()}
        if not any(id(q) in mine for g in optimizer.param_groups for q in g["params"]):
            raise SpecError("Protector: the optimizer optimizes none of the model's "
                            "parameters (pass the optimizer built from this model)")
        if not callable(step_fn):
            raise SpecError(f"Protector: step_fn must be a function of one batch that runs "
                            f"the step and returns the loss, got {type(step_fn).__name__}")
        self.model, self.optimizer, self.step_fn = model, optimizer, step_fn
        self._check_batches(batches)
        every = self._check_every(every)
        data_obj = self._check_data(data)
        _check_schedulers(scheduler)
        self._check_extra(extra)
        policy = self._check_policy(policy)
        _check_injector(injector, model)
        suite = self._check_suite(detectors, thresholds)
        self._check_directory(directory)
        self.every, self.policy, self.injector, self.extra = every, policy, injector, extra
        self.adapter = TorchCheckpointAdapter(model, optimizer, scheduler=scheduler,
                                              data=data_obj, generators=generators)
        self._start(_LoopTrainer(self), suite, directory)

    def _armed(self) -> list:
        return list(self.injector.armed) if self.injector is not None else []

    def _release(self) -> None:
        """Remove the optimizer hooks; the adapter's resources."""
        self.trainer.close()
        self.adapter.close()


def _check_schedulers(scheduler) -> None:
    if scheduler is None:
        return
    for s in (scheduler.values() if isinstance(scheduler, Mapping) else [scheduler]):
        if not _stateful(s):
            raise SpecError(f"Protector(scheduler=...): a {type(s).__name__} has no "
                            f"state_dict() / load_state_dict()")


def _check_injector(injector, model) -> None:
    if injector is not None:
        from faultlab.backends.torch.own_loop import Injector
        if not isinstance(injector, Injector) or injector.model is not model:
            raise SpecError("Protector(injector=...): pass the faultlab.torch.Injector "
                            "built for this model")


def _norm(tensors: list) -> torch.Tensor | None:
    """The L2 norm of all `tensors` together (one fused reduction per device), or None."""
    if not tensors:
        return None
    norms = torch._foreach_norm(tensors)
    dev = norms[0].device
    return torch.stack([n.to(dev, torch.float32) for n in norms]).square().sum().sqrt()


def _bit_sum(t: torch.Tensor) -> torch.Tensor:
    """An exact checksum of a tensor's bits, on its device: the sum of its bytes read as
    64-bit integers (wrapping, so mod 2^64), or of its elements' bit patterns as integers of
    their own width where its bytes do not fill whole, aligned words. Equal tensors give
    equal sums bit for bit, in any order of summation; reading words rather than widening
    each float32 is about 10x faster."""
    flat = t.detach().contiguous().view(-1)
    if (flat.numel() * flat.element_size()) % 8 == 0 and flat.element_size() <= 8:
        try:
            return flat.view(torch.int64).sum()
        except RuntimeError:            # a misaligned storage offset
            pass
    return flat.view(_INTS[flat.element_size()]).sum(dtype=torch.int64)


def _rng_state(cuda: list[int]) -> tuple:
    return (torch.get_rng_state(), [torch.cuda.get_rng_state(i) for i in cuda],
            np.random.get_state(), random.getstate())


def _set_rng_state(state: tuple) -> None:
    cpu, cuda, np_state, py_state = state
    torch.set_rng_state(cpu)
    for i, st in enumerate(cuda):
        torch.cuda.set_rng_state(st, i)
    np.random.set_state(np_state)
    random.setstate(py_state)


def _restore_into(live: MutableMapping, saved: Mapping) -> None:
    """A restored extra dict into the user's own, in place; tensors go to the device of the
    value they replace."""
    for k, v in saved.items():
        old = live.get(k)
        live[k] = _to_like(v, old)


def _to_like(v, old):
    if isinstance(v, torch.Tensor):
        return v.to(old.device) if isinstance(old, torch.Tensor) else v
    if isinstance(v, (tuple, list)):
        olds = old if isinstance(old, (tuple, list)) and len(old) == len(v) else [None] * len(v)
        return type(v)(_to_like(a, b) for a, b in zip(v, olds))
    if isinstance(v, dict):
        return {k: _to_like(x, (old or {}).get(k) if isinstance(old, dict) else None)
                for k, x in v.items()}
    return v
