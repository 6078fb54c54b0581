"""`faultlab plan`: statistical sample sizes and seeded random campaigns that validate."""

import pytest
from hypothesis import given, settings, strategies as st

from faultlab.campaigns import format_columnar, parse_columnar
from faultlab.errors import SpecError
from faultlab.campaigns.plan import plan, sample_size
from faultlab.runner import validate_trials
from faultlab.workloads.base import default_config

CFG = default_config("resnet18", width=8, input_size=16, replicas=4, per_replica_batch=4,
                     dataset="digits", steps_per_epoch=5, epochs=3, seed=2)


def test_sample_size_matches_leveugle_for_known_cases():
    assert sample_size(1e12) == 385           # e = 5%, 95%: the textbook 384.16 -> 385
    assert sample_size(1e12, 0.01, 0.99) == 16588
    assert sample_size(100) == 80             # a small population needs most of it


@settings(max_examples=100, deadline=None)
@given(st.floats(10, 1e15), st.floats(0.005, 0.2), st.floats(0.5, 0.999))
def test_sample_size_is_at_most_the_population_and_shrinks_with_the_margin(n, e, c):
    k = sample_size(n, e, c)
    assert 1 <= k <= max(1, round(n) + 1)
    assert sample_size(n, min(0.5, e * 2), c) <= k


def test_bad_margin_is_a_spec_error():
    with pytest.raises(SpecError):
        sample_size(100, margin=0)


@pytest.mark.framework("torch")
def test_plan_is_seeded_valid_and_round_trips_through_the_columnar_format():
    a = plan(CFG, 25, seed=3, horizon=5)
    assert [t.faults for t in a] == [t.faults for t in plan(CFG, 25, seed=3, horizon=5)]
    assert [t.faults for t in a] != [t.faults for t in plan(CFG, 25, seed=4, horizon=5)]
    validate_trials(a)
    back = parse_columnar(format_columnar(a), "plan.csv")
    assert [t.faults for t in back] == [t.faults for t in a]
    assert len({f.site for t in a for f in t.faults}) > 3
