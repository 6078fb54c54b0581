"""Outcome classification: what a fault did to training, decided against the golden run.

Pure functions over metric series; the rules are documented in docs/outcomes.md and every
threshold lives in :class:`OutcomeRules`. Trial and golden runs see identical batches, so the
accuracy gap between them at a step is the fault's effect, not data noise.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

from faultlab.errors import SpecError

MASKED = "Masked"
IMMEDIATE = "ImmediateINFsNaNs"
SHORT_TERM = "ShortTermINFsNaNs"
LATENT = "LatentINFsNaNs"
SHARP = "SharpDegrade"
SLOW = "SlowDegrade"
SHARP_SLOW = "SharpSlowDegrade"
LOW_TEST = "LowTestAccuracy"
CRASH = "Crash"
HANG = "Hang"


@dataclass(frozen=True)
class OutcomeRules:
    """Thresholds of the outcome rules (accuracies are fractions in [0, 1])."""

    immediate_steps: int = 1       # non-finite within this many steps of the injection
    short_term_steps: int = 20     # ... within this many: short-term; later: latent
    window: int = 5                # steps of the moving average of training accuracy
    degrade: float = 0.10          # accuracy gap that counts as degraded
    sharp: float = 0.25            # gap, `sharp_steps` after the injection, that makes it sharp
    sharp_steps: int = 1
    further: float = 0.10          # trial accuracy falling this much more after a sharp drop
    test_tolerance: float = 0.02   # final test accuracy below golden by more: LowTestAccuracy

    @classmethod
    def from_pairs(cls, pairs: Sequence[str]) -> "OutcomeRules":
        """Rules from `name=value` strings (the CLI's --rule)."""
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        kw = {}
        for p in pairs:
            name, sep, value = p.partition("=")
            name = name.strip()
            if not sep or name not in fields:
                raise SpecError(f"bad rule {p!r} (expected name=value with name one of: "
                                f"{', '.join(fields)})")
            try:
                kw[name] = int(value) if fields[name] == "int" else float(value)
            except ValueError:
                raise SpecError(f"rule {name} needs a number, got {value!r}") from None
        return cls(**kw)


@dataclass(frozen=True)
class Classification:
    outcome: str
    first_nonfinite_step: int | None
    max_acc_drop: float | None
    final_gap: float | None
    bit_exact: bool


def _smooth(xs: Sequence[float], w: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= w:
            acc -= xs[i - w]
        out.append(acc / min(i + 1, w))
    return out


def classify(trial_acc: Sequence[float], golden_acc: Sequence[float], inject_index: int,
             first_nonfinite: int | None, test_acc: float | None, golden_test_acc: float | None,
             bit_exact: bool, rules: OutcomeRules = OutcomeRules()) -> Classification:
    """Classify a trial.

    trial_acc / golden_acc: per-step training accuracy over the same steps (the trial's may be
    shorter when it stopped on a non-finite loss); inject_index: index of the injection step in
    those series; first_nonfinite: steps from the injection to the first non-finite loss or
    state (None if none)."""
    if first_nonfinite is not None:
        outcome = (IMMEDIATE if first_nonfinite <= rules.immediate_steps else
                   SHORT_TERM if first_nonfinite <= rules.short_term_steps else LATENT)
        return Classification(outcome, first_nonfinite, None, None, False)
    n = min(len(trial_acc), len(golden_acc))
    t_s = _smooth(trial_acc[:n], rules.window)
    gap = [g - t for g, t in zip(_smooth(golden_acc[:n], rules.window), t_s)][inject_index:]
    if not gap:
        return Classification(MASKED, None, 0.0, 0.0, bit_exact)
    max_drop = max(gap)
    final_gap = gap[-1]
    # the raw (unsmoothed) drop right after the injection decides sharpness
    k = inject_index + rules.sharp_steps
    early = (golden_acc[k] - trial_acc[k]) if k < n else gap[-1]
    if final_gap >= rules.degrade:
        if early >= rules.sharp:
            # after the sharp drop, does the trial's own accuracy keep falling?
            after = trial_acc[k:k + rules.window]
            level = sum(after) / len(after) if after else t_s[-1]
            outcome = SHARP_SLOW if level - t_s[-1] >= rules.further else SHARP
        else:
            outcome = SLOW
    elif (test_acc is not None and golden_test_acc is not None
          and golden_test_acc - test_acc > rules.test_tolerance):
        outcome = LOW_TEST
    else:
        outcome = MASKED
    return Classification(outcome, None, max_drop, final_gap, bit_exact)


def is_finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
