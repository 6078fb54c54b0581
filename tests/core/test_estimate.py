"""Sizes a machine cannot hold are refused before anything is built (faultlab/workloads/
estimate.py): the parameter count is exact (checked against the built torch and Keras models),
the estimate grows with every size, and a refusal is one line naming the column responsible."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import assume, given, settings, strategies as st

from faultlab.campaigns import load_campaign, parse_campaign
from faultlab.errors import CampaignError, FaultlabError, SpecError
from faultlab.runner.session import Session, validate_trials
from faultlab.trials import Trial
from faultlab.workloads import estimate as est
from faultlab.workloads.base import BUILTINS, default_config

ROOT = Path(__file__).resolve().parents[2]
SHARED = next((p for p in (ROOT / "shared", ROOT.parent / "shared") if p.is_dir()), None)
HEADER = "trial,workload,replicas,per_replica_batch,width,input_size,steps_per_epoch,epochs"
BIG = 2**31 - 1

SMALL = [("mlp", dict(width=1, input_size=1)), ("mlp", dict(width=7, input_size=5)),
         ("mlp", dict(width=64, input_size=8)),
         ("resnet18", dict(width=1, input_size=4)), ("resnet18", dict(width=3, input_size=9)),
         ("resnet18", dict(width=8, input_size=32)),
         ("transformer", dict(width=4, input_size=1)),
         ("transformer", dict(width=12, input_size=7, options=(("blocks", "3"), ("heads", "3")))),
         ("transformer", dict(width=8, input_size=16, options=(("blocks", "0"),))),
         ("transformer", dict(width=8, input_size=16, dataset="digits"))]


# --- the parameter count is exact --------------------------------------------------------------

@pytest.mark.framework("torch")
@pytest.mark.parametrize("name, kw", SMALL)
def test_the_parameter_count_equals_the_built_torch_models(name, kw):
    from faultlab.backends.torch.trainer import build_workload
    cfg = default_config(name, **kw)
    model = build_workload(cfg, with_data=False).model
    assert est.parameter_count(cfg) == sum(p.numel() for p in model.parameters())
    stats = sum(b.numel() for n, b in model.named_buffers() if "running" in n)
    assert est._statistics(est.parameter_shapes(cfg)) == stats
    largest = max(p.numel() for p in model.parameters())
    assert max(n for _, n in est.parameter_shapes(cfg)) == largest


@pytest.mark.framework("tf")
def test_the_parameter_count_equals_the_built_keras_models():
    import numpy as np
    from faultlab.backends.tf import models
    for name, kw in SMALL[1:9:3]:                      # one of each model: Keras builds slowly
        cfg = default_config(name, framework="tf", **kw)
        w, s = cfg.width, cfg.input_size
        if name == "mlp":
            model = models.mlp(s, w, 10, 1)
        elif name == "resnet18":
            model = models.resnet18(w, 10, s, 3, 0.1)
        else:
            model = models.transformer(est._vocab(cfg), w, s, int(cfg.option("blocks", "2")),
                                       int(cfg.option("heads", "4")))
        assert est.parameter_count(cfg) == sum(int(np.prod(v.shape))
                                               for v in model.trainable_weights), name


def test_user_workloads_have_no_estimate():
    assert est.estimate(default_config("my.pkg:build", width=BIG)) is None
    assert est.check_fits(default_config("my.pkg:build", width=BIG)) is None


# --- properties --------------------------------------------------------------------------------

def configs(max_size: int = BIG):
    sizes = st.integers(1, max_size)
    return st.builds(
        lambda name, fw, w, s, b, r, ds, opts: default_config(
            name, framework=fw, width=w, input_size=s, per_replica_batch=b, replicas=r,
            dataset=ds, options=opts),
        st.sampled_from(sorted(BUILTINS)), st.sampled_from(["torch", "tf"]), sizes, sizes, sizes,
        st.integers(1, 65536), st.sampled_from(["digits", "cifar10", "synthetic", "corpus"]),
        st.lists(st.tuples(st.sampled_from(["blocks", "heads", "augment"]),
                           st.sampled_from(["0", "1", "2", "4", "x", "-3", "64"])),
                 max_size=2, unique_by=lambda kv: kv[0]).map(tuple))


@settings(max_examples=400, deadline=None)
@given(configs(), st.sampled_from(est.SIZE_COLUMNS), st.integers(1, 2**20),
       st.sampled_from([None, "1", "1000000", str(2**40), str(2**90)]))
def test_the_estimate_grows_with_every_size_and_only_spec_errors_come_out(cfg, col, more, limit):
    import os
    old = os.environ.get(est.MEMORY_ENV)
    try:
        if limit is None:
            os.environ.pop(est.MEMORY_ENV, None)
        else:
            os.environ[est.MEMORY_ENV] = limit
        try:
            est.check_fits(cfg)
        except SpecError as e:
            assert "\n" not in str(e)
            assert e.field in (*est.SIZE_COLUMNS, "options")
        try:
            small = est.estimate(cfg)
        except SpecError:
            assume(False)
        hi = 65536 if col == "replicas" else BIG
        bigger = cfg.replace(**{col: min(hi, getattr(cfg, col) + more)})
        try:
            large = est.estimate(bigger)
        except SpecError:            # a transformer width that its heads do not divide
            assume(False)
        assert large.total_bytes >= small.total_bytes
        assert large.largest >= small.largest
        assert large.parameters >= small.parameters
    finally:
        if old is None:
            os.environ.pop(est.MEMORY_ENV, None)
        else:
            os.environ[est.MEMORY_ENV] = old


@pytest.mark.parametrize("name", sorted(BUILTINS))
@pytest.mark.parametrize("framework", ["torch", "tf"])
def test_the_default_configurations_fit_a_small_machine(name, framework):
    e = est.estimate(default_config(name, framework=framework))
    assert 0 < e.total_bytes < 7 * 2**30       # a 7 GiB CI runner
    assert e.largest <= est.MAX_TENSOR_ELEMENTS


# --- refusals ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, kw, column", [
    ("mlp", dict(width=BIG), "width"),
    ("mlp", dict(input_size=BIG), "input_size"),
    ("mlp", dict(per_replica_batch=BIG), "per_replica_batch"),
    ("resnet18", dict(width=100_000), "width"),
    ("resnet18", dict(input_size=100_000), "input_size"),
    ("resnet18", dict(per_replica_batch=10**7, dataset="digits"), "per_replica_batch"),
    ("transformer", dict(width=1 << 20), "width"),
    ("transformer", dict(input_size=1 << 20), "input_size"),
    ("resnet18", dict(replicas=65536, framework="tf", dataset="digits"), "replicas"),
])
def test_a_refusal_names_the_column_responsible(name, kw, column):
    cfg = default_config(name, **kw)
    with pytest.raises(SpecError) as e:
        est.check_fits(cfg)
    assert e.value.field == column
    msg = str(e.value)
    assert msg.startswith(f"workload {name} with {column} {getattr(cfg, column)} ")
    assert "\n" not in msg


def test_the_message_gives_the_estimate_and_the_machine(monkeypatch):
    monkeypatch.delenv(est.MEMORY_ENV, raising=False)
    with pytest.raises(SpecError) as e:
        est.check_fits(default_config("mlp", width=BIG))
    assert str(e.value).startswith(
        "workload mlp with width 2147483647 needs about 112.0 EiB (parameters 16.0 EiB, "
        "gradients and optimizer state 96.0 EiB, activations 8.0 TiB, data 930.5 KiB) but "
        "this machine has ")


def test_the_memory_limit_can_be_set(monkeypatch):
    cfg = default_config("mlp")
    monkeypatch.setenv(est.MEMORY_ENV, "1000")
    with pytest.raises(SpecError, match=r"but FAULTLAB_MEMORY_LIMIT is 1000 B$"):
        est.check_fits(cfg)
    monkeypatch.setenv(est.MEMORY_ENV, str(2**40))
    assert est.check_fits(cfg).total_bytes < 2**40
    monkeypatch.setenv(est.MEMORY_ENV, "lots")
    with pytest.raises(FaultlabError, match="FAULTLAB_MEMORY_LIMIT must be a number of bytes"):
        est.check_fits(cfg)


def test_a_tensor_too_large_for_32_bit_indexing_is_refused_even_with_the_memory(monkeypatch):
    monkeypatch.setenv(est.MEMORY_ENV, str(2**90))
    with pytest.raises(SpecError) as e:
        est.check_fits(default_config("mlp", width=50_000))
    assert e.value.field == "width"
    assert str(e.value) == ("workload mlp with width 50000 makes a tensor (dense_2 weight) of "
                            "2500000000 elements; one tensor may hold at most 2**31-1 = "
                            "2147483647")


def test_a_transformer_width_its_heads_do_not_divide_is_refused():
    with pytest.raises(SpecError, match="transformer width 30 is not a multiple of its 4 "
                                        "attention heads") as e:
        est.check_fits(default_config("transformer", width=30))
    assert e.value.field == "width"
    with pytest.raises(SpecError, match="option heads must be an integer"):
        est.check_fits(default_config("transformer", options=(("heads", "x"),)))


def test_human_bytes():
    assert est.human_bytes(0) == "0 B"
    assert est.human_bytes(1536) == "1.5 KiB"
    assert est.human_bytes(23 * 2**30 + 2**29) == "23.5 GiB"
    assert est.human_bytes(2**80) == "1.05e+06 EiB"


# --- where the check runs ----------------------------------------------------------------------

def test_a_campaign_too_large_is_refused_at_its_cell(tmp_path):
    text = f"{HEADER}\nok,mlp,2,8,16,8,5,4\nhuge,mlp,2,8,2147483647,8,5,4\n"
    with pytest.raises(CampaignError) as e:
        parse_campaign(text.encode(), "c.csv")
    assert str(e.value).startswith("c.csv:3: column 'width': workload mlp with width "
                                   "2147483647 needs about 112.0 EiB")
    isca = ("model,resnet18\nstage,fwd\nfmodel,INPUT\ntarget_worker,0\ntarget_layer,conv1\n"
            "target_epoch,0\ntarget_step,1\ninj_pos,0/0/0/0\ninput_size,1000000\n")
    with pytest.raises(CampaignError, match=r"c\.isca:9: column 'input_size': workload "
                                            r"resnet18 with input_size 1000000 needs about"):
        parse_campaign(isca.encode(), "c.isca")


def test_configs_built_in_python_are_refused_before_a_trainer_is_built(tmp_path, monkeypatch):
    monkeypatch.setenv("FAULTLAB_CACHE", str(tmp_path))
    cfg = default_config("mlp", width=BIG)
    session = Session()
    with pytest.raises(SpecError, match="needs about"):
        session.trainer(cfg)
    with pytest.raises(SpecError, match="needs about"):
        session.golden(cfg)
    with pytest.raises(SpecError, match=r"^t1: column 'width': workload mlp with width"):
        validate_trials([Trial("t1", cfg)])
    assert session._trainers == {}


def _campaign_files():
    files = sorted((ROOT / "campaigns").glob("*.csv"))
    if SHARED is not None:
        files += sorted((SHARED / "reference" / "isca_ae").rglob("*.csv"))
    return files


@pytest.mark.parametrize("path", _campaign_files(), ids=lambda p: p.name)
def test_the_shipped_campaigns_are_accepted(path):
    assert load_campaign(path).trials
