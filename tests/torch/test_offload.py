"""Offloaded training (offload = window:N) and the host_state site: bit-identical to the run
without offload, a real window (released storages, a prefetch thread), checkpoints that read the
host store where it lies, and faults validated before anything trains (docs/offload.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from faultlab.backends import load_backend
from faultlab.backends.base import check_fault
from faultlab.campaigns import parse_campaign
from faultlab.campaigns.columnar import format_columnar
from faultlab.errors import CampaignError, SpecError
from faultlab.faults import Site, fault
from faultlab.runner.session import validate_trials
from faultlab.workloads.base import (BUILTINS, WorkloadConfig, default_config, offload_layers,
                                     parse_offload)

BACKEND = load_backend("torch")
SMALL = {"mlp": dict(epochs=2),
         "resnet18": dict(width=4, input_size=16, dataset="digits", replicas=2,
                          per_replica_batch=4, steps_per_epoch=3, epochs=2, eval_samples=64),
         "transformer": dict(width=16, input_size=8, per_replica_batch=4, steps_per_epoch=3,
                             epochs=2, eval_samples=32)}


def _pair(name, window, **kw):
    kw = {**SMALL[name], **kw}
    return (BACKEND.new_trainer(default_config(name, **kw)),
            BACKEND.new_trainer(default_config(name, offload=window, **kw)))


def _diff(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return [k for k in a if a[k].dtype != b[k].dtype or a[k].tobytes() != b[k].tobytes()]


# --- training is bit-identical ----------------------------------------------------------------

@pytest.mark.parametrize("name,window", [("mlp", "window:1"), ("mlp", "window:2"),
                                         ("resnet18", "window:3"), ("transformer", "window:2")])
def test_offloaded_training_is_bit_identical_to_training_on_the_device(name, window):
    dev, off = _pair(name, window)
    for step in range(4):
        assert dev.train_step(step) == off.train_step(step)       # loss and accuracy, exactly
    assert _diff(dev.get_state(), off.get_state()) == []          # parameters + Adam state
    assert dev.full_checksum() == off.full_checksum()
    assert dev.evaluate() == off.evaluate()


def test_the_window_holds_at_most_n_layers_and_releases_the_rest():
    _, off = _pair("mlp", "window:2")
    off.train_step(0)
    off.train_step(1)
    sizes = sorted((u.nbytes for u in off.units), reverse=True)
    assert 0 < off.window.peak_bytes <= sum(sizes[:2]) < sum(sizes)
    # between steps no device-side copy holds bytes; the host store holds every value
    assert all(p.untyped_storage().nbytes() == 0 for u in off.units for p in u.params)
    assert all(h.untyped_storage().nbytes() == h.numel() * 4 for u in off.units for h in u.host)
    assert all(h.data_ptr() != p.data_ptr() for u in off.units for p, h in zip(u.params, u.host))
    # the prefetch thread copied ahead of use: every layer arrived before it was asked for
    assert off.window.fetches > 0 and off.window.sync_fetches == 0
    assert off.window._thread.is_alive()
    # the optimizer is the host's: Adam over the host masters
    assert isinstance(off.optimizer, torch.optim.Adam)
    assert {id(p) for g in off.optimizer.param_groups for p in g["params"]} == \
        {id(h) for h in off.host_params}


def test_offload_layers_of_every_builtin_are_the_units_the_backend_moves():
    from faultlab.backends.torch.offload import offload_units
    from faultlab.backends.torch.trainer import build_workload
    for name in BUILTINS:
        cfg = default_config(name, **SMALL[name])
        with torch.device("meta"):
            model = build_workload(cfg, with_data=False).model
        assert [n for n, _ in offload_units(model)[0]] == offload_layers(cfg)


# --- checkpoints read the host store where it lies ---------------------------------------------

def test_get_state_views_the_host_store_and_later_steps_never_change_it():
    dev, off = _pair("mlp", "window:2")
    for step in range(2):
        dev.train_step(step)
        off.train_step(step)
    lent = off.get_state()
    frozen = {k: v.copy() for k, v in lent.items()}
    host_w = off._host_of[id(off.model.dense_1.weight)]
    assert np.shares_memory(lent["model/dense_1.weight"], host_w.detach().numpy())
    m = off.optimizer.state[host_w]["exp_avg"]
    assert np.shares_memory(lent["optim/0/exp_avg"], m.detach().numpy())
    for step in range(2, 4):            # the host step writes copy-on-write, not into the views
        dev.train_step(step)
        off.train_step(step)
    assert _diff(lent, frozen) == []
    assert not np.shares_memory(lent["model/dense_1.weight"], host_w.detach().numpy())
    assert _diff(dev.get_state(), off.get_state()) == []


def test_set_state_restores_and_leaves_lent_views_alone():
    _, off = _pair("mlp", "window:2")
    off.train_step(0)
    saved = off.get_state()
    copy = {k: v.copy() for k, v in saved.items()}
    losses = [off.train_step(s).loss for s in (1, 2)]
    off.set_state(saved)                 # copies into the host store (saved is lent, too)
    assert _diff(saved, copy) == []
    assert [off.train_step(s).loss for s in (1, 2)] == losses


# --- the host_state site -----------------------------------------------------------------------

def _host_fault(layer, tensor, **kw):
    kw = {"step": 2, "value": "bitflip", "positions": [(3, 5)], **kw}
    if kw["value"] == "bitflip":
        kw.setdefault("bit", 30)
    return fault("host_state", layer, tensor=tensor, **kw)


@pytest.mark.parametrize("tensor,changed", [
    ("weight", {"model/dense_2.weight"}),
    ("m", {"model/dense_2.weight", "optim/2/exp_avg"}),
    ("v", {"model/dense_2.weight", "optim/2/exp_avg_sq"}),
    ("grad", {"model/dense_2.weight", "optim/2/exp_avg", "optim/2/exp_avg_sq"}),
])
def test_a_host_state_fault_hits_the_host_copy_it_names(tensor, changed):
    dev, off = _pair("mlp", "window:2")
    f = _host_fault("dense_2", tensor, positions=[(0, 0)] if tensor == "grad" else [(3, 5)])
    for step in range(3):
        dev.train_step(step)
        off.train_step(step, [f] if step == 2 else [])
    assert set(_diff(dev.get_state(), off.get_state())) >= changed


def test_a_layer_in_transit_is_corrupted_on_the_device_only_like_a_forward_weight_fault():
    # dense_1 is the first layer: its weight is used only by the forward pass, so a copy
    # corrupted in transit does what fwd_weight does on the twin without offload, bit for bit
    dev, off = _pair("mlp", "window:2")
    pos = dict(step=2, replica=1, value="bitflip", bit=30, positions=[(36, 20)])
    for step in range(4):
        a = [fault("fwd_weight", "dense_1", **pos)] if step == 2 else []
        b = [fault("host_state", "dense_1", tensor="transit", **pos)] if step == 2 else []
        assert dev.train_step(step, a) == off.train_step(step, b)
    assert _diff(dev.get_state(), off.get_state()) == []


def test_a_corrupted_bias_master_reaches_training():
    dev, off = _pair("mlp", "window:2")
    f = _host_fault("dense_3", "bias", positions=[(4,)], value="nan", step=0)
    dev.train_step(0)
    off.train_step(0, [f])
    assert not np.isfinite(off.get_state()["model/dense_3.bias"]).all()
    assert np.isnan(off.train_step(1).loss)


# --- validated when the trial is built -----------------------------------------------------------

def _check(cfg, f):
    return check_fault(BACKEND.operand_shapes(cfg), f, cfg)


@pytest.mark.parametrize("cfg,f,field,text", [
    (default_config("mlp"), _host_fault("dense_2", "weight"), "site",
     "site host_state needs an offloaded workload"),
    (default_config("mlp", offload="window:2"), _host_fault("dense_2", "moments"), "tensor",
     "unknown tensor 'moments' for site host_state"),
    (default_config("mlp", offload="window:2"), _host_fault("dense_2", "m", replica=1),
     "replica", "host_state tensor m is the one host copy every replica shares"),
    (default_config("mlp", offload="window:2"), _host_fault("dense_9", "weight"), "layer",
     "unknown layer 'dense_9'"),
    (default_config("mlp", offload="window:2"), _host_fault("dense_2", "grad",
                                                            positions=[(64, 0)]),
     "positions", "outside"),
    (default_config("mlp", offload="window:2"), fault("param", "dense_2"), "site",
     "site param is device-resident state"),
    (default_config("mlp", offload="window:2"), fault("opt_state", "dense_2", tensor="m"),
     "site", "use site host_state"),
])
def test_host_state_faults_are_refused_in_one_line_naming_the_field(cfg, f, field, text):
    with pytest.raises(SpecError) as e:
        _check(cfg, f)
    assert e.value.field == field and text in str(e.value) and "\n" not in str(e.value)


def test_every_host_state_kind_of_the_shipped_campaign_validates():
    from pathlib import Path
    path = Path(__file__).parents[2] / "campaigns" / "offload.csv"
    trials = parse_campaign(path.read_bytes(), str(path)).trials
    validate_trials(trials)
    kinds = {f.tensor for t in trials for f in t.faults if f.site.value == "host_state"}
    assert kinds == {"weight", "m", "v", "transit", "grad"}
    twins = {t.workload.offload for t in trials}
    assert twins == {"", "window:2"}


# --- the offload setting ---------------------------------------------------------------------------

def test_a_config_without_offload_keeps_its_key():
    cfg = default_config("resnet18")
    d = cfg.to_dict()
    assert "offload" not in d
    import hashlib
    import json
    assert cfg.key() == hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
    off = default_config("resnet18", offload="window:2")
    assert off.to_dict()["offload"] == "window:2" and off.key() != cfg.key()
    assert off.offload_window == 2 and cfg.offload_window == 0


@pytest.mark.parametrize("cell,column,text", [
    ("window:0", "offload", "at least 1 layer"),
    ("windows:2", "offload", "is not understood"),
    ("window:3", "offload", "keeps all 3 layers of mlp on the device"),
])
def test_a_bad_offload_cell_is_refused_at_its_column(cell, column, text):
    with pytest.raises(CampaignError) as e:
        parse_campaign(f"trial,workload,offload\nt,mlp,{cell}\n".encode(), "c.csv")
    assert str(e.value).startswith(f"c.csv:2: column '{column}': ") and text in str(e.value)


def test_offload_on_tensorflow_is_refused_in_one_line():
    with pytest.raises(CampaignError) as e:
        parse_campaign(b"trial,workload,framework,offload\nt,mlp,tf,window:1\n", "c.csv")
    assert str(e.value).startswith("c.csv:2: column 'offload': offload is torch-only")
    with pytest.raises(SpecError, match="offload is torch-only"):
        WorkloadConfig("mlp", framework="tf", offload="window:1")


def test_host_state_on_a_row_without_offload_is_refused_at_the_site_cell():
    with pytest.raises(CampaignError) as e:
        parse_campaign(b"trial,workload,site,layer,tensor,value\nt,mlp,host_state,dense_1,m,"
                       b"nan\n", "c.csv")
    assert str(e.value) == ("c.csv:2: column 'site': site host_state needs an offloaded "
                            "workload: set the offload column (e.g. window:2) to keep mlp's "
                            "state in host memory, or use param or opt_state for the device "
                            "copy")


def test_the_isca_format_takes_offload_as_an_extension_key():
    text = ("model,mlp\nstage,fwrd_inject\nfmodel,WT\ntarget_worker,0\ntarget_layer,dense_1\n"
            "target_epoch,0\ntarget_step,1\noffload,window:1\n")
    (trial,) = parse_campaign(text.encode(), "isca.txt").trials
    assert trial.workload.offload == "window:1"


def test_offloaded_campaigns_round_trip_through_the_writer():
    text = (b"trial,workload,offload,site,layer,tensor,replica,step,value,positions\n"
            b"a,mlp,window:2,host_state,dense_1,transit,1,3,zero,1/2\n")
    trials = parse_campaign(text, "c.csv").trials
    again = parse_campaign(format_columnar(trials).encode(), "d.csv").trials
    assert [(t.workload, t.faults) for t in again] == [(t.workload, t.faults) for t in trials]


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.integers(0, 10 ** 6).map(lambda n: f"window:{n}"),
                 st.text(alphabet="windowWINDOW:0123456789 -x,", max_size=14), st.text(max_size=8)))
def test_parse_offload_gives_the_canonical_form_or_a_spec_error(text):
    try:
        got = parse_offload(text)
    except SpecError as e:
        assert e.field == "offload" and "\n" not in str(e)
        return
    assert got == "" or (got.startswith("window:") and int(got[7:]) >= 1)
    assert parse_offload(got) == got


def test_a_trainer_nobody_holds_is_collected_with_its_window():
    import gc
    import weakref
    _, off = _pair("mlp", "window:2")
    off.train_step(0)
    trainer, window = weakref.ref(off), weakref.ref(off.window)
    del off
    gc.collect()
    assert trainer() is None and window() is None   # the prefetch thread held neither


# --- resnet18 and the transformer: buffers, evaluations between steps, the shipped campaign -------

@pytest.mark.parametrize("name,window", [("resnet18", "window:1"), ("resnet18", "window:8"),
                                         ("transformer", "window:1"),
                                         ("transformer", "window:5")])
def test_resnet18_and_transformer_stay_bit_identical_through_evaluations(name, window):
    # evaluation passes between training steps change the window's learned schedule and leave
    # layers resident; batch-norm statistics (buffers, which stay on the device) must still
    # follow the run without offload bit for bit
    dev, off = _pair(name, window)
    for step in range(4):
        assert dev.train_step(step) == off.train_step(step)
        if step % 2:
            assert dev.evaluate() == off.evaluate()
    a, b = dev.get_state(), off.get_state()
    assert _diff(a, b) == []
    if name == "resnet18":
        stats = [k for k in a if k.endswith(("running_mean", "running_var",
                                             "num_batches_tracked"))]
        assert len(stats) == 3 * 20 and all(a[k].tobytes() == b[k].tobytes() for k in stats)
        assert not np.array_equal(a["model/bn1.running_mean"], np.zeros(4, np.float32))
    assert dev.full_checksum() == off.full_checksum()


def _models_campaign():
    from pathlib import Path
    path = Path(__file__).parents[2] / "campaigns" / "offload_models.csv"
    return parse_campaign(path.read_bytes(), str(path)).trials


def test_the_models_campaign_pairs_every_host_state_kind_with_its_device_twin():
    trials = _models_campaign()
    validate_trials(trials)
    for wl in ("resnet18", "transformer"):
        mine = [t for t in trials if t.workload.workload == wl]
        kinds = {f.tensor for t in mine for f in t.faults if f.site.value == "host_state"}
        assert kinds == {"weight", "bias", "m", "v", "transit", "grad"}
        assert {t.workload.offload for t in mine} == {"", "window:3"}
        host = {t.trial_id.replace("_host_", "_"): t for t in mine if "_host_" in t.trial_id}
        twin = {t.trial_id.replace("_device_", "_"): t for t in mine
                if "_device_" in t.trial_id}
        assert len(host) == 6 and len(twin) == 6
        for t in host.values():     # each host fault's twin: same layer, step and value
            (h,) = t.faults
            (d,) = next(v for k, v in twin.items() if v.faults[0].layer == h.layer).faults
            assert (d.step, d.value, d.positions) == (h.step, h.value, h.positions)


@pytest.mark.slow
def test_the_models_campaign_runs_and_classifies(tmp_path, monkeypatch):
    """Every trial of campaigns/offload_models.csv (resnet18 and the transformer, offloaded
    and not) runs and is classified; the offloaded golden runs are the plain ones, bit for
    bit; each host-resident fault has the outcome of its device-resident twin."""
    from faultlab.outcomes import IMMEDIATE, MASKED
    from faultlab.runner import Session
    monkeypatch.setenv("FAULTLAB_CACHE", str(tmp_path))
    session = Session(threads=1)
    res = {t.trial_id: session.run_trial(t) for t in _models_campaign()}
    assert all(r.error is None for r in res.values())
    for p in ("r", "t"):
        a, b = res[f"{p}_control_offload"], res[f"{p}_control_device"]
        assert a.bit_exact and b.bit_exact
        assert a.metrics["golden_loss"] == b.metrics["golden_loss"]
        assert a.metrics["golden_test"] == b.metrics["golden_test"]
    pairs = [(k, k.replace("_host_", "_device_", 1)) for k in res if "_host_" in k]
    twins = {"master_exp": "param_exp", "bn_bias_exp": "bn_bias_exp",
             "ln_bias_exp": "ln_bias_exp", "m_sign": "m_sign", "v_inf": "v_inf",
             "transit_exp": "fwd_weight_exp", "grad_nan": "grad_wt_nan"}
    for host, _ in pairs:
        p, kind = host.split("_host_")
        assert res[host].outcome == res[f"{p}_device_{twins[kind]}"].outcome, host
    assert {r.outcome for r in res.values()} == {MASKED, IMMEDIATE}


@pytest.mark.parametrize("name,layer,host,device", [
    ("resnet18", "dense", "v", ("opt_state", "v")),
    ("resnet18", "basicblock_1_basic_0_conv1", "weight", ("param", None)),
    ("transformer", "block_0_attn_qkv", "weight", ("param", None)),
    ("transformer", "block_1_mlp_fc1", "m", ("opt_state", "m")),
])
def test_with_one_replica_a_host_copy_fault_is_its_device_twin_bit_for_bit(name, layer, host,
                                                                              device):
    # with R > 1 a device param / opt_state fault forks one replica's copy while the host copy
    # is every replica's (docs/offload.md, "resnet18 and the transformer"); with one replica
    # the two are the same fault
    dev, off = _pair(name, "window:3", replicas=1)
    shape = BACKEND.operand_shapes(dev.config)[layer][Site.PARAM][0]
    pos = dict(step=2, value="bitflip", bit=30, positions=[tuple(d // 2 for d in shape)])
    for step in range(4):
        a = [fault(device[0], layer, tensor=device[1], **pos)] if step == 2 else []
        b = [fault("host_state", layer, tensor=host, **pos)] if step == 2 else []
        assert str(dev.train_step(step, a)) == str(off.train_step(step, b))
    assert _diff(dev.get_state(), off.get_state()) == []
