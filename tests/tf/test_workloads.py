"""The TensorFlow workloads have the torch workloads' names, layers and operand shapes (the
artifact's at full size), so one campaign file addresses the same elements in both."""

from __future__ import annotations

import math

import numpy as np
import pytest

from faultlab.campaigns import load_campaign
from faultlab.faults import Site
from faultlab.runner import validate_trials
from faultlab.workloads.base import default_config
from faultlab.backends.tf.trainer import TFTrainer, operand_shapes

REFERENCE = "/work/shared/reference/isca_ae/injections"


def _tiny(name, **kw):
    base = dict(width=8, input_size=16, per_replica_batch=4, dataset="digits")
    if name == "transformer":
        base = dict(width=16, input_size=16, per_replica_batch=4)
    if name == "mlp":
        base["input_size"] = 8
    base.update(kw)
    return default_config(name, **base)


@pytest.mark.parametrize("name", ["resnet18", "mlp", "transformer"])
def test_layer_names_and_operand_shapes_equal_torch(name):
    torch_trainer = pytest.importorskip("faultlab.backends.torch.trainer")
    cfg = _tiny(name)
    tf_table = operand_shapes(cfg.replace(framework="tf"))
    torch_table = torch_trainer.operand_shapes(cfg)
    assert list(tf_table) == list(torch_table) or set(tf_table) == set(torch_table)
    for layer, sites in torch_table.items():
        assert set(tf_table[layer]) == set(sites), layer
        for site, (shape, dtype) in sites.items():
            got = tf_table[layer][site]
            if name == "transformer" and layer == "embed" and site in (
                    Site.FWD_WEIGHT, Site.GRAD_WT, Site.PARAM, Site.OPT_STATE):
                # Keras' (and the canonical) layout is (vocab, width); the torch backend maps
                # nn.Embedding's weight like a Linear's and reports it transposed
                assert tuple(got[0]) == tuple(reversed(shape)), (layer, site)
                continue
            if dtype == "int64":  # token ids
                assert tuple(got[0]) == tuple(shape)
                continue
            assert (tuple(got[0]), got[1]) == (tuple(shape), dtype), (layer, site)


def test_resnet18_full_size_shapes_match_the_artifact():
    t = operand_shapes(default_config("resnet18", framework="tf"))
    assert t["basicblock_2_basic_0_conv2"][Site.FWD_OUTPUT][0] == (128, 8, 8, 128)
    assert t["basicblock_4_basic_0_conv2"][Site.FWD_WEIGHT][0] == (3, 3, 512, 512)
    assert t["basicblock_4_basic_0_downsample"][Site.BWD_INPUT][0] == (128, 4, 4, 512)
    assert t["conv1"][Site.FWD_OUTPUT][0] == (128, 16, 16, 64)
    assert t["dense"][Site.FWD_WEIGHT][0] == (512, 10)


@pytest.mark.parametrize("name", ["inj_immediate_infs_nans", "inj_masked", "inj_slow_degrade"])
def test_reference_files_validate_against_the_full_size_tf_resnet(name):
    import os
    path = os.path.join(REFERENCE, f"{name}.csv")
    if not os.path.exists(path):
        pytest.skip("reference files not present")
    camp = load_campaign(path, framework="tf")
    (trial,) = camp.trials
    assert trial.workload.replicas == 8 and trial.workload.per_replica_batch == 128
    validate_trials(camp.trials)


def test_transformer_trains_deterministically_and_takes_faults():
    from faultlab.faults import FaultSpec, PositionSpec, ValueSpec
    cfg = _tiny("transformer", replicas=2, steps_per_epoch=3, epochs=1, framework="tf")
    tr = TFTrainer(cfg)
    start = tr.get_state()
    clean = [tr.train_step(s) for s in range(3)]
    tr.set_state(start)
    assert [tr.train_step(s) for s in range(3)] == clean
    tr.set_state(start)
    f = FaultSpec(site=Site.FWD_WEIGHT, layer="embed", value=ValueSpec("set", values=(40.0,)),
                  positions=PositionSpec("explicit", indices=((1, 5),)), replica=1, step=1)  # 1: " "
    g = FaultSpec(site=Site.FWD_OUTPUT, layer="block_1_attn_qkv",
                  value=ValueSpec("bitflip", bit=30), positions=PositionSpec("random", count=4),
                  replica=0, step=2, seed=3)
    hit = [tr.train_step(s, [x for x in (f, g) if x.active(s)]) for s in range(3)]
    assert hit[0] == clean[0] and hit[1] != clean[1]
    tr.set_state(start)
    assert math.isfinite(tr.evaluate().loss)
