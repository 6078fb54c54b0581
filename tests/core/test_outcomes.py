"""Outcome rules, each shown by a real trial on a small MLP (plus Crash and Hang from the
executor), and the rule function itself on constructed series."""

import pytest
from hypothesis import given, settings, strategies as st

from faultlab.runner.pool import LocalPool
from faultlab.faults import Duration, FaultSpec, PositionSpec, Site, ValueSpec
from faultlab.outcomes import OutcomeRules, classify
from faultlab.runner import Session
from faultlab.trials import Trial
from faultlab.workloads.base import default_config

#: tests/helpers: the `_trial_workloads` user workloads (importable in worker processes too)
HELPERS = __import__("pathlib").Path(__file__).resolve().parents[1] / "helpers"

CFG = default_config("mlp", replicas=2, per_replica_batch=16, width=32, input_size=8,
                     dataset="digits", steps_per_epoch=10, epochs=6, seed=0, lr=1e-2)
PERM = Duration("permanent")


def F(site, layer, value, positions, step, duration=Duration(), replica=0):
    return FaultSpec(site=site, layer=layer, value=value, positions=positions, replica=replica,
                     step=step, duration=duration, seed=1)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("FAULTLAB_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield Session(threads=1)
    mp.undo()


def outcome(session, *faults):
    return session.run_trial(Trial("t", CFG, tuple(faults)))


@pytest.mark.framework("torch")
def test_fault_free_trial_is_bit_exact_masked(session):
    r = outcome(session)
    assert r.outcome == "Masked" and r.bit_exact
    assert r.metrics["loss"] == r.metrics["golden_loss"]


@pytest.mark.framework("torch")
def test_nan_in_a_forward_output_is_immediate(session):
    r = outcome(session, F(Site.FWD_OUTPUT, "dense_2", ValueSpec("nan"),
                           PositionSpec("explicit", indices=((3, 5),)), 25, replica=1))
    assert r.outcome == "ImmediateINFsNaNs" and r.first_nonfinite_step == 25


@pytest.mark.framework("torch")
def test_weights_amplified_each_step_overflow_within_a_few_steps_short_term(session):
    r = outcome(session, F(Site.PARAM, "dense_1", ValueSpec("scale", factor=1e4),
                           PositionSpec("random", count=64), 25, PERM))
    assert r.outcome == "ShortTermINFsNaNs"
    assert 1 < r.first_nonfinite_step - 25 <= 20


@pytest.mark.framework("torch")
def test_slowly_amplified_weights_overflow_late_latent(session):
    r = outcome(session, F(Site.PARAM, "dense_1", ValueSpec("scale", factor=8.0),
                           PositionSpec("random", count=64), 10, PERM))
    assert r.outcome == "LatentINFsNaNs" and r.first_nonfinite_step - 10 > 20


@pytest.mark.framework("torch")
def test_dead_output_layer_is_a_sharp_degrade(session):
    r = outcome(session, F(Site.PARAM, "dense_3", ValueSpec("zero"),
                           PositionSpec("random", count=320), 25, PERM))
    assert r.outcome == "SharpDegrade"


@pytest.mark.framework("torch")
def test_sharp_drop_then_further_loss_is_sharp_slow_degrade(session):
    # the same units dead in every replica's copy of the weights (each replica holds its own)
    r = outcome(session, *[F(Site.PARAM, "dense_3", ValueSpec("zero"), PositionSpec("random", count=n),
                             step, PERM, replica=k)
                           for n, step in ((200, 20), (320, 35)) for k in range(CFG.replicas)])
    assert r.outcome == "SharpSlowDegrade"


@pytest.mark.framework("torch")
def test_slowly_degrading_unit_is_a_slow_degrade(session):
    r = outcome(session, F(Site.FWD_OUTPUT, "dense_2", ValueSpec("degrade", ramp=0.5),
                           PositionSpec("random", count=200), 20, PERM, replica=1))
    assert r.outcome == "SlowDegrade"


@pytest.mark.framework("torch")
def test_late_weight_loss_shows_only_in_test_accuracy(session):
    r = outcome(session, F(Site.PARAM, "dense_2", ValueSpec("zero"),
                           PositionSpec("random", count=500), 59))
    assert r.outcome == "LowTestAccuracy"
    assert r.golden_test_acc - r.final_test_acc > 0.02


@pytest.mark.framework("torch")
def test_low_mantissa_bitflip_is_masked(session):
    r = outcome(session, F(Site.PARAM, "dense_2", ValueSpec("bitflip", bit=3),
                           PositionSpec("explicit", indices=((1, 1),)), 30))
    assert r.outcome == "Masked" and not r.bit_exact


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("FAULTLAB_CACHE", str(tmp_path_factory.mktemp("cache_pool")))
    mp.syspath_prepend(str(HELPERS))
    mp.setenv("PYTHONPATH", str(HELPERS))
    with LocalPool(workers=1, threads=1, timeout=60) as p:
        yield p
    mp.undo()


@pytest.mark.framework("torch")
def test_a_fault_that_kills_the_process_is_a_crash_and_the_campaign_goes_on(pool):
    cfg = default_config("_trial_workloads:tripwire", replicas=2, per_replica_batch=8, width=16,
                         input_size=8, dataset="digits", steps_per_epoch=5, epochs=2, lr=1e-2)
    kill = F(Site.FWD_INPUT, "trip", ValueSpec("set", values=(1e31,)),
             PositionSpec("explicit", indices=((0, 0),)), 3)
    pool.golden([cfg])
    out = []
    pool.trials([Trial("boom", cfg, (kill,)), Trial("ok", cfg, ())], "c", out.append)
    by = {r.trial_id: r for r in out}
    assert by["boom"].outcome == "Crash" and "exit code 3" in by["boom"].error
    assert by["ok"].outcome == "Masked" and by["ok"].bit_exact


@pytest.mark.framework("torch")
def test_a_fault_that_blocks_forever_is_a_hang(tmp_path, monkeypatch):
    monkeypatch.setenv("FAULTLAB_CACHE", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(HELPERS))
    cfg = default_config("_trial_workloads:tripwire", replicas=2, per_replica_batch=8, width=16,
                         input_size=8, dataset="digits", steps_per_epoch=5, epochs=2, lr=1e-2)
    block = F(Site.FWD_INPUT, "trip", ValueSpec("set", values=(-12345.0,)),
              PositionSpec("explicit", indices=((0, 0),)), 3)
    out = []
    with LocalPool(workers=1, threads=1, timeout=600) as p:
        p.golden([cfg])
        p.timeout = 5  # a deadline for the blocked trial, not a timing assertion
        p.trials([Trial("stuck", cfg, (block,))], "c", out.append)
    assert [r.outcome for r in out] == ["Hang"]


# --- the rule function on constructed series ------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=60), st.data())
def test_identical_series_are_masked(acc, data):
    i = data.draw(st.integers(0, len(acc) - 1))
    c = classify(acc, acc, i, None, 0.5, 0.5, True)
    assert c.outcome == "Masked" and c.bit_exact


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 100), st.integers(0, 40))
def test_nonfinite_delay_decides_the_inf_nan_class(delay, short):
    rules = OutcomeRules(short_term_steps=max(short, 2))
    c = classify([0.5], [0.5], 0, delay, None, None, False, rules)
    expect = ("ImmediateINFsNaNs" if delay <= 1 else
              "ShortTermINFsNaNs" if delay <= rules.short_term_steps else "LatentINFsNaNs")
    assert c.outcome == expect


def test_rules_from_cli_pairs():
    r = OutcomeRules.from_pairs(["degrade=0.2", "window=3"])
    assert r.degrade == 0.2 and r.window == 3
    with pytest.raises(Exception, match="bad rule"):
        OutcomeRules.from_pairs(["nope=1"])
