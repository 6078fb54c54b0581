"""Rank-kill torture of the multi-process runtime (rank_torture.py's docstring says how it
works and what each counter checks): SIGKILL ranks, rank pairs and whole nodes of a 4-rank,
2-node job from outside, wiping memory domains with them; the job must end bit-identical to
the uninterrupted one. The quick variant runs by default; the long one is marked slow
(FAULTLAB_RANK_KILLS, default 60; FAULTLAB_RANK_SEED; FAULTLAB_RANK_REPORT: a JSON report)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import rank_torture  # noqa: E402

pytest.importorskip("torch")


def _check(out: dict) -> None:
    bad = {k: out[k] for k in rank_torture.BAD if out[k]}
    assert not bad, f"seed(s) {out.get('failed_seeds', out.get('seed'))}: {bad}\n" + "\n".join(
        out.get("failures", []) or [f for j in out.get("per_job", []) for f in j["failures"]])


def _rec(attempt, source, step):
    return {"event": "recovery", "reason": "restart", "attempt": attempt, "source": source,
            "step": step}


def test_the_oracle_catches_lost_and_future_recoveries():
    # no processes: the judge of recoveries against the bounds noted at each kill
    timeline = [{"attempt": 0, "step": s} for s in range(30)]
    kills = [{"attempt": 0, "kind": "rank", "disk": 19, "mem": 27}]
    judge = rank_torture.judge_recoveries
    assert judge([_rec(1, "memory", 27)], kills, timeline)[1:3] == (0, 0)
    assert judge([_rec(1, "memory", 26)], kills, timeline)[1] == 1       # memory step lost
    assert judge([_rec(1, "disk", 14)], kills, timeline)[1] == 1         # committed step lost
    assert judge([_rec(1, "scratch", None)], kills, timeline)[1] == 1    # everything lost
    assert judge([_rec(1, "memory", 30)], kills, timeline)[2] == 1       # never ran
    # a pair or node kill wipes memory: only the disk bound holds
    wiped = [{"attempt": 0, "kind": "pair", "disk": 19, "mem": None}]
    assert judge([_rec(1, "disk", 19)], wiped, timeline)[1:3] == (0, 0)
    # attempts that stalled in between keep the memory bound; a recovery in between ends it
    assert judge([_rec(3, "memory", 26)], kills, timeline)[1] == 1
    assert judge([_rec(1, "memory", 27), _rec(3, "memory", 25)], kills, timeline)[1] == 0
    # the disk bound holds for every later recovery
    later = kills + [{"attempt": 2, "kind": "node", "disk": 9, "mem": None}]
    assert judge([_rec(1, "memory", 27), _rec(3, "disk", 14)], later, timeline)[1] == 1
    sources = judge([_rec(1, "memory", 27), _rec(3, "disk", 19)], later, timeline)[0]
    assert sources == {"memory": 1, "disk": 1, "scratch": 0}


def test_rank_torture_quick(record_property):
    # one job of 200 steps, 6 kills, all timed into training (~15 steps of progress each;
    # the slow test adds kills timed into the attempts' start). ~45 s on 2 idle cores, plus
    # ~40 s per start-up stall of the agent if one happens (docs/hardening.md, "Rank kills")
    out = rank_torture.run_one(3, 6, 200, early_p=0.0)
    print(rank_torture.line(out))
    record_property("rank_torture", {k: v for k, v in out.items() if k != "failures"})
    _check(out)
    assert out["kills"] == 6
    assert out["bit_identical"]
    assert sum(out["recoveries"].values()) >= 1


@pytest.mark.slow
def test_rank_torture_long(record_property):
    kills = int(os.environ.get("FAULTLAB_RANK_KILLS", "60"))
    seed = int(os.environ.get("FAULTLAB_RANK_SEED", "1"))
    report = os.environ.get("FAULTLAB_RANK_REPORT")
    out = rank_torture.run_kills(kills, seed=seed, per_job=25, report=report, verbose=True)
    print("TOTAL " + rank_torture.summary_line(out))
    if report:
        Path(report).write_text(json.dumps(out, indent=1))
    record_property("rank_torture", {k: v for k, v in out.items() if k != "per_job"})
    _check(out)
    assert out["kills"] >= kills
    assert out["bit_identical_jobs"] == out["jobs"]
