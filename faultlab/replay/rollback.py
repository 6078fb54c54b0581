"""Protected training: detect every step, roll back to the last persisted checkpoint, replay
deterministically and tell a transient fault from a real instability.

Framework-free: it drives a Trainer (faultlab.backends.base) and a CheckpointEngine. Checkpoints are
taken every `checkpoint_every` steps while training continues (the engine persists them
concurrently); on a detection the run waits for the saves in flight, restores the newest
committed checkpoint, replays the steps since it and re-runs the anomalous step. A clean
re-run means the fault was transient: training goes on from the replayed state. The same
anomaly again, from every retained checkpoint, means it was not: the policy decides.
"""

from __future__ import annotations

import enum
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from faultlab.backends.base import StepMetrics, TrainerBase
from faultlab.checkpointing import CheckpointEngine
from faultlab.detectors import DetectorSuite, Verdict
from faultlab.errors import CheckpointError, SpecError
from faultlab.faults import DurationKind, FaultSpec


#: a protected run's checkpoint slots hold this many times the slot the first state needs (by
#: the engine's rule, CheckpointEngine.slot_bytes_for): optimizer state appears after the
#: first step (Adam: two moments per parameter)
SLOT_HEADROOM = 4


class Policy(str, enum.Enum):
    """What to do when replay shows the same anomaly (not a transient fault)."""

    STOP = "stop"            # stop training and report
    SKIP = "skip"            # skip the anomalous step's update (at most `max_skips` in a row)
    LOWER_LR = "lower_lr"    # re-run the step with the learning rate scaled by `lr_factor`


@dataclass
class Detection:
    """One detection and what recovery made of it."""

    step: int
    detector: str
    reason: str
    rollback_to: int | None = None     # checkpoint step the run resumed from
    transient: bool | None = None      # the re-run was clean
    action: str = ""                   # recovered | stopped | skipped | lowered_lr
    load_s: float = 0.0                # restoring the checkpoint
    replay_s: float = 0.0              # replaying steps to the anomalous one
    steps_replayed: int = 0            # work lost: steps re-executed
    attempts: int = 0                  # checkpoints tried

    @property
    def recovery_s(self) -> float:
        return self.load_s + self.replay_s

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["recovery_s"] = self.recovery_s
        return d


@dataclass
class ProtectedRun:
    """The outcome of a protected run: the final timeline and every detection."""

    start: int
    losses: list[float] = field(default_factory=list)
    accs: list[float] = field(default_factory=list)
    detections: list[Detection] = field(default_factory=list)
    stopped_at: int | None = None
    step_s: list[float] = field(default_factory=list)   # each clean first execution of a step

    @property
    def recovered(self) -> bool:
        return bool(self.detections) and self.stopped_at is None and all(
            d.action in ("recovered", "skipped", "lowered_lr") for d in self.detections)


def refires_on_replay(fault: FaultSpec) -> bool:
    """Permanent and intermittent faults are in the hardware and come back on replay;
    transient ones (one step, or a burst of steps) do not."""
    return fault.duration.kind in (DurationKind.PERMANENT, DurationKind.INTERMITTENT)


class Protector:
    """Runs steps under detection with periodic persistent checkpoints and rollback."""

    def __init__(self, trainer: TrainerBase, suite: DetectorSuite, checkpoint_every: int = 10,
                 policy: Policy | str = Policy.STOP, directory: str | Path | None = None,
                 max_skips: int = 3, lr_factor: float = 0.1, max_attempts: int = 2):
        if checkpoint_every < 1:
            raise SpecError("checkpoint_every must be at least 1")
        self.trainer, self.suite = trainer, suite
        self.every = checkpoint_every
        self.policy = Policy(policy)
        self.max_skips, self.lr_factor = max_skips, lr_factor
        self.max_attempts = max_attempts   # checkpoints to roll back to before giving up
        self._own_dir = directory is None
        self.dir = Path(tempfile.mkdtemp(prefix="faultlab-protect-")) if directory is None else Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.engine: CheckpointEngine | None = None
        self._retired: list[CheckpointEngine] = []   # earlier files (smaller slots), newest last
        self._slot_bytes = 0
        self._snapshots: dict[int, object] = {}   # detector state at each checkpoint step
        trainer.signal_spec = suite.spec
        trainer.prepare_restore()   # (TF: trace the bulk assign before, not during, a rollback)

    def close(self) -> None:
        self.trainer.signal_spec = None
        for engine in self._retired + ([self.engine] if self.engine is not None else []):
            engine.close()
        self._retired.clear()
        self.engine = None
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _checkpoint(self, step: int) -> None:
        state = self.trainer.get_state()
        meta = {"step": step}
        # the slot this state needs, by the engine's own rule
        needed = CheckpointEngine.slot_bytes_for(state, meta=meta)
        if self.engine is None or needed > self._slot_bytes:
            # Slots are fixed at creation; optimizer state appears after the first step
            # (Adam: two moments per parameter), so size them for the state x SLOT_HEADROOM.
            # A state that outgrows them (a replica whose copy diverged adds its own) starts
            # a new file; the old one stays readable for rollbacks past the switch.
            if self.engine is not None:
                self.engine.wait_all()
                self._retired.append(self.engine)
            self._slot_bytes = SLOT_HEADROOM * needed
            path = self.dir / f"protect-{time.monotonic_ns()}.ckpt"
            self.engine = CheckpointEngine(path, keep=2, max_in_flight=2,
                                           slot_bytes=self._slot_bytes)
        # get_state() returns arrays nobody else holds: the engine writes them as they are
        # (borrowed) instead of copying them once more into its staging pool
        self.engine.save(step, state, meta, borrowed=True)
        self._snapshots[step] = self.suite.snapshot()

    def _firing(self, faults, step: int, attempt: int):
        """A step run for the first time gets every fault active at it; a replayed step only
        the faults that live in the hardware (redrawn per attempt if intermittent)."""
        if step > self._hwm:
            return [f for f in faults if f.active(step)]
        return [f for f in faults if refires_on_replay(f) and f.active(step, attempt)]

    def _step(self, step: int, faults, attempt: int) -> tuple[StepMetrics, Verdict | None]:
        firing = self._firing(faults, step, attempt)
        self._hwm = max(self._hwm, step)
        self.trainer.lr_scale = self._lr.get(step, 1.0)
        try:
            m = self.trainer.train_step(step, firing)
        finally:
            self.trainer.lr_scale = 1.0
        v = self.suite.observe(m.signals) if m.signals is not None else None
        if v is None and not math.isfinite(m.loss):
            v = Verdict("nonfinite", step, f"loss is {m.loss}")
        return m, v

    def run(self, start: int, end: int, faults: Sequence[FaultSpec] = ()) -> ProtectedRun:
        """Train steps start..end-1 from the trainer's current state."""
        out = ProtectedRun(start)
        for _ in self.steps(start, end, faults, out):
            pass
        return out

    def steps(self, start: int, end: int, faults: Sequence[FaultSpec], out: ProtectedRun):
        """The run as a generator: yields after each step (a detection and its recovery
        count as part of the step), so several runs can be interleaved step by step."""
        self._hwm = start - 1  # the last step executed at least once
        self._skipped: set[int] = set()      # policy decisions, honoured again by replays
        self._lr: dict[int, float] = {}
        attempt = 0          # rollbacks so far: intermittent faults redraw per attempt
        skips = 0
        step = start
        lr_scale = None
        while step < end:
            if step > start:
                yield step
            if (step - start) % self.every == 0 and len(out.losses) == step - start:
                self._checkpoint(step)
            t0 = time.perf_counter()
            m, v = self._step(step, faults, attempt)
            if v is None:
                out.step_s.append(time.perf_counter() - t0)
                out.losses.append(m.loss)
                out.accs.append(m.acc)
                step += 1
                skips = 0
                continue
            det = Detection(step, v.detector, v.reason)
            out.detections.append(det)
            clean = self._recover(det, out, faults, attempt + 1)
            attempt += 1
            if clean is not None:
                out.losses.append(clean.loss)
                out.accs.append(clean.acc)
                det.transient, det.action = True, "recovered"
                step += 1
                continue
            det.transient = False
            if self.policy is Policy.SKIP and skips < self.max_skips and self._restore_to(step, out, faults, attempt):
                # the state is the replayed one before `step`: drop this step's update; the
                # timeline carries the previous step's metrics over the skipped step
                det.action = "skipped"
                self._skipped.add(step)
                skips += 1
                out.losses.append(out.losses[-1] if out.losses else m.loss)
                out.accs.append(out.accs[-1] if out.accs else m.acc)
                step += 1
                continue
            if self.policy is Policy.LOWER_LR and lr_scale is None and self._restore_to(step, out, faults, attempt):
                lr_scale = self.lr_factor
                self._lr[step] = lr_scale
                m2, v2 = self._step(step, faults, attempt)
                if v2 is None:
                    det.action = "lowered_lr"
                    out.losses.append(m2.loss)
                    out.accs.append(m2.acc)
                    step += 1
                    continue
                del self._lr[step]
            det.action = "stopped"
            out.stopped_at = step
            out.losses.append(m.loss)
            out.accs.append(m.acc)
            break
        if self.engine is not None:
            self.engine.wait_all()
        yield step

    def _load_latest(self, before: int | None):
        """The newest committed checkpoint before `before`, in the current file or, failing
        that, in the files it replaced (newest first)."""
        engines = [self.engine] + self._retired[::-1]
        for i, engine in enumerate(engines):
            try:
                return engine.load_latest(before_step=before)
            except CheckpointError:
                if i == len(engines) - 1:
                    raise

    def _restore(self, det: Detection, out: ProtectedRun, before: int | None):
        t0 = time.perf_counter()
        self.engine.wait_all()
        restored = self._load_latest(before)
        self.trainer.set_state(restored.state)
        self.suite.restore(self._snapshots[restored.step])
        det.load_s += time.perf_counter() - t0
        del out.losses[restored.step - out.start:]
        del out.accs[restored.step - out.start:]
        return restored.step

    def _replay(self, det: Detection, out: ProtectedRun, frm: int, to: int, faults, attempt):
        """Replay steps frm..to-1; returns False if an anomaly shows on the way."""
        t0 = time.perf_counter()
        for s in range(frm, to):
            if s in self._skipped:   # a skipped update stays skipped
                out.losses.append(out.losses[-1] if out.losses else float("nan"))
                out.accs.append(out.accs[-1] if out.accs else 0.0)
                continue
            m, v = self._step(s, faults, attempt)
            det.steps_replayed += 1
            if v is not None:
                det.replay_s += time.perf_counter() - t0
                return False
            out.losses.append(m.loss)
            out.accs.append(m.acc)
        det.replay_s += time.perf_counter() - t0
        return True

    def _recover(self, det: Detection, out: ProtectedRun, faults, attempt) -> StepMetrics | None:
        """Roll back and re-run the anomalous step from each retained checkpoint, newest
        first; the re-run's metrics when it is clean, None when every attempt repeats it."""
        before = det.step + 1
        while True:
            try:
                frm = self._restore(det, out, before)
            except CheckpointError:
                return None
            det.attempts += 1
            if det.rollback_to is None:
                det.rollback_to = frm
            if self._replay(det, out, frm, det.step, faults, attempt):
                t0 = time.perf_counter()
                m, v = self._step(det.step, faults, attempt)
                det.replay_s += time.perf_counter() - t0
                det.steps_replayed += 1
                if v is None:
                    det.rollback_to = frm
                    return m
            if det.attempts >= self.max_attempts:
                return None
            before = frm   # the corruption may already be in that checkpoint: go older

    def _restore_to(self, step: int, out: ProtectedRun, faults, attempt) -> bool:
        """Bring the trainer to the (replayed) state before `step`; False if impossible
        (no checkpoint, or the replay itself is anomalous)."""
        scratch = Detection(step, "", "")
        try:
            frm = self._restore(scratch, out, step + 1)
        except CheckpointError:
            return False
        return self._replay(scratch, out, frm, step, faults, attempt)
