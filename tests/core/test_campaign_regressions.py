"""Regressions found by the campaign-file fuzzer (tests/fuzz/campaign_fuzz.py): files that
`faultlab validate` accepted and `faultlab run` then crashed on, file names that broke the
one-line error, the docs' own examples, datasets a workload cannot train on, host_state.

The operand checks run framework-free against written-out operand tables (check_fault, what
validate_trials calls per fault); the end-to-end ones through validate_trials need torch's
operand shapes (meta device, nothing trained)."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from faultlab.backends.base import check_fault
from faultlab.campaigns import load_campaign, parse_campaign
from faultlab.errors import CampaignError, FaultlabError, SpecError, printable
from faultlab.faults import (FaultSpec, PositionSpec, Site, ValueSpec, check_corruption,
                             resolve)
from faultlab.workloads.base import default_config

ROOT = Path(__file__).resolve().parents[2]
FORMATS_MD = ROOT / "docs" / "formats.md"

CFG = default_config("mlp", replicas=2, per_replica_batch=4, width=8, input_size=8,
                     dataset="digits", steps_per_epoch=3, epochs=2, seed=1)
F32 = ((4, 8), "float32")
TABLE = {"dense_1": {Site.FWD_OUTPUT: F32, Site.FWD_INPUT: ((4, 64), "float32")},
         "embed": {Site.FWD_INPUT: ((4, 8), "int64"), Site.GRAD_IN: ((4, 8), "int64"),
                   Site.FWD_OUTPUT: ((4, 8, 16), "float32")},
         "q": {Site.FWD_OUTPUT: ((4, 8), "int8")},
         "one": {Site.FWD_OUTPUT: ((1,), "float32")},
         "f16": {Site.FWD_OUTPUT: ((4, 8), "float16")}}


def fault(site="fwd_output", layer="dense_1", **value):
    model = value.pop("model", "bitflip")
    return FaultSpec(site=site, layer=layer, value=ValueSpec(model, **value),
                     positions=PositionSpec("random", count=1))


def one_line(msg: str) -> bool:
    return not any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in msg)


# --- 1-3: the operand's dtype is checked when the file is validated ----------------------------

@pytest.mark.parametrize("f, field, msg", [
    (fault(bit=40), "bit", "bit 40 is outside the fp32 layout of the fwd_output operand of "
                           "layer 'dense_1' (bits 0..31, the native layout of its float32)"),
    (fault(model="stuck_at", bit=63), "bit", "bit 63 is outside the fp32 layout"),
    (fault(layer="f16", bit=16), "bit", "bit 16 is outside the fp16 layout"),
    (fault(bits=33), "bits", "cannot flip 33 distinct bits in the 32-bit fp32 layout of the "
                             "fwd_output operand of layer 'dense_1'"),
    (fault(layer="f16", bits=17), "bits", "cannot flip 17 distinct bits in the 16-bit fp16"),
    (fault(site="fwd_input", layer="embed", model="zero"), "site",
     "cannot corrupt the fwd_input operand of layer 'embed' of dtype int64"),
    (fault(site="grad_in", layer="embed", model="nan"), "site",
     "cannot corrupt the grad_in operand of layer 'embed' of dtype int64"),
    (fault(layer="q", model="zero", layout="fp16"), "layout",
     "the fwd_output operand of layer 'q' is int8: it cannot be corrupted in the fp16 layout"),
    (fault(layer="one", model="copy"), "value", "value copy needs an operand of at least two"),
], ids=["bit40", "stuck63", "bit16-fp16", "bits33", "bits17-fp16", "int64-fwd_input",
        "int64-grad_in", "int8-layout", "copy-one-element"])
def test_validation_applies_the_dtype_rules_of_resolve(f, field, msg):
    with pytest.raises(SpecError) as e:
        check_fault(TABLE, f, CFG)
    assert e.value.field == field
    assert str(e.value).startswith(msg), str(e.value)
    assert "\n" not in str(e.value)
    # ... and they are the rules resolve() applies when the fault fires: the same error
    shape, dtype = TABLE[f.layer][f.site]
    with pytest.raises(SpecError) as r:
        f.resolve(shape, dtype, 0)
    assert r.value.field == field
    operand = f"{f.site.value} operand of layer '{f.layer}'"
    assert str(r.value) == str(e.value).replace(operand, "tensor")


@pytest.mark.parametrize("f", [fault(bit=31), fault(bits=32), fault(model="stuck_at", bit=0),
                               fault(layer="f16", bit=15), fault(layer="f16", bits=16),
                               fault(layer="dense_1", bit=63, layout="fp64"),
                               fault(site="fwd_output", layer="embed", model="zero"),
                               fault(layer="q", bit=7), fault(layer="q", model="zero",
                                                              layout="int8"),
                               fault(layer="dense_1", bit=7, layout="int8")])
def test_faults_that_fit_their_operand_still_pass(f):
    check_fault(TABLE, f, CFG)
    shape, dtype = TABLE[f.layer][f.site]
    f.resolve(shape, dtype, 0)


def test_resolve_and_validation_share_one_implementation(monkeypatch):
    """resolve() checks through check_corruption, the function check_fault calls: replacing
    it changes both (no second copy of the rules)."""
    import faultlab.faults as faults
    calls = []
    real = faults.check_corruption

    def spy(*a, **kw):
        calls.append(a[3])
        return real(*a, **kw)
    monkeypatch.setattr(faults, "check_corruption", spy)
    f = fault(bit=3)
    check_fault(TABLE, f, CFG)
    resolve(f.value, f.positions, (4, 8), "float32", np.random.default_rng(0),
            np.random.default_rng(1))
    assert calls == ["float32", "float32"]


def test_unknown_dtype_or_shape_checks_what_is_known():
    assert check_corruption(ValueSpec("bitflip", bit=40), PositionSpec(), None, None) is None
    with pytest.raises(SpecError) as e:
        check_corruption(ValueSpec("bitflip", bit=40), PositionSpec(), None, "float32")
    assert e.value.field == "bit"


MLP = ("trial,workload,replicas,per_replica_batch,width,input_size,dataset,steps_per_epoch,"
       "epochs")
TINY = "mlp,2,4,8,8,digits,3,2"


@pytest.mark.framework("torch")
@pytest.mark.parametrize("text, where, msg", [
    ("trial,workload,site,layer,value,bit\nt,mlp,fwd_output,dense_1,bitflip,40\n",
     "c.csv:2: column 'bit'", "bit 40 is outside the fp32 layout"),
    ("trial,workload,site,layer,value,bit\nt,mlp,fwd_output,dense_1,stuck_at,63\n",
     "c.csv:2: column 'bit'", "bit 63 is outside the fp32 layout"),
    ("trial,workload,site,layer,value,bits\nt,mlp,fwd_output,dense_1,bitflip,33\n",
     "c.csv:2: column 'bits'", "cannot flip 33 distinct bits in the 32-bit fp32 layout"),
    ("trial,workload,site,layer,value\nt,transformer,fwd_input,embed,zero\n",
     "c.csv:2: column 'site'", "cannot corrupt the fwd_input operand of layer 'embed' of dtype "
                               "int64"),
    ("trial,workload,site,layer,value\nt,transformer,grad_in,embed,zero\n",
     "c.csv:2: column 'site'", "cannot corrupt the grad_in operand"),
    ("# two rows of one trial: the error is on the second\n"
     "trial,workload,site,layer,value,bit\nt,mlp,fwd_output,dense_1,bitflip,3\n"
     "t,mlp,fwd_output,dense_2,bitflip,32\n", "c.csv:4: column 'bit'", "bit 32 is outside"),
    ("trial,workload,stage,fmodel,layer\nt,transformer,fwrd_inject,INPUT,embed\n",
     "c.csv:2: column 'fmodel'", "cannot corrupt the fwd_input operand of layer 'embed'"),
    ("model,transformer\nstage,fwrd_inject\nfmodel,INPUT\ntarget_worker,0\n"
     "target_layer,embed\ntarget_epoch,0\ntarget_step,0\n",
     "c.csv:3: column 'fmodel'", "cannot corrupt the fwd_input operand of layer 'embed'"),
], ids=["bit40", "stuck63", "bits33", "int64-fwd_input", "int64-grad_in", "second-row",
        "columnar-fmodel", "isca"])
def test_validate_refuses_at_the_cell(tmp_path, text, where, msg):
    from faultlab.runner.session import validate_trials
    p = tmp_path / "c.csv"
    p.write_text(text)
    camp = load_campaign(p)
    with pytest.raises(SpecError) as e:
        validate_trials(camp.trials)
    s = str(e.value)
    assert s.startswith(f"{tmp_path}/{where}: {msg}"), s
    assert "\n" not in s


# --- 4: file names are escaped in every message -----------------------------------------------

@pytest.mark.parametrize("name", ["no\nsuch.csv", "bad\x1b[31mred.csv", "tab\there.csv",
                                  "cr\rname.csv", "bidi\u202ename.csv", "zw\u200bsp.csv"])
def test_missing_file_names_are_escaped(tmp_path, name):
    with pytest.raises(CampaignError) as e:
        load_campaign(tmp_path / name)
    assert one_line(str(e.value)), repr(str(e.value))
    assert str(e.value).endswith(": no such campaign file")
    assert printable(name) in str(e.value)


def test_a_nul_in_the_path_is_escaped():
    with pytest.raises(CampaignError) as e:
        load_campaign("a\x00b.csv")
    assert str(e.value) == "a\\x00b.csv: cannot read the campaign file: embedded null byte"


def test_undecodable_bytes_in_a_path_are_escaped(tmp_path):
    with pytest.raises(CampaignError) as e:
        load_campaign(bytes(tmp_path) + b"/x\xff\n.csv")
    assert one_line(str(e.value)) and "x\\udcff\\n.csv" in str(e.value)
    str(e.value).encode("utf-8")      # printable on any UTF-8 terminal: no lone surrogate


@pytest.mark.parametrize("name", ["bad\nname.csv", "bad\x1b[31mred.csv"])
def test_errors_inside_a_badly_named_file_are_one_line(tmp_path, name):
    p = tmp_path / name
    p.write_text("trial,workload,replica\nt,mlp,1\n")
    with pytest.raises(CampaignError) as e:
        load_campaign(p)
    msg = str(e.value)
    assert one_line(msg), repr(msg)
    assert msg.startswith(str(tmp_path) + "/" + printable(name) + ":2: column 'site': ")
    assert e.value.file == printable(str(p))


def test_trial_sources_and_locations_are_escaped(tmp_path):
    p = tmp_path / "a\nb.csv"
    p.write_text("trial,workload,site,layer\nt,mlp,fwd_output,dense_1\n")
    camp = load_campaign(p)
    assert camp.path == str(p)                     # the real path, for the results store
    t = camp.trials[0]
    assert one_line(t.source) and t.source.endswith("a\\nb.csv:2")
    assert all(one_line(v) for v in t.locations[0].values())
    assert t.where(0, "bit").endswith("a\\nb.csv:2: column 'bit'")


def test_campaign_error_escapes_file_and_column():
    e = CampaignError("msg", file="x\ny.csv", row=3, column="c\x1b")
    assert str(e) == "x\\ny.csv:3: column 'c\\x1b': msg"
    assert e.where == "x\\ny.csv:3: column 'c\\x1b'"


def test_printable_leaves_ordinary_text_alone():
    for s in ("runs.csv", "dir/ünïcode €.csv", "back\\slash"):
        assert printable(s) == s
    assert printable(b"a\nb") == "a\\nb"
    assert printable(Path("p\x00")) == "p\\x00"


# --- 5: the examples of docs/formats.md are valid ---------------------------------------------

def _doc_examples() -> list[str]:
    text = FORMATS_MD.read_text(encoding="utf-8")
    blocks = re.findall(r"^```[A-Za-z]*\n(.*?)^```", text, re.S | re.M)
    return blocks


def test_docs_have_campaign_examples():
    blocks = _doc_examples()
    assert len(blocks) >= 3
    assert any(b.lstrip().startswith("trial,") for b in blocks)


@pytest.mark.parametrize("index", range(len(_doc_examples())))
def test_docs_examples_parse(index):
    block = _doc_examples()[index]
    camp = parse_campaign(block.encode(), f"formats.md-example-{index}")
    assert camp.trials


@pytest.mark.framework("torch")
@pytest.mark.parametrize("index", range(len(_doc_examples())))
def test_docs_examples_validate(index):
    """Every example validates against its workloads' operands (a TF trial against the same
    canonical shapes from torch, so TF need not be installed)."""
    from faultlab.runner.session import validate_trials
    block = _doc_examples()[index]
    camp = parse_campaign(block.encode(), f"formats.md-example-{index}", framework="torch")
    validate_trials(camp.trials)


# --- 6: datasets are those the workload can train on --------------------------------------------

@pytest.mark.parametrize("text, msg", [
    ("trial,workload,dataset\nt,mlp,nosuchdata\n",
     "column 'dataset': unknown dataset 'nosuchdata': workload mlp trains on digits"),
    ("trial,workload,dataset\nt,resnet18,corpus\n",
     "column 'dataset': workload resnet18 cannot train on dataset 'corpus' (token ids): valid "
     "datasets are cifar10, digits, synthetic"),
    ("trial,workload,dataset\nt,transformer,digits\n",
     "column 'dataset': workload transformer cannot train on dataset 'digits' (images): valid "
     "datasets are corpus"),
    ("trial,workload,dataset\nt,mlp,cifar10\n",
     "column 'dataset': workload mlp cannot train on dataset 'cifar10' (3-channel images): "
     "valid datasets are digits"),
    ("trial,workload,dataset\nt,mlp,synthetic\n", "valid datasets are digits"),
    ("model,resnet18\nstage,fwrd_inject\nfmodel,RD\ntarget_worker,0\ntarget_layer,conv1\n"
     "target_epoch,0\ntarget_step,0\ndataset,corpus\n", "c.csv:8: column 'dataset': workload "
                                                        "resnet18 cannot train on"),
], ids=["unknown", "resnet18-corpus", "transformer-digits", "mlp-cifar10", "mlp-synthetic",
        "isca"])
def test_datasets_are_checked_against_the_workload(text, msg):
    with pytest.raises(CampaignError) as e:
        parse_campaign(text.encode(), "c.csv")
    assert msg in str(e.value), str(e.value)
    assert e.value.column == "dataset"


@pytest.mark.parametrize("wl, ds", [("resnet18", "cifar10"), ("resnet18", "digits"),
                                    ("resnet18", "synthetic"), ("mlp", "digits"),
                                    ("transformer", "corpus")])
def test_datasets_a_workload_trains_on_are_accepted(wl, ds):
    camp = parse_campaign(f"trial,workload,dataset\nt,{wl},{ds}\n".encode(), "c.csv")
    assert camp.trials[0].workload.dataset == ds


def test_user_workloads_keep_their_dataset_name():
    camp = parse_campaign(b"trial,workload,dataset\nt,my.pkg:build,stripes\n", "c.csv",
                          allow_workloads=["my.pkg"])
    assert camp.trials[0].workload.dataset == "stripes"


def test_the_dataset_table_matches_the_datasets():
    from faultlab.workloads import data
    from faultlab.workloads.base import BUILTINS
    assert set(data.WORKLOAD_DATASETS) == set(BUILTINS)
    for wl, names in data.WORKLOAD_DATASETS.items():
        assert BUILTINS[wl].defaults["dataset"] in names
        assert set(names) <= set(data.IMAGE_DATASETS + data.TEXT_DATASETS)


# --- 7: host_state is refused where a file names it ---------------------------------------------

@pytest.mark.parametrize("row", ["t,mlp,host_state,dense_1,,zero",
                                 "t,mlp,HOST_STATE,dense_1,weight,zero",
                                 "t,mlp,host_state,dense_1,m,nan"])
def test_host_state_is_refused_at_the_site_cell(row):
    with pytest.raises(CampaignError) as e:
        parse_campaign(f"trial,workload,site,layer,tensor,value\n{row}\n".encode(), "c.csv")
    assert str(e.value).startswith("c.csv:2: column 'site': site host_state needs an "
                                   "offloaded workload: set the offload column (e.g. window:2)")


def test_every_error_of_this_file_is_a_faultlab_error():
    assert issubclass(CampaignError, FaultlabError) and issubclass(SpecError, FaultlabError)
