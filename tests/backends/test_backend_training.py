"""Every backend trains reproducibly: a fault-free trial reproduces the golden run bit for bit
(and a fault makes the comparison fail), and the backend's checkpoint adapter round-trips a
training session through the checkpoint engine, so a fresh session restored from it goes on
bit-identical to the uninterrupted one."""

from __future__ import annotations

from faultlab.checkpointing import CheckpointEngine, recover
from faultlab.faults import FaultSpec, PositionSpec, Site, ValueSpec
from faultlab.outcomes import IMMEDIATE, MASKED
from faultlab.runner import Session
from faultlab.trials import Trial
from faultlab.workloads.base import default_config


def mlp(framework: str):
    """A workload small enough to train in a second or two on either framework."""
    return default_config("mlp", replicas=3, per_replica_batch=8, width=16, input_size=8,
                          dataset="digits", steps_per_epoch=4, epochs=2, seed=1, lr=1e-2,
                          framework=framework)


def test_fault_free_trial_reproduces_the_golden_run_bit_for_bit(backend, tmp_path, monkeypatch):
    monkeypatch.setenv("FAULTLAB_CACHE", str(tmp_path))
    cfg = mlp(backend.NAME)
    session = Session(threads=1)
    gold = session.golden(cfg)
    control = session.run_trial(Trial("control", cfg, (), horizon=None))
    assert control.outcome == MASKED and control.bit_exact
    assert control.metrics["loss"] == gold.loss
    # the comparison can fail: a NaN on one replica's output shows in that very step
    layer = next(n for n, sites in backend.BACKEND.operand_shapes(cfg).items()
                 if Site.FWD_OUTPUT in sites)
    nan = FaultSpec(site=Site.FWD_OUTPUT, layer=layer, value=ValueSpec("nan"),
                    positions=PositionSpec("explicit", indices=((1, 1),)), replica=0, step=5)
    hit = session.run_trial(Trial("nan", cfg, (nan,)))
    assert hit.outcome == IMMEDIATE and hit.first_nonfinite_step == 5 and not hit.bit_exact
    again = session.run_trial(Trial("control2", cfg, (), horizon=None))
    assert again.bit_exact and again.metrics["loss"] == gold.loss


def test_checkpoint_adapter_round_trips_a_session_through_the_engine(backend, tmp_path):
    """Train 2 steps, save through the engine, train on to 5; a fresh session (other seeds,
    other initial weights and RNG states) resumed from the file and trained to 5 ends with
    the same bits in every parameter, optimizer slot and generator state."""
    path = tmp_path / "run.ckpt"
    ref = backend.CheckpointSession(seed=0)
    assert isinstance(ref.adapter, backend.BACKEND.checkpoint_adapter())
    for _ in range(2):
        ref.step()
    with CheckpointEngine(path, chunk_bytes=4096) as engine:
        ref.adapter.save(engine, 2, data_position={"batch": ref.batch}).wait()
    for _ in range(3):
        ref.step()

    fresh = backend.CheckpointSession(seed=123)
    assert fresh.fingerprint() != ref.fingerprint()
    got = fresh.adapter.resume(lambda: recover(path))
    assert (got.step, got.data_position) == (2, {"batch": 2})
    fresh.batch = got.data_position["batch"]
    for _ in range(3):
        fresh.step()
    (sa, ma), (sb, mb) = ref.fingerprint(), fresh.fingerprint()
    assert sa.keys() == sb.keys()
    assert [k for k in sa if sa[k] != sb[k]] == []
    assert ma == mb
