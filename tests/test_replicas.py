"""Replica emulation: a fault on replica k changes only replica k's gradient contribution, and
training is bit-reproducible (resume from any checkpoint equals the uninterrupted run)."""

import numpy as np
import pytest
import torch

from faultlab.faults import FaultSpec, PositionSpec, Site, ValueSpec
from faultlab.workloads.base import default_config
from faultlab.workloads.torch_trainer import TorchTrainer

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
