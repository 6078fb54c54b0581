"""The framework-free pieces of protecting a training loop the user keeps
(faultlab.torch.Protector, faultlab.keras.Protector): the report of what protection did and
small argument checks. Detection and recovery themselves are :mod:`faultlab.replay.rollback`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

from faultlab.replay.rollback import Detection

__all__ = ["ProtectionReport", "whole", "stateful"]


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
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def stateful(obj) -> bool:
    return callable(getattr(obj, "state_dict", None)) and \
        callable(getattr(obj, "load_state_dict", None))
