"""The TensorFlow trainer runs the plain step (no injection point) whenever no fault is armed
in the graph, and the step with the points only when one fires. Both are traced once and do
the same arithmetic bit for bit while nothing fires, so a run that switches between them step
by step ends bit-identical to one that never does (loss, every variable, optimizer slots and
BatchNorm statistics included), and a fault does to training exactly what it did when every
step carried the points."""

from __future__ import annotations

import numpy as np
import pytest

from faultlab.detectors import SignalSpec
from faultlab.faults import FaultSpec, PositionSpec, Site, ValueSpec
from faultlab.workloads.base import default_config
from faultlab.backends.tf.trainer import TFTrainer

RESNET = default_config("resnet18", width=4, input_size=16, replicas=2, per_replica_batch=4,
                        dataset="digits", steps_per_epoch=3, epochs=2, seed=5, framework="tf")
MLP = default_config("mlp", replicas=3, per_replica_batch=8, width=16, input_size=8,
                     dataset="digits", steps_per_epoch=4, epochs=2, seed=1, lr=1e-2,
                     framework="tf")
TRANSFORMER = default_config("transformer", replicas=2, per_replica_batch=4, width=16,
                             input_size=16, steps_per_epoch=3, epochs=2, seed=3,
                             framework="tf")
STEPS = 5


def bitwise(a: dict, b: dict) -> list[str]:
    """The keys whose arrays differ in a single bit (or that only one side has)."""
    return sorted(k for k in set(a) | set(b)
                  if k not in a or k not in b or a[k].tobytes() != b[k].tobytes())


def run(t: TFTrainer, state: dict, points_at, faults=()) -> tuple[list, dict]:
    """Train STEPS steps from `state`; the step with the points at the steps in points_at
    (armed or not), the dispatched step elsewhere. Returns (losses, final state)."""
    t.set_state(state)
    losses = []
    for s in range(STEPS):
        t.dispatch = s not in points_at
        losses.append(t.train_step(s, [f for f in faults if f.active(s)]).loss)
    t.dispatch = True
    return losses, t.get_state()


@pytest.fixture(scope="module", params=[RESNET, MLP, TRANSFORMER],
                ids=["resnet18", "mlp", "transformer"])
def trainer(request):
    return TFTrainer(request.param)


def test_plain_and_unfired_instrumented_steps_are_bit_identical(trainer):
    t = trainer
    start = t.get_state()
    golden_losses, golden = run(t, start, points_at=())          # plain step every time
    alt_losses, alt = run(t, start, points_at=range(1, STEPS, 2))  # switching each step
    all_losses, every = run(t, start, points_at=range(STEPS))   # the points every step
    assert alt_losses == golden_losses == all_losses
    assert bitwise(golden, alt) == [] and bitwise(golden, every) == []
    assert len(golden) > len(t.model.weights)      # optimizer slots are compared too
    assert t._steps and t._point_steps             # both steps ran
    assert all(fn.experimental_get_tracing_count() == 1
               for fn in list(t._steps.values()) + list(t._point_steps.values()))


def test_a_fault_does_what_it_did_when_every_step_carried_the_points(trainer):
    t = trainer
    layer = next(n for n, i in t.injector.layers.items() if i.kind is not None)
    f = FaultSpec(site=Site.FWD_OUTPUT, layer=layer, value=ValueSpec("bitflip", bit=22),
                  positions=PositionSpec("random", count=3), replica=1, step=2, seed=11)
    start = t.get_state()
    clean_losses, _ = run(t, start, points_at=())
    losses, state = run(t, start, points_at=(), faults=[f])       # points at step 2 only
    old_losses, old = run(t, start, points_at=range(STEPS), faults=[f])
    assert losses == old_losses and bitwise(state, old) == []
    assert losses[:2] == clean_losses[:2] and losses[2:] != clean_losses[2:]
    assert all(fn.experimental_get_tracing_count() == 1
               for fn in list(t._steps.values()) + list(t._point_steps.values()))


def test_the_plain_step_reports_the_same_abft_residuals_as_the_points(trainer):
    t = trainer
    t.signal_spec = SignalSpec(history=True, grads=True, params=True, replicas=True, abft=True)
    try:
        start = t.get_state()
        t.set_state(start)
        plain = [t.train_step(s).signals for s in range(2)]
        t.set_state(start)
        t.dispatch = False
        points = [t.train_step(s).signals for s in range(2)]
    finally:
        t.dispatch = True
        t.signal_spec = None
    assert [s.abft_residual for s in plain] == [s.abft_residual for s in points]
    assert all(np.isfinite(s.abft_residual) for s in plain)
    assert [s.replica_checksums for s in plain] == [s.replica_checksums for s in points]
    assert [s.grad_norm for s in plain] == [s.grad_norm for s in points]


def test_a_trainer_with_the_stock_optimizer_still_trains_the_same_model():
    """The unmodified Keras step (TensorFlow's default Grappler options, for benchmarks) is
    the same computation up to rounding: its arithmetic optimizer reorders sums."""
    t, stock = TFTrainer(RESNET, instrumented=False), TFTrainer(RESNET, instrumented=False,
                                                                 stock_optimizer=True)
    stock.set_state(t.get_state())
    a, b = t.train_step(0).loss, stock.train_step(0).loss
    assert a == pytest.approx(b, rel=1e-5)


def _trial(t: TFTrainer, state: dict, faults, mode: str) -> tuple[list, dict]:
    t.set_state(state)
    t.specialise.mode = mode
    try:
        losses = [t.train_step(s, [f for f in faults if f.active(s)]).loss
                  for s in range(STEPS)]
    finally:
        t.specialise.mode = "auto"
    return losses, t.get_state()


def _faults(t: TFTrainer) -> list[list[FaultSpec]]:
    """One fault per graph site family, on a linear layer (the backward operands too), on
    replica 1, firing at steps 1 and 3 (a permanent one from step 2 for grad_wt)."""
    linear = [n for n, i in t.injector.layers.items() if i.kind is not None]
    layer = linear[len(linear) // 2]     # not the first: its input gradient goes nowhere
    other = [n for n in t.injector.layers if n != layer][-1]
    flip = ValueSpec("bitflip", bit=22)

    def f(site, at=1, **kw):
        return FaultSpec(site=site, layer=kw.pop("layer", layer), value=flip,
                         positions=PositionSpec("random", count=2), replica=1, step=at,
                         seed=13, **kw)
    return [[f(Site.FWD_OUTPUT), f(Site.FWD_INPUT, at=3)],
            [f(Site.GRAD_OUT), f(Site.GRAD_IN, at=3, layer=other)],
            [f(Site.BWD_INPUT), f(Site.BWD_WEIGHT, at=3)],
            [f(Site.FWD_WEIGHT), f(Site.GRAD_WT, at=2)]]


def test_a_step_specialised_to_the_armed_points_fires_the_same_bits_as_the_shared_one(trainer):
    """The shared step (every point) and the steps with only the armed points compute the
    same bits when a fault fires and when none does: which one runs is a matter of time."""
    t = trainer
    start = t.get_state()
    _, clean = run(t, start, points_at=())
    for faults in _faults(t):
        shared_losses, shared = _trial(t, start, faults, "shared")
        own_losses, own = _trial(t, start, faults, "specialised")
        assert own_losses == shared_losses, faults[0].site
        assert bitwise(own, shared) == [], faults[0].site
        assert bitwise(own, clean) != [], faults[0].site     # the faults did fire
    assert len(t._armed_steps) >= 4                    # one per armed pattern (kept: 8)
    assert all(fn.experimental_get_tracing_count() == 1
               for fn in list(t._steps.values()) + list(t._point_steps.values())
               + list(t._armed_steps.values()))


def test_auto_traces_a_pattern_its_own_step_once_the_shared_one_has_cost_as_much():
    from faultlab.backends.tf.trainer import SpecialisePolicy
    p = SpecialisePolicy()
    a, b = frozenset({(0, 2)}), frozenset({(1, 5)})
    assert not p.choose(a, have=False)           # nothing known yet: the shared step
    p.ran("plain", 5.0, first=True)              # a first call: trace + run, 5 s
    for _ in range(3):
        p.ran("plain", 0.125)
    assert p.trace_s == 5.0
    for _ in range(39):
        p.ran("shared", 0.25, a)                 # 0.125 s over the plain step each
    assert not p.choose(a, have=False)           # 4.875 s paid on a: not yet
    p.ran("shared", 0.25, a)
    assert p.choose(a, have=False)               # 5.0 s: a trace is paid for
    assert not p.choose(b, have=False)           # per pattern
    assert p.choose(b, have=True)                # a traced pattern keeps its step
    p.mode = "shared"
    assert not p.choose(a, have=True)
    with pytest.raises(Exception, match="specialise must be one of"):
        SpecialisePolicy("sometimes")
