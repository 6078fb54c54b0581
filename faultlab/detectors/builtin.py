"""Built-in detectors. Thresholds are documented in docs/detection.md; the defaults were chosen
from the false-positive rate on golden runs (benchmarks/detection.py measures it)."""

from __future__ import annotations

import math
from collections import deque
from typing import Iterable

from faultlab.detectors.base import DetectorSuite, Verdict
from faultlab.errors import SpecError
from faultlab.detectors.signals import Signals, SignalSpec


class NonFinite:
    """Non-finite loss, gradient norm, optimizer moment or parameter norm."""

    name = "nonfinite"
    needs = SignalSpec(history=True)   # a non-finite gradient makes Adam's m non-finite
    PARAMS = ()

    def observe(self, s: Signals) -> Verdict | None:
        if not math.isfinite(s.loss):
            return Verdict(self.name, s.step, f"loss is {s.loss}")
        if not math.isfinite(s.grad_norm):
            return Verdict(self.name, s.step, f"gradient norm is {s.grad_norm}")
        bad = [k for k, v in s.m_max.items() if not math.isfinite(v)]
        if bad or not math.isfinite(s.m_other):
            where = bad[0] if bad else "a non-kernel parameter"
            return Verdict(self.name, s.step, f"Adam moment of {where} is non-finite")
        if s.param_norm is not None and not math.isfinite(s.param_norm):
            return Verdict(self.name, s.step, "parameters are non-finite")
        return None


class HistoryBound:
    """The ISCA'23 bound on optimizer history: any conv / dense kernel whose Adam first moment
    exceeds `bound` in absolute value (the artifact checks m against 20.0 every step; our
    default 5.0 is 40x the largest |m| of golden runs of three workloads, see docs/detection.md)."""

    name = "history"
    PARAMS = ("bound",)

    def __init__(self, bound: float = 5.0):
        self.bound = float(bound)
        self.needs = SignalSpec(history=True, bound=self.bound)

    def observe(self, s: Signals) -> Verdict | None:
        for layer, m in s.m_max.items():
            if m > self.bound:
                return Verdict(self.name, s.step, f"|m| of {layer} is {m:.3g} > {self.bound:g}")
        return None


class Spike:
    """Loss and gradient-norm spikes against the run's own history: robust z-score (median and
    MAD of the last `window` normal steps), upward only, after `warmup` steps."""

    name = "spike"
    needs = SignalSpec(history=False, grads=True)
    PARAMS = ("z", "window", "warmup")

    def __init__(self, z: float = 12.0, window: int = 50, warmup: int = 10):
        self.z, self.window, self.warmup = float(z), int(window), int(warmup)
        self.loss: deque = deque(maxlen=self.window)
        self.grad: deque = deque(maxlen=self.window)

    @staticmethod
    def _score(x: float, hist) -> float:
        """Robust z-score; 0 unless x is above everything in the window (a spike must be new).
        The scale has a floor of 5% of the median for histories with no spread."""
        xs = sorted(hist)
        if not x > xs[-1]:
            return 0.0
        med = xs[len(xs) // 2]
        mad = sorted(abs(v - med) for v in xs)[len(xs) // 2]
        scale = max(1.4826 * mad, 0.05 * abs(med), 1e-12)
        return (x - med) / scale

    def observe(self, s: Signals) -> Verdict | None:
        verdict = None
        if len(self.loss) >= self.warmup:
            zl = self._score(s.loss, self.loss)
            zg = self._score(s.grad_norm, self.grad)
            if zl > self.z:
                verdict = Verdict(self.name, s.step, f"loss {s.loss:.4g} is {zl:.1f} MADs above its history")
            elif zg > self.z:
                verdict = Verdict(self.name, s.step, f"gradient norm {s.grad_norm:.4g} is {zg:.1f} MADs above its history")
        if verdict is None and math.isfinite(s.loss) and math.isfinite(s.grad_norm):
            self.loss.append(s.loss)
            self.grad.append(s.grad_norm)
        return verdict


class ReplicaDivergence:
    """Replicas that should hold identical weights do not: their checksums differ."""

    name = "divergence"
    needs = SignalSpec(history=False, replicas=True)
    PARAMS = ()

    def observe(self, s: Signals) -> Verdict | None:
        c = s.replica_checksums
        if c and any(x != c[0] for x in c[1:]):
            odd = [i for i, x in enumerate(c) if x != c[0]] or [0]
            return Verdict(self.name, s.step, f"replica {odd[0]} weights differ from replica 0")
        return None


class ABFTDetector:
    """Algorithm-based fault tolerance: the checksum of a linear / conv output (sum over output
    channels) must equal the product with the column-summed kernel, within `tol` relative."""

    name = "abft"
    needs = SignalSpec(history=False, abft=True)
    PARAMS = ("tol",)

    def __init__(self, tol: float = 1e-3):
        self.tol = float(tol)

    def observe(self, s: Signals) -> Verdict | None:
        r = s.abft_residual
        if r is not None and not (r <= self.tol):
            return Verdict(self.name, s.step, f"checksum residual {r:.3g} > {self.tol:g}")
        return None


BUILTIN = {"nonfinite": NonFinite, "history": HistoryBound, "spike": Spike,
           "divergence": ReplicaDivergence, "abft": ABFTDetector}


def default_suite(names: Iterable[str] | None = None, **thresholds) -> DetectorSuite:
    """The built-in detectors by name (default: nonfinite, history, spike)."""
    names = list(names or ("nonfinite", "history", "spike"))
    unknown = [n for n in names if n not in BUILTIN]
    if unknown:
        raise SpecError(f"unknown detector {unknown[0]!r} (built-ins: {', '.join(BUILTIN)})")
    return DetectorSuite(BUILTIN[n](**{k: v for k, v in thresholds.items()
                                       if k in BUILTIN[n].PARAMS}) for n in names)
