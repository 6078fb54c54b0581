"""`faultlab crash --results`: each engine's kill / power-loss report is stored in the results
database and `faultlab report` shows its table; `faultlab run` stores each run's configuration
and golden-run fingerprint beside its trials. Bad paths are one-line errors before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import faultlab.results as fr
from faultlab import cli
from faultlab.results import ResultStore, TrialResult

pd = pytest.importorskip("pandas")


def _trial() -> TrialResult:
    return TrialResult(campaign="abc", trial_id="t1", source="c.csv:2", framework="torch",
                       workload="mlp", workload_key="k1", faults=[], outcome="Masked",
                       bit_exact=True, steps_run=3)


def test_kill_campaign_is_stored_and_reported(tmp_path, capsys):
    db = tmp_path / "x.sqlite"
    with ResultStore(db) as store:            # a file with trials already: they are kept
        store.add(_trial())
    assert cli.main(["crash", "--engine", "faultlab", "--kills", "3", "--steps", "6",
                     "--results", str(db)]) == 0
    out, err = capsys.readouterr()
    assert "stored as crash campaign" in err
    df = fr.load_crash(db)
    assert len(df) == 1
    row = df.iloc[0]
    assert (row["mode"], row.engine, row.workload, row.kills, row.steps) == (
        "kill", "faultlab", "mlp", 3, 6)
    assert row.ok and row.torn == row.mixed == row.lost_committed == 0
    assert row.exact + row.nothing_committed == row.recoveries == 3
    assert json.loads(row.report)["kills"] == 3
    with ResultStore(db) as store:
        assert [r.trial_id for r in store.results()] == ["t1"]
    assert cli.main(["report", str(db)]) == 0
    text = capsys.readouterr().out
    i = text.index(f"crash campaign {row.run_id}")
    lines = text[i:].splitlines()
    assert "kill, workload mlp, 6 steps, checkpoint every 1, seed 0" in lines[0]
    assert lines[1].split()[:2] == ["engine", "kills"]
    assert lines[3].split()[:2] == ["faultlab", "3"]


def test_power_loss_reports_are_stored_per_engine(tmp_path, capsys):
    db = tmp_path / "p.sqlite"
    assert cli.main(["crash", "--power-loss", "--engine", "faultlab", "--engine", "sync",
                     "--points", "3", "--images", "2", "--steps", "3", "--json",
                     "--results", str(db)]) == 0
    doc = json.loads(capsys.readouterr().out)
    df = fr.load_crash(db)
    assert df["engine"].tolist() == ["faultlab", "sync"]
    assert set(df["mode"]) == {"power-loss"} and set(df["run_id"]) == {doc["run_id"]}
    assert df.iloc[0]["crash_points"] == 3 and df.iloc[0]["images"] > 0
    assert "not modeled" in df.iloc[1]["note"]


@pytest.mark.parametrize("how", ["directory", "foreign", "both"])
def test_a_bad_results_path_is_one_line_before_any_kill(tmp_path, capsys, how):
    target = tmp_path / "t"
    argv = ["crash", "--kills", "1", "--results", str(target)]
    if how == "directory":
        target.mkdir()
    elif how == "foreign":
        target.write_bytes(b"not a database at all, just text " * 40)
    else:
        argv.append("--no-results")
    before = target.read_bytes() if target.is_file() else None
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("faultlab: error:"), err
    assert "starting the training zygote" not in err and out == ""
    if before is not None:
        assert target.read_bytes() == before      # nothing written to it


@pytest.mark.framework("torch")
def test_run_stores_the_golden_runs_fingerprint(tmp_path, faultlab_cache):
    tiny = "mlp,2,8,16,8,digits,5,4"
    (tmp_path / "c.csv").write_text(
        "trial,workload,replicas,per_replica_batch,width,input_size,dataset,steps_per_epoch,"
        f"epochs,site,layer,replica,epoch,step,value,values,positions,bit\ncontrol,{tiny}"
        ",,,,,,,,,\n")
    env = {**os.environ, "FAULTLAB_CACHE": str(faultlab_cache)}
    env.pop("FAULTLAB_STOP_AFTER", None)
    p = subprocess.run([sys.executable, "-m", "faultlab.cli", "run", "c.csv", "--results",
                        "r.sqlite"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr
    runs = fr.load_runs(tmp_path / "r.sqlite")
    assert len(runs) == 1
    r = runs.iloc[0]
    assert (r.run, r.workload, r.framework, r.executor) == ("plain", "mlp", "torch", "local")
    assert r.fingerprint_source == "golden run"
    fp = json.loads(r.fingerprint)
    assert fp["threads"] == r.threads and fp["framework"].startswith("torch")
    golden = list((faultlab_cache / "golden").glob(f"*-{r.workload_key}-t{r.threads}-*"))
    assert any(g.name.endswith("-" + r.fingerprint_digest) for g in golden), golden
    assert json.loads(r.config)["workload"] == "mlp"
