"""Multi-process workloads (processes, nodes) and process faults (kill, hang, kill_node) on the
campaign side: WorkloadConfig, ProcessFault, Trial, both campaign formats, validation and the
`faultlab validate` command. Framework-free (the CLI test validates a torch workload)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from faultlab.campaigns import format_columnar, parse_campaign, parse_columnar
from faultlab.errors import CampaignError, SpecError
from faultlab.faults import FaultSpec, Site, ValueModel, ValueSpec
from faultlab.process_faults import (KillPhase, ProcessFault, ProcessKind,
                                     check_process_fault)
from faultlab.trials import Trial
from faultlab.workloads import estimate as est
from faultlab.workloads.base import WorkloadConfig, default_config

#: default_config("mlp").key() before processes and nodes existed (golden-run cache key)
MLP_KEY_BEFORE = "d466f20755a3e7b9"


def parse(text: str, path: str = "c.csv"):
    return parse_campaign(text.encode(), path).trials


def refused(text: str, path: str = "c.csv") -> str:
    with pytest.raises(CampaignError) as e:
        parse(text, path)
    msg = str(e.value)
    assert "\n" not in msg and "\r" not in msg
    return msg


# --- WorkloadConfig ------------------------------------------------------------------------------

def test_single_process_keys_and_dicts_are_unchanged():
    cfg = default_config("mlp")
    assert (cfg.processes, cfg.nodes) == (1, 1)
    assert cfg.key() == MLP_KEY_BEFORE
    assert "processes" not in cfg.to_dict() and "nodes" not in cfg.to_dict()
    assert default_config("mlp", processes=1, nodes=1).key() == MLP_KEY_BEFORE


def test_multi_process_configs_have_their_own_key():
    a = default_config("mlp", processes=4)
    b = default_config("mlp", processes=4, nodes=2)
    assert a.replicas == 4 and a.global_batch == 4 * a.per_replica_batch
    assert a.to_dict()["processes"] == 4 and "nodes" not in a.to_dict()
    assert b.to_dict()["nodes"] == 2
    assert len({a.key(), b.key(), default_config("mlp", replicas=4).key()}) == 3
    assert b.ranks_per_node == 2 and b.node_ranks(1) == (2, 3) and b.node_of(3) == 1


@pytest.mark.parametrize("kw, field, text", [
    (dict(processes=4, replicas=2), "replicas", "replicas 2 must equal processes 4"),
    (dict(processes=4, replicas=4, nodes=3), "nodes", "nodes 3 must divide processes 4"),
    (dict(processes=1, nodes=2), "nodes", "nodes 2 must divide processes 1"),
    (dict(processes=0), "processes", "processes must be a positive integer"),
    (dict(nodes=0), "nodes", "nodes must be a positive integer"),
    (dict(processes=True), "processes", "positive integer"),
    (dict(processes=2, replicas=2, framework="tf"), "processes",
     "TensorFlow multi-worker training is out of scope: processes must be 1 for framework tf "
     "(use replicas for MirroredStrategy)"),
])
def test_the_config_refuses_bad_process_settings(kw, field, text):
    with pytest.raises(SpecError) as e:
        WorkloadConfig("mlp", **kw)
    assert e.value.field == field and text in str(e.value) and "\n" not in str(e.value)


def test_the_estimate_multiplies_one_rank_by_the_processes(monkeypatch):
    one = est.estimate(default_config("mlp", replicas=1))
    four = est.estimate(default_config("mlp", processes=4))
    assert four.total_bytes == 4 * one.total_bytes and four.largest == one.largest
    monkeypatch.setenv(est.MEMORY_ENV, str(3 * one.total_bytes))
    est.check_fits(default_config("mlp", processes=2))
    with pytest.raises(SpecError) as e:
        est.check_fits(default_config("mlp", processes=4))
    assert e.value.field == "processes"
    assert str(e.value).startswith("workload mlp with processes 4 needs about ")


def test_more_ranks_than_the_machine_can_run_are_refused(monkeypatch):
    monkeypatch.setattr(est.os, "cpu_count", lambda: 2)
    assert est.max_processes() == 16
    est.check_fits(default_config("mlp", processes=16))
    with pytest.raises(SpecError) as e:
        est.check_fits(default_config("mlp", processes=17))
    assert e.value.field == "processes" and "at most 16" in str(e.value)
    monkeypatch.setattr(est.os, "cpu_count", lambda: 64)
    assert est.max_processes() == 64
    # user workloads have no size estimate, but the rank bound holds for them too
    with pytest.raises(SpecError):
        est.check_fits(default_config("my.pkg:build", processes=65))


# --- ProcessFault --------------------------------------------------------------------------------

def test_process_faults_describe_themselves():
    k = ProcessFault("KILL", 7, rank=1)
    assert k.kind is ProcessKind.KILL and k.phase is KillPhase.STEP
    assert k.to_dict() == {"process": "kill", "rank": 1, "step": 7, "phase": "step"}
    n = ProcessFault(ProcessKind.KILL_NODE, 3, node=1, phase="persisting")
    assert n.to_dict() == {"process": "kill_node", "node": 1, "step": 3, "phase": "persisting"}
    for f in (k, n, ProcessFault("hang", 0, rank=0)):
        assert ProcessFault.from_dict(f.to_dict()) == f
    cfg = default_config("mlp", processes=4, nodes=2)
    assert n.ranks(cfg) == (2, 3) and k.ranks(cfg) == (1,)


@pytest.mark.parametrize("args, kw, field", [
    (("explode", 1), dict(rank=0), "process"),
    (("kill", -1), dict(rank=0), "step"),
    (("kill", 1), dict(rank=-1), "rank"),
    (("kill", 1), dict(), "rank"),
    (("kill", 1), dict(rank=0, node=0), "node"),
    (("kill_node", 1), dict(rank=0), "rank"),
    (("kill_node", 1), dict(), "node"),
    (("hang", 1), dict(rank=0, phase="staging"), "phase"),
    (("kill", 1), dict(rank=0, phase="later"), "phase"),
    (("kill", 1.5), dict(rank=0), "step"),
])
def test_process_faults_are_checked_when_built(args, kw, field):
    with pytest.raises(SpecError) as e:
        ProcessFault(*args, **kw)
    assert e.value.field == field and "\n" not in str(e.value)


@pytest.mark.parametrize("fault, cfg, field, text", [
    (ProcessFault("kill", 0, rank=4), dict(processes=4), "rank", "rank 4 is out of range 0..3"),
    (ProcessFault("kill", 0, rank=1), dict(), "rank", "(1 process)"),
    (ProcessFault("kill_node", 0, node=0), dict(processes=4), "node", "needs nodes > 1"),
    (ProcessFault("kill_node", 0, node=2), dict(processes=4, nodes=2), "node",
     "node 2 is out of range 0..1"),
    (ProcessFault("kill", 200, rank=0), dict(), "step", "past the run's 200 steps"),
    (ProcessFault("kill", 0, rank=0), dict(framework="tf"), "process",
     "kill rows need framework torch: TensorFlow multi-worker training is out of scope"),
])
def test_process_faults_are_checked_against_the_config(fault, cfg, field, text):
    with pytest.raises(SpecError) as e:
        check_process_fault(fault, default_config("mlp", **cfg))
    assert e.value.field == field and text in str(e.value)


# --- Trial ---------------------------------------------------------------------------------------

def _value_fault(step: int) -> FaultSpec:
    return FaultSpec(Site.FWD_OUTPUT, ValueSpec(ValueModel.ZERO), layer="dense_1", step=step)


def test_trials_count_process_faults():
    cfg = default_config("mlp", processes=2)
    plain = Trial("t", cfg, (_value_fault(9),))
    both = dataclasses.replace(plain, process_faults=(ProcessFault("kill", 4, rank=1),))
    only = Trial("k", cfg, process_faults=(ProcessFault("hang", 12, rank=0),))
    assert plain.inject_step == 9 and both.inject_step == 4 and only.inject_step == 12
    assert not only.is_control and Trial("c", cfg).is_control
    assert both.describe_faults()[-1] == {"process": "kill", "rank": 1, "step": 4,
                                          "phase": "step"}
    assert len(both.describe_faults()) == 2 and len(plain.describe_faults()) == 1
    assert plain.digest() != both.digest()
    # no process faults: the digest is computed as it was before they existed
    import hashlib
    import json

    from faultlab.trials import fault_to_dict
    blob = json.dumps({"w": cfg.to_dict(), "f": [fault_to_dict(_value_fault(9))], "h": None},
                      sort_keys=True).encode()
    assert plain.digest() == hashlib.sha256(blob).hexdigest()[:16]


# --- the columnar format -------------------------------------------------------------------------

HEAD = "trial,workload,processes,nodes,site,layer,replica,epoch,step,phase,node,value\n"


def test_kill_hang_and_kill_node_rows_parse():
    trials = parse(HEAD +
                   "k,mlp,4,2,kill,,1,2,3,,,\n"
                   "h,mlp,4,,hang,,3,0,5,step,,\n"
                   "n,mlp,4,2,KILL_NODE,,,1,0,Persisting,1,\n"
                   "c,mlp,4,2,kill,,0,0,7,committing,,\n")
    k, h, n, c = trials
    assert k.workload.processes == 4 and k.workload.replicas == 4 and k.workload.nodes == 2
    assert k.process_faults == (ProcessFault("kill", 43, rank=1),) and k.faults == ()
    assert h.process_faults == (ProcessFault("hang", 5, rank=3),) and h.workload.nodes == 1
    assert n.process_faults == (ProcessFault("kill_node", 20, node=1, phase="persisting"),)
    assert c.process_faults[0].phase is KillPhase.COMMITTING
    assert k.process_where(0, "rank") == "c.csv:2: column 'replica'"


def test_a_trial_mixes_value_and_process_faults():
    (t,) = parse(HEAD +
                 "m,mlp,2,,fwd_output,dense_1,1,1,0,,,zero\n"
                 "m,mlp,,,kill,,0,0,9,,,\n"
                 "m,mlp,,,fwd_output,dense_2,0,2,0,,,nan\n")
    assert [f.layer for f in t.faults] == ["dense_1", "dense_2"]
    assert t.process_faults == (ProcessFault("kill", 9, rank=0),)
    assert t.inject_step == 9 and len(t.locations) == 3
    assert t.where(1, "layer") == "c.csv:4: column 'layer'"
    assert t.process_where(0, "rank") == "c.csv:3: column 'replica'"
    # the default fault seed still counts the row's index within its trial (the kill is 1)
    (u,) = parse(HEAD + "m,mlp,2,,fwd_output,dense_1,1,1,0,,,zero\n"
                        "m,mlp,,,fwd_output,dense_2,0,2,0,,,nan\n")
    assert u.faults[1].seed != t.faults[1].seed


def test_processes_imply_the_replicas():
    (t,) = parse("trial,workload,processes\nt,mlp,4\n")
    assert t.workload.replicas == 4
    (t,) = parse("trial,workload,processes,replicas\nt,mlp,4,4\n")
    assert t.workload.replicas == 4
    (t,) = parse("trial,workload,processes\nt,mlp,1\n")       # one process: the default replicas
    assert (t.workload.processes, t.workload.replicas) == (1, default_config("mlp").replicas)


VALUE_COLUMNS = {"value": "zero", "bit": "3", "bits": "2", "stuck": "1", "factor": "2.0",
                 "values": "1.0", "ramp": "0.1", "layout": "fp16", "positions": "0/1",
                 "position_mode": "random", "count": "2", "groups": "2",
                 "duration": "permanent", "duration_steps": "2", "probability": "0.5",
                 "layer": "dense_1", "tensor": "m", "fmodel": "RD", "stage": "fwrd_inject",
                 "fault_seed": "3"}


@pytest.mark.parametrize("col", sorted(VALUE_COLUMNS))
@pytest.mark.parametrize("kind, where", [("kill", "replica,1"), ("hang", "replica,1"),
                                         ("kill_node", "node,1")])
def test_a_process_row_refuses_every_value_fault_column(col, kind, where):
    wcol, wval = where.split(",")
    msg = refused(f"trial,workload,processes,nodes,site,{wcol},{col}\n"
                  f"t,mlp,4,2,{kind},{wval},{VALUE_COLUMNS[col]}\n")
    assert msg == f"c.csv:2: column '{col}': a {kind} row takes no value-fault columns"


@pytest.mark.parametrize("text, col, part", [
    # process columns on a value row, or on a control row
    ("trial,workload,site,layer,phase\nt,mlp,fwd_output,dense_1,step\n", "phase",
     "phase applies only to process-fault rows (site kill, hang, kill_node)"),
    ("trial,workload,site,layer,node\nt,mlp,fwd_output,dense_1,0\n", "node",
     "node applies only to process-fault rows"),
    ("trial,workload,phase\nt,mlp,step\n", "phase", "phase applies only to process-fault rows"),
    # processes and replicas
    ("trial,workload,processes,replicas\nt,mlp,4,2\n", "replicas",
     "replicas 2 must equal processes 4 (one data-parallel replica per rank)"),
    ("trial,workload,processes,replicas,site,replica\nt,mlp,4,,kill,0\nt,mlp,,2,kill,1\n",
     "replicas", "replicas 2 must equal processes 4"),
    ("trial,workload,processes,site,replica\nt,mlp,4,kill,0\nt,mlp,2,kill,1\n", "processes",
     "rows of trial t disagree on processes"),
    ("trial,workload,processes,framework\nt,mlp,4,tf\n", "processes",
     "TensorFlow multi-worker training is out of scope: processes must be 1 for framework tf "
     "(use replicas for MirroredStrategy)"),
    ("trial,workload,processes,nodes\nt,mlp,4,3\n", "nodes", "nodes 3 must divide processes 4"),
    ("trial,workload,processes\nt,mlp,0\n", "processes", "out of range 1..65536"),
    ("trial,workload,processes\nt,mlp,65536\n", "processes", "more ranks than this machine"),
    ("trial,workload,processes\nt,my.pkg:build,65536\n", "workload", "not allowed"),
    # the rank, the node, the step, the phase, the framework
    ("trial,workload,processes,site,replica\nt,mlp,4,kill,4\n", "replica",
     "replica 4 is out of range 0..3: a kill row's replica is the rank, and the workload has "
     "4 processes"),
    ("trial,workload,site,replica\nt,mlp,hang,1\n", "replica", "has 1 process"),
    ("trial,workload,processes,site,node\nt,mlp,4,kill_node,0\n", "node", "needs nodes > 1"),
    ("trial,workload,processes,nodes,site,node\nt,mlp,4,2,kill_node,2\n", "node",
     "node 2 is out of range 0..1 (2 nodes)"),
    ("trial,workload,processes,nodes,site\nt,mlp,4,2,kill_node\n", "node",
     "node is required for a kill_node row"),
    ("trial,workload,processes,nodes,site,replica,node\nt,mlp,4,2,kill_node,1,1\n", "replica",
     "a kill_node row names its node in column node"),
    ("trial,workload,processes,site,replica,node\nt,mlp,4,kill,1,1\n", "node",
     "a kill row names its rank in column replica"),
    ("trial,workload,processes,site,replica,phase\nt,mlp,4,hang,1,staging\n", "phase",
     "a hang fires only at phase step"),
    ("trial,workload,processes,site,replica,phase\nt,mlp,4,kill,1,later\n", "phase",
     "unknown kill phase 'later'"),
    ("trial,workload,processes,site,epoch\nt,mlp,4,kill,10\n", "epoch", "past the run's"),
    ("trial,workload,processes,site,step\nt,mlp,4,kill,20\n", "step", "out of range 0..19"),
    ("trial,workload,framework,site\nt,mlp,tf,kill\n", "site",
     "kill rows need framework torch: TensorFlow multi-worker training is out of scope"),
    ("trial,workload,processes,site\nt,mlp,4,kill\nt,mlp,,\n", "trial",
     "mixes a fault-free control row"),
])
def test_bad_rows_are_one_line_at_the_column(text, col, part):
    msg = refused(text)
    assert msg.startswith("c.csv:"), msg
    assert f": column '{col}': " in msg and part in msg, msg


def test_the_isca_format_takes_processes_and_nodes():
    base = ("model,mlp\nstage,fwrd_inject\nfmodel,RD\ntarget_worker,3\ntarget_layer,dense_1\n"
            "target_epoch,0\ntarget_step,0\n")
    (t,) = parse(base + "processes,4\nnodes,2\n", "i.csv")
    assert (t.workload.processes, t.workload.nodes, t.workload.replicas) == (4, 2, 4)
    msg = refused(base + "processes,4\nreplicas,2\n", "i.csv")
    assert msg == ("i.csv:9: column 'replicas': replicas 2 must equal processes 4 (one "
                   "data-parallel replica per rank)")
    msg = refused(base + "processes,2\n", "i.csv")           # target_worker 3 of 2 ranks
    assert msg.startswith("i.csv:4: column 'target_worker': target_worker 3 is out of range")
    msg = refused(base + "processes,4\nnodes,3\n", "i.csv")
    assert msg.startswith("i.csv:9: column 'nodes': nodes 3 must divide")


# --- round trips ---------------------------------------------------------------------------------

@st.composite
def process_trials(draw):
    out = []
    for i in range(draw(st.integers(1, 4))):
        procs = draw(st.sampled_from([1, 2, 4, 8]))
        nodes = draw(st.sampled_from([n for n in (1, 2, 4) if procs % n == 0]))
        cfg = default_config("mlp", processes=procs, nodes=nodes,
                             steps_per_epoch=draw(st.integers(1, 9)),
                             epochs=draw(st.integers(1, 5)))
        kinds = ["kill", "hang"] + (["kill_node"] if nodes > 1 else [])
        pfs = []
        for _ in range(draw(st.integers(0, 3))):
            kind = draw(st.sampled_from(kinds))
            step = draw(st.integers(0, cfg.total_steps - 1))
            if kind == "kill_node":
                pfs.append(ProcessFault(kind, step, node=draw(st.integers(0, nodes - 1)),
                                        phase=draw(st.sampled_from(list(KillPhase)))))
            elif kind == "hang":
                pfs.append(ProcessFault(kind, step, rank=draw(st.integers(0, procs - 1))))
            else:
                pfs.append(ProcessFault(kind, step, rank=draw(st.integers(0, procs - 1)),
                                        phase=draw(st.sampled_from(list(KillPhase)))))
        values = tuple(FaultSpec(Site.FWD_OUTPUT, ValueSpec(ValueModel.ZERO), layer="dense_1",
                                 replica=draw(st.integers(0, cfg.replicas - 1)),
                                 step=draw(st.integers(0, cfg.total_steps - 1)),
                                 seed=draw(st.integers(0, 2**63 - 1)))
                       for _ in range(draw(st.integers(0, 2))))
        out.append(Trial(f"t{i}", cfg, values, process_faults=tuple(pfs),
                         horizon=draw(st.none() | st.integers(0, 50))))
    return out


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(process_trials())
def test_process_trials_round_trip_through_the_columnar_format(trials):
    back = parse_columnar(format_columnar(trials), "rt.csv")
    assert len(back) == len(trials)
    for a, b in zip(back, trials):
        assert (a.trial_id, a.workload, a.horizon, a.faults, a.process_faults) == \
               (b.trial_id, b.workload, b.horizon, b.faults, b.process_faults)
        assert a.digest() == b.digest()


# --- validation and the command line -------------------------------------------------------------

def test_validate_trials_places_process_faults_at_their_row():
    from faultlab.runner.session import validate_trials
    (t,) = parse(HEAD + "k,mlp,4,2,kill,,1,2,3,,,\n")
    validate_trials([t])
    bad = dataclasses.replace(t, process_faults=(ProcessFault("kill_node", 0, node=5),))
    with pytest.raises(SpecError) as e:
        validate_trials([bad])
    assert str(e.value).startswith("c.csv:2: column 'node': node 5 is out of range 0..1")


def test_faultlab_validate_refuses_a_bad_kill_row_with_one_line(tmp_path):
    (tmp_path / "bad.csv").write_text("trial,workload,processes,site,replica,bit\n"
                                      "t,mlp,4,kill,1,3\n")
    (tmp_path / "ok.csv").write_text(HEAD + "k,mlp,4,2,kill,,1,2,3,,,\n"
                                            "k,mlp,,,fwd_output,dense_1,3,1,0,,,zero\n")
    runs = [subprocess.run([sys.executable, "-m", "faultlab.cli", "validate", name],
                           cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=300) for name in ("bad.csv", "ok.csv")]
    bad, ok = runs
    assert bad.returncode == 2, bad.stderr
    assert "Traceback" not in bad.stderr
    assert bad.stderr == ("faultlab: error: bad.csv:2: column 'bit': a kill row takes no "
                          "value-fault columns\n")
    assert ok.returncode == 0, ok.stderr
