"""The recovery point: property tests of recovery_plan against a brute-force oracle, and the
strict JSON form of a published inventory."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from faultlab.distributed import (RecoveryPlan, SnapshotError, complete_steps,
                                  inventory_from_json, inventory_to_json, recovery_plan)
from faultlab.errors import FaultlabError


@st.composite
def scenarios(draw):
    world = draw(st.integers(1, 6))
    ranks = st.integers(0, world - 1)
    inventories = draw(st.dictionaries(ranks, st.dictionaries(
        ranks, st.lists(st.integers(0, 6), max_size=4)), max_size=world))
    alive = draw(st.none() | st.sets(ranks))
    disk = draw(st.lists(st.integers(0, 8), max_size=3))
    return world, inventories, alive, disk


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_recovery_plan_against_the_oracle(scenario):
    world, inventories, alive, disk = scenario
    plan = recovery_plan(inventories, world, disk, alive)
    counted = {h: inv for h, inv in inventories.items() if alive is None or h in alive}

    def holds(h, owner, step):
        return h in counted and step in counted[h].get(owner, [])

    steps = {s for inv in counted.values() for ss in inv.values() for s in ss}
    complete = sorted(s for s in steps
                      if all(any(holds(h, o, s) for h in counted) for o in range(world)))
    assert sorted(complete_steps(inventories, world, alive)) == complete
    if plan.source == "memory":
        assert plan.step == complete[-1]                        # the newest complete step
        assert not disk or plan.step >= max(disk)
        assert sorted(plan.fetch) == list(range(world))
        for owner, (kind, h) in plan.fetch.items():
            if kind == "local":
                assert h == owner and holds(owner, owner, plan.step)
            else:
                assert kind == "peer" and h != owner and holds(h, owner, plan.step)
                assert not holds(owner, owner, plan.step)
                assert h == min(x for x in counted if holds(x, owner, plan.step))
        for h in range(world):
            assert plan.sends(h) == sorted(o for o, f in plan.fetch.items() if f == ("peer", h))
    elif plan.source == "disk":
        assert disk and plan.step == max(disk)
        assert not complete or complete[-1] < max(disk)
        assert plan.fetch == {o: ("disk", None) for o in range(world)}
    else:
        assert plan == RecoveryPlan(None, "scratch", {})
        assert not complete and not disk


def test_examples():
    # 4 ranks, copies on the next rank; rank 1's node lost ({}), disk at step 3
    inv = {0: {0: [4, 5], 3: [4, 5]}, 1: {}, 2: {1: [4, 5], 2: [4, 5]}, 3: {2: [4], 3: [4, 5]}}
    plan = recovery_plan(inv, 4, [3])
    assert plan == RecoveryPlan(5, "memory", {0: ("local", 0), 1: ("peer", 2),
                                             2: ("local", 2), 3: ("local", 3)})
    assert plan.sends(2) == [1]
    assert recovery_plan(inv, 4, [6]) == RecoveryPlan(6, "disk",
                                                      {o: ("disk", None) for o in range(4)})
    assert recovery_plan(inv, 4, [5]).source == "memory"          # a tie goes to memory
    # holder 2 dead: owner 1 has no copy anywhere any more
    assert recovery_plan(inv, 4, [3], alive_holders=[0, 1, 3]).source == "disk"
    assert recovery_plan({0: {}, 1: {}}, 2, []) == RecoveryPlan(None, "scratch", {})
    # peer choice: the lowest-numbered holder other than the owner, whatever the dict order
    inv = {2: {0: [1], 1: [1], 2: [1]}, 1: {0: [1]}, 0: {1: [1]}}
    assert recovery_plan(inv, 3, []).fetch == {0: ("peer", 1), 1: ("peer", 0),
                                               2: ("local", 2)}


@pytest.mark.parametrize("args", [
    ({5: {}}, 2, []), ({0: {7: [1]}}, 2, []), ({0: {0: [-1]}}, 1, []), ({0: {0: [True]}}, 1, []),
    ({0: {0: [1]}}, 0, []), ({0: {0: [1]}}, 1, [-2]), ({0: {0: [1]}}, 1, [1.5]),
    ({0: []}, 1, []),
])
def test_bad_inputs_raise_one_line_errors(args):
    with pytest.raises(SnapshotError) as e:
        recovery_plan(*args)
    assert "\n" not in str(e.value) and isinstance(e.value, FaultlabError)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.integers(0, 10**6), st.lists(st.integers(0, 2**63 - 1), max_size=5)))
def test_inventory_json_round_trip(inv):
    text = inventory_to_json(inv)
    assert "\n" not in text
    assert inventory_from_json(text) == {o: sorted(set(s)) for o, s in sorted(inv.items())}
    assert inventory_from_json(text.encode()) == inventory_from_json(text)


@pytest.mark.parametrize("text, field", [
    ("", "not valid JSON"), ("[]", "not a JSON object"), ('{"a":[1]}', "key"),
    ('{"01":[1]}', "key"), ('{"-1":[1]}', "key"), ('{"1":3}', "not a list"),
    ('{"1":[2,1]}', r"steps\[1\]"), ('{"1":[1,1]}', r"steps\[1\]"), ('{"1":[-1]}', r"steps\[0\]"),
    ('{"1":[1.0]}', r"steps\[0\]"), ('{"1":[true]}', r"steps\[0\]"),
    ('{"1":[NaN]}', "NaN"), ('{"1":[1],"1":[2]}', "twice"), ('{"1":[' + "[" * 200 + "]" * 200
                                                              + "]}", "nested"),
    (b'{"1":"\xff"}', "not valid JSON"), (None, "not JSON text"),
    ('{"1":[9223372036854775808]}', r"steps\[0\]"),
])
def test_inventory_from_json_is_strict(text, field):
    with pytest.raises(SnapshotError, match=field) as e:
        inventory_from_json(text)
    assert "\n" not in str(e.value) and str(e.value).startswith("inventory")


def test_inventory_to_json_rejects_bad_values():
    for bad in ({-1: [1]}, {0: [-1]}, {"0": [1]}, {0: [1.5]}):
        with pytest.raises(SnapshotError):
            inventory_to_json(bad)
