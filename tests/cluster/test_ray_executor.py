"""`faultlab run --executor ray` on a real local Ray cluster (tests/cluster/conftest.py: a head
and a worker node as separate processes on 127.0.0.1, one CPU each).

Every campaign runs the real command in a child process (`python -m faultlab.cli run ...
--executor ray --address ADDR`) with a temporary FAULTLAB_CACHE and --results database, and the
tests read the database. Nothing waits a fixed time: conditions are polled with deadlines.

The order of the tests matters only for speed: the node-kill and fingerprint tests change the
cluster and run last; each test makes sure the cluster has the nodes it needs.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="needs Ray: pip install 'faultlab[ray]'")

pytestmark = pytest.mark.framework("torch")

REPO = Path(__file__).resolve().parents[2]
#: how long a run may take before the test gives up on it: a deadline against a hung run,
#: not a speed check (a loaded 2-core machine recording golden runs needs minutes)
TIMEOUT = 600

HEADER = ("trial,workload,replicas,per_replica_batch,width,input_size,dataset,steps_per_epoch,"
          "epochs,site,layer,replica,epoch,step,value,values,positions")
TINY = "mlp,2,8,16,8,digits,5,4"                  # 20 steps: trials of a few milliseconds
LONG = "mlp,2,8,64,8,digits,50,20"                # 1,000 steps: trials of a few seconds
MEDIUM = "mlp,2,8,64,8,digits,25,16"              # 400 steps: about two seconds


def _rows(config: str, n: int) -> str:
    """A control and n-1 faulty trials of `config` (values that differ, some NaN)."""
    rows = [f"control,{config},,,,,,,,"]
    for i in range(1, n):
        value = "nan,," if i % 3 == 0 else f"set,{i * 0.5},"
        rows.append(f"t{i},{config},fwd_output,dense_{1 + i % 3},{i % 2},{i % 4},{i % 5},"
                    f"{value}0/{i % 4}")
    return "\n".join([HEADER, *rows]) + "\n"


def _env(cache: Path, **extra) -> dict:
    env = dict(os.environ, FAULTLAB_CACHE=str(cache), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               **extra)
    env.pop("FAULTLAB_STOP_AFTER", None)
    env.pop("RAY_ADDRESS", None)
    return env


def _start(args, cwd: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "faultlab.cli", *map(str, args)], cwd=cwd,
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(p: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        pytest.fail(f"{p.args} did not finish in {TIMEOUT}s\n{err[-3000:]}")
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _show(p) -> str:
    return f"exit {p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-5000:]}"


def _ray_args(cluster, campaign: Path, db: Path, *extra) -> list:
    return ["run", campaign, "--executor", "ray", "--address", cluster.address,
            "--threads", "1", "--results", db, *extra]


def _db_rows(db: Path) -> dict[str, dict]:
    """trial id -> stored row (a dict); {} while the database does not exist yet."""
    if not db.exists():
        return {}
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        con.row_factory = sqlite3.Row
        rows = con.execute("SELECT * FROM results").fetchall()
    except sqlite3.OperationalError:          # created, table not there yet
        return {}
    finally:
        con.close()
    return {r["trial_id"]: dict(r) for r in rows}


def _poll(cond, what: str, p: subprocess.Popen | None = None, deadline_s: float = TIMEOUT):
    end = time.monotonic() + deadline_s
    while True:
        got = cond()
        if got:
            return got
        if p is not None and p.poll() is not None:
            out, err = p.communicate()
            pytest.fail(f"the run ended (exit {p.returncode}) before {what}\n{err[-3000:]}")
        if time.monotonic() > end:
            pytest.fail(f"no {what} within {deadline_s}s")
        time.sleep(0.1)


def _node(row: dict) -> str | None:
    return json.loads(row["metrics"] or "{}").get("node")


COMPARED = ("outcome", "bit_exact", "steps_run", "first_nonfinite_step", "final_train_acc",
            "final_test_acc", "golden_test_acc", "final_loss", "max_acc_drop")


# --- 1. same outcomes as the local pool, over both nodes ----------------------------------------

def test_two_nodes_give_the_local_pools_outcomes(ray_cluster, tmp_path):
    ray_cluster.ensure_worker()
    campaign = tmp_path / "c.csv"
    campaign.write_text(_rows(TINY, 8))
    env = _env(tmp_path / "cache")
    ray_db, local_db = tmp_path / "ray.sqlite", tmp_path / "local.sqlite"
    ray_p = _finish(_start(_ray_args(ray_cluster, campaign, ray_db, "--workers", "2"),
                           tmp_path, env))
    local_p = _finish(_start(["run", campaign, "--executor", "local", "--workers", "2",
                              "--threads", "1", "--results", local_db], tmp_path, env))
    assert ray_p.returncode == 0, _show(ray_p)
    assert local_p.returncode == 0, _show(local_p)
    ray_rows, local_rows = _db_rows(ray_db), _db_rows(local_db)
    assert set(ray_rows) == set(local_rows) and len(ray_rows) == 8
    for tid, row in local_rows.items():
        assert {k: ray_rows[tid][k] for k in COMPARED} == {k: row[k] for k in COMPARED}, tid
    outcomes = {r["outcome"] for r in ray_rows.values()}
    assert "Masked" in outcomes and "ImmediateINFsNaNs" in outcomes
    assert ray_rows["control"]["bit_exact"] == 1
    nodes = {_node(r) for r in ray_rows.values()}
    assert nodes == ray_cluster.alive_ids(), "trials did not run on both nodes"
    # the table printed is the local pool's (same rows; completion order may differ)
    assert sorted(ray_p.stdout.splitlines()) == sorted(local_p.stdout.splitlines())


# --- 3. the driver killed: run again resumes -----------------------------------------------------

def test_killed_driver_resumes_without_redoing(ray_cluster, tmp_path):
    ray_cluster.ensure_worker()
    n = 6
    campaign = tmp_path / "c.csv"
    campaign.write_text(_rows(MEDIUM, n))
    env = _env(tmp_path / "cache")
    db = tmp_path / "r.sqlite"
    p = _start(_ray_args(ray_cluster, campaign, db, "--workers", "2"), tmp_path, env)
    try:
        _poll(lambda: len(_db_rows(db)) >= 2, "2 stored results", p)
    finally:
        p.send_signal(signal.SIGKILL)
        p.communicate()
    before = _db_rows(db)
    k = len(before)
    assert 2 <= k < n, f"{k} results stored before the kill: make the trials longer"
    again = _finish(_start(_ray_args(ray_cluster, campaign, db, "--workers", "2"),
                           tmp_path, env))
    assert again.returncode == 0, _show(again)
    assert f"resuming: {k} of {n}" in again.stderr, again.stderr
    after = _db_rows(db)
    assert len(after) == n
    for tid, row in before.items():
        assert after[tid] == row, f"trial {tid} was redone or changed"


# --- 5. a trial past --timeout is a Hang, its task cancelled -------------------------------------

def test_timed_out_trial_is_a_hang(ray_cluster, tmp_path):
    ray_cluster.ensure_worker()
    campaign = tmp_path / "c.csv"
    # injected at step 0: the trial runs the whole 1,000 steps (several seconds)
    campaign.write_text(f"{HEADER}\nslow,{LONG},fwd_output,dense_3,0,0,0,set,0.0,0/0\n")
    env = _env(tmp_path / "cache")
    db = tmp_path / "r.sqlite"
    # record the golden run first (it is not subject to --timeout), then time the trial out
    p = _finish(_start(_ray_args(ray_cluster, campaign, db, "--timeout", "0.5"), tmp_path, env))
    assert p.returncode == 0, _show(p)
    rows = _db_rows(db)
    assert rows["slow"]["outcome"] == "Hang", rows
    assert "timed out after 0.5s" in rows["slow"]["error"]
    assert "cancelled" in rows["slow"]["error"]
    assert rows["slow"]["wall_s"] < 5.0
    # the cancelled task freed its CPU: a run on the same cluster right after goes through
    quick = tmp_path / "q.csv"
    quick.write_text(_rows(TINY, 2))
    q = _finish(_start(_ray_args(ray_cluster, quick, tmp_path / "q.sqlite", "--workers", "2"),
                       tmp_path, env))
    assert q.returncode == 0, _show(q)


# --- 2. the worker node killed mid-campaign ------------------------------------------------------

def test_killed_worker_node_is_a_crash_and_the_campaign_finishes(ray_cluster, tmp_path):
    worker = ray_cluster.ensure_worker()
    n = 8
    campaign = tmp_path / "c.csv"
    campaign.write_text(_rows(MEDIUM, n))
    env = _env(tmp_path / "cache")
    db = tmp_path / "r.sqlite"
    p = _start(_ray_args(ray_cluster, campaign, db, "--workers", "2"), tmp_path, env)
    try:
        # some trials finished, one running on the worker node right now
        _poll(lambda: len(_db_rows(db)) >= 1 and ray_cluster.running(worker, "_trial_task"),
              "trial running on the worker node after a stored result", p)
        before = _db_rows(db)
        ray_cluster.remove(worker)
        done = _finish(p)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert done.returncode == 0, _show(done)
    after = _db_rows(db)
    assert len(after) == n, "the campaign did not finish on the head"
    for tid, row in before.items():
        assert after[tid] == row, f"finished trial {tid} was lost or redone"
    crashed = [r for r in after.values() if r["outcome"] == "Crash"]
    assert crashed, "the trial running on the killed node was not recorded as a Crash"
    for r in crashed:
        assert r["trial_id"] not in before
        assert "\n" not in r["error"] and "Ray task lost" in r["error"], r["error"]
        # names the node (Ray says which when it reports the node dead, not a lost worker)
        assert worker.node_id[:8] in r["error"] or "WorkerCrashedError" in r["error"], r["error"]
    head = ray_cluster.head.node_id
    late = [r for tid, r in after.items() if tid not in before and r["outcome"] != "Crash"]
    assert any(_node(r) == head for r in late), "nothing ran on the head after the kill"


# --- 4. a node whose fingerprint differs fails the campaign --------------------------------------

def test_odd_fingerprint_node_fails_natively_in_one_line_and_portable_mode_evens_it_out(
        ray_cluster, tmp_path):
    ray_cluster.ensure_worker()
    odd = ray_cluster.add_worker({"ATEN_CPU_CAPABILITY": "default"})   # torch's non-SIMD kernels
    try:
        campaign = tmp_path / "c.csv"
        campaign.write_text(_rows(TINY, 3))
        db = tmp_path / "r.sqlite"
        native = _finish(_start(_ray_args(ray_cluster, campaign, db) + ["--native"], tmp_path,
                                _env(tmp_path / "cache")))
        assert native.returncode == 2, _show(native)
        errors = [ln for ln in native.stderr.splitlines() if ln.startswith("faultlab: error:")]
        assert len(errors) == 1 and "Traceback" not in native.stderr, native.stderr
        line = errors[0]
        assert odd.node_id[:8] in line and "ATEN_CPU_CAPABILITY" in line, line
        assert ray_cluster.head.node_id[:8] not in line     # only the odd node is named
        assert _db_rows(db) == {}, "trials ran although a node computes differently"
        assert not list((tmp_path / "cache").glob("golden/*")), "a golden run was recorded"
        # portable mode (the default) pins the kernels on every node, the odd one too: one
        # golden run serves all three nodes, each vouched for by its control trial
        port = _finish(_start(_ray_args(ray_cluster, campaign, db), tmp_path,
                              _env(tmp_path / "cache")))
        assert port.returncode == 0, _show(port)
        assert len(_db_rows(db)) == 3
        assert len(list((tmp_path / "cache").glob("golden/*"))) == 1
    finally:
        ray_cluster.remove(odd)
