"""Statistics of trial results: Wilson intervals and the per-outcome summary."""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Iterable

from faultlab.results.store import OUTCOMES, TOTAL, TrialResult

def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n at the given two-sided confidence.

    ``center = (p + z^2/(2n)) / (1 + z^2/n)``, ``half = z*sqrt(p(1-p)/n + z^2/(4n^2)) /
    (1 + z^2/n)``, z the standard normal quantile of ``1 - (1-confidence)/2``. n = 0 gives
    (0.0, 1.0)."""
    if isinstance(k, bool) or isinstance(n, bool) or int(k) != k or int(n) != n:
        raise ValueError(f"k and n must be integers, got k={k!r}, n={n!r}")
    k, n = int(k), int(n)
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    z2 = z * z
    # computed from the side of the smaller count and mirrored, so that the interval of
    # n-k is exactly the mirror image of the interval of k
    if k > n - k:
        lo, hi = wilson_interval(n - k, n, confidence)
        return 1.0 - hi, 1.0 - lo
    p = k / n
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else min(p, max(0.0, center - half))
    hi = max(p, min(1.0, center + half))
    return lo, hi


@dataclass(frozen=True)
class OutcomeRow:
    """One line of a summary: how many trials had ``outcome``, the rate and its Wilson CI.
    The last row of :func:`summarize` is the total (``outcome == TOTAL``)."""

    outcome: str
    count: int
    rate: float
    ci_low: float
    ci_high: float
    confidence: float = 0.95

    @property
    def is_total(self) -> bool:
        return self.outcome == TOTAL


def summarize(results: Iterable[TrialResult], confidence: float = 0.95) -> list[OutcomeRow]:
    """Count per outcome (only outcomes that occur, in :data:`OUTCOMES` order) with rates and
    Wilson intervals, then a total row (rate 1, interval (1, 1); 0 and (0, 0) when empty)."""
    return _summarize((r.outcome for r in results), confidence)


def summarize_after_recovery(results: Iterable[TrialResult],
                             confidence: float = 0.95) -> list[OutcomeRow]:
    """:func:`summarize` of the outcomes after detection and recovery (a trial without an
    ``outcome_after`` counts with its own outcome)."""
    return _summarize((r.outcome_after or r.outcome for r in results), confidence)


def _summarize(outcomes: Iterable[str], confidence: float) -> list[OutcomeRow]:
    counts = dict.fromkeys(OUTCOMES, 0)
    n = 0
    for o in outcomes:
        counts[o] += 1
        n += 1
    rows = []
    for o in OUTCOMES:
        k = counts[o]
        if k:
            lo, hi = wilson_interval(k, n, confidence)
            rows.append(OutcomeRow(o, k, k / n, lo, hi, confidence))
    t = 1.0 if n else 0.0
    rows.append(OutcomeRow(TOTAL, n, t, t, t, confidence))
    return rows
