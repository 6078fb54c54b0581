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
import json
import operator
import os
import random
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from faultlab.backends.base import EvalMetrics, StepMetrics, TrainerBase
from faultlab.backends.torch.adapter import TorchCheckpointAdapter
from faultlab.detectors import DetectorSuite, Signals, default_suite
from faultlab.errors import SpecError, printable
from faultlab.replay.own_loop import ProtectionReport
from faultlab.replay.own_loop import stateful as _stateful
from faultlab.replay.own_loop import whole as _whole
from faultlab.replay.rollback import Policy, ProtectedRun
from faultlab.replay.rollback import Protector as _Recovery

__all__ = ["Protector", "ProtectionReport"]

#: modules whose weight's Adam first moment the history bound watches (as TorchTrainer's)
_KERNELS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_META = "__protector_meta__"          # the adapter's JSON meta, carried as a uint8 array
_INTS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class _LoopTrainer(TrainerBase):
    """The user's loop behind the trainer contract the recovery Protector drives."""

    config = None

    def __init__(self, p: "Protector"):
        self.p = p
        self.signal_spec = None
        self.lr_scale = 1.0
        self.next_step = 0                 # the step the state is before
        self.recorded: dict[int, Any] | None = None   # step form: batches kept for replays
        self._it = None                    # the batch iterator (re-iterable form)
        self._it_step = 0                  # the step of its next batch
        self._epochs: dict[int, tuple] = {}   # step -> generator states an iteration began at
        self._gnorm = None                 # the gradient norm, taken in the optimizer pre-hook
        self._saved_lr: list | None = None
        self.first_checksum: dict[int, int] = {}
        self.differs: set[int] = set()
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

    # --- batches ----------------------------------------------------------------------------

    def _batch(self, step: int):
        p = self.p
        if self.recorded is not None:
            try:
                return self.recorded[step]
            except KeyError:
                raise SpecError(f"Protector: the batch of step {step} is no longer held (the "
                                f"step form keeps the batches since the second newest "
                                f"checkpoint)") from None
        if p.batch_fn is not None:
            return p.batch_fn(step)
        if self._it is None:
            self._reiterate()
        while True:
            try:
                batch = next(self._it)
            except StopIteration:       # an epoch ended: the next one, as `for` would
                self._new_iter(self._it_step)
                try:
                    batch = next(self._it)
                except StopIteration:
                    raise SpecError(f"Protector: batches yielded nothing for step "
                                    f"{self._it_step}") from None
            self._it_step += 1
            if self._it_step > step:    # earlier ones: steps a policy skipped
                return batch

    def _new_iter(self, step: int) -> None:
        """iter(batches) where the user's loop makes it (the run's first step, an epoch's
        end), remembering the generators' states it starts from: a DataLoader draws its
        base seed, a RandomSampler its shuffle seed, from the global generator."""
        self._epochs[step] = _rng_state(self._cuda())
        self._it, self._it_step = iter(self.p.batches), step

    def _reiterate(self) -> None:
        """The iterator after a restore (state before step `next_step`). Where the run made
        one at this step, make it the same way. Else, from the data position restored, the
        iterator resumes where the checkpoint was (a re-created one must not move the
        restored generators); without a data position, the iteration that covers this step
        is made again from the generators' states it started from and fast-forwarded."""
        step = self.next_step
        starts = [s for s in self._epochs if s <= step]
        if not starts or max(starts) == step:
            self._new_iter(step)
            return
        saved = _rng_state(self._cuda())
        try:
            if self.p.has_position:
                self._it = iter(self.p.batches)
            else:
                first = max(starts)
                _set_rng_state(self._epochs[first])
                self._it = iter(self.p.batches)
                for s in range(first, step):
                    try:
                        next(self._it)
                    except StopIteration:
                        raise SpecError(f"Protector: batches ran out at step {s} while "
                                        f"replaying (they yielded more the first time); "
                                        f"give data= your data position") from None
        finally:
            _set_rng_state(saved)
        self._it_step = step

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

    def _note_checksum(self, step: int, checksum: int) -> None:
        first = self.first_checksum.get(step)
        if first is None:
            self.first_checksum[step] = checksum
        elif first != checksum:
            self.differs.add(step)

    # --- state --------------------------------------------------------------------------------

    def get_state(self) -> dict[str, np.ndarray]:
        """The adapter's capture (copies: the engine writes them borrowed) and its meta."""
        p = self.p
        step = p._run.start + len(p._run.losses)    # the recovery checkpoints before `step`
        at = self._it_step if self._it is not None else self.next_step
        if p.batches is not None and at < step:
            self._batch(step - 1)        # a skipped step's batch is consumed before saving
        self.next_step = step
        arrays, meta = p.adapter.capture(step, data_position=p.get_position(),
                                         extra=p.extra, copy=True)
        arrays[_META] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8).copy()
        p.prune(step)
        return arrays

    def set_state(self, state: Mapping[str, np.ndarray]) -> None:
        p = self.p
        meta = json.loads(np.asarray(state[_META]).tobytes().decode())
        arrays = {k: v for k, v in state.items() if k != _META}
        resume = p.adapter.restore(arrays, meta)
        if self.recorded is None:
            p.set_position(resume.data_position)
        if p.extra is not None:
            _restore_into(p.extra, resume.extra)
        self.next_step = resume.step
        self._it = None

    def evaluate(self) -> EvalMetrics:
        raise SpecError("Protector does not evaluate: your loop keeps its own validation")


class Protector:
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
        mine = {id(q) for q in model.parameters()}
        if not any(id(q) in mine for g in optimizer.param_groups for q in g["params"]):
            raise SpecError("Protector: the optimizer optimizes none of the model's "
                            "parameters (pass the optimizer built from this model)")
        if not callable(step_fn):
            raise SpecError(f"Protector: step_fn must be a function of one batch that runs "
                            f"the step and returns the loss, got {type(step_fn).__name__}")
        self.model, self.optimizer, self.step_fn = model, optimizer, step_fn
        self.batch_fn = self.batches = None
        if batches is not None:
            if hasattr(batches, "__iter__"):
                if hasattr(batches, "__next__") and iter(batches) is batches:
                    raise SpecError(f"Protector: batches is a one-shot iterator "
                                    f"({type(batches).__name__}) that cannot be re-iterated "
                                    f"after a rollback; pass the loader or iterable itself, "
                                    f"or batch_fn(step)")
                self.batches = batches
            elif callable(batches):
                self.batch_fn = batches
            else:
                raise SpecError(f"Protector: batches must be batch_fn(step) or a re-iterable "
                                f"such as a DataLoader, got {type(batches).__name__}")
        n = _whole(every)
        if n is None or n < 1:
            raise SpecError(f"Protector(every={every!r}): every must be a whole number of "
                            f"steps, at least 1")
        every = n
        self._get = self._set = None
        self.has_position = data is not None
        data_obj = None
        if isinstance(data, tuple) and len(data) == 2 and all(map(callable, data)):
            self._get, self._set = data
        elif isinstance(data, MutableMapping):
            self._get = lambda d=data: dict(d)
            self._set = lambda v, d=data: (d.clear(), d.update(v or {}))
        elif data is not None:
            if not _stateful(data):
                raise SpecError(f"Protector(data=...): a {type(data).__name__} has no "
                                f"state_dict() / load_state_dict(); pass a stateful sampler or "
                                f"loader, a dict of your own, or a (get, set) pair")
            data_obj = data
        if scheduler is not None:
            for s in (scheduler.values() if isinstance(scheduler, Mapping) else [scheduler]):
                if not _stateful(s):
                    raise SpecError(f"Protector(scheduler=...): a {type(s).__name__} has no "
                                    f"state_dict() / load_state_dict()")
        if extra is not None and not isinstance(extra, MutableMapping):
            raise SpecError(f"Protector(extra=...): pass a dict (restored in place), not a "
                            f"{type(extra).__name__}")
        try:
            policy = Policy(policy)
        except ValueError:
            raise SpecError(f"Protector(policy={policy!r}): valid policies are "
                            f"{', '.join(p.value for p in Policy)}") from None
        if injector is not None:
            from faultlab.backends.torch.own_loop import Injector
            if not isinstance(injector, Injector) or injector.model is not model:
                raise SpecError("Protector(injector=...): pass the faultlab.torch.Injector "
                                "built for this model")
        if isinstance(detectors, DetectorSuite):
            suite = detectors
        else:
            known = ("bound", "z", "window", "warmup", "tol")
            bad = [k for k in thresholds if k not in known]
            if bad:
                raise SpecError(f"Protector: unknown argument {bad[0]!r} (thresholds are "
                                f"{', '.join(known)})")
            suite = default_suite(detectors, **thresholds)
        if directory is not None:
            d = Path(directory)
            if d.exists() and not d.is_dir():
                raise SpecError(f"Protector(directory={printable(d)}): not a directory")
        self.every, self.policy, self.injector, self.extra = every, policy, injector, extra
        self.adapter = TorchCheckpointAdapter(model, optimizer, scheduler=scheduler,
                                              data=data_obj, generators=generators)
        self.trainer = _LoopTrainer(self)
        self._recovery = _Recovery(self.trainer, suite, every, policy, directory=directory)
        self.suite = suite
        self._report: ProtectionReport | None = None
        self._run = None            # the recovery's ProtectedRun
        self._gen = None            # step form: the recovery's step generator
        self._closed = False

    # --- data position --------------------------------------------------------------------

    def get_position(self):
        return self._get() if self._get is not None else None

    def set_position(self, value) -> None:
        if self._set is not None:
            self._set(value)

    def prune(self, step: int) -> None:
        """At a checkpoint before `step`: forget what only steps before the second newest
        checkpoint needed (they are never replayed): their first checksums and, in the step
        form, their batches."""
        keep = step - self.every
        t = self.trainer
        for held in (t.recorded, t.first_checksum):
            for s in [s for s in held or () if s < keep]:
                del held[s]

    # --- running ----------------------------------------------------------------------------

    def run(self, steps: int, start: int | None = None) -> ProtectionReport:
        """Train steps start..start+steps-1 under protection (start: where the last run
        ended, 0 at first); returns the report of this run."""
        self._check_open()
        if self.batches is None and self.batch_fn is None:
            raise SpecError("Protector.run needs batches= (batch_fn(step) or a re-iterable); "
                            "without it, hand each batch in with prot.step(step, batch)")
        if self._gen is not None:
            raise SpecError("Protector: run() after step(): use one form per protector")
        n = _whole(steps)
        if n is None or n < 0:
            raise SpecError(f"Protector.run(steps={steps!r}): a whole number of steps")
        steps = n
        t = self.trainer
        start = t.next_step if start is None else operator.index(start)
        t.next_step = start
        self._run = ProtectedRun(start)
        try:
            for _ in self._recovery.steps(start, start + steps, self._faults(), self._run):
                pass
        finally:
            self._absorb(self._run)
        return self._report

    def step(self, step: int, batch) -> bool:
        """Run step `step` on `batch` under protection (steps in order, from any first one).
        Returns False when the policy stopped training, at this step (its anomaly was not
        transient) or earlier (nothing is run): end your loop then."""
        self._check_open()
        if self.batches is not None or self.batch_fn is not None:
            raise SpecError("Protector.step(step, batch) is for protectors built without "
                            "batches=; this one draws its own batches: call run(steps)")
        step = operator.index(step)
        t = self.trainer
        if self._gen is None:
            t.recorded = {}
            t.next_step = step
            self._run = ProtectedRun(step)
            self._gen = self._recovery.steps(step, 2**62, self._faults(), self._run)
            self._expect = step
        if self._run.stopped_at is not None:
            return False
        if step != self._expect:
            raise SpecError(f"Protector.step: expected step {self._expect}, got {step} (steps "
                            f"are handed in order)")
        t.recorded[step] = batch
        try:
            next(self._gen)
        except BaseException:
            self._run.stopped_at = step    # the step raised: the run cannot go on
            raise
        self._expect = step + 1
        self._absorb(self._run)
        return self._run.stopped_at is None

    def _faults(self) -> list:
        return list(self.injector.armed) if self.injector is not None else []

    def _absorb(self, run) -> None:
        t = self.trainer
        det_steps = {d.step for d in run.detections}
        self._report = ProtectionReport(run.start, run.losses, run.detections, run.stopped_at,
                                        sorted(t.differs - det_steps))

    @property
    def report(self) -> ProtectionReport:
        """What protection did so far (ProtectionReport)."""
        if self._report is None:
            return ProtectionReport(self.trainer.next_step)
        return self._report

    def _check_open(self) -> None:
        if self._closed:
            raise SpecError("Protector is closed")

    def close(self) -> None:
        """Wait for checkpoints in flight, remove the hooks (and the temporary checkpoints)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._recovery.engine is not None:
                self._recovery.engine.wait_all()
        finally:
            self._recovery.close()
            self.trainer.close()
            self.adapter.close()
            self._gen = None

    def __enter__(self) -> "Protector":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
