"""Tests of the results store, exports and summaries (faultlab.results)."""

from __future__ import annotations

import csv
import io
import json
import math
import multiprocessing
import sqlite3
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from faultlab.errors import FaultlabError
from faultlab.results import (EXPORT_COLUMNS, OUTCOMES, SCHEMA_VERSION, TOTAL, OutcomeRow,
                              ResultStore, TrialResult, describe_faults, format_results,
                              format_summary, summarize, to_csv, to_pandas, to_parquet,
                              to_records, wilson_interval)

NAN, INF = float("nan"), float("inf")

FAULT = {"site": "fwd_output", "layer": "conv1", "replica": 0, "step": 7, "value": "bitflip",
         "positions": "random", "duration": "transient", "seed": 3, "count": 1, "bit": 30}


def make(trial_id="t0", campaign="c" * 16, outcome="Masked", **kw) -> TrialResult:
    base = dict(campaign=campaign, trial_id=trial_id, source="camp.csv:2", framework="torch",
                workload="cnn", workload_key="k123", faults=[dict(FAULT)], outcome=outcome,
                bit_exact=False, inject_step=7, steps_run=20, wall_s=1.25,
                final_test_acc=0.9, golden_test_acc=0.91)
    base.update(kw)
    return TrialResult(**base)


def full() -> TrialResult:
    """A result with every field set, non-finite floats included."""
    return TrialResult(
        campaign="0123456789abcdef", trial_id="row-9", source="c.csv:10", framework="tf",
        workload="resnet", workload_key="wk", outcome="ImmediateINFsNaNs", bit_exact=True,
        faults=[dict(FAULT), {"site": "param", "layer": "fc", "tensor": "bias", "value": "nan",
                              "values": [NAN, INF, -INF, 1.5]}],
        inject_step=3, first_nonfinite_step=4, final_train_acc=NAN, final_test_acc=-INF,
        golden_test_acc=0.875, final_loss=INF, max_acc_drop=0.125, steps_run=11, wall_s=2.5,
        error="boom: 'x'\nsecond line",
        metrics={"trial": {"loss": [1.0, NAN, INF], "test_acc": [0.5, -INF]},
                 "golden": {"loss": [1.0, 0.9, 0.8]}},
        detected=True, detect_step=5, detector="nonfinite", recovered=False,
        outcome_after="LowTestAccuracy")


def same(a, b) -> bool:
    """Equality where NaN equals NaN, recursively."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def same_result(a: TrialResult, b: TrialResult) -> bool:
    return same(a.to_dict(), b.to_dict())


# ------------------------------------------------------------------------------------------
# TrialResult

def test_outcome_names():
    assert OUTCOMES == ("Masked", "ImmediateINFsNaNs", "ShortTermINFsNaNs", "LatentINFsNaNs",
                        "SharpDegrade", "SlowDegrade", "SharpSlowDegrade", "LowTestAccuracy",
                        "Crash", "Hang")


def test_unknown_outcome_rejected():
    with pytest.raises(ValueError):
        make(outcome="masked")
    with pytest.raises(ValueError):
        make(outcome_after="Nope")


def test_detection_fields_default_to_none():
    r = make()
    assert (r.detected, r.detect_step, r.detector, r.recovered, r.outcome_after) == (None,) * 5


@pytest.mark.parametrize("strict", [False, True])
def test_json_round_trip(strict):
    r = full()
    text = r.to_json(strict=strict)
    if strict:                       # strict JSON: no bare NaN/Infinity tokens
        json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict token {c}"))
        assert "NaN" in text and "-Infinity" in text
    back = TrialResult.from_json(text)
    assert same_result(back, r)
    # fault vocabulary strings such as the value model "nan" are left alone
    assert back.faults[1]["value"] == "nan"


def test_to_dict_is_a_copy():
    r = full()
    d = r.to_dict()
    d["metrics"]["trial"]["loss"].append(0.0)
    d["faults"][0]["layer"] = "other"
    assert len(r.metrics["trial"]["loss"]) == 3 and r.faults[0]["layer"] == "conv1"


# ------------------------------------------------------------------------------------------
# the store

def test_round_trip_every_field(tmp_path):
    path = tmp_path / "deep" / "er" / "results.db"      # parent folders are created
    rs = [full(), make("t1"), make("t2", final_test_acc=None, golden_test_acc=None,
                                   inject_step=None, faults=[], bit_exact=True, wall_s=0.0)]
    with ResultStore(path) as store:
        for r in rs:
            store.add(r)
        got = store.results()
    assert len(got) == 3
    for a, b in zip(got, rs):
        assert same_result(a, b), (a, b)
    g = got[0]
    assert math.isnan(g.final_train_acc) and g.final_test_acc == -INF and g.final_loss == INF
    assert isinstance(g.bit_exact, bool) and isinstance(g.detected, bool)
    assert g.recovered is False and got[1].detected is None
    assert math.isnan(g.metrics["trial"]["loss"][1]) and g.faults[1]["values"][2] == -INF


def test_nonfinite_stored_as_null_plus_flag(tmp_path):
    path = tmp_path / "r.db"
    with ResultStore(path) as store:
        store.add(full())
        store.add(make("plain"))
    con = sqlite3.connect(path)
    rows = dict(con.execute("SELECT trial_id, nonfinite FROM results"))
    loss, acc = con.execute("SELECT final_loss, golden_test_acc FROM results "
                            "WHERE trial_id = 'row-9'").fetchone()
    con.close()
    assert json.loads(rows["row-9"]) == {"final_train_acc": "nan", "final_test_acc": "-inf",
                                         "final_loss": "inf"}
    assert rows["plain"] is None
    assert loss is None and acc == 0.875


def test_numpy_values_are_stored(tmp_path):
    r = make(metrics={"trial": {"loss": np.array([1.0, np.nan], dtype=np.float32)},
                      "n": np.int64(4)},
             final_test_acc=np.float32(0.5), inject_step=np.int64(3))
    with ResultStore(tmp_path / "r.db") as store:
        store.add(r)
        g = store.results()[0]
    assert g.final_test_acc == 0.5 and g.inject_step == 3 and g.metrics["n"] == 4
    assert g.metrics["trial"]["loss"][0] == 1.0 and math.isnan(g.metrics["trial"]["loss"][1])


def test_resume_after_interruption(tmp_path):
    path = tmp_path / "r.db"
    a, b = "a" * 16, "b" * 16
    store = ResultStore(path)
    store.add(make("t0", campaign=a))
    store.add(make("t1", campaign=a))
    store.add(make("t0", campaign=b))
    # interrupted: nothing but a close (no flush, no checkpoint call)
    store.close()
    with ResultStore(path) as store:
        assert store.done(a) == {"t0", "t1"}
        assert store.done(b) == {"t0"}
        assert store.done("unknown") == set()
        store.add(make("t2", campaign=a))
    with ResultStore(path) as store:
        assert store.done(a) == {"t0", "t1", "t2"}
        assert [r.trial_id for r in store.results(a)] == ["t0", "t1", "t2"]


def test_add_is_visible_to_another_connection_before_close(tmp_path):
    path = tmp_path / "r.db"
    store = ResultStore(path)
    try:
        store.add(make("t0"))
        con = sqlite3.connect(path)
        try:
            assert con.execute("SELECT trial_id FROM results").fetchall() == [("t0",)]
        finally:
            con.close()
        with ResultStore(path) as other:           # and through a second store
            assert other.done(make().campaign) == {"t0"}
            other.add(make("t1"))
        assert store.done(make().campaign) == {"t0", "t1"}
    finally:
        store.close()


def test_wal_mode_and_schema_version(tmp_path):
    path = tmp_path / "r.db"
    with ResultStore(path) as store:
        assert store.journal_mode == "wal"
    con = sqlite3.connect(path)
    try:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        con.close()


def test_insertion_order_campaigns_replace_and_clear(tmp_path):
    a, b = "a" * 16, "b" * 16
    with ResultStore(tmp_path / "r.db") as store:
        store.add(make("z", campaign=b))
        store.add(make("y", campaign=a))
        store.add(make("x", campaign=b))
        assert [(r.campaign, r.trial_id) for r in store.results()] == [(b, "z"), (a, "y"),
                                                                       (b, "x")]
        assert store.campaigns() == [b, a]
        # the same trial again replaces its row, which moves to the end
        store.add(make("z", campaign=b, outcome="Crash", error="oops"))
        assert [r.trial_id for r in store.results(b)] == ["x", "z"]
        assert store.results(b)[-1].outcome == "Crash" and len(store) == 3
        assert store.clear(b) == 2
        assert store.done(b) == set() and store.campaigns() == [a]
        assert [r.trial_id for r in store.results()] == ["y"]


def test_closed_store_raises_faultlab_error(tmp_path):
    store = ResultStore(tmp_path / "r.db")
    store.close()
    store.close()                                   # twice is fine
    with pytest.raises(FaultlabError):
        store.done("x")


def _append_many(path, worker, n):
    with ResultStore(path) as store:
        for i in range(n):
            store.add(make(f"w{worker}-{i}"))


def test_two_processes_append(tmp_path):
    path = tmp_path / "r.db"
    ResultStore(path).close()
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    procs = [ctx.Process(target=_append_many, args=(path, w, 40)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert [p.exitcode for p in procs] == [0, 0]
    with ResultStore(path) as store:
        assert store.done(make().campaign) == {f"w{w}-{i}" for w in range(2) for i in range(40)}


# ------------------------------------------------------------------------------------------
# opening something that is not a results database

def _assert_one_line(exc: BaseException, path) -> None:
    msg = str(exc)
    assert isinstance(exc, FaultlabError) and exc.exit_code == 2
    assert msg and "\n" not in msg and str(path) in msg


@pytest.mark.parametrize("content", [
    b"trial_id,outcome\nt0,Masked\n" * 50,
    bytes(range(256)) * 20,
    b"SQLite format 3\x00" + b"\xff" * 2000,
])
def test_non_database_file(tmp_path, content):
    path = tmp_path / "r.db"
    path.write_bytes(content)
    with pytest.raises(FaultlabError) as e:
        ResultStore(path)
    _assert_one_line(e.value, path)
    assert path.read_bytes() == content              # and it was left untouched


def test_corrupt_database(tmp_path):
    path = tmp_path / "r.db"
    with ResultStore(path) as store:
        for i in range(50):
            store.add(make(f"t{i}", metrics={"x": list(range(200))}))
    data = bytearray(path.read_bytes())
    data[0:100] = b"\x5a" * 100                      # header destroyed
    path.write_bytes(bytes(data))
    with pytest.raises(FaultlabError) as e:
        with ResultStore(path) as store:
            store.results()
    _assert_one_line(e.value, path)


def test_foreign_sqlite_database(tmp_path):
    path = tmp_path / "other.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    with pytest.raises(FaultlabError) as e:
        ResultStore(path)
    _assert_one_line(e.value, path)
    assert "not a faultlab results database" in str(e.value)


def test_newer_schema(tmp_path):
    path = tmp_path / "r.db"
    ResultStore(path).close()
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.commit()
    con.close()
    with pytest.raises(FaultlabError) as e:
        ResultStore(path)
    _assert_one_line(e.value, path)
    assert "newer" in str(e.value)


def test_directory_is_not_a_database(tmp_path):
    with pytest.raises(FaultlabError) as e:
        ResultStore(tmp_path)
    _assert_one_line(e.value, tmp_path)


def test_empty_file_becomes_a_database(tmp_path):
    path = tmp_path / "r.db"
    path.write_bytes(b"")
    with ResultStore(path) as store:
        store.add(make())
        assert len(store) == 1


# ------------------------------------------------------------------------------------------
# exports

def test_csv_export_parses_back(tmp_path):
    rs = [full(), make("t1", bit_exact=True), make("t2", inject_step=None, faults=[])]
    path = tmp_path / "out" / "r.csv"
    assert to_csv(rs, path) == 3
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0].keys()) == EXPORT_COLUMNS and "metrics" not in rows[0]
    assert [r["trial_id"] for r in rows] == ["row-9", "t1", "t2"]
    first = rows[0]
    assert json.loads(first["faults"])[0] == FAULT
    assert math.isnan(float(first["final_train_acc"])) and float(first["final_loss"]) == INF
    assert float(first["final_test_acc"]) == -INF and float(first["golden_test_acc"]) == 0.875
    assert first["error"] == "boom: 'x'\nsecond line"              # quoted multi-line cell
    assert first["bit_exact"] == "true" and rows[2]["bit_exact"] == "false"
    assert first["detected"] == "true" and rows[1]["detected"] == ""
    assert rows[2]["inject_step"] == "" and json.loads(rows[2]["faults"]) == []
    assert int(first["steps_run"]) == 11 and float(first["wall_s"]) == 2.5


def test_csv_to_file_object():
    buf = io.StringIO()
    to_csv([make("a"), make("b")], buf)
    rows = list(csv.reader(io.StringIO(buf.getvalue())))
    assert rows[0] == list(EXPORT_COLUMNS) and [r[1] for r in rows[1:]] == ["a", "b"]


def test_to_records():
    recs = to_records([full()])
    assert set(recs[0]) == set(EXPORT_COLUMNS)
    assert isinstance(recs[0]["faults"], str) and json.loads(recs[0]["faults"])[0] == FAULT
    assert recs[0]["final_loss"] == INF and recs[0]["detected"] is True
    with_m = to_records([full()], include_metrics=True)[0]
    assert json.loads(with_m["metrics"])["golden"]["loss"] == [1.0, 0.9, 0.8]


@pytest.mark.parametrize("func, module", [
    (lambda rs, p: to_pandas(rs), "pandas"),
    (lambda rs, p: to_parquet(rs, p / "r.parquet"), "pyarrow"),
])
def test_optional_exports_without_dependency(monkeypatch, tmp_path, func, module):
    monkeypatch.setitem(sys.modules, module, None)      # makes `import module` fail
    with pytest.raises(FaultlabError) as e:
        func([make()], tmp_path)
    assert "\n" not in str(e.value) and module in str(e.value)


def test_to_pandas_when_installed():
    pd = pytest.importorskip("pandas")
    df = to_pandas([full(), make("t1")])
    assert list(df.columns) == list(EXPORT_COLUMNS)
    assert df["trial_id"].tolist() == ["row-9", "t1"]
    assert pd.isna(df.loc[1, "detected"]) and df.loc[0, "final_loss"] == INF


def test_to_parquet_when_installed(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "r.parquet"
    assert to_parquet([full(), make("t1")], path) == 2
    t = pq.read_table(path).to_pylist()
    assert [r["trial_id"] for r in t] == ["row-9", "t1"]
    assert t[0]["final_loss"] == INF and math.isnan(t[0]["final_train_acc"])
    assert t[1]["detected"] is None and t[0]["bit_exact"] is True


# ------------------------------------------------------------------------------------------
# statistics

def test_wilson_known_values():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.7225, abs=1e-4)
    lo, hi = wilson_interval(1, 100)   # reference value of the Wilson interval for 1/100
    assert lo == pytest.approx(0.00177, abs=1e-5) and hi == pytest.approx(0.05449, abs=1e-5)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    # the 99% interval contains the 95% one
    l99, h99 = wilson_interval(5, 10, confidence=0.99)
    assert l99 < 0.2366 and h99 > 0.7634


@pytest.mark.parametrize("args", [(-1, 10), (11, 10), (1, -1), (0.5, 10), (5, 10, 1.0),
                                  (5, 10, 0.0)])
def test_wilson_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        wilson_interval(*args)


counts = st.integers(min_value=1, max_value=5000).flatmap(
    lambda n: st.tuples(st.integers(min_value=0, max_value=n), st.just(n)))
confidences = st.sampled_from([0.5, 0.8, 0.9, 0.95, 0.99, 0.999])


@given(counts, confidences)
def test_wilson_contains_the_estimate(kn, conf):
    k, n = kn
    lo, hi = wilson_interval(k, n, conf)
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    assert lo < hi


@given(counts, confidences)
def test_wilson_symmetric(kn, conf):
    k, n = kn
    lo, hi = wilson_interval(k, n, conf)
    lo2, hi2 = wilson_interval(n - k, n, conf)
    assert lo == pytest.approx(1.0 - hi2, abs=1e-12)
    assert hi == pytest.approx(1.0 - lo2, abs=1e-12)


@given(counts, st.integers(min_value=2, max_value=50), confidences)
def test_wilson_narrower_with_more_trials(kn, m, conf):
    k, n = kn
    lo, hi = wilson_interval(k, n, conf)
    lo2, hi2 = wilson_interval(k * m, n * m, conf)
    assert hi2 - lo2 < hi - lo


@settings(max_examples=50)
@given(counts)
def test_wilson_wider_with_more_confidence(kn):
    k, n = kn
    lo, hi = wilson_interval(k, n, 0.9)
    lo2, hi2 = wilson_interval(k, n, 0.99)
    assert lo2 <= lo and hi2 >= hi and (hi2 - lo2) > (hi - lo)


def test_summarize():
    rs = ([make(f"m{i}") for i in range(7)] + [make("c", outcome="Crash")]
          + [make(f"s{i}", outcome="SharpDegrade") for i in range(2)])
    rows = summarize(rs)
    assert [r.outcome for r in rows] == ["Masked", "SharpDegrade", "Crash", TOTAL]
    masked = rows[0]
    assert (masked.count, masked.rate) == (7, 0.7)
    assert (masked.ci_low, masked.ci_high) == wilson_interval(7, 10)
    total = rows[-1]
    assert total.is_total and total.count == 10 and total.rate == 1.0
    assert sum(r.count for r in rows[:-1]) == total.count
    assert summarize([]) == [OutcomeRow(TOTAL, 0, 0.0, 0.0, 0.0)]


def test_format_summary_lists_every_present_outcome():
    rs = [make(f"t{i}", outcome=o) for i, o in enumerate(OUTCOMES)] + [make("x")]
    text = format_summary(summarize(rs))
    text.encode("ascii")
    lines = text.splitlines()
    assert "outcome" in lines[0] and "95% CI" in lines[0]
    for o in OUTCOMES:
        assert any(line.split()[0] == o for line in lines), o
    masked = next(line for line in lines if line.startswith("Masked"))
    assert masked.split()[1:3] == ["2", "18.2"]
    assert lines[-1].split()[:3] == [TOTAL, "11", "100.0"]
    # fixed width: the table's columns line up
    assert len({len(line) for line in lines if line.startswith("-")}) == 1


def test_format_summary_only_present_outcomes():
    text = format_summary(summarize([make("a"), make("b", outcome="Hang")]))
    assert "Hang" in text and "Masked" in text and "Crash" not in text


def test_format_results():
    rs = [full(), make("t1", bit_exact=True),
          make("ctl", faults=[], inject_step=None, final_test_acc=None, golden_test_acc=0.9),
          make("\u00e9t\u00e9")]
    text = format_results(rs)
    text.encode("ascii")                                 # plain ASCII, even for non-ASCII ids
    lines = text.splitlines()
    assert len(lines) == 2 + len(rs)
    assert "trial" in lines[0] and "outcome" in lines[0]
    assert "conv1/fwd_output bitflip:30 +1 more" in lines[2]
    assert "-inf / 0.8750" in lines[2] and "ImmediateINFsNaNs" in lines[2]
    row_t1 = next(line for line in lines if line.startswith("t1 "))
    assert "0.9000 / 0.9100" in row_t1 and row_t1.split()[-2:] == ["=", "-"]
    row_ctl = next(line for line in lines if line.startswith("ctl "))
    assert "(control)" in row_ctl and "- / 0.9000" in row_ctl
    assert "detected" in lines[0] and "step 5" in lines[2]  # detection column when present
    plain = format_results([make(bit_exact=True)]).splitlines()
    assert "detected" not in plain[0] and plain[2].endswith("=")


def test_describe_faults():
    assert describe_faults([]) == "(control)"
    assert describe_faults([{"site": "param", "layer": "fc", "tensor": "bias",
                             "value": "zero"}]) == "fc/param.bias zero"
