"""The framework-free half of multi-process trials (runner/ranks.py, report): the job's text
form, the trial summary, the report, and the command line's one-line errors."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from faultlab.faults import fault
from faultlab.process_faults import KillPhase, ProcessFault
from faultlab.report import format_distributed
from faultlab.results.store import TrialResult
from faultlab.runner import ranks
from faultlab.runner.session import DetectOptions
from faultlab.trials import Trial
from faultlab.workloads.base import default_config

ROOT = Path(__file__).resolve().parents[2]
CFG = default_config("mlp", processes=4, nodes=2, epochs=2)


def _pf(draw_kind, step, who, phase):
    if draw_kind == "kill_node":
        return ProcessFault("kill_node", step, node=who % 2, phase=phase)
    return ProcessFault(draw_kind, step, rank=who, phase="step" if draw_kind == "hang" else phase)


process_faults = st.builds(_pf, st.sampled_from(["kill", "hang", "kill_node"]),
                           st.integers(0, 39), st.integers(0, 3),
                           st.sampled_from([p.value for p in KillPhase]))


@settings(max_examples=40, deadline=None)
@given(st.lists(process_faults, max_size=3), st.integers(0, 3), st.integers(1, 5),
       st.booleans(), st.booleans())
def test_a_job_survives_its_text_form(pfs, replica, every, zero, protect):
    faults = (fault("param", "dense_2", replica=replica, step=3, value="bitflip", bit=30,
                    positions=[(0, 1)]),)
    det = DetectOptions(("nonfinite", "divergence"), (("z", 9.0),), 4, "stop") if protect else None
    job = ranks.RankJob(CFG, "/tmp/run", "/dev/shm/x", faults, tuple(pfs),
                        snapshot_every=every, zero=zero, detect=det, port=1234)
    back = ranks.job_from_json(ranks.job_to_json(job))
    assert back == job


def test_the_job_text_holds_no_pickle():
    job = ranks.RankJob(CFG, "/tmp/run", "/dev/shm/x")
    text = ranks.job_to_json(job)
    assert text.startswith("{") and "trial,framework,workload" in text


def _result(tid, fired, recoveries, lost, exact=True, torn=0, mixed=0, lc=0):
    d = {"fired": fired, "recoveries": recoveries, "steps_lost": lost, "restarts": len(fired),
         "detections": [], "torn": torn, "mixed": mixed, "lost_committed": lc}
    return TrialResult(campaign="c", trial_id=tid, source="f:2", framework="torch",
                       workload="mlp", workload_key="k", faults=fired, outcome="Masked",
                       bit_exact=exact, inject_step=7, first_nonfinite_step=None,
                       final_train_acc=0.5, final_test_acc=0.9, golden_test_acc=0.9,
                       final_loss=0.3, max_acc_drop=0.0, steps_run=40, wall_s=1.0,
                       metrics={"processes": 4, "distributed": d})


def test_the_report_lists_recoveries_and_crash_consistency():
    kill = {"process": "kill", "rank": 1, "step": 7, "phase": "staging"}
    node = {"process": "kill_node", "node": 1, "step": 9, "phase": "step"}
    rs = [_result("a", [kill], [{"reason": "restart", "source": "memory", "step": 6,
                                 "seconds": 0.02}], 1),
          _result("b", [node], [{"reason": "restart", "source": "disk", "step": 4,
                                 "seconds": 0.5}], 4, torn=0, mixed=1)]
    text = format_distributed(rs)
    assert "kill rank 1 in staging" in text and "memory@6" in text
    assert "kill_node node 1" in text and "disk@4" in text
    assert "torn 0, mixed 1, lost-committed 0" in text
    assert "5 step(s) of work lost" in text
    assert format_distributed([]) == ""


def test_steps_lost_count_the_work_run_again():
    trial = Trial("t", CFG, process_faults=(ProcessFault("kill", 7, rank=1),
                                            ProcessFault("kill", 12, rank=0, phase="staging")))
    rec = ranks.JobRecord(ok=True, events=[
        {"event": "fault", "fault": trial.process_faults[0].to_dict(), "attempt": 0,
         "time": 100.0},
        {"event": "recovery", "reason": "restart", "source": "memory", "step": 6,
         "seconds": 0.1, "attempt": 1, "disk_newest": 4, "time": 102.5},
        {"event": "fault", "fault": trial.process_faults[1].to_dict(), "attempt": 1,
         "time": 110.0},
        {"event": "recovery", "reason": "restart", "source": "memory", "step": 11,
         "seconds": 0.1, "attempt": 2, "disk_newest": 9, "time": 111.0}], attempts=2)
    s = ranks._summary(rec, trial)
    # killed before step 7 ran, resumed at 7: nothing lost; killed while staging step 12
    # (step 12 done), resumed at 12: one step lost
    assert s["steps_lost"] == 1
    assert s["lost_committed"] == 0 and s["torn"] == 0 and s["mixed"] == 0
    assert s["downtime_s"] == [2.5, 1.0]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "faultlab.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_a_port_in_use_is_one_line_and_exit_2(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        got = _cli("run", "campaigns/distributed.csv", "--port", port,
                   "--results", tmp_path / "r.sqlite")
    assert got.returncode == 2
    assert got.stderr.count("\n") == 1 and f"port {port} on 127.0.0.1 is already in use" in got.stderr
    assert not (tmp_path / "r.sqlite").exists()


@pytest.mark.parametrize("flag,value,message", [
    ("--copies", "-1", "--copies must be at least 0"),
    ("--snapshot-every", "0", "--snapshot-every must be at least 1"),
    ("--rank-timeout", "0", "--rank-timeout must be positive"),
    ("--port", "70000", "--port must be from 0 to 65535")])
def test_bad_multi_process_options_are_one_line_and_exit_2(tmp_path, flag, value, message):
    got = _cli("run", "campaigns/distributed.csv", flag, value, "--results", tmp_path / "r.sqlite")
    assert got.returncode == 2 and message in got.stderr and got.stderr.count("\n") == 1


def test_a_kill_row_for_tensorflow_is_refused_in_one_line(tmp_path):
    f = tmp_path / "tf.csv"
    f.write_text("trial,framework,workload,site,replica,step\nk,tf,mlp,kill,0,3\n")
    got = _cli("validate", f)
    assert got.returncode == 2 and got.stderr.count("\n") == 1
    assert "TensorFlow multi-worker training is out of scope" in got.stderr


def test_fsdp_refuses_faults_on_sharded_tensors_at_the_row():
    from faultlab.campaigns.columnar import parse_columnar
    from faultlab.errors import SpecError
    text = ("trial,workload,processes,site,layer,replica,step,value,bit,positions\n"
            "a,mlp,2,fwd_output,dense_1,1,3,nan,,0/0\n"
            "b,mlp,2,param,dense_1,1,3,bitflip,30,0/0\n")
    trials = parse_columnar(text, "c.csv")
    ranks.check_options(trials, ranks.DistOptions())            # DDP takes both
    with pytest.raises(SpecError, match=r"c\.csv:3: .*site param is not supported with --fsdp"):
        ranks.check_options(trials, ranks.DistOptions(fsdp=True))
    with pytest.raises(SpecError, match="choose one"):
        ranks.check_options(trials, ranks.DistOptions(zero=True, fsdp=True))
