"""The TensorFlow backend: a fault on replica k changes only replica k's gradients before the
all-reduce; training is bit-reproducible and resumes exactly from any state (replica copies
that a state fault made diverge included); a fault-free trial reproduces the golden run bit
for bit; BatchNorm overflows as an fp32 accelerator does; strategies are chosen as documented."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from faultlab.errors import FaultlabError
from faultlab.faults import Duration, FaultSpec, PositionSpec, Site, ValueSpec
from faultlab.workloads.base import default_config
from faultlab.backends.tf import BACKEND
from faultlab.backends.tf.trainer import TFTrainer, select_strategy

RESNET = default_config("resnet18", width=4, input_size=16, replicas=2, per_replica_batch=4,
                        dataset="digits", steps_per_epoch=3, epochs=2, seed=5, framework="tf")
MLP = default_config("mlp", replicas=3, per_replica_batch=8, width=16, input_size=8,
                     dataset="digits", steps_per_epoch=4, epochs=2, seed=1, lr=1e-2,
                     framework="tf")


@pytest.fixture(scope="module")
def resnet():
    return TFTrainer(RESNET, probe=True)


@pytest.fixture(scope="module")
def mlp():
    return TFTrainer(MLP, probe=True)


def fault(site, layer, replica, pos, step, value=1e3, tensor=None, model="set", **kw):
    """pos: one explicit position, or a number of random positions (for backward sites, whose
    effect a single position can lose behind an inactive ReLU or an all-zero input patch)."""
    vs = ValueSpec(model, values=(value,), **kw) if model == "set" else ValueSpec(model, **kw)
    positions = (PositionSpec("random", count=pos) if isinstance(pos, int)
                 else PositionSpec("explicit", indices=(pos,)))
    return FaultSpec(site=site, layer=layer, value=vs, tensor=tensor, positions=positions,
                     replica=replica, step=step, seed=11)


def same(a, b) -> bool:
    return np.asarray(a).tobytes() == np.asarray(b).tobytes()


def contributions(trainer, faults, step=2):
    state = trainer.get_state()
    try:
        return trainer.replica_gradients(step, faults)
    finally:
        trainer.set_state(state)


RESNET_CASES = [
    (Site.FWD_OUTPUT, "basicblock_2_basic_0_conv2", (1, 2, 1, 3), None),
    (Site.FWD_WEIGHT, "basicblock_3_basic_0_conv2", (1, 1, 10, 12), None),
    (Site.BWD_INPUT, "basicblock_4_basic_0_downsample", 24, None),
    (Site.GRAD_WT, "conv1", (3, 3, 2, 1), None),
    (Site.GRAD_IN, "bn1", 24, None),   # conv1 feeds bn1 directly: no ReLU gate
    (Site.PARAM, "basicblock_1_basic_1_conv1", (1, 1, 2, 3), "weight"),
]
MLP_CASES = [
    (Site.FWD_INPUT, "dense_2", (5, 7), None),
    (Site.FWD_OUTPUT, "dense_1", (0, 3), None),
    (Site.GRAD_OUT, "dense_3", (2, 4), None),
    (Site.PARAM, "dense_1", (3,), "bias"),
]


@pytest.mark.parametrize("site,layer,pos,tensor", RESNET_CASES, ids=lambda v: getattr(v, "value", None))
def test_fault_on_replica_k_changes_only_replica_k_gradients_resnet(resnet, site, layer, pos,
                                                                    tensor):
    _isolated(resnet, 1, fault(site, layer, 1, pos, 2, tensor=tensor))


@pytest.mark.slow
@pytest.mark.parametrize("replicas,k", [(4, 2), (8, 5)])
def test_replica_isolation_with_more_replicas(replicas, k):
    """As above with more replicas, and two more backward sites."""
    tr = TFTrainer(RESNET.replace(replicas=replicas), probe=True)
    cases = RESNET_CASES + [(Site.BWD_INPUT, "basicblock_3_basic_1_conv2", 24, None),
                            (Site.GRAD_OUT, "dense", 8, None)]
    for site, layer, pos, tensor in cases:
        _isolated(tr, k, fault(site, layer, k, pos, 2, tensor=tensor))


@pytest.mark.parametrize("site,layer,pos,tensor", MLP_CASES, ids=lambda v: getattr(v, "value", None))
def test_fault_on_replica_k_changes_only_replica_k_gradients_mlp(mlp, site, layer, pos, tensor):
    _isolated(mlp, 1, fault(site, layer, 1, pos, 2, tensor=tensor))


def _isolated(trainer, k, f):
    clean = contributions(trainer, [])
    hit = contributions(trainer, [f])
    assert set(clean) == set(hit) == set(range(trainer.config.replicas))
    for r in clean:
        unchanged = all(same(clean[r][n], hit[r][n]) for n in clean[r])
        assert unchanged == (r != k), f"replica {r}: {'unchanged' if unchanged else 'changed'}"


def test_training_is_bit_reproducible_and_resumes_exactly(resnet):
    """BatchNorm, stateless dropout and augmentation included: the state after step 2,
    restored, replays steps 2..5 bit for bit, evaluation included."""
    start = resnet.get_state()
    resnet.set_state(start)
    ref = [resnet.train_step(s) for s in range(2)]
    mid = resnet.get_state()
    ref += [resnet.train_step(s) for s in range(2, 6)]
    end, ev = resnet.get_state(), resnet.evaluate()
    resnet.set_state(start)
    assert [resnet.train_step(s) for s in range(2)] == ref[:2]
    resnet.set_state(mid)
    assert [resnet.train_step(s) for s in range(2, 6)] == ref[2:]
    again = resnet.get_state()
    assert again.keys() == end.keys() and all(same(again[k], end[k]) for k in end)
    assert resnet.evaluate() == ev
    resnet.set_state(start)


def test_state_faults_hit_one_replicas_copy_and_checkpoints_keep_it(mlp):
    start = mlp.get_state()
    try:
        mlp.train_step(0)
        mlp.train_step(1, [fault(Site.PARAM, "dense_2", 2, (3, 4), 1, value=50.0),
                           fault(Site.OPT_STATE, "dense_1", 1, (10, 2), 1, value=9.0,
                                 tensor="m")])
        state = mlp.get_state()
        diverged = sorted(k for k in state if k.startswith("replica"))
        assert diverged and {k.split("/")[0] for k in diverged} == {"replica1", "replica2"}
        follow = [mlp.train_step(s) for s in range(2, 5)]
        mlp.set_state(start)
        mlp.set_state(state)
        assert [mlp.train_step(s) for s in range(2, 5)] == follow
    finally:
        mlp.set_state(start)


def test_one_pass_batchnorm_turns_an_overflowing_value_into_nan_in_the_same_step(resnet):
    """The artifact's ImmediateINFsNaNs example: 2.87e24 in a conv output overflows the batch
    variance E[x^2] - E[x]^2 (Inf - Inf) and the loss is NaN in that very step."""
    start = resnet.get_state()
    try:
        f = fault(Site.FWD_OUTPUT, "basicblock_2_basic_0_conv2", 1, (3, 1, 1, 5), 2,
                  value=2.86871514043344e+24)
        assert math.isfinite(resnet.train_step(0).loss)
        assert math.isnan(resnet.train_step(1, [f]).loss)
    finally:
        resnet.set_state(start)


def test_permanent_fault_keeps_hitting_and_disarms_afterwards(mlp):
    start = mlp.get_state()
    try:
        f = FaultSpec(site=Site.FWD_OUTPUT, layer="dense_1", value=ValueSpec("scale", factor=-8.0),
                      positions=PositionSpec("random", count=3), replica=0, step=1,
                      duration=Duration("steps", steps=2), seed=4)
        hit = [mlp.train_step(s, [f] if f.active(s) else []) for s in range(4)]
        mlp.set_state(start)
        clean = [mlp.train_step(s) for s in range(4)]
        assert hit[0] == clean[0] and hit[1] != clean[1]
    finally:
        mlp.set_state(start)


def test_a_reused_trainer_equals_a_fresh_one():
    cfg = MLP.replace(seed=2)
    fresh = TFTrainer(cfg)
    ref = [fresh.train_step(s) for s in range(3)]
    reused = BACKEND.build_trainer(cfg)
    [reused.train_step(s) for s in range(2)]
    assert BACKEND.build_trainer(cfg) is reused
    assert [reused.train_step(s) for s in range(3)] == ref


def test_strategies():
    assert isinstance(select_strategy(1), tf.distribute.OneDeviceStrategy)
    s = select_strategy(4)
    assert isinstance(s, tf.distribute.MirroredStrategy) and s.num_replicas_in_sync == 4
    assert isinstance(select_strategy(2, "mirrored"), tf.distribute.MirroredStrategy)
    with pytest.raises(FaultlabError, match="logical CPU devices"):
        select_strategy(64)
    with pytest.raises(FaultlabError):
        select_strategy(2, "one_device")
    with pytest.raises(FaultlabError):
        select_strategy(2, "bogus")


def test_one_replica_runs_on_one_device_strategy():
    tr = TFTrainer(MLP.replace(replicas=1))
    assert isinstance(tr.strategy, tf.distribute.OneDeviceStrategy)
    a = tr.train_step(0, [fault(Site.FWD_OUTPUT, "dense_1", 0, (0, 0), 0)])
    assert math.isfinite(a.loss)
