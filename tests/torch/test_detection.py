"""Detectors, rollback to a persisted checkpoint, deterministic replay, recovery policies."""

import math

import pytest
from hypothesis import given, settings, strategies as st

from faultlab.results.coverage import coverage
from faultlab.detectors import (ABFTDetector, DetectorSuite, HistoryBound, NonFinite,
                                ReplicaDivergence, Signals, SignalSpec, Spike, default_suite)
from faultlab.detectors.base import Verdict
from faultlab.errors import SpecError
from faultlab.faults import Duration, FaultSpec, PositionSpec, Site, ValueSpec
from faultlab.replay import Protector
from faultlab.results import TrialResult
from faultlab.runner import DetectOptions, Session
from faultlab.trials import Trial
from faultlab.workloads.base import default_config
from faultlab.backends.torch.trainer import TorchTrainer

CFG = default_config("mlp", replicas=2, per_replica_batch=16, width=32, input_size=8,
                     dataset="digits", steps_per_epoch=10, epochs=5, seed=0, lr=1e-2)


def sig(step=0, loss=1.0, grad=1.0, m=None, **kw):
    return Signals(step=step, loss=loss, grad_norm=grad, m_max=m or {"a": 0.1}, **kw)


def nan_fault(step, duration=Duration(), replica=1):
    return FaultSpec(site=Site.FWD_OUTPUT, layer="dense_2", value=ValueSpec("nan"),
                     positions=PositionSpec("explicit", indices=((3, 5),)), replica=replica,
                     step=step, duration=duration, seed=1)


@pytest.fixture(scope="module")
def golden_losses():
    tr = TorchTrainer(CFG)
    return [tr.train_step(s).loss for s in range(CFG.total_steps)]


# --- detectors -----------------------------------------------------------------------------

def test_nonfinite_catches_loss_gradient_moment_and_parameters():
    d = NonFinite()
    assert d.observe(sig()) is None
    assert "loss" in d.observe(sig(loss=math.nan)).reason
    assert "gradient" in d.observe(sig(grad=math.inf)).reason
    assert "moment" in d.observe(sig(m={"conv1": math.nan})).reason
    assert "parameters" in d.observe(sig(param_norm=math.inf)).reason


def test_history_bound_is_the_artifacts_bound_on_adam_m():
    assert HistoryBound().observe(sig(m={"conv1": 4.9})) is None
    assert HistoryBound().observe(sig(m={"conv1": 5.1})) is not None
    d = HistoryBound(bound=20.0)   # the artifact's setting
    assert d.observe(sig(m={"conv1": 19.9})) is None
    v = d.observe(sig(m={"conv1": 0.1, "dense": 25.0}))
    assert v.detector == "history" and "dense" in v.reason


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.5, 2.0), min_size=12, max_size=60), st.floats(50, 1e30))
def test_spike_stays_quiet_on_its_own_range_and_fires_on_a_spike(history, factor):
    d = Spike()
    for i, x in enumerate(history):
        d.observe(sig(i, loss=x, grad=x))
    n = len(history)
    for j, x in enumerate(sorted(set(history))):   # nothing inside the seen range alarms
        assert d.observe(sig(n + j, loss=x, grad=x)) is None
    assert d.observe(sig(2 * n, loss=max(history) * factor, grad=1.0)) is not None


def test_spike_does_not_learn_from_anomalous_steps():
    d = Spike(warmup=3)
    for i in range(5):
        d.observe(sig(i, loss=1.0 + 0.01 * i))
    for i in range(5, 40):  # a run stuck at a huge loss keeps alarming
        assert d.observe(sig(i, loss=1e6)) is not None


def test_divergence_and_abft():
    assert ReplicaDivergence().observe(sig(replica_checksums=[1.0, 1.0, 1.0])) is None
    assert "replica 2" in ReplicaDivergence().observe(sig(replica_checksums=[1.0, 1.0, 2.0])).reason
    assert ABFTDetector().observe(sig(abft_residual=1e-6)) is None
    assert ABFTDetector().observe(sig(abft_residual=0.5)) is not None
    assert ABFTDetector().observe(sig(abft_residual=math.nan)) is not None


def test_suite_snapshot_rolls_history_back_but_keeps_persistent_state():
    class Once:
        name, needs, PERSISTENT = "once", SignalSpec(history=False), ("seen",)

        def __init__(self):
            self.seen, self.count = set(), 0

        def observe(self, s):
            self.count += 1
            if s.step not in self.seen:
                self.seen.add(s.step)
                return Verdict("once", s.step, "")
    d = Once()
    suite = DetectorSuite([d])
    snap = suite.snapshot()
    assert suite.observe(sig(5)) is not None
    suite.restore(snap)
    assert d.count == 0 and d.seen == {5}
    assert suite.observe(sig(5)) is None


def test_unknown_detector_is_a_spec_error():
    with pytest.raises(SpecError, match="unknown detector"):
        default_suite(["nope"])


def test_trainer_signals_do_not_change_training(golden_losses):
    tr = TorchTrainer(CFG)
    tr.signal_spec = SignalSpec(history=True, params=True, abft=True)
    ms = [tr.train_step(s) for s in range(10)]
    assert [m.loss for m in ms] == golden_losses[:10]
    s = ms[-1].signals
    assert s.grad_norm > 0 and set(s.m_max) == {"dense_1", "dense_2", "dense_3"}
    assert s.abft_residual < 1e-3 and math.isfinite(s.param_norm)


def test_abft_sees_a_corrupted_output_and_a_corrupted_kernel_operand():
    tr = TorchTrainer(CFG)
    tr.signal_spec = SignalSpec(abft=True)
    for site in (Site.FWD_OUTPUT, Site.FWD_WEIGHT):
        f = FaultSpec(site=site, layer="dense_2", value=ValueSpec("set", values=(40.0,)),
                      positions=PositionSpec("explicit", indices=((1, 2),)), step=0)
        assert tr.train_step(0, [f]).signals.abft_residual > 0.01


# --- rollback and replay ---------------------------------------------------------------------

def protect(faults, policy="stop", detectors=None, every=10):
    tr = TorchTrainer(CFG)
    with Protector(tr, detectors or default_suite(), every, policy) as p:
        return p.run(0, CFG.total_steps, faults)


def test_transient_fault_is_detected_rolled_back_and_recovered_bit_exactly(golden_losses):
    run = protect([nan_fault(25)])
    (d,) = run.detections
    assert (d.step, d.detector, d.rollback_to, d.transient, d.action) == (25, "nonfinite", 20, True, "recovered")
    assert d.steps_replayed == 6 and run.recovered
    assert run.losses == golden_losses     # the run ends as if the fault never happened


def test_permanent_fault_repeats_on_replay_and_is_reported_not_transient():
    run = protect([nan_fault(25, Duration("permanent"))])
    (d,) = run.detections
    assert d.transient is False and d.action == "stopped" and run.stopped_at == 25
    assert d.attempts == 2     # the newest checkpoint and the one before it were both tried


def test_skip_policy_drops_the_anomalous_steps_update():
    run = protect([nan_fault(25, Duration("permanent"))], policy="skip")
    assert [d.action for d in run.detections][:3] == ["skipped"] * 3
    assert run.stopped_at is not None      # at most max_skips (3) in a row, then stop
    assert all(math.isfinite(x) for x in run.losses[:-1])


def test_lower_lr_policy_reruns_the_step_more_gently():
    big_grad = FaultSpec(site=Site.GRAD_WT, layer="dense_2", value=ValueSpec("scale", factor=1e9),
                         positions=PositionSpec("random", count=64), step=25,
                         duration=Duration("permanent"), seed=2)
    run = protect([big_grad], policy="lower_lr", detectors=default_suite(["history"]))
    assert run.detections[0].transient is False
    assert run.detections[0].action in ("lowered_lr", "stopped")


def test_intermittent_fault_is_redrawn_on_replay():
    f = nan_fault(25, Duration("intermittent", probability=0.5))
    # the draw at step 25 fires on first execution; a replay draws again
    assert f.active(25) and any(not f.active(25, attempt) for attempt in range(1, 20))


def test_rollback_goes_past_a_checkpoint_that_already_holds_the_corruption(golden_losses):
    """The fault at 19 lands in the checkpoint taken at 20; the detector only sees it at 21.
    Replay from 20 repeats the anomaly, replay from 10 (the fault does not re-fire) is clean."""
    class LateParam:
        name, needs, PERSISTENT = "late", SignalSpec(history=False, params=True), ()

        def __init__(self):
            self.base = None

        def observe(self, s):
            if s.step == 18:
                self.base = s.param_norm
            if s.step >= 21 and self.base is not None and s.param_norm > self.base + 1e3:
                return Verdict("late", s.step, "parameter norm jumped")
    hit = FaultSpec(site=Site.PARAM, layer="dense_2", value=ValueSpec("set", values=(1e4,)),
                    positions=PositionSpec("explicit", indices=((0, 0),)), step=19)
    run = protect([hit], detectors=DetectorSuite([LateParam()]))
    (d,) = run.detections
    assert d.step == 21 and d.transient and d.rollback_to == 10 and d.attempts == 2
    assert run.losses == golden_losses


def test_protected_trial_records_detection_and_outcome_after(tmp_path, monkeypatch):
    monkeypatch.setenv("FAULTLAB_CACHE", str(tmp_path))
    s = Session(threads=1, detect=DetectOptions())
    r = s.run_trial(Trial("t", CFG, (nan_fault(25),)))
    assert r.outcome == "ImmediateINFsNaNs"
    assert (r.detected, r.detect_step, r.detector, r.recovered) == (True, 25, "nonfinite", True)
    assert r.outcome_after == "Masked" and r.metrics["protected"]["bit_exact"]
    ctrl = s.run_trial(Trial("c", CFG, ()))
    assert ctrl.detected is False and ctrl.outcome_after == "Masked"


def test_coverage_counts_per_class_latency_and_before_after():
    def res(tid, outcome, detected, after, inject=10, det=10, faults=({"site": "x"},)):
        return TrialResult(campaign="c", trial_id=tid, source="", framework="torch",
                           workload="mlp", workload_key="k", faults=list(faults), outcome=outcome,
                           bit_exact=False, inject_step=inject, detected=detected,
                           detect_step=det if detected else None, recovered=detected,
                           outcome_after=after,
                           metrics={"protected": {"detections": [{"steps_replayed": 5, "recovery_s": 0.1}] if detected else []}})
    rs = [res("a", "ImmediateINFsNaNs", True, "Masked"), res("b", "SlowDegrade", True, "Masked", det=12),
          res("c", "SlowDegrade", False, "SlowDegrade"), res("d", "Masked", False, "Masked"),
          res("e", "Masked", False, "Masked", faults=())]
    c = coverage(rs)
    assert (c["non_masked"], c["non_masked_detected"]) == (3, 2)
    assert {r["outcome"]: (r["trials"], r["detected"]) for r in c["by_outcome"]} == {
        "Masked": (2, 0), "ImmediateINFsNaNs": (1, 1), "SlowDegrade": (2, 1)}
    assert c["latency_steps"]["max"] == 2 and c["steps_lost"] == 10
    assert c["control_trials"] == 1 and c["control_false_positives"] == 0
    assert c["before_after"]["SlowDegrade"] == {"Masked": 1, "SlowDegrade": 1}


def test_replay_rerun_reports_recovery_against_both_bounds(capsys):
    """`faultlab replay --rerun` on a small workload: every rerun recovers, and the recovery
    is reported with the load priced at the disk's (O_DIRECT) and the page cache's bandwidth
    and the replayed steps at the protected run's own first executions."""
    from faultlab import cli
    rc = cli.main(["replay", "--rerun", "--workload", "mlp", "--steps", "20", "--every", "10",
                   "--checkpoint-every", "5"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "recovery (detection -> training resumed)" in out
    assert "O_DIRECT" in out and "first time" in out


def test_disk_read_bandwidth_direct_and_cached(tmp_path):
    from faultlab.replay.overhead import disk_read_bandwidth
    assert disk_read_bandwidth(tmp_path, 4 << 20) > 0
    assert disk_read_bandwidth(tmp_path, 4 << 20, direct=True) > 0
    assert not list(tmp_path.iterdir())          # the probe file is gone
