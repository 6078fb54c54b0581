"""Random campaigns, sized by the statistical fault-injection formula (Leveugle et al., DATE
2009): n = N / (1 + e^2 (N - 1) / (t^2 p (1 - p))) trials give a margin of error e at the
confidence whose normal quantile is t, for a fault population of N and an expected proportion
p (0.5, the worst case). Every choice is drawn from a seeded generator."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from faultlab.backends import load_backend
from faultlab.errors import SpecError
from faultlab.faults import (Duration, FaultSpec, PositionMode, PositionSpec, Site, ValueModel,
                     ValueSpec)
from faultlab.trials import Trial
from faultlab.workloads.base import WorkloadConfig

#: sites and value models a random campaign draws from (uniformly)
SITES = (Site.FWD_INPUT, Site.FWD_WEIGHT, Site.FWD_OUTPUT, Site.GRAD_OUT, Site.BWD_INPUT,
         Site.GRAD_IN, Site.GRAD_WT, Site.PARAM, Site.OPT_STATE)
VALUES = (ValueModel.BITFLIP, ValueModel.RANDOM, ValueModel.ZERO, ValueModel.COPY,
          ValueModel.STUCK_AT)


def sample_size(population: float, margin: float = 0.05, confidence: float = 0.95,
                p: float = 0.5) -> int:
    """Leveugle et al.'s sample size for a finite population."""
    if not 0 < margin < 1 or not 0 < confidence < 1:
        raise SpecError("margin and confidence must be in (0, 1)")
    t = NormalDist().inv_cdf(0.5 + confidence / 2)
    n = population / (1 + margin ** 2 * (population - 1) / (t ** 2 * p * (1 - p)))
    return max(1, math.ceil(n))


def population(config: WorkloadConfig, table) -> float:
    """Size of the fault space: every (step, replica, site, element, bit) of every layer."""
    elements = sum(int(np.prod(shape)) * (32 if dtype == "float32" else 16)
                   for layer in table.values() for site, (shape, dtype) in layer.items()
                   if isinstance(site, Site) and site in SITES)
    return float(config.total_steps) * config.replicas * elements


def plan(config: WorkloadConfig, n: int | None = None, margin: float = 0.05,
         confidence: float = 0.95, seed: int = 0, horizon: int | None = None,
         layers: list[str] | None = None) -> list[Trial]:
    """A random campaign on `config`: `n` trials (default: the formula's sample size)."""
    table = load_backend(config.framework).operand_shapes(config)
    names = sorted(layers or [k for k, v in table.items() if Site.BWD_INPUT in v])
    missing = [x for x in names if x not in table]
    if missing:
        raise SpecError(f"unknown layer {missing[0]!r}")
    if n is None:
        n = sample_size(population(config, table), margin, confidence)
    rng = np.random.default_rng([seed, 0x9A1])
    trials = []
    for i in range(n):
        layer = names[int(rng.integers(len(names)))]
        sites = [s for s in SITES if s in table[layer]]
        site = sites[int(rng.integers(len(sites)))]
        model = VALUES[int(rng.integers(len(VALUES)))]
        shape, dtype = table[layer][site]
        width = 32 if dtype == "float32" else 16
        bit = int(rng.integers(width)) if model in (ValueModel.BITFLIP, ValueModel.STUCK_AT) else None
        stuck = int(rng.integers(2))
        value = ValueSpec(model, bit=bit, stuck=stuck if model is ValueModel.STUCK_AT else 1)
        index = tuple(int(rng.integers(d)) for d in shape)
        step = int(rng.integers(config.steps_per_epoch, config.total_steps))
        replica = int(rng.integers(config.replicas)) if not site.is_state else 0
        fault = FaultSpec(site=site, value=value, layer=layer, replica=replica, step=step,
                          positions=PositionSpec(PositionMode.EXPLICIT, indices=(index,)),
                          duration=Duration(), seed=int(rng.integers(2**62)),
                          tensor="m" if site is Site.OPT_STATE else None)
        trials.append(Trial(f"r{i:04d}", config, (fault,), horizon=horizon))
    return trials
