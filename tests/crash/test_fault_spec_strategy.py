"""`faultlab.testing.strategies.fault_specs` draws valid FaultSpecs, and every one survives a
round trip through a columnar campaign file."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings

from faultlab.campaigns import format_columnar, parse_columnar
from faultlab.faults import FaultSpec, Site
from faultlab.testing import strategies as fst
from faultlab.trials import Trial
from faultlab.workloads.base import default_config

CFG = default_config("mlp", replicas=2, steps_per_epoch=20, epochs=10)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(faults=fst.fault_specs(max_replica=1, max_step=CFG.total_steps - 1).map(lambda f: [f]))
def test_every_drawn_fault_spec_round_trips_through_a_columnar_campaign(faults):
    (fault,) = faults
    assert isinstance(fault, FaultSpec)
    text = format_columnar([Trial("t1", CFG, (fault,))])
    (back,) = parse_columnar(text)
    assert back.trial_id == "t1" and back.workload == CFG
    assert back.faults == (fault,)


@settings(max_examples=50, deadline=None)
@given(fault=fst.fault_specs(sites=[Site.PARAM], layers=["fc1", "fc2"], max_step=5))
def test_fault_specs_can_be_narrowed(fault):
    assert fault.site is Site.PARAM and fault.layer in ("fc1", "fc2") and fault.step <= 5
