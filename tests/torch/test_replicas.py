"""Replica emulation: a fault on replica k changes only replica k's gradient contribution, and
training is bit-reproducible (resume from any checkpoint equals the uninterrupted run)."""

import dataclasses

import numpy as np
import pytest
import torch

from faultlab.faults import FaultSpec, PositionSpec, Site, ValueSpec
from faultlab.workloads.base import default_config
from faultlab.backends.torch.trainer import TorchTrainer

RESNET = default_config("resnet18", width=4, input_size=16, replicas=4, per_replica_batch=4,
                        dataset="digits", steps_per_epoch=3, epochs=2, seed=5)
MLP = default_config("mlp", replicas=3, per_replica_batch=8, width=16, input_size=8,
                     dataset="digits", steps_per_epoch=4, epochs=2, seed=1, lr=1e-2)


def contributions(config, faults, step=2):
    tr = TorchTrainer(config)
    for s in range(step):
        tr.train_step(s)
    rec, remove = tr.replica_gradient_probe()
    tr.train_step(step, faults)
    remove()
    return rec


def fault(site, layer, replica, pos, step=2, value=1e3):
    return FaultSpec(site=site, layer=layer, value=ValueSpec("set", values=(value,)),
                     positions=PositionSpec("explicit", indices=(pos,)), replica=replica, step=step)


CASES = [
    (RESNET, Site.FWD_OUTPUT, "basicblock_2_basic_0_conv2", (1, 2, 1, 3)),
    (RESNET, Site.FWD_WEIGHT, "basicblock_3_basic_0_conv2", (1, 1, 10, 12)),
    (RESNET, Site.BWD_INPUT, "basicblock_4_basic_0_downsample", (3, 1, 1, 30)),
    (RESNET, Site.GRAD_WT, "conv1", (3, 3, 2, 1)),
    (MLP, Site.FWD_INPUT, "dense_2", (5, 7)),
    (MLP, Site.GRAD_IN, "dense_2", (0, 3)),
]


@pytest.mark.parametrize("config,site,layer,pos", CASES, ids=lambda v: getattr(v, "value", None))
def test_fault_on_replica_k_changes_only_replica_k_gradients(config, site, layer, pos):
    k = config.replicas - 2
    clean = contributions(config, [])
    hit = contributions(config, [fault(site, layer, k, pos)])
    assert set(clean) == set(hit) == set(range(config.replicas))
    for r in range(config.replicas):
        same = all(torch.equal(clean[r][n], hit[r][n]) for n in clean[r])
        assert same == (r != k), f"replica {r}: gradients {'unchanged' if same else 'changed'}"


def test_training_is_bit_reproducible_and_resumes_exactly():
    a = TorchTrainer(MLP)
    losses = [a.train_step(s).loss for s in range(8)]
    b = TorchTrainer(MLP)
    for s in range(3):
        b.train_step(s)
    state = b.get_state()
    c = TorchTrainer(MLP)
    with torch.no_grad():  # scramble: everything must come from the restored state
        for p in c.model.parameters():
            p.normal_()
    c.set_state(state)
    assert [c.train_step(s).loss for s in range(3, 8)] == losses[3:]
    end_a, end_c = a.get_state(), c.get_state()
    assert end_a.keys() == end_c.keys()
    assert all(np.array_equal(end_a[k], end_c[k]) for k in end_a)


def test_resnet_resume_with_batchnorm_and_dropout_is_bit_exact():
    a = TorchTrainer(RESNET)
    ref = [a.train_step(s) for s in range(5)]
    b = TorchTrainer(RESNET)
    b.train_step(0)
    b.train_step(1)
    c = TorchTrainer(RESNET)
    c.set_state(b.get_state())
    assert [c.train_step(s) for s in range(2, 5)] == ref[2:]
    assert c.evaluate() == a.evaluate()


# --- per-replica copies: a fault in one replica's mirrored state ---------------------------------

def state_fault(site, replica, step=2, tensor=None):
    return FaultSpec(site=site, layer="dense_2", tensor=tensor,
                     value=ValueSpec("set", values=(0.5,)),
                     positions=PositionSpec("explicit", indices=((3, 4),)), replica=replica,
                     step=step)


def run(faults, steps=4, spec=None):
    from faultlab.detectors.signals import SignalSpec
    tr = TorchTrainer(MLP)
    tr.signal_spec = spec or SignalSpec(history=False, replicas=True)
    out = [tr.train_step(s, [f for f in faults if f.step == s]) for s in range(steps)]
    return tr, out


def test_param_fault_forks_one_replica_and_its_checksum_diverges():
    k = 1
    clean_tr, clean = run([])
    tr, hit = run([state_fault(Site.PARAM, k)])
    # fault-free replicas agree, bit for bit
    assert all(len(set(m.signals.replica_checksums)) == 1 for m in clean)
    assert all(len(set(m.signals.replica_checksums)) == 1 for m in hit[:2])
    for m in hit[2:]:   # from the fault on, replica k's copy is its own
        c = m.signals.replica_checksums
        assert [i for i, x in enumerate(c) if x != c[0]] == [k]
    assert set(tr.copies.forks) == {k}
    # the other replicas' copies took only the (common) update: in the fault step replica 0
    # computed its gradient with the clean weights
    contrib_clean = contributions(MLP, [])
    contrib_hit = contributions(MLP, [state_fault(Site.PARAM, k)])
    for r in range(MLP.replicas):
        same = all(torch.equal(contrib_clean[r][n], contrib_hit[r][n]) for n in contrib_clean[r])
        assert same == (r != k)


def test_opt_state_fault_hits_only_that_replicas_moments():
    k = 2
    clean_tr, _ = run([], steps=3)
    tr, _ = run([state_fault(Site.OPT_STATE, k, tensor="m")], steps=3)
    clean, hit = clean_tr.get_state(), tr.get_state()
    # the shared copy (replicas 0, 1) is exactly the fault-free run's: the fault step's
    # gradients do not depend on the moments
    shared = {key: v for key, v in hit.items() if not key.startswith("replica")}
    assert shared.keys() == clean.keys()
    assert all(np.array_equal(clean[key], shared[key]) for key in clean)
    own = sorted(key for key in hit if key.startswith(f"replica{k}/"))
    assert own and all(key.startswith(f"replica{k}/") for key in hit if key.startswith("replica"))
    assert any("/optim/" in key for key in own) and any("/model/" in key for key in own)


def test_diverged_replicas_checkpoint_and_resume_bit_for_bit():
    faults = [state_fault(Site.PARAM, 1, step=1)]
    ref_tr, ref = run(faults, steps=6)
    tr, _ = run(faults, steps=3)
    state = tr.get_state()
    assert any(k.startswith("replica1/") for k in state)
    fresh = TorchTrainer(MLP)
    fresh.signal_spec = tr.signal_spec
    fresh.set_state(state)
    assert [fresh.train_step(s) for s in range(3, 6)] == ref[3:]
    assert fresh.evaluate() == ref_tr.evaluate()
    # restoring a state without forks removes them
    fresh.set_state(TorchTrainer(MLP).get_state())
    assert fresh.copies.forks == {}



LONG = default_config("mlp", replicas=3, per_replica_batch=8, width=512, input_size=8,
                      dataset="digits", steps_per_epoch=4, epochs=5, seed=1, lr=1e-2)


def protected(faults, detectors, every=5):
    from faultlab.detectors import default_suite
    from faultlab.replay.rollback import Protector
    with Protector(TorchTrainer(LONG), default_suite(detectors), every) as p:
        run = p.run(0, LONG.total_steps, faults)
        run.files = 1 + len(p._retired)
        return run


def plain(faults):
    tr = TorchTrainer(LONG)
    return [tr.train_step(s, [f for f in faults if f.active(s)]).loss
            for s in range(LONG.total_steps)]


def test_divergence_detector_catches_a_param_fault_on_one_replica_and_rollback_recovers():
    run = protected([state_fault(Site.PARAM, 1, step=7)], ["nonfinite", "divergence"])
    (d,) = run.detections
    assert (d.step, d.detector, d.rollback_to, d.transient) == (7, "divergence", 5, True)
    assert run.losses == plain([])      # as if the fault never happened, bit for bit


def test_checkpoints_grow_with_a_diverged_replica_and_rollback_restores_its_copy():
    """Undetected param faults fork replicas 1 and 2 at step 3 (dense_1 and dense_2 of each);
    the checkpoints at 5 and 10 hold their copies of those tensors too, more than the slots
    sized at step 0 take, so the protector moves to a file with larger slots; a NaN at 12
    rolls back to 10 and the replay ends exactly like the run with the param faults only."""
    param = [dataclasses.replace(state_fault(Site.PARAM, k, step=3), layer=layer)
             for k in (1, 2) for layer in ("dense_1", "dense_2")]
    nan = FaultSpec(site=Site.FWD_OUTPUT, layer="dense_2", value=ValueSpec("nan"),
                    positions=PositionSpec("explicit", indices=((1, 2),)), replica=0, step=12)
    run = protected(param + [nan], ["nonfinite"])
    (d,) = run.detections
    assert (d.step, d.rollback_to, d.transient) == (12, 10, True)
    assert run.files == 2
    assert run.losses == plain(param)
