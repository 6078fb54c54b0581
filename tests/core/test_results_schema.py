"""Results schema version 2: the `runs` table (each campaign run's configuration and golden-run
determinism fingerprint) and the `crash_reports` table (`faultlab crash` campaigns); a version-1
file is read as it is and upgraded, keeping every row, when something new is written to it."""

from __future__ import annotations

import json
import math
import shutil
import sqlite3
from pathlib import Path

import pytest

import faultlab.results as fr
from faultlab.results import APPLICATION_ID, SCHEMA_VERSION, ResultsError, ResultStore, TrialResult
from faultlab.results.store import _SCHEMA

LEGACY = Path(__file__).resolve().parents[1] / "data" / "fed88b5" / "results.sqlite"

FP = {"faultlab": "0.1.0", "python": "3.12.1", "numpy": "2.1.0", "framework": "torch 2.5.0",
      "machine": "x86_64", "isa": "GenuineIntel avx avx2 fma", "env": {"MKL_CBWR": "AVX2"},
      "threads": 2, "device": "cpu", "portable": False}


def _trial(tid: str, campaign: str = "abc") -> TrialResult:
    return TrialResult(campaign=campaign, trial_id=tid, source="c.csv:2", framework="torch",
                       workload="mlp", workload_key="k1", faults=[], outcome="Masked",
                       bit_exact=True, steps_run=3, final_loss=math.nan)


def _v1_file(path: Path) -> None:
    """A results database exactly as schema version 1 wrote it (its SQL), with two trials."""
    con = sqlite3.connect(path, isolation_level=None)
    for stmt in _SCHEMA.split(";"):
        if stmt.strip():
            con.execute(stmt)
    con.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    con.execute("PRAGMA user_version = 1")
    from faultlab.results.store import COLUMNS, _to_row     # the results table is unchanged
    for i, tid in enumerate(("control", "nan")):
        row, nonfinite = _to_row(_trial(tid))
        con.execute(f"INSERT INTO results (seq, nonfinite, {', '.join(COLUMNS)}) VALUES "
                    f"(?, ?, {', '.join('?' for _ in COLUMNS)})", [i + 1, nonfinite, *row])
    con.close()


def _version(path) -> int:
    con = sqlite3.connect(path)
    try:
        return con.execute("PRAGMA user_version").fetchone()[0]
    finally:
        con.close()


def _kill_report(engine="faultlab", **kw) -> dict:
    rep = {"engine": engine, "mode": "kill", "kills": 5, "recoveries": 5, "exact": 4,
           "nothing_committed": 1, "torn": 0, "mixed": 0, "lost_committed": 0,
           "incomplete_state": 0, "steps_lost_total": 5, "steps_lost_mean": 1.0,
           "steps_lost_max": 2, "runs": 1, "runs_bit_identical": 1,
           "kills_by_phase": {"staging": 2, "committing": 3}, "crash_points": 0, "images": 0,
           "resumes": 0, "resumes_bit_identical": 0, "ok": True, "problems": [],
           "wall_s": 1.25, "note": ""}
    rep.update(kw)
    return rep


def test_schema_version_is_2():
    assert SCHEMA_VERSION == 2


def test_a_version_1_file_is_read_unchanged_then_upgraded_keeping_its_rows(tmp_path):
    db = tmp_path / "v1.sqlite"
    _v1_file(db)
    with ResultStore(db) as store:
        assert store.version == 1
        assert [r.trial_id for r in store.results()] == ["control", "nan"]
        assert store.runs() == [] and store.crash_reports() == []
        store.add(_trial("late"))             # a trial needs no new table
    assert _version(db) == 1                  # reading (and adding trials) changes no schema
    with ResultStore(db) as store:
        store.add_runs("abc", [{"workload_key": "k1", "framework": "torch", "workload": "mlp",
                                "config": {"width": 8}, "fingerprint": FP,
                                "fingerprint_source": "golden run", "threads": 2}])
        assert store.version == SCHEMA_VERSION
    assert _version(db) == SCHEMA_VERSION
    with ResultStore(db) as store:
        got = store.results()
        assert [r.trial_id for r in got] == ["control", "nan", "late"]
        assert math.isnan(got[1].final_loss)
        assert [r["workload_key"] for r in store.runs("abc")] == ["k1"]
    assert fr.load(db)["trial_id"].tolist() == ["control", "nan", "late"]


def test_the_committed_legacy_file_upgrades_in_a_copy(tmp_path):
    db = tmp_path / "results.sqlite"
    shutil.copy(LEGACY, db)
    with ResultStore(db) as store:
        before = [r.to_json(strict=True) for r in store.results()]
        assert before and store.version == 1
        store.add_crash_reports([_kill_report()], run_id="r1", workload="mlp")
    with ResultStore(db) as store:
        assert [r.to_json(strict=True) for r in store.results()] == before
        assert [r["engine"] for r in store.crash_reports()] == ["faultlab"]
    assert _version(db) == SCHEMA_VERSION


def test_a_new_file_has_every_table(tmp_path):
    db = tmp_path / "new.sqlite"
    with ResultStore(db) as store:
        assert store.version == SCHEMA_VERSION
    con = sqlite3.connect(db)
    names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    con.close()
    assert {"results", "runs", "crash_reports"} <= names


def test_runs_round_trip_with_the_fingerprint(tmp_path):
    db = tmp_path / "r.sqlite"
    entry = {"workload_key": "k1", "framework": "torch", "workload": "mlp",
             "config": {"workload": "mlp", "width": 8}, "threads": 2, "executor": "local",
             "fingerprint": FP, "fingerprint_source": "golden run"}
    with ResultStore(db) as store:
        store.add_runs("abc", [entry])
        store.add_runs("abc+detect", [entry])
        store.add_runs("abc", [entry])            # the same run again: replaced, not doubled
        store.add_runs("abc", [{**entry, "fingerprint": {**FP, "threads": 4}}])  # elsewhere
        store.add_runs("xyz", [{**entry, "fingerprint": None, "executor": "ray",
                                "fingerprint_source": None}])
    with ResultStore(db) as store:
        runs = store.runs()
        assert [(r["campaign"], r["fingerprint"]["threads"] if r["fingerprint"] else None)
                for r in runs] == [("abc+detect", 2), ("abc", 2), ("abc", 4), ("xyz", None)]
        r = store.runs("abc")[0]
        assert r["fingerprint"] == FP and r["config"] == entry["config"]
        assert r["threads"] == 2 and r["executor"] == "local"
        assert r["fingerprint_source"] == "golden run" and r["recorded_at"].endswith("+00:00")
        from faultlab.determinism import Fingerprint
        assert r["fingerprint_digest"] == Fingerprint.from_dict(FP).digest()
        assert store.runs("xyz")[0]["fingerprint_digest"] is None
    df = fr.load_runs(db, campaign="abc")
    assert list(df.columns) == list(fr.RUNS_COLUMNS)
    assert sorted(df["run"]) == ["detect", "plain", "plain"] and set(df["campaign"]) == {"abc"}
    assert json.loads(df.iloc[0]["fingerprint"]) == FP


def test_crash_reports_round_trip_as_strict_json(tmp_path):
    db = tmp_path / "c.sqlite"
    bad = _kill_report("naive", torn=2, exact=2, recoveries=3, ok=False,
                       problems=["k3 at writing/1: torn: w differs"], steps_lost_mean=math.nan)
    power = _kill_report(mode="power-loss", kills=0, crash_points=8, images=30, exact=30,
                         resumes=4, resumes_bit_identical=4)
    with ResultStore(db) as store:
        store.add_crash_reports([_kill_report(), bad], run_id="r1", workload="mlp", steps=6,
                                every=1, seed=3)
        store.add_crash_reports([power], run_id="r2", workload="mlp", steps=6, every=1, seed=0)
    with ResultStore(db) as store:
        rows = store.crash_reports()
    assert [(r["run_id"], r["mode"], r["engine"], r["ok"]) for r in rows] == [
        ("r1", "kill", "faultlab", True), ("r1", "kill", "naive", False),
        ("r2", "power-loss", "faultlab", True)]
    assert rows[1]["torn"] == 2 and rows[1]["steps_lost_mean"] is None   # NaN: not a number
    assert rows[1]["report"]["steps_lost_mean"] == "NaN"                 # strict JSON
    assert rows[0]["report"] == _kill_report()
    assert (rows[2]["images"], rows[2]["crash_points"], rows[2]["seed"]) == (30, 8, 0)
    con = sqlite3.connect(db)
    for (text,) in con.execute("SELECT report FROM crash_reports"):
        json.loads(text, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    con.close()


def test_load_crash_is_one_row_per_engine_and_campaign(tmp_path):
    db = tmp_path / "c.sqlite"
    with ResultStore(db) as store:
        store.add_crash_reports([_kill_report(), _kill_report("sync")], run_id="r1",
                                workload="mlp", steps=6, every=1, seed=0)
    df = fr.load_crash(db)
    assert list(df.columns) == list(fr.CRASH_REPORT_COLUMNS)
    assert df["engine"].tolist() == ["faultlab", "sync"]
    assert df["kills"].tolist() == [5, 5] and str(df["kills"].dtype) == "Int64"
    assert df["ok"].all() and df["torn"].sum() == 0
    assert json.loads(df.iloc[0]["report"])["kills_by_phase"] == {"staging": 2, "committing": 3}
    empty = tmp_path / "e.sqlite"
    ResultStore(empty).close()
    assert len(fr.load_crash(empty)) == 0 and len(fr.load_runs(empty)) == 0


def test_a_crash_report_of_an_unknown_mode_is_refused(tmp_path):
    with ResultStore(tmp_path / "c.sqlite") as store:
        with pytest.raises(ValueError, match="mode"):
            store.add_crash_reports([_kill_report(mode="flood")], run_id="r", workload="mlp")
        assert store.crash_reports() == []


def test_loaders_name_a_missing_file(tmp_path):
    for load in (fr.load_crash, fr.load_runs):
        with pytest.raises(Exception, match="no such results database"):
            load(tmp_path / "nope.sqlite")


def test_a_newer_schema_than_2_is_still_refused(tmp_path):
    db = tmp_path / "n.sqlite"
    ResultStore(db).close()
    con = sqlite3.connect(db)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.commit()
    con.close()
    with pytest.raises(ResultsError, match="newer"):
        ResultStore(db)
