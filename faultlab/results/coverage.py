"""Detection coverage of a campaign run with `--detect` (framework-free, from results)."""

from __future__ import annotations

import statistics
from typing import Sequence

from faultlab.results.stats import wilson_interval
from faultlab.results.store import OUTCOMES, TrialResult


def coverage(results: Sequence[TrialResult]) -> dict:
    """Coverage per outcome class (detected / trials of that class, Wilson 95%), detection
    latency, recovery success, steps of work lost, and outcomes before and after recovery."""
    protected = [r for r in results if r.detected is not None]
    by_class = []
    for outcome in OUTCOMES:
        rs = [r for r in protected if r.outcome == outcome]
        if not rs:
            continue
        k = sum(bool(r.detected) for r in rs)
        lo, hi = wilson_interval(k, len(rs))
        by_class.append({"outcome": outcome, "trials": len(rs), "detected": k,
                         "rate": k / len(rs), "ci_low": lo, "ci_high": hi})
    harmful = [r for r in protected if r.outcome != "Masked"]
    k = sum(bool(r.detected) for r in harmful)
    lo, hi = wilson_interval(k, len(harmful)) if harmful else (0.0, 1.0)
    controls = [r for r in protected if not r.faults]
    latency = [r.detect_step - r.inject_step for r in protected
               if r.detected and r.inject_step is not None and r.detect_step is not None]
    detections = [d for r in protected for d in (r.metrics.get("protected") or {}).get("detections", [])]
    detected = [r for r in protected if r.detected]
    after = {}
    for r in protected:
        if r.outcome_after:
            after.setdefault(r.outcome, {}).setdefault(r.outcome_after, 0)
            after[r.outcome][r.outcome_after] += 1
    return {
        "trials": len(protected),
        "non_masked": len(harmful), "non_masked_detected": k,
        "coverage": k / len(harmful) if harmful else None, "ci_low": lo, "ci_high": hi,
        "by_outcome": by_class,
        "control_trials": len(controls),
        "control_false_positives": sum(bool(r.detected) for r in controls),
        "masked_with_alarm": sum(bool(r.detected) for r in protected if r.outcome == "Masked"),
        "latency_steps": {"median": statistics.median(latency) if latency else None,
                          "max": max(latency) if latency else None, "n": len(latency)},
        "recovered": sum(bool(r.recovered) for r in detected), "detected": len(detected),
        "masked_after": sum(r.outcome_after == "Masked" for r in detected),
        "steps_lost": sum(d.get("steps_replayed", 0) for d in detections),
        "recovery_s_median": statistics.median(secs) if (secs := [
            d["recovery_s"] for d in detections if d.get("recovery_s") is not None]) else None,
        "before_after": after,
    }

