"""Detection, rollback and deterministic replay on TensorFlow: the TF trainer fills the same
framework-free Signals as torch (Adam history, gradient and parameter norms, per-replica
checksums of each replica's own variables, ABFT residuals) without changing training or
retracing per fault; the Protector rolls a TF run back and replays it bit for bit; a fault on
one replica's copy of the weights is caught by the divergence detector; golden signals raise no
false positive; the campaigns end Masked after recovery through the command line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from faultlab.detectors import SignalSpec, default_suite
from faultlab.faults import Duration, FaultSpec, PositionSpec, Site, ValueSpec
from faultlab.replay.overhead import false_positives
from faultlab.replay import Protector
from faultlab.runner import DetectOptions, Session
from faultlab.trials import Trial
from faultlab.workloads.base import default_config
from faultlab.backends.tf import BACKEND

from _clihelpers import HEADER, REPO, TINY, env_for as _env, finish as _finish, start as _start

MLP = default_config("mlp", replicas=3, per_replica_batch=8, width=16, input_size=8,
                     dataset="digits", steps_per_epoch=5, epochs=3, seed=1, lr=1e-2,
                     framework="tf")
EVERYTHING = SignalSpec(history=True, grads=True, bound=0.0, params=True, replicas=True,
                        abft=True)


def fault(site, layer, pos, step, value=40.0, replica=1, tensor=None, model="set", **kw):
    vs = ValueSpec(model, values=(value,)) if model == "set" else ValueSpec(model, **kw)
    return FaultSpec(site=site, layer=layer, value=vs, tensor=tensor, replica=replica,
                     positions=PositionSpec("explicit", indices=(pos,)), step=step, seed=3,
                     duration=kw.get("duration", Duration()))


@pytest.fixture
def t():
    """The backend's trainer of MLP (built once, then handed out again reset to the initial
    state, as in a worker process)."""
    return BACKEND.build_trainer(MLP)


@pytest.fixture(scope="module")
def golden():
    """The fault-free run's losses and final state, unprotected."""
    trainer = BACKEND.build_trainer(MLP)
    losses = [trainer.train_step(s).loss for s in range(MLP.total_steps)]
    return losses, trainer.get_state()


def same_state(a, b) -> bool:
    return sorted(a) == sorted(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_signals_leave_training_bit_identical_and_fault_free_replicas_agree(t, golden):
    t.signal_spec = EVERYTHING
    ms = [t.train_step(s) for s in range(MLP.total_steps)]
    assert [m.loss for m in ms] == golden[0] and same_state(t.get_state(), golden[1])
    for m in ms:
        s = m.signals
        assert set(s.m_max) == {"dense_1", "dense_2", "dense_3"}
        assert all(0 < v < 1 for v in s.m_max.values()) and 0 < s.m_other < 1
        assert s.grad_norm > 0 and math.isfinite(s.param_norm) and s.abft_residual < 1e-4
        assert len(s.replica_loss) == 3 and s.loss == pytest.approx(np.mean(s.replica_loss))
        assert len(s.replica_checksums) == 3 and len(set(s.replica_checksums)) == 1
    assert len({m.signals.replica_checksums[0] for m in ms}) == len(ms)   # state changes
    # unprotected steps run the plain step function again; nothing was traced twice
    t.signal_spec = None
    assert t.train_step(0).signals is None
    assert (False, None) in t._steps and (False, t._signal_key(EVERYTHING)) in t._steps
    assert all(fn.experimental_get_tracing_count() == 1 for fn in t._steps.values())


def test_gradient_norm_is_the_all_reduced_gradients_norm(t):
    state = t.get_state()
    per = t.replica_gradients(0)          # each replica's contribution, before the all-reduce
    t.set_state(state)
    t.signal_spec = SignalSpec(history=False, grads=True)
    got = t.train_step(0).signals.grad_norm
    total = [sum(per[r][k].astype(np.float64) for r in per) for k in per[0]]
    assert got == pytest.approx(math.sqrt(sum(float(np.sum(g * g)) for g in total)), rel=1e-5)


@pytest.mark.parametrize("site,layer,pos,tensor", [
    (Site.PARAM, "dense_2", (4, 7), "weight"),
    (Site.OPT_STATE, "dense_1", (3, 2), "m"),
], ids=["param", "opt_state"])
def test_a_fault_on_one_replicas_copy_is_caught_by_divergence_and_recovered(
        t, golden, site, layer, pos, tensor):
    f = fault(site, layer, pos, 7, value=1e-3, replica=2, tensor=tensor)
    with Protector(t, default_suite(["divergence"]), checkpoint_every=5) as p:
        run = p.run(0, MLP.total_steps, [f])
    (d,) = run.detections
    assert (d.step, d.detector, d.rollback_to, d.transient, d.action) == \
        (7, "divergence", 5, True, "recovered")
    assert "replica 2" in d.reason
    assert run.losses == golden[0] and same_state(t.get_state(), golden[1])


def test_fault_free_run_raises_no_alarm_with_every_detector(t, golden):
    with Protector(t, default_suite(["nonfinite", "history", "spike", "divergence", "abft"]),
                   checkpoint_every=5) as p:
        run = p.run(0, MLP.total_steps)
    assert run.detections == [] and run.losses == golden[0]


def test_nan_on_one_replica_is_rolled_back_and_replayed_bit_exactly(t, golden):
    with Protector(t, default_suite(), checkpoint_every=5) as p:
        run = p.run(0, MLP.total_steps, [fault(Site.FWD_OUTPUT, "dense_1", (2, 3), 12,
                                               model="nan")])
    (d,) = run.detections
    assert (d.step, d.detector, d.rollback_to, d.transient, d.action) == \
        (12, "nonfinite", 10, True, "recovered")
    assert d.steps_replayed == 3 and run.recovered
    assert run.losses == golden[0] and same_state(t.get_state(), golden[1])
    # one trace for the suite's signals, whatever fired and whatever was replayed
    key = t._signal_key(default_suite().spec)
    assert t._steps[(False, key)].experimental_get_tracing_count() == 1


def test_abft_sees_a_corrupted_output_and_kernel_operand_not_a_corrupted_input(t):
    t.signal_spec = SignalSpec(history=False, abft=True)
    state = t.get_state()
    for site, expect in ((Site.FWD_OUTPUT, True), (Site.FWD_WEIGHT, True),
                         (Site.FWD_INPUT, False)):
        t.set_state(state)
        r = t.train_step(0, [fault(site, "dense_2", (1, 2), 0)]).signals.abft_residual
        assert (r > 1e-2) is expect, (site, r)


def test_lr_scale_scales_the_step_and_a_reused_trainer_resets_it(t, golden):
    t.lr_scale, t.signal_spec = 0.1, EVERYTHING
    t.train_step(0)
    gentle = t.train_step(1).loss
    t = BACKEND.build_trainer(MLP)
    assert t.lr_scale == 1.0 and t.signal_spec is None
    assert [t.train_step(s).loss for s in range(2)] == golden[0][:2] and gentle != golden[0][1]


def test_lower_lr_policy_reruns_a_repeating_anomaly_gently_on_tf(t):
    big = FaultSpec(site=Site.GRAD_WT, layer="dense_2", value=ValueSpec("scale", factor=1e9),
                    positions=PositionSpec("random", count=64), step=8,
                    duration=Duration("permanent"), seed=2)
    with Protector(t, default_suite(["history"]), checkpoint_every=5, policy="lower_lr") as p:
        run = p.run(0, MLP.total_steps, [big])
    d = run.detections[0]
    assert d.step == 8 and d.transient is False and d.action in ("lowered_lr", "stopped")
    assert t.lr_scale == 1.0


def test_golden_signals_raise_no_false_positive(tmp_path, monkeypatch):
    monkeypatch.setenv("FAULTLAB_CACHE", str(tmp_path))
    gold = Session(threads=1).golden(MLP)
    assert len(gold.signals) == MLP.total_steps
    assert all(s["grad_norm"] > 0 and len(s["m_max"]) == 3 for s in gold.signals)
    assert false_positives(gold.signals)["alarms"] == 0
    s = Session(threads=1, detect=DetectOptions(checkpoint_every=5))
    r = s.run_trial(Trial("control", MLP, ()))
    assert r.detected is False and r.outcome == r.outcome_after == "Masked" and r.bit_exact


# --- the command line -------------------------------------------------------------------------

CAMPAIGN = f"""{HEADER}
nan,tf,{TINY},fwd_output,dense_1,,0,1,2,nan,,0/0
control,tf,{TINY},,,,,,,,,
param,tf,{TINY},param,dense_2,weight,1,2,0,set,0.5,3/4
"""


def test_run_detect_on_tensorflow_recovers_every_trial(tmp_path, faultlab_cache):
    (tmp_path / "camp.csv").write_text(CAMPAIGN)
    p = _finish(_start(["run", "camp.csv", "--detect", "--expect-after", "Masked",
                        "--detectors", "nonfinite,history,spike,divergence,abft",
                        "--checkpoint-every", "5", "--json"], tmp_path, _env(faultlab_cache)))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    trials = {t["trial_id"]: t for t in json.loads(p.stdout)["trials"]}
    assert (trials["nan"]["detected"], trials["nan"]["detector"], trials["nan"]["detect_step"]) \
        == (True, "nonfinite", 7)
    assert (trials["param"]["detected"], trials["param"]["detector"]) == (True, "divergence")
    assert trials["control"]["detected"] is False
    for t in trials.values():
        assert t["outcome_after"] == "Masked"
        assert t["metrics"]["protected"]["bit_exact"] is True, t["trial_id"]


@pytest.mark.slow
@pytest.mark.parametrize("campaign,outcome,detected", [
    ("inj_immediate_infs_nans", "ImmediateINFsNaNs", True),
    ("inj_slow_degrade", "SlowDegrade", True),
    ("inj_masked", "Masked", False)])
def test_isca_campaigns_are_detected_and_end_masked_on_tensorflow(tmp_path, faultlab_cache,
                                                                  campaign, outcome, detected):
    env = _env(faultlab_cache)
    args = [REPO / "campaigns" / f"{campaign}.csv", "--framework", "tf",
            "--results", tmp_path / "r.sqlite", "--json"]
    p = _finish(_start(["run", *args, "--detect", "--expect", outcome, "--expect-after",
                        "Masked"], tmp_path, env))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    (t,) = json.loads(p.stdout)["trials"]
    assert t["detected"] is detected and t["outcome_after"] == "Masked"
    protected = t["metrics"]["protected"]
    if detected:   # recovered: the run ends as if the fault never happened
        assert t["recovered"] is True and t["detect_step"] - t["inject_step"] <= 1
        assert protected["bit_exact"] is True
    else:          # no alarm: protection changed nothing in the (masked) faulty run
        assert protected["loss"] == t["metrics"]["loss"] and protected["detections"] == []
    # the coverage report over the same results (nothing re-run): golden signals are clean
    p = _finish(_start(["detect", "--campaign", *args], tmp_path, env))
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads(p.stdout)
    assert doc["golden_false_positives"]["alarms"] == 0
    assert doc["coverage"]["masked_with_alarm"] == 0
