"""faultlab.results.load / curves, and `faultlab report` counting each trial once per run
(framework-free: the results database is written directly)."""

from __future__ import annotations

import json
import re

import pytest

import faultlab.results as fr
from faultlab.cli import main

from _synthetic import DIGEST, write

pd = pytest.importorskip("pandas")


@pytest.fixture
def db(tmp_path):
    p = tmp_path / "r.sqlite"
    write(p)
    return p


def test_load_one_row_per_trial_and_run(db, tmp_path):
    df = fr.load(db)
    assert list(df.columns) == list(fr.TRIAL_COLUMNS)
    assert len(df) == 6
    assert sorted(df.groupby("run").size().items()) == [("detect", 3), ("plain", 3)]
    assert set(df["campaign"]) == {DIGEST}
    assert not df.duplicated(["campaign", "run", "trial_id"]).any()
    nan = df[(df.trial_id == "nan") & (df.run == "detect")].iloc[0]
    assert (nan.site, nan.layer, nan.value, nan.replica) == ("fwd_output", "dense_1", "nan", "0")
    assert nan.detected and nan.detect_step == 7 and nan.latency_steps == 0
    assert nan.outcome_after == "Masked" and nan.outcome_final == "Masked"
    assert nan.recovery_s == pytest.approx(0.301) and nan.steps_replayed == 3
    assert pd.isna(df[(df.trial_id == "nan") & (df.run == "plain")].iloc[0].detected)
    assert df[df.trial_id == "flip"].bit.tolist() == [30, 30]
    assert df[df.trial_id == "control"].fault.tolist() == ["(control)"] * 2
    # one run, by its stored id; both runs by the digest
    assert len(fr.load(db, campaign=DIGEST + "+detect")) == 3
    assert len(fr.load(db, campaign=DIGEST)) == 6
    out = tmp_path / "r.parquet"
    df.to_parquet(out)
    back = pd.read_parquet(out)
    assert back.shape == df.shape and back.trial_id.tolist() == df.trial_id.tolist()


def test_curves(db):
    c = fr.curves(db)
    assert list(c.columns) == list(fr.CURVE_COLUMNS)
    nan = c[(c.trial_id == "nan") & (c.run == "plain")]
    assert nan.step.tolist() == [5, 6, 7]                   # stopped at the NaN
    assert nan.loss.isna().tolist() == [False, False, True]
    det = c[(c.trial_id == "nan") & (c.run == "detect")]
    assert det.step.tolist() == list(range(5, 20))          # the protected run goes on
    assert det.protected_loss.notna().all()
    assert set(fr.curves(db, trials=["flip"]).trial_id) == {"flip"}


def _counts(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"^Total\s+(\d+)", text, re.M)]


def test_report_counts_each_trial_once_per_run(db, capsys):
    assert main(["report", str(db)]) == 0
    out = capsys.readouterr().out
    assert f"campaign {DIGEST}, plain run: 3 trial(s)" in out
    assert f"campaign {DIGEST}, --detect run: 3 trial(s)" in out
    # plain summary, detect summary, detect after recovery: 3 each, never 6
    assert _counts(out) == [3, 3, 3]
    for block in out.split(f"campaign {DIGEST}")[1:]:
        table = block.split("\n\n")[0]
        for trial in ("control", "nan", "flip"):
            assert len(re.findall(rf"^{trial}\s", table, re.M)) == 1
    assert main(["report", str(db), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["campaign"] for r in doc["runs"]] == [DIGEST, DIGEST + "+detect"]
    assert [{s["outcome"]: s["count"] for s in r["summary"]}["Total"] for r in doc["runs"]] \
        == [3, 3]
    assert "summary" not in doc                  # ambiguous with two runs
    assert main(["report", str(db), "--campaign", DIGEST + "+detect", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {s["outcome"]: s["count"] for s in doc["summary"]}["Total"] == 3


def test_report_one_run_unchanged(tmp_path, capsys):
    p = tmp_path / "plain.sqlite"
    write(p, detect=False)
    assert main(["report", str(p)]) == 0
    assert _counts(capsys.readouterr().out) == [3]


def test_text_and_json_reports_show_stored_crash_campaigns(db, capsys):
    from _synthetic import write_crash, write_runs
    write_runs(db)
    write_crash(db)
    assert main(["report", str(db)]) == 0
    out = capsys.readouterr().out
    assert "campaign " + DIGEST + ", plain run: 3 trial(s)" in out     # the trials still
    i = out.index("crash campaign kill-1")
    kill = out[i:].splitlines()
    assert kill[0].endswith("kill, workload mlp, 6 steps, checkpoint every 1, seed 0")
    assert kill[1].split()[:3] == ["engine", "kills", "recoveries"]
    assert kill[3].split()[:5] == ["faultlab", "6", "6", "0", "0"]
    assert kill[4].split()[:5] == ["naive", "6", "3", "3", "0"]
    assert "crash campaign power-1" in out and "engine (power loss)" in out
    assert main(["report", str(db), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(c["run_id"], c["engine"], c["torn"]) for c in doc["crash"]] == [
        ("kill-1", "faultlab", 0), ("kill-1", "naive", 3), ("power-1", "faultlab", 0)]
    (cfg,) = doc["runs"][0]["configurations"]
    assert cfg["fingerprint"]["isa"] == "GenuineIntel avx avx2 fma"


def test_an_unknown_campaign_is_a_one_line_error(db, capsys):
    assert main(["report", str(db), "--campaign", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope" in err
