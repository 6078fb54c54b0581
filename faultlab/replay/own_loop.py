"""The framework-free pieces of protecting a training loop the user keeps
(faultlab.torch.Protector, faultlab.keras.Protector): the report of what protection did,
small argument checks, and the two halves each backend's Protector builds on:
:class:`OwnLoopProtector` (its arguments, run / step / report / close) and
:class:`OwnLoopTrainer` (the user's loop behind the trainer contract: batches, positions,
checksums of replayed steps, checkpoint state through the backend's adapter). Detection and
recovery themselves are :mod:`faultlab.replay.rollback`.
"""

from __future__ import annotations

import abc
import contextlib
import json
import operator
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from faultlab.backends.base import EvalMetrics, TrainerBase
from faultlab.detectors import DetectorSuite, default_suite
from faultlab.errors import SpecError, printable
from faultlab.replay.rollback import Detection, Policy, ProtectedRun
from faultlab.replay.rollback import Protector as _Recovery

__all__ = ["ProtectionReport", "OwnLoopProtector", "OwnLoopTrainer", "whole", "stateful"]

_META = "__protector_meta__"          # the adapter's JSON meta, carried as a uint8 array
_THRESHOLDS = ("bound", "z", "window", "warmup", "tol")


@dataclass
class ProtectionReport:
    """What protection did: every detection (step, detector, reason, the checkpoint rolled
    back to, transient or not, the action taken, steps replayed), the loss of every completed
    step, where training stopped (policy ``stop``), and the replayed steps whose parameters
    differed from their first run (beside the anomalous step itself): where a fault struck
    before it was detected, or a step that is not a deterministic function of the state
    handed over. Empty for a transient fault detected where it struck."""

    start: int
    losses: list[float] = field(default_factory=list)
    detections: list[Detection] = field(default_factory=list)
    stopped_at: int | None = None
    replay_differs: list[int] = field(default_factory=list)

    @property
    def steps(self) -> int:
        """Steps completed (a skipped step counts; the step training stopped at does not)."""
        return len(self.losses) - (self.stopped_at is not None)

    @property
    def rollbacks(self) -> int:
        """Checkpoints restored (a detection tries up to two, newest first)."""
        return sum(d.attempts for d in self.detections)

    @property
    def steps_replayed(self) -> int:
        return sum(d.steps_replayed for d in self.detections)

    @property
    def recovered(self) -> bool:
        return bool(self.detections) and self.stopped_at is None and all(
            d.action in ("recovered", "skipped", "lowered_lr") for d in self.detections)

    def __str__(self) -> str:
        lines = [f"{self.steps} step(s) done from step {self.start}, {len(self.detections)} "
                 f"detection(s), {self.rollbacks} rollback(s), {self.steps_replayed} step(s) "
                 f"replayed" + (f", stopped at step {self.stopped_at}"
                                if self.stopped_at is not None else "")]
        for d in self.detections:
            kind = {True: "transient", False: "not transient", None: "?"}[d.transient]
            tried = f" ({d.attempts} checkpoints tried)" if d.attempts > 1 else ""
            lines.append(f"  step {d.step}: {d.detector} ({d.reason}); rolled back to step "
                         f"{d.rollback_to}{tried}, {d.steps_replayed} step(s) replayed: {kind}, "
                         f"{d.action}")
        return "\n".join(lines)


def whole(value) -> int | None:
    """`value` as an int when it is a whole number (int, NumPy or 0-d tensor integer), else
    None (bools and floats included)."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def stateful(obj) -> bool:
    return callable(getattr(obj, "state_dict", None)) and \
        callable(getattr(obj, "load_state_dict", None))


class OwnLoopTrainer(TrainerBase):
    """The user's loop behind the trainer contract the recovery Protector drives: the batch
    of each step, the checkpoint state, the checksums of replayed steps. A backend adds the
    step itself (``train_step`` and its signals) and these hooks: ``_capture`` (the adapter's
    capture), ``_restore_extra``, and, where making an iteration draws random numbers,
    ``_iteration_state`` / ``_generators_at``."""

    config = None

    def __init__(self, p):
        self.p = p
        self.signal_spec = None
        self.lr_scale = 1.0
        self.next_step = 0                 # the step the state is before
        self.recorded: dict[int, Any] | None = None   # step form: batches kept for replays
        self._it = None                    # the batch iterator (re-iterable form)
        self._it_step = 0                  # the step of its next batch
        self._epochs: dict[int, Any] = {}  # step an iteration began at -> _iteration_state()
        self.first_checksum: dict[int, Any] = {}
        self.differs: set[int] = set()

    # --- batches ----------------------------------------------------------------------------

    def _batch(self, step: int):
        if self.recorded is not None:
            return self._recorded(step)
        if self.p.batch_fn is not None:
            return self.p.batch_fn(step)
        if self._it is None:
            self._reiterate()
        while True:
            batch = self._next_batch()
            self._it_step += 1
            if self._it_step > step:    # earlier ones: steps a policy skipped
                return batch

    def _recorded(self, step: int):
        try:
            return self.recorded[step]
        except KeyError:
            raise SpecError(f"Protector: the batch of step {step} is no longer held (the "
                            f"step form keeps the batches since the second newest "
                            f"checkpoint)") from None

    def _next_batch(self):
        try:
            return next(self._it)
        except StopIteration:       # an epoch ended: the next one, as `for` would
            self._new_iter(self._it_step)
        try:
            return next(self._it)
        except StopIteration:
            raise SpecError(f"Protector: batches yielded nothing for step "
                            f"{self._it_step}") from None

    def _new_iter(self, step: int) -> None:
        """iter(batches) where the user's loop makes it (the run's first step, an epoch's
        end), remembering the state it starts from (:meth:`_iteration_state`)."""
        self._epochs[step] = self._iteration_state()
        self._it, self._it_step = iter(self.p.batches), step

    def _reiterate(self) -> None:
        """The iterator after a restore (state before step `next_step`). Where the run made
        one at this step, make it the same way. Else, from the data position restored, the
        iterator resumes where the checkpoint was; without a data position, the iteration
        that covers this step is made again from the state it started from and
        fast-forwarded (it must yield the same batches)."""
        step = self.next_step
        starts = [s for s in self._epochs if s <= step]
        if not starts or max(starts) == step:
            self._new_iter(step)
            return
        first = max(starts)
        replay = not self.p.has_position
        with self._generators_at(self._epochs[first] if replay else None):
            self._it = iter(self.p.batches)
            if replay:
                self._fast_forward(first, step)
        self._it_step = step

    def _fast_forward(self, first: int, step: int) -> None:
        for s in range(first, step):
            try:
                next(self._it)
            except StopIteration:
                raise SpecError(f"Protector: batches ran out at step {s} while replaying "
                                f"(they yielded more the first time); give data= your data "
                                f"position") from None

    def _iteration_state(self) -> Any:
        """What making an iteration of `batches` depends on beyond the data position (the
        global generators for a shuffling loader); None by default."""
        return None

    def _generators_at(self, state: Any):
        """A context in which a re-made iteration starts from `state` (None: from the
        restored generators, which it must not move)."""
        return contextlib.nullcontext()

    # --- replayed steps ---------------------------------------------------------------------

    def _note_checksum(self, step: int, checksum) -> None:
        first = self.first_checksum.get(step)
        if first is None:
            self.first_checksum[step] = checksum
        elif first != checksum:
            self.differs.add(step)

    # --- state --------------------------------------------------------------------------------

    def get_state(self) -> dict[str, np.ndarray]:
        """The adapter's capture (:meth:`_capture`) and its meta."""
        p = self.p
        step = p._run.start + len(p._run.losses)    # the recovery checkpoints before `step`
        at = self._it_step if self._it is not None else self.next_step
        if p.batches is not None and at < step:
            self._batch(step - 1)        # a skipped step's batch is consumed before saving
        self.next_step = step
        arrays, meta = self._capture(step)
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
            self._restore_extra(p.extra, resume.extra)
        self.next_step = resume.step
        self._it = None

    @abc.abstractmethod
    def _capture(self, step: int) -> tuple[dict, dict]:
        """(arrays, meta): the adapter's capture of the state before `step` (the backend's)."""

    @abc.abstractmethod
    def _restore_extra(self, live: MutableMapping, saved: Mapping) -> None:
        """A restored extra dict into the user's own, in place (the backend's)."""

    def evaluate(self) -> EvalMetrics:
        raise SpecError("Protector does not evaluate: your loop keeps its own validation")


class OwnLoopProtector:
    """The framework-free part of a backend's Protector: the checks of the arguments every
    backend takes (``_check_*``, called by the backend in its own order), the data position,
    and run / step / report / close over :class:`faultlab.replay.Protector`. A backend sets
    the wording of its hints (``_ITERABLE_HINT``, ``_ITERABLE_EXAMPLE``, ``_DATA_HINT``),
    calls :meth:`_start` last in its ``__init__``, and provides ``_armed`` (the faults the
    recovery may fire) and ``_release`` (what close() gives back)."""

    _ITERABLE_HINT = "the iterable itself"      # what to pass instead of a one-shot iterator
    _ITERABLE_EXAMPLE = "a list"                # a re-iterable, for the batches message
    _DATA_HINT = "a dict of your own or a (get, set) pair"

    # --- arguments ---------------------------------------------------------------------------

    def _check_batches(self, batches) -> None:
        self.batch_fn = self.batches = None
        if batches is None:
            return
        if hasattr(batches, "__iter__"):
            if hasattr(batches, "__next__") and iter(batches) is batches:
                raise SpecError(f"Protector: batches is a one-shot iterator "
                                f"({type(batches).__name__}) that cannot be re-iterated "
                                f"after a rollback; pass {self._ITERABLE_HINT}, or "
                                f"batch_fn(step)")
            self.batches = batches
        elif callable(batches):
            self.batch_fn = batches
        else:
            raise SpecError(f"Protector: batches must be batch_fn(step) or a re-iterable "
                            f"such as {self._ITERABLE_EXAMPLE}, got {type(batches).__name__}")

    @staticmethod
    def _check_every(every) -> int:
        n = whole(every)
        if n is None or n < 1:
            raise SpecError(f"Protector(every={every!r}): every must be a whole number of "
                            f"steps, at least 1")
        return n

    def _check_data(self, data):
        """The data position's get / set; returns the stateful object the adapter captures
        itself, else None."""
        self._get = self._set = None
        self.has_position = data is not None
        if isinstance(data, tuple) and len(data) == 2 and all(map(callable, data)):
            self._get, self._set = data
        elif isinstance(data, MutableMapping):
            self._get = lambda d=data: dict(d)
            self._set = lambda v, d=data: (d.clear(), d.update(v or {}))
        elif data is not None:
            if not stateful(data):
                raise SpecError(f"Protector(data=...): a {type(data).__name__} has no "
                                f"state_dict() / load_state_dict(); pass {self._DATA_HINT}")
            return data
        return None

    @staticmethod
    def _check_extra(extra) -> None:
        if extra is not None and not isinstance(extra, MutableMapping):
            raise SpecError(f"Protector(extra=...): pass a dict (restored in place), not a "
                            f"{type(extra).__name__}")

    @staticmethod
    def _check_policy(policy) -> Policy:
        try:
            return Policy(policy)
        except ValueError:
            raise SpecError(f"Protector(policy={policy!r}): valid policies are "
                            f"{', '.join(p.value for p in Policy)}") from None

    @staticmethod
    def _check_suite(detectors, thresholds: Mapping) -> DetectorSuite:
        if isinstance(detectors, DetectorSuite):
            return detectors
        bad = [k for k in thresholds if k not in _THRESHOLDS]
        if bad:
            raise SpecError(f"Protector: unknown argument {bad[0]!r} (thresholds are "
                            f"{', '.join(_THRESHOLDS)})")
        return default_suite(detectors, **thresholds)

    @staticmethod
    def _check_directory(directory) -> None:
        if directory is not None:
            d = Path(directory)
            if d.exists() and not d.is_dir():
                raise SpecError(f"Protector(directory={printable(d)}): not a directory")

    def _start(self, trainer: OwnLoopTrainer, suite: DetectorSuite, directory) -> None:
        """The recovery over `trainer` (after every, policy and the rest are set); the
        trainer is closed again when the recovery cannot be built."""
        self.trainer = trainer
        try:
            self._recovery = _Recovery(trainer, suite, self.every, self.policy,
                                       directory=directory)
        except BaseException:
            trainer.close()
            raise
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
        n = whole(steps)
        if n is None or n < 0:
            raise SpecError(f"Protector.run(steps={steps!r}): a whole number of steps")
        t = self.trainer
        start = t.next_step if start is None else operator.index(start)
        t.next_step = start
        self._run = ProtectedRun(start)
        try:
            for _ in self._recovery.steps(start, start + n, self._armed(), self._run):
                pass
        finally:
            self._absorb(self._run)
            self._after_run()
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
        if self._gen is None:
            self._begin_steps(step)
        if self._run.stopped_at is not None:
            return False
        if step != self._expect:
            raise SpecError(f"Protector.step: expected step {self._expect}, got {step} (steps "
                            f"are handed in order)")
        self.trainer.recorded[step] = batch
        try:
            next(self._gen)
        except BaseException:
            self._run.stopped_at = step    # the step raised: the run cannot go on
            raise
        self._expect = step + 1
        self._absorb(self._run)
        return self._run.stopped_at is None

    def _begin_steps(self, step: int) -> None:
        """The step form's first step: the recovery's generator over steps from `step` on."""
        t = self.trainer
        t.recorded = {}
        t.next_step = step
        self._run = ProtectedRun(step)
        self._gen = self._recovery.steps(step, 2**62, self._armed(), self._run)
        self._expect = step

    def _armed(self) -> list:
        """The faults the recovery may fire (it decides which fire at each step)."""
        return []

    def _after_run(self) -> None:
        """What run() undoes when it ends (nothing by default)."""

    def _absorb(self, run) -> None:
        det_steps = {d.step for d in run.detections}
        self._report = ProtectionReport(run.start, run.losses, run.detections, run.stopped_at,
                                        sorted(self.trainer.differs - det_steps))

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
        """Wait for checkpoints in flight, remove the temporary checkpoints and give back
        what the protector installed (:meth:`_release`)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._recovery.engine is not None:
                self._recovery.engine.wait_all()
        finally:
            self._recovery.close()
            self._release()
            self._gen = None

    def _release(self) -> None:
        self.trainer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
