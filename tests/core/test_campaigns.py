"""Campaign files: both formats parse to the right trials, and bad input is always a one-line
CampaignError naming file, row and column (never another exception)."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from faultlab.campaigns import (COLUMNS, ISCA_KEYS, Campaign, detect_format, format_columnar,
                                load_campaign, parse_campaign, parse_columnar, parse_isca)
from faultlab.errors import CampaignError
from faultlab.faults import (BitLayout, Duration, DurationKind, PositionMode, PositionSpec, Site,
                             ValueModel, ValueSpec)
from faultlab.process_faults import KillPhase, ProcessFault
from faultlab.testing.strategies import fault_specs
from faultlab.trials import Trial
from faultlab.workloads.base import default_config

def write(tmp_path: Path, text: str | bytes, name: str = "c.csv") -> Path:
    p = tmp_path / name
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    return p


ROOT = Path(__file__).resolve().parents[2]
REF_DIRS = [Path("/work/shared/reference/isca_ae/injections"),
            ROOT / "shared" / "reference" / "isca_ae" / "injections"]
# byte-exact copies of the artifact's files, used where the reference folder is not present
def _isca_file(stage, fmodel, worker, layer, epoch, step, pos, value) -> bytes:
    return (f"model,resnet18\nstage,{stage}\nfmodel,{fmodel}\ntarget_worker,{worker}\n"
            f"target_layer,{layer}\ntarget_epoch,{epoch}\ntarget_step,{step}\n"
            f"inj_pos,{pos}\ninj_values,{value}\nlearning_rate,0.001\nseed,123\n").encode()


REF_BYTES = {
    "inj_immediate_infs_nans.csv": _isca_file("fwrd_inject", "RD", 1, "basicblock_2_basic_0_conv2",
                                              19, 38, "107/3/3/85", "2.86871514043344e+24"),
    "inj_masked.csv": _isca_file("fwrd_inject", "WT", 3, "basicblock_4_basic_0_conv2", 30, 32,
                                 "2/2/383/201", "0.0606911815702915"),
    "inj_slow_degrade.csv": _isca_file("bkwd_inject", "INPUT", 5,
                                       "basicblock_4_basic_0_downsample_grad_in", 7, 35,
                                       "124/3/1/450", "8.98393226329413e+17"),
}


@pytest.fixture(params=sorted(REF_BYTES))
def reference(request, tmp_path) -> Path:
    """One ISCA reference file, unmodified: the shared original, else its embedded copy."""
    for d in REF_DIRS:
        if (d / request.param).is_file():
            assert (d / request.param).read_bytes() == REF_BYTES[request.param]
            return d / request.param
    return write(tmp_path, REF_BYTES[request.param], request.param)

SLOW = """model,resnet18
stage,bkwd_inject
fmodel,INPUT
target_worker,5
target_layer,basicblock_4_basic_0_downsample_grad_in
target_epoch,7
target_step,35
inj_pos,124/3/1/450
inj_values,8.98393226329413e+17
learning_rate,0.001
seed,123
"""

COLUMNAR = """\
trial,workload,replicas,steps_per_epoch,epochs,site,layer,replica,epoch,step,value,bit,positions
a,mlp,4,10,5,fwd_output,fc1,3,2,9,bitflip,30,0/5;1/7
b,mlp,4,10,5,param,fc2,0,0,0,zero,,
,mlp,,,,,,,,,,,
"""


def essence(trials):
    """A trial list without its `source` (which names the file and row)."""
    return [(t.trial_id, t.workload, t.faults, t.horizon) for t in trials]


def error_of(text: str | bytes, framework=None) -> CampaignError:
    data = text.encode() if isinstance(text, str) else text
    with pytest.raises(CampaignError) as info:
        parse_campaign(data, "f.csv", framework)
    e = info.value
    assert "\n" not in str(e) and "\r" not in str(e)
    assert e.file == "f.csv"
    return e


# --- the ISCA reference files ---------------------------------------------------------------

REFERENCE = {
    "inj_slow_degrade.csv": (Site.BWD_INPUT, "basicblock_4_basic_0_downsample", 5, 7 * 49 + 35,
                             (124, 3, 1, 450), 8.98393226329413e+17),
    "inj_masked.csv": (Site.FWD_WEIGHT, "basicblock_4_basic_0_conv2", 3, 30 * 49 + 32,
                       (2, 2, 383, 201), 0.0606911815702915),
    "inj_immediate_infs_nans.csv": (Site.FWD_OUTPUT, "basicblock_2_basic_0_conv2", 1,
                                    19 * 49 + 38, (107, 3, 3, 85), 2.86871514043344e+24),
}


def test_reference_isca_files_parse_unmodified(reference):
    site, layer, replica, step, pos, value = REFERENCE[reference.name]
    c = load_campaign(reference)
    assert isinstance(c, Campaign) and c.format == "isca" and len(c.digest) == 16
    (trial,) = c.trials
    assert trial.trial_id == "0" and trial.horizon is None
    cfg = trial.workload
    assert (cfg.workload, cfg.replicas, cfg.steps_per_epoch, cfg.epochs) == ("resnet18", 8, 49, 80)
    assert (cfg.lr, cfg.seed) == (0.001, 123)
    (f,) = trial.faults
    assert (f.site, f.layer, f.replica, f.step) == (site, layer, replica, step)
    assert f.value == ValueSpec(ValueModel.SET, values=(value,))
    assert f.positions == PositionSpec(PositionMode.EXPLICIT, indices=(pos,))
    assert f.duration == Duration(DurationKind.TRANSIENT)
    assert f.seed == 123 and f.tensor is None


def test_crlf_bom_comments_and_trailing_commas_parse_the_same(tmp_path, reference):
    name = reference.name
    text = reference.read_text()
    base = essence(load_campaign(reference).trials)
    crlf = load_campaign(write(tmp_path, text.replace("\n", "\r\n")))
    assert essence(crlf.trials) == base
    noisy = "\ufeff# replay of " + name + "\n\n" + text.replace("\n", ",\n\n   \n")
    assert essence(load_campaign(write(tmp_path, noisy, "n.csv")).trials) == base
    assert crlf.digest != load_campaign(reference).digest   # the bytes differ


def test_digest_covers_the_bytes_and_the_framework_override(tmp_path):
    p = write(tmp_path, SLOW)
    d = load_campaign(p).digest
    assert d == load_campaign(p).digest == load_campaign(str(p)).digest
    assert load_campaign(p, "tf").digest not in (d, load_campaign(p, "torch").digest)


def test_framework_override_beats_the_file(tmp_path):
    p = write(tmp_path, SLOW + "framework,tf\n")
    assert load_campaign(p).trials[0].workload.framework.value == "tf"
    assert load_campaign(p, framework="torch").trials[0].workload.framework.value == "torch"
    q = write(tmp_path, COLUMNAR.replace("trial,", "framework,trial,").replace("\na,", "\ntf,a,")
              .replace("\nb,", "\n,b,").replace("\n,mlp", "\ntf,,mlp"), "q.csv")
    assert [t.workload.framework.value for t in load_campaign(q).trials] == ["tf", "torch", "tf"]
    assert {t.workload.framework.value for t in load_campaign(q, "TF").trials} == {"tf"}
    e = error_of(SLOW, framework="jax")
    assert e.column == "framework" and "jax" in str(e)


def test_isca_extension_keys(tmp_path):
    text = SLOW.replace("model,resnet18", "model,mlp").replace(
        "target_layer,basicblock_4_basic_0_downsample_grad_in", "target_layer,fc2_grad_in")
    text += ("replicas,8\nsteps_per_epoch,49\nepochs,9\nwidth,16\nper_replica_batch,4\n"
             "input_size,8\ndataset,digits\neval_samples,64\ncheckpoint_every,7\nhorizon,12\n"
             "duration,steps\nduration_steps,3\nfault_seed,99\nframework,tf\n")
    (t,) = load_campaign(write(tmp_path, text)).trials
    cfg = t.workload
    assert (cfg.workload, cfg.replicas, cfg.epochs, cfg.width, cfg.per_replica_batch) == \
        ("mlp", 8, 9, 16, 4)
    assert (cfg.input_size, cfg.eval_samples, cfg.checkpoint_every) == (8, 64, 7)
    assert cfg.framework.value == "tf" and t.horizon == 12
    (f,) = t.faults
    assert f.layer == "fc2" and f.duration == Duration(DurationKind.STEPS, steps=3)
    assert f.seed == 99 and f.step == 7 * 49 + 35


def test_isca_without_values_uses_the_fmodels_own_distribution():
    text = "\n".join(l for l in SLOW.splitlines() if not l.startswith(("inj_", "fmodel")))
    (t,) = parse_isca(text + "\nfmodel,N16_RD\n", "x.csv")
    (f,) = t.faults
    assert f.site is Site.GRAD_IN and f.value.model is ValueModel.RANDOM
    assert f.positions == PositionSpec(PositionMode.CONSECUTIVE, count=16)
    (t,) = parse_isca(text + "\nfmodel,INPUT_16\ninj_pos,1/2/3/4,5/6/7/8\n", "x.csv")
    f = t.faults[0]
    assert f.value == ValueSpec(ValueModel.BITFLIP, layout=BitLayout.BF16)
    assert f.positions.indices == ((1, 2, 3, 4), (5, 6, 7, 8))


def test_isca_values_may_be_nonfinite_one_per_position():
    text = SLOW.replace("inj_pos,124/3/1/450", "inj_pos,1/1/1/1,2/2/2/2,3/3/3/3").replace(
        "inj_values,8.98393226329413e+17", "inj_values,nan,-inf,1e400")
    f = parse_isca(text, "x.csv")[0].faults[0]
    v = f.value.values
    assert math.isnan(v[0]) and v[1] == -math.inf and v[2] == math.inf


def _replace_line(text: str, key: str, new: str | None) -> str:
    lines = text.splitlines()
    out = [new if l.split(",")[0] == key else l for l in lines]
    return "\n".join(l for l in out if l is not None) + "\n"


# (edit of SLOW, row, column, words in the message)
ISCA_BAD = [
    (lambda t: _replace_line(t, "target_worker", "target_worker,8"), 4, "target_worker",
     "out of range 0..7"),
    (lambda t: _replace_line(t, "target_worker", "target_worker,-1"), 4, "target_worker",
     "out of range"),
    (lambda t: _replace_line(t, "target_worker", "target_worker,1.5"), 4, "target_worker",
     "integer"),
    (lambda t: _replace_line(t, "target_worker", "target_worker,true"), 4, "target_worker",
     "integer"),
    (lambda t: _replace_line(t, "target_worker", "target_worker,1e400"), 4, "target_worker",
     "integer"),
    (lambda t: _replace_line(t, "target_worker", "target_worker," + "9" * 5000), 4,
     "target_worker", "out of range"),
    (lambda t: _replace_line(t, "target_step", "target_step,49"), 7, "target_step",
     "out of range 0..48"),
    (lambda t: _replace_line(t, "target_epoch", "target_epoch,80"), 6, "target_epoch",
     "out of range 0..79"),
    (lambda t: _replace_line(t, "target_epoch", "target_epoch,5,6"), 6, "target_epoch",
     "one value"),
    (lambda t: _replace_line(t, "target_epoch", "target_epoch"), 6, "target_epoch", "no value"),
    (lambda t: _replace_line(t, "target_epoch", "target_epoch,,3"), 6, "target_epoch", "empty"),
    (lambda t: _replace_line(t, "target_epoch", None), None, "target_epoch", "missing"),
    (lambda t: t + "seed,4\n", 12, "seed", "duplicate key seed (first on row 11)"),
    (lambda t: t + "colour,red\n", 12, "colour", "unknown key"),
    (lambda t: _replace_line(t, "model", "model,resnet18_sgd"), 1, "model", "not built in"),
    (lambda t: _replace_line(t, "model", "model,vgg"), 1, "model", "unknown workload"),
    (lambda t: _replace_line(t, "model", "model,os:system;rm"), 1, "model", "module.path"),
    (lambda t: _replace_line(t, "stage", "stage,sideways"), 2, "stage", "fwrd_inject"),
    (lambda t: _replace_line(t, "fmodel", "fmodel,MAGIC"), 3, "fmodel", "unknown fmodel"),
    (lambda t: _replace_line(t, "target_layer", "target_layer,basicblock_4_basic_0_downsample"),
     5, "target_layer", "_grad_in"),
    (lambda t: _replace_line(t, "target_layer", "target_layer,a b"), 5, "target_layer",
     "not a valid name"),
    (lambda t: _replace_line(t, "inj_pos", "inj_pos,1/2/x/4"), 8, "inj_pos", "integer"),
    (lambda t: _replace_line(t, "inj_pos", "inj_pos,1/2/-3/4"), 8, "inj_pos", "out of range"),
    (lambda t: _replace_line(t, "inj_pos", "inj_pos,1/2/3/4,1/2/3"), 8, "inj_pos",
     "dimensions"),
    (lambda t: _replace_line(t, "inj_pos", "inj_pos,1/2/3/4,1/2/3/4"), 8, "inj_pos", "twice"),
    (lambda t: _replace_line(t, "inj_pos", None), 8, "inj_values", "needs inj_pos"),
    (lambda t: _replace_line(t, "inj_values", "inj_values,1,2"), 9, "inj_values",
     "2 inj_values for 1 positions"),
    (lambda t: _replace_line(t, "inj_values", "inj_values,big"), 9, "inj_values", "number"),
    (lambda t: _replace_line(t, "learning_rate", "learning_rate,nan"), 10, "learning_rate",
     "finite"),
    (lambda t: _replace_line(t, "learning_rate", "learning_rate,1e999"), 10, "learning_rate",
     "overflows"),
    (lambda t: _replace_line(t, "learning_rate", "learning_rate,-0.1"), 10, "learning_rate",
     "positive"),
    (lambda t: _replace_line(t, "seed", "seed,-5"), 11, "seed", "out of range"),
    (lambda t: t + "replicas,0\n", 12, "replicas", "out of range 1.."),
    (lambda t: t + "replicas,4\n", 4, "target_worker", "out of range 0..3"),
    (lambda t: t + "duration,forever\n", 12, "duration", "unknown duration"),
    (lambda t: t + "duration,steps\n", 12, "duration_steps", "needs duration_steps"),
    (lambda t: t + "duration_steps,3\n", 12, "duration_steps", "applies to duration 'steps'"),
    (lambda t: t + "duration,intermittent\nprobability,1.5\n", 13, "probability", "(0, 1]"),
    (lambda t: t + "framework,jax\n", 12, "framework", "unknown framework"),
    (lambda t: t + "horizon,-1\n", 12, "horizon", "out of range"),
    (lambda t: t + "dataset,../../etc\n", 12, "dataset", "not a valid name"),
]


@pytest.mark.parametrize("edit,row,column,words", ISCA_BAD)
def test_malformed_isca_names_row_and_column(edit, row, column, words):
    e = error_of(edit(SLOW))
    assert (e.row, e.column) == (row, column), str(e)
    assert words in str(e)
    crlf = error_of(edit(SLOW).replace("\n", "\r\n"))   # the same with CRLF line ends
    assert (crlf.row, crlf.column, crlf.message) == (e.row, e.column, e.message)


# --- reading files: nothing but CampaignError -----------------------------------------------

def test_missing_file_and_directory_name_the_path(tmp_path):
    with pytest.raises(CampaignError, match="no such campaign file") as info:
        load_campaign(tmp_path / "nope.csv")
    assert info.value.file == str(tmp_path / "nope.csv")
    with pytest.raises(CampaignError, match="directory") as info:
        load_campaign(tmp_path)
    assert info.value.file == str(tmp_path)
    with pytest.raises(CampaignError):
        load_campaign(str(tmp_path / "a\0b"))
    if os.path.exists("/dev/null"):
        with pytest.raises(CampaignError, match="regular file"):
            load_campaign("/dev/null")


@pytest.mark.parametrize("data,row,words", [
    (b"", None, "empty"),
    (b"  \n\t\r\n \n", None, "only blank lines and comments"),
    (b"# just a comment\n\n#another\n", None, "only blank lines and comments"),
    (b"model,resnet18\nstage,\xff\xfe\n", 2, "not UTF-8"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", 1, "not UTF-8"),
    (b"model,resnet18\nseed,1\x002\n", 2, "NUL"),
    (b"hello world\n", 1, "neither format"),
    (b"\n\n{\"model\": 1}\n", 3, "neither format"),
    (b"trial,site,layer\n1,param,fc1\n", 1, "no 'workload' column"),
])
def test_unreadable_or_unrecognised_files(tmp_path, data, row, words):
    with pytest.raises(CampaignError) as info:
        load_campaign(write(tmp_path, data))
    assert info.value.row == row and words in str(info.value)


def test_detection():
    assert detect_format(SLOW) == "isca"
    assert detect_format(COLUMNAR) == "columnar"
    assert detect_format("# c\n\nseed,lr,WORKLOAD\n") == "columnar"
    assert detect_format("seed,1\n") == "isca"


# --- the columnar format ---------------------------------------------------------------------

def test_columnar_rows_become_trials(tmp_path):
    c = load_campaign(write(tmp_path, COLUMNAR))
    assert c.format == "columnar"
    a, b, control = c.trials
    assert [t.trial_id for t in c.trials] == ["a", "b", "4"]   # default id: the row number
    assert a.workload == default_config("mlp", replicas=4, steps_per_epoch=10, epochs=5)
    (f,) = a.faults
    assert (f.site, f.layer, f.replica, f.step) == (Site.FWD_OUTPUT, "fc1", 3, 29)
    assert f.value == ValueSpec(ValueModel.BITFLIP, bit=30)
    assert f.positions == PositionSpec(PositionMode.EXPLICIT, indices=((0, 5), (1, 7)))
    assert b.faults[0].value.model is ValueModel.ZERO
    assert b.faults[0].positions == PositionSpec(PositionMode.RANDOM, count=1)
    assert control.faults == () and control.workload == default_config("mlp")
    assert a.source.endswith(":2") and control.source.endswith(":4")


def test_columnar_crlf_case_insensitive_header_quotes_and_comments(tmp_path):
    base = load_campaign(write(tmp_path, COLUMNAR)).trials
    variant = ("# a campaign\r\n" + COLUMNAR.replace("trial,workload", " Trial , WORKLOAD ")
               .replace("fwd_output,fc1", '"FWD_OUTPUT", "fc1"').replace("\n", "\r\n"))
    got = load_campaign(write(tmp_path, variant, "v.csv")).trials
    # the default id is the row number, which the comment line moved
    assert [t.faults for t in got] == [t.faults for t in base]
    assert [t.trial_id for t in got] == ["a", "b", "5"]


def test_multi_fault_trial_and_inherited_workload_cells():
    text = ("trial,workload,replicas,lr,horizon,site,layer,tensor,replica,value,factor,ramp,"
            "duration,duration_steps,probability\n"
            "t1,mlp,4,0.01,5,param,fc1,bias,1,scale,2.5,,permanent,,\n"
            "t2,mlp,,,,grad_wt,fc2,,0,zero,,,,,\n"
            "t1,mlp,,,,opt_state,fc2,v,3,degrade,,0.1,steps,4,\n"
            "t1,mlp,4,0.01,5,fwd_input,fc1,,2,nan,,,intermittent,,0.25\n")
    t1, t2 = parse_columnar(text, "m.csv")
    assert t1.trial_id == "t1" and len(t1.faults) == 3 and t1.horizon == 5
    assert (t1.workload.replicas, t1.workload.lr) == (4, 0.01)
    f0, f1, f2 = t1.faults
    assert (f0.site, f0.tensor, f0.value) == (Site.PARAM, "bias", ValueSpec(ValueModel.SCALE,
                                                                              factor=2.5))
    assert f0.duration.kind is DurationKind.PERMANENT
    assert (f1.site, f1.tensor, f1.replica, f1.value.ramp) == (Site.OPT_STATE, "v", 3, 0.1)
    assert f1.duration == Duration(DurationKind.STEPS, steps=4)
    assert f2.duration == Duration(DurationKind.INTERMITTENT, probability=0.25)
    assert len({f.seed for f in t1.faults} | {t2.faults[0].seed}) == 4  # distinct default seeds
    assert parse_columnar(text, "other-name.csv")[0].faults == t1.faults  # deterministic
    assert t2.workload == default_config("mlp")


def test_columnar_isca_names():
    text = ("workload,stage,fmodel,layer,replica,epoch,step,positions,values\n"
            "resnet18,bkwd_inject,INPUT,basicblock_4_basic_0_downsample_grad_in,5,7,35,"
            "124/3/1/450,8.98393226329413e+17\n"
            "resnet18,fwrd_inject,N64_WT_16,conv1,0,0,0,,\n")
    a, b = parse_columnar(text, "i.csv")
    (f,) = a.faults
    assert (f.site, f.layer) == (Site.BWD_INPUT, "basicblock_4_basic_0_downsample")
    assert (f.replica, f.step) == (5, 7 * 49 + 35)
    assert f.value.values == (8.98393226329413e+17,)
    g = b.faults[0]
    assert g.site is Site.FWD_WEIGHT and g.value.model is ValueModel.COPY
    assert g.positions == PositionSpec(PositionMode.CONSECUTIVE, count=64)


def test_columnar_value_and_position_columns():
    text = ("workload,site,layer,value,bit,bits,stuck,layout,values,position_mode,count,groups,"
            "positions\n"
            "mlp,fwd_output,fc1,bitflip,,3,,fp16,,consecutive,8,,\n"
            "mlp,fwd_output,fc1,stuck_at,7,,0,int8,,groups,4,9,\n"
            "mlp,fwd_output,fc1,set,,,,,1.5;nan;-inf,random,3,,\n"
            "mlp,fwd_output,fc1,-INF,,,,,,,,,3/4\n")
    a, b, c, d = (t.faults[0] for t in parse_columnar(text, "v.csv"))
    assert a.value == ValueSpec(ValueModel.BITFLIP, bits=3, layout=BitLayout.FP16)
    assert a.positions == PositionSpec(PositionMode.CONSECUTIVE, count=8)
    assert b.value == ValueSpec(ValueModel.STUCK_AT, bit=7, stuck=0, layout=BitLayout.INT8)
    assert b.positions == PositionSpec(PositionMode.GROUPS, count=4, groups=9)
    assert c.value.values[0] == 1.5 and math.isnan(c.value.values[1])
    assert c.positions == PositionSpec(PositionMode.RANDOM, count=3)
    assert d.value.model is ValueModel.NEG_INF and d.positions.indices == ((3, 4),)


HEAD = "trial,workload,replicas,steps_per_epoch,site,layer,replica,epoch,step,value,bit,values\n"
OK = "1,mlp,4,10,fwd_output,fc1,0,0,0,bitflip,3,\n"


def _cell(col: str, value: str, row: str = OK, head: str = HEAD) -> str:
    names = head.strip().split(",")
    cells = row.rstrip("\n").split(",")
    cells[names.index(col)] = value
    return head + OK + ",".join(cells) + "\n"


# (text, row, column, words)
COLUMNAR_BAD = [
    (_cell("replica", "4"), 3, "replica", "replica 4 is out of range 0..3"),
    (_cell("replica", "x"), 3, "replica", "integer"),
    (_cell("step", "10"), 3, "step", "out of range 0..9"),
    (_cell("epoch", "10"), 3, "epoch", "out of range 0..9"),
    (_cell("epoch", "1.0"), 3, "epoch", "integer"),
    (_cell("replicas", "yes"), 3, "replicas", "integer"),
    (_cell("replicas", "2"), 3, "replicas", "disagree"),
    (_cell("workload", "transformer"), 3, "workload", "disagree"),
    (_cell("workload", ""), 3, "workload", "required"),
    (_cell("workload", "nfnet"), 3, "workload", "not built in"),
    (_cell("site", "elsewhere"), 3, "site", "unknown site"),
    (_cell("site", ""), 3, "site", "site is required"),
    (_cell("layer", ""), 3, "layer", "layer is required"),
    (_cell("value", "melt"), 3, "value", "unknown value model"),
    (_cell("bit", "64"), 3, "bit", "out of range 0..63"),
    (_cell("values", "1.0"), 3, "values", "applies to value set"),
    (HEAD + OK + "1,mlp,4,10,fwd_output,fc1,0,0,0,set,,\n", 3, "values",
     "required for value set"),
    ("workload,site,layer,value\nmlp,param,fc1,scale\n", 2, "factor",
     "required for value scale"),
    (HEAD + "3,mlp,4,10,,,,,,,,\n,mlp,4,10,,,,,,,,\n", 3, "trial", "collides"),
    (_cell("trial", "a b"), 3, "trial", "not a valid name"),
    (HEAD + OK + "1,mlp,4,10,fwd_output,fc1,0,0,0,bitflip\n", 3, None, "fields"),
    (HEAD + OK + "1,mlp,4,10,fwd_output,fc1,0,0,0,bitflip,3,,junk\n", 3, None, "fields"),
    (HEAD + OK + '1,mlp,4,10,"fwd_output,fc1,0,0,0,bitflip,3,\n', 3, None, "malformed CSV"),
    (HEAD + ",mlp,4,10,,,,,,,,\n2,mlp,4,10,,,,,,,,\n", 3, "trial", "collides"),
    (HEAD + "c,mlp,4,10,,,,,,,,\nc,mlp,4,10,,,,,,,,\n", 3, "trial", "control"),
    (HEAD + "c,mlp,4,10,,fc1,,,,,,\n", 2, "site", "site is required"),
    (HEAD, 1, None, "no trials"),
    (HEAD.replace("bit,", "bit,BIT,"), 1, "bit", "duplicate column"),
    (HEAD.replace("bit,", "colour,"), 1, "colour", "unknown column"),
    (HEAD.replace("bit,", ","), 1, None, "empty"),
    ("workload,site,layer,fmodel,stage\nmlp,param,fc1,WT,fwrd_inject\n", 2, "fmodel",
     "not both"),
    ("workload,layer,fmodel\nmlp,fc1,WT\n", 2, "stage", "required"),
    ("workload,layer,fmodel,stage\nmlp,fc1_grad_in,WT,fwrd_inject\n", 2, "layer", "backward"),
    ("workload,layer,fmodel,stage,bit\nmlp,fc1,WT,fwrd_inject,3\n", 2, "bit", "fmodel"),
    ("workload,layer,fmodel,stage,values\nmlp,fc1,RD,fwrd_inject,3\n", 2, "values",
     "need positions"),
    ("workload,site,layer,tensor\nmlp,fwd_output,fc1,weight\n", 2, "tensor", "state sites"),
    ("workload,site,layer,tensor\nmlp,opt_state,fc1,weight\n", 2, "tensor", "m, v"),
    ("workload,site,layer,value,ramp\nmlp,param,fc1,degrade,0\n", 2, "ramp", "non-zero"),
    ("workload,site,layer,value,factor\nmlp,param,fc1,scale,inf\n", 2, "factor", "finite"),
    ("workload,site,layer,positions\nmlp,param,fc1,1/2;3\n", 2, "positions", "dimensions"),
    ("workload,site,layer,positions,position_mode\nmlp,param,fc1,1/2,random\n", 2,
     "positions", "position_mode is random"),
    ("workload,site,layer,position_mode\nmlp,param,fc1,explicit\n", 2, "positions", "needs"),
    ("workload,site,layer,count,positions\nmlp,param,fc1,2,1/2\n", 2, "count", "explicit"),
    ("workload,site,layer,groups\nmlp,param,fc1,2\n", 2, "groups", "groups"),
    ("workload,site,layer,value,values,positions\nmlp,param,fc1,set,1;2;3,1/2;3/4\n", 2,
     "values", "3 values for 2 positions"),
    ("workload,site,layer,value,bit,bits\nmlp,param,fc1,bitflip,3,2\n", 2, "bits", "not both"),
    ("workload,site,layer,value,stuck\nmlp,param,fc1,stuck_at,2\n", 2, "stuck", "0..1"),
    ("workload,site,layer,layout\nmlp,param,fc1,fp8\n", 2, "layout", "unknown bit layout"),
    ("workload,site,layer,probability\nmlp,param,fc1,0.5\n", 2, "probability", "intermittent"),
    ("workload,site,layer,fault_seed\nmlp,param,fc1,-1\n", 2, "fault_seed", "out of range"),
    ("workload,lr\nmlp,0\n", 2, "lr", "positive"),
    ("workload,lr\nmlp,inf\n", 2, "lr", "finite"),
    ("workload,epochs\nmlp,99999999999999999999999999999999\n", 2, "epochs", "out of range"),
    ("workload,horizon\nmlp,1e3\n", 2, "horizon", "integer"),
    ("workload,framework\nmlp,jax\n", 2, "framework", "unknown framework"),
    ("workload\nbad:name:x\n", 2, "workload", "module.path:function"),
]


@pytest.mark.parametrize("text,row,column,words", COLUMNAR_BAD)
def test_malformed_columnar_names_row_and_column(text, row, column, words):
    e = error_of(text)
    assert (e.row, e.column) == (row, column), str(e)
    if words:
        assert words in str(e)
    crlf = error_of(text.replace("\n", "\r\n"))
    assert (crlf.row, crlf.column, crlf.message) == (e.row, e.column, e.message)


def test_error_message_names_file_row_and_column():
    e = error_of(_cell("replica", "9"))
    assert str(e) == "f.csv:3: column 'replica': replica 9 is out of range 0..3 (4 replicas)"


# --- property-based: fuzzing and round trips -------------------------------------------------

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _outcome(data: bytes, framework=None):
    """Parse; anything but success or a one-line CampaignError fails the test."""
    try:
        return parse_campaign(data, "fuzz.csv", framework)
    except CampaignError as e:
        assert "\n" not in str(e) and "\r" not in str(e) and e.file == "fuzz.csv"
        assert len(str(e)) < 2000
        return None


@FUZZ
@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_raise_anything_but_campaign_error(data):
    _outcome(data)


@FUZZ
@given(st.text(max_size=300))
def test_arbitrary_text_never_raises_anything_but_campaign_error(text):
    _outcome(text.encode("utf-8", "surrogatepass"))
    for parse in (parse_isca, parse_columnar):
        try:
            parse(text, "fuzz.csv")
        except CampaignError:
            pass


TOKENS = (list(ISCA_KEYS) + list(COLUMNS) + ["resnet18", "mlp", "1", "0", "-1", "1.5", "nan",
          "inf", "1e400", "9" * 40, "a/b", "1/2/3/4", "1;2", "", " ", ",", '"', "\r", "#",
          "fwd_output", "set", "bitflip", "INPUT", "bkwd_inject", "x_grad_in", "m:f", "\x00",
          "\ufeff", "é"])
junk = st.one_of(st.sampled_from(TOKENS), st.text(max_size=12))


@st.composite
def mutated(draw, base: str):
    lines = base.splitlines()
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, max(len(lines) - 1, 0)))
        op = draw(st.sampled_from(["drop", "swap", "dup", "junk", "swapkey"]))
        if not lines:
            lines = [draw(junk)]
        elif op == "drop":
            del lines[i]
        elif op == "dup":
            lines.insert(draw(st.integers(0, len(lines))), lines[i])
        elif op == "junk":
            lines.insert(draw(st.integers(0, len(lines))),
                         ",".join(draw(st.lists(junk, min_size=1, max_size=4))))
        else:
            cells = lines[i].split(",")
            j = draw(st.integers(0, len(cells) - 1)) if op == "swap" else 0
            cells[j] = draw(junk)
            lines[i] = ",".join(cells)
    eol = draw(st.sampled_from(["\n", "\r\n"]))
    return eol.join(lines) + draw(st.sampled_from(["", eol]))


@FUZZ
@given(mutated(SLOW))
def test_mutated_isca_files_never_raise_anything_but_campaign_error(text):
    _outcome(text.encode("utf-8", "surrogatepass"))


@FUZZ
@given(mutated(COLUMNAR + "t,mlp,4,10,5,opt_state,fc1,2,1,1,set,,1/2\n"))
def test_mutated_columnar_files_never_raise_anything_but_campaign_error(text):
    _outcome(text.encode("utf-8", "surrogatepass"))


def test_the_valid_bases_of_the_mutations_parse():
    assert _outcome(SLOW.encode()) is not None
    assert _outcome((COLUMNAR + "t,mlp,4,10,5,opt_state,fc1,2,1,1,zero,,1/2\n").encode())


LAYER_NAMES = ["fc1", "fc2", "conv1", "blocks.0.attn", "basicblock_2_basic_0_conv2"]


@st.composite
def workloads(draw):
    name = draw(st.sampled_from(["mlp", "transformer", "resnet18", "my.pkg:build"]))
    cfg = default_config(name)
    kw = {}
    if draw(st.booleans()):
        kw = dict(replicas=draw(st.integers(1, 8)), steps_per_epoch=draw(st.integers(1, 50)),
                  epochs=draw(st.integers(1, 20)), seed=draw(st.integers(0, 2**63 - 1)),
                  lr=draw(st.floats(1e-6, 1.0)), framework=draw(st.sampled_from(["torch", "tf"])),
                  checkpoint_every=draw(st.integers(0, 30)))
    procs = draw(st.sampled_from([1, 1, 2, 4]))
    if procs > 1 and kw.get("framework", cfg.framework.value) == "torch":
        # torch.distributed ranks: one replica each, spread over nodes that divide them
        kw.update(processes=procs, replicas=procs,
                  nodes=draw(st.sampled_from([n for n in (1, 2, 4) if procs % n == 0])))
    return cfg.replace(**kw)


@st.composite
def process_faults(draw, cfg):
    """A kill, hang or kill_node the workload can take (torch only)."""
    kinds = ["kill", "hang"] + (["kill_node"] if cfg.nodes > 1 else [])
    kind = draw(st.sampled_from(kinds))
    step = draw(st.integers(0, cfg.total_steps - 1))
    phase = draw(st.sampled_from(list(KillPhase))) if kind != "hang" else KillPhase.STEP
    if kind == "kill_node":
        return ProcessFault(kind, step, node=draw(st.integers(0, cfg.nodes - 1)), phase=phase)
    return ProcessFault(kind, step, rank=draw(st.integers(0, cfg.processes - 1)), phase=phase)


def faults(cfg):
    """Any fault the columnar format can hold for `cfg`: faultlab.testing's strategy, widened
    to indices a full-size operand may have and SET values that include NaN and +-Inf."""
    return fault_specs(layers=LAYER_NAMES, max_replica=cfg.replicas - 1,
                       max_step=cfg.total_steps - 1, max_index=2**31 - 1, max_count=64,
                       max_groups=9, set_values=st.floats())


@st.composite
def trial_lists(draw):
    out = []
    for i in range(draw(st.integers(1, 4))):
        cfg = draw(workloads())
        fs = tuple(draw(faults(cfg)) for _ in range(draw(st.integers(0, 3))))
        n = draw(st.integers(0, 2)) if cfg.framework.value == "torch" else 0
        ps = tuple(draw(process_faults(cfg)) for _ in range(n))
        out.append(Trial(f"t{i}", cfg, fs, horizon=draw(st.none() | st.integers(0, 500)),
                         process_faults=ps))
    return out


@FUZZ
@given(trial_lists(), st.sampled_from(["\n", "\r\n"]))
def test_columnar_round_trip_gives_back_the_same_trials(trials, eol):
    text = format_columnar(trials).replace("\n", eol)
    # my.pkg:build is a user workload: a campaign file names it only when it is allowed
    got = parse_campaign(text.encode(), "rt.csv", allow_workloads=["my.pkg"]).trials
    assert len(got) == len(trials)
    for a, b in zip(got, trials):
        # repr: NaN replacement values compare unequal to themselves
        assert (a.trial_id, a.workload, a.horizon) == (b.trial_id, b.workload, b.horizon)
        assert repr(a.faults) == repr(b.faults)
        assert a.process_faults == b.process_faults


def test_the_examples_in_docs_formats_parse():
    doc = ROOT / "docs" / "formats.md"
    if not doc.is_file():
        pytest.skip("docs/formats.md not present")
    section = doc.read_text().split("## Campaign files", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```\n(.*?)```", section, re.S)
    assert len(blocks) >= 3
    formats = [parse_campaign(b.encode(), "doc.csv").format for b in blocks]
    assert formats.count("isca") >= 2 and "columnar" in formats
