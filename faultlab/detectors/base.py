"""The detector interface and a suite that runs several of them.

A detector sees one step's :class:`Signals` and returns a :class:`Verdict` when the step is
anomalous. Detectors that learn from the run's own history keep it in plain Python state that
the suite can snapshot and restore, so a rollback also rolls the detectors back."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable, Protocol

from faultlab.errors import SpecError
from faultlab.detectors.signals import Signals, SignalSpec


@dataclass(frozen=True)
class Verdict:
    detector: str
    step: int
    reason: str


class Detector(Protocol):
    name: str
    needs: SignalSpec

    def observe(self, s: Signals) -> Verdict | None:
        """Judge one step; update the history only with steps judged normal."""


class DetectorSuite:
    """Runs detectors in order; the first verdict wins (all are still fed the step)."""

    def __init__(self, detectors: Iterable[Detector]):
        self.detectors = list(detectors)
        if not self.detectors:
            raise SpecError("a detector suite needs at least one detector")

    @property
    def spec(self) -> SignalSpec:
        return SignalSpec(history=any(d.needs.history for d in self.detectors),
                          grads=any(d.needs.grads for d in self.detectors),
                          bound=min(d.needs.bound for d in self.detectors),
                          params=any(d.needs.params for d in self.detectors),
                          replicas=any(d.needs.replicas for d in self.detectors),
                          abft=any(d.needs.abft for d in self.detectors))

    def observe(self, s: Signals) -> Verdict | None:
        verdicts = [d.observe(s) for d in self.detectors]
        return next((v for v in verdicts if v is not None), None)

    def warm_up(self, history: Iterable[Signals]) -> None:
        """Feed fault-free steps (e.g. the golden run's) so history-based detectors start
        informed; verdicts during warm-up are ignored."""
        for s in history:
            for d in self.detectors:
                d.observe(s)

    def snapshot(self):
        """Detector state to roll back with the model (attributes a detector lists in
        PERSISTENT, e.g. what it has already reported, survive rollbacks)."""
        return copy.deepcopy([{k: v for k, v in d.__dict__.items()
                               if k not in getattr(d, "PERSISTENT", ())}
                              for d in self.detectors])

    def restore(self, snap) -> None:
        for d, state in zip(self.detectors, copy.deepcopy(snap)):
            d.__dict__.update(state)

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.detectors]
