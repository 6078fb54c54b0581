"""End-to-end tests of the `faultlab` command line (DESIGN.md, "Command line").

Every test runs the real command in a child process (`python -m faultlab.cli ...`) in a
temporary directory, with FAULTLAB_CACHE pointing at a cache shared by the test session, so the
golden run of the tiny configuration below is recorded once. The contract checked here: exit 0 on
success, 1 on a failed check, 2 on bad input with exactly one line on stderr naming the problem
(never a traceback), 130 when interrupted; --json prints one JSON document on stdout.

Independent commands are started together (`_cli_many`), and the `run` scenario runs on a
background thread while the other tests go on, so that the start-up of the child processes
(Python, torch) overlaps; the whole file takes about a minute on two cores.
"""

from __future__ import annotations

import csv
import json
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]
#: shared/ sits inside the checkout on some machines and beside it on others (CI, /work)
SHARED = next((p for p in (REPO / "shared", REPO.parent / "shared") if p.is_dir()), None)
INJECTIONS = SHARED / "reference" / "isca_ae" / "injections" if SHARED else None
REFERENCE = ("inj_immediate_infs_nans.csv", "inj_masked.csv", "inj_slow_degrade.csv")

TIMEOUT = 300  # seconds for one command; a tiny trial takes about one

# --- a tiny columnar campaign on the perceptron: trials take about a second -------------------

HEADER = ("trial,workload,replicas,per_replica_batch,width,input_size,dataset,steps_per_epoch,"
          "epochs,site,layer,replica,epoch,step,value,values,positions")
TINY = "mlp,2,8,16,8,digits,5,4"
CAMPAIGN = f"""{HEADER}
control,{TINY},,,,,,,,
nan,{TINY},fwd_output,dense_1,0,1,2,nan,,0/0
harmless,{TINY},fwd_output,dense_3,1,3,4,set,0.0,0/0
"""
EXPECTED = {"control": "Masked", "nan": "ImmediateINFsNaNs", "harmless": "Masked"}


# --- helpers ------------------------------------------------------------------------------------

def _env(cache: Path, **extra: str) -> dict:
    env = dict(os.environ)
    env.pop("FAULTLAB_STOP_AFTER", None)
    env["FAULTLAB_CACHE"] = str(cache)
    env.update(extra)
    return env


def _start(args, cwd: Path, env: dict, module: str = "faultlab.cli") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(p: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        pytest.fail(f"{p.args} did not finish in {TIMEOUT}s\n{err}")
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _cli(args, cwd: Path, env: dict, module: str = "faultlab.cli") -> subprocess.CompletedProcess:
    return _finish(_start(args, cwd, env, module))


def _cli_many(argvs, cwd: Path, env: dict) -> list[subprocess.CompletedProcess]:
    """Run several independent commands at once; results in the order given."""
    procs = [_start(a, cwd, env) for a in argvs]
    return [_finish(p) for p in procs]


def _show(p: subprocess.CompletedProcess) -> str:
    return f"{p.args}\nexit {p.returncode}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}"


def _assert_user_error(p: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, exactly one stderr line 'faultlab: error: ...' containing each needle."""
    assert p.returncode == 2, _show(p)
    assert "Traceback" not in p.stderr + p.stdout, _show(p)
    lines = p.stderr.splitlines()
    assert len(lines) == 1, _show(p)
    assert lines[0].startswith("faultlab: error:"), _show(p)
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


def _rows(db: Path) -> dict[str, tuple]:
    """Every stored row of a results database by trial id (asserting each id appears once)."""
    con = sqlite3.connect(db)
    try:
        con.row_factory = sqlite3.Row
        rows = con.execute("SELECT * FROM results ORDER BY seq").fetchall()
    finally:
        con.close()
    ids = [r["trial_id"] for r in rows]
    assert len(ids) == len(set(ids)), f"a trial is stored twice: {ids}"
    return {r["trial_id"]: tuple(r) for r in rows}


def _outcomes(db: Path) -> dict[str, str]:
    con = sqlite3.connect(db)
    try:
        return dict(con.execute("SELECT trial_id, outcome FROM results"))
    finally:
        con.close()


def _table_line(stdout: str, trial: str) -> str:
    lines = [ln for ln in stdout.splitlines() if ln.split()[:1] == [trial]]
    assert len(lines) == 1, f"no single row for trial {trial!r} in:\n{stdout}"
    return lines[0]


def _copy_db(src: Path, dst: Path) -> None:
    """A consistent copy of a SQLite database (WAL included)."""
    a, b = sqlite3.connect(src), sqlite3.connect(dst)
    try:
        a.backup(b)
    finally:
        a.close()
        b.close()


@pytest.fixture
def env(faultlab_cache):
    return _env(faultlab_cache)


# --- help, usage, entry points ------------------------------------------------------------------

def test_no_arguments_is_exit_2(tmp_path, env):
    p = _cli([], tmp_path, env)
    assert p.returncode == 2, _show(p)
    assert "usage" in (p.stdout + p.stderr).lower()
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("command", ["run", "validate", "workloads", "report"])
def test_help_has_examples(tmp_path, env, command):
    p = _cli([command, "--help"], tmp_path, env)
    assert p.returncode == 0, _show(p)
    assert "examples" in p.stdout
    assert f"faultlab {command}" in p.stdout


def test_python_dash_m_faultlab(tmp_path, env):
    p = _cli(["--version"], tmp_path, env, module="faultlab")
    assert p.returncode == 0, _show(p)
    assert p.stdout.startswith("faultlab ")


def test_console_script(tmp_path, env):
    exe = Path(sys.executable).parent / ("faultlab.exe" if os.name == "nt" else "faultlab")
    if not exe.exists():
        pytest.skip("the faultlab console script is not installed beside this interpreter")
    p = subprocess.run([str(exe), "workloads"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=TIMEOUT)
    assert p.returncode == 0, _show(p)
    assert "mlp" in p.stdout


# --- workloads ----------------------------------------------------------------------------------

def test_workloads_text_and_json(tmp_path, env):
    text, js = _cli_many([["workloads"], ["workloads", "--json"]], tmp_path, env)
    assert text.returncode == 0, _show(text)
    for name in ("resnet18", "mlp", "transformer"):
        assert name in text.stdout
    assert js.returncode == 0, _show(js)
    doc = json.loads(js.stdout)
    items = {w["name"]: w for w in doc["workloads"]}
    assert {"resnet18", "mlp", "transformer"} <= set(items)
    assert items["resnet18"]["defaults"]["per_replica_batch"] == 128
    assert items["mlp"]["defaults"]["dataset"] == "digits"


@pytest.mark.framework("torch")
def test_workloads_layers_resnet18_full_size(tmp_path, env):
    p = _cli(["workloads", "--layers", "resnet18", "--json"], tmp_path, env)
    assert p.returncode == 0, _show(p)
    doc = json.loads(p.stdout)
    assert doc["workload"] == "resnet18"
    assert doc["config"]["per_replica_batch"] == 128   # the artifact's size, not a shrunk one
    ds = doc["layers"]["basicblock_4_basic_0_downsample"]
    assert ds["bwd_input"] == [128, 4, 4, 512]
    assert ds["fwd_input"] == [128, 4, 4, 256]


# --- validate -----------------------------------------------------------------------------------

needs_shared = pytest.mark.skipif(
    INJECTIONS is None or not INJECTIONS.is_dir(),
    reason="shared/reference/isca_ae/injections not found (shared/ is not beside the checkout)")


@pytest.mark.framework("torch")
@needs_shared
def test_validate_reference_files(tmp_path, env):
    *texts, js = _cli_many([["validate", INJECTIONS / f] for f in REFERENCE[:-1]]
                           + [["validate", INJECTIONS / REFERENCE[-1], "--json"]], tmp_path, env)
    for f, p in zip(REFERENCE, texts):
        assert p.returncode == 0, _show(p)
        assert f in p.stdout and "valid isca campaign" in p.stdout
        assert "1 trial" in p.stdout and "torch:resnet18" in p.stdout
    assert js.returncode == 0, _show(js)
    assert js.stdout.count("\n") == 1                          # one JSON document
    doc = json.loads(js.stdout)
    assert doc["valid"] is True and doc["format"] == "isca"
    assert doc["trials"] == 1 and doc["faults"] == 1
    assert doc["workloads"] == ["torch:resnet18"]


@pytest.mark.framework("torch")
@needs_shared
def test_validate_position_outside_operand(tmp_path, env):
    text = (INJECTIONS / "inj_slow_degrade.csv").read_text()
    row = next(i for i, ln in enumerate(text.splitlines(), 1) if ln.startswith("inj_pos"))
    assert "124/3/1/450" in text
    bad = {"batch_outside.csv": "128/3/1/450", "row_outside.csv": "124/4/1/450"}
    for name, pos in bad.items():
        (tmp_path / name).write_text(text.replace("124/3/1/450", pos))
    results = _cli_many([["validate", name] for name in bad], tmp_path, env)
    for (name, pos), p in zip(bad.items(), results):
        line = _assert_user_error(p, f"{name}:{row}", "inj_pos", pos, "outside")
        assert "128/4/4/512" in line   # the operand's shape is named too
        assert p.stdout == ""


# --- malformed input: exit 2, one line, no traceback --------------------------------------------

ROW = f"x,{TINY},fwd_output,dense_1,0,1,2,nan,,0/0"

MALFORMED = {
    # name: (file contents or None for "not created", strings the message must contain)
    "unknown_column": (f"{HEADER},bogus\n{ROW},1\n", ["bogus", ":1"]),
    "unknown_isca_key": (b"model,mlp\nstage,fwrd_inject\nbogus_key,3\n", ["bogus_key", ":3"]),
    "bad_position": (f"{HEADER}\n{ROW.replace('0/0', '0/x')}\n", ["positions", "0/x"]),
    "negative_position": (f"{HEADER}\n{ROW.replace('0/0', '-1/0')}\n", ["positions", "-1"]),
    "unknown_layer": (f"{HEADER}\n{ROW.replace('dense_1', 'nosuch')}\n", ["layer", "nosuch"]),
    "unknown_workload": (f"{HEADER}\n{ROW.replace('mlp', 'nosuchwl')}\n",
                         ["workload", "nosuchwl"]),
    "non_numeric_int": (f"{HEADER}\n{ROW.replace('mlp,2,', 'mlp,two,')}\n", ["replicas", "two"]),
    "non_numeric_value": (f"{HEADER}\nx,{TINY},fwd_output,dense_1,0,1,2,set,abc,0/0\n",
                          ["values", "abc"]),
    "empty": (b"", ["empty"]),
    "only_comments": (b"# nothing here\n\n", ["no campaign data"]),
    "binary_garbage": (bytes(range(256)) * 4, ["UTF-8"]),
    "nul_byte": (b"workload,trial\n\x00\x00\x00\n", ["NUL"]),
    "missing": (None, ["no such"]),
    "directory": ("DIR", ["directory"]),
}


@pytest.fixture(scope="module")
def malformed(tmp_path_factory, faultlab_cache):
    """`faultlab validate` on every MALFORMED file, all started at once: case -> process."""
    d = tmp_path_factory.mktemp("malformed")
    for case, (content, _) in MALFORMED.items():
        path = d / f"{case}.csv"
        if content == "DIR":
            path.mkdir()
        elif content is not None:
            path.write_bytes(content.encode() if isinstance(content, str) else content)
    procs = _cli_many([["validate", f"{case}.csv"] for case in MALFORMED], d,
                      _env(faultlab_cache))
    return dict(zip(MALFORMED, procs))


@pytest.mark.parametrize("case", [  # an unknown layer is found in the workload's operand table
    pytest.param(c, marks=pytest.mark.framework("torch")) if c == "unknown_layer" else c
    for c in MALFORMED])
def test_validate_malformed(malformed, case):
    p = malformed[case]
    _assert_user_error(p, f"{case}.csv", *MALFORMED[case][1])
    assert p.stdout == ""


def test_run_bad_input(tmp_path, env):
    (tmp_path / "camp.csv").write_text(CAMPAIGN)
    (tmp_path / "wl.csv").write_text(f"{HEADER}\n{ROW.replace('mlp', 'nosuchwl')}\n")
    results = _cli_many([["run", "missing.csv"],
                         ["run", "wl.csv"],
                         ["run", "camp.csv", "--expect", "Bogus"],
                         ["run", "camp.csv", "--workers", "0"]], tmp_path, env)
    needles = [["missing.csv", "no such"], ["wl.csv", "nosuchwl"], ["--expect", "Bogus"],
               ["--workers"]]
    for p, n in zip(results, needles):
        _assert_user_error(p, *n)


def test_usage_errors_are_one_line(tmp_path, env):
    """argparse's own errors (unknown command, bad option value, missing argument) follow the
    same contract: exit 2, one line, no usage dump."""
    cases = {("bogus",): ["bogus"],
             ("run", "camp.csv", "--framework", "bogus"): ["run", "--framework", "bogus"],
             ("run", "camp.csv", "--workers", "many"): ["--workers", "many"],
             ("validate",): ["validate", "campaign"],
             ("report", "x.sqlite", "--no-such-flag"): ["--no-such-flag"]}
    for p, needles in zip(_cli_many(list(cases), tmp_path, env), cases.values()):
        _assert_user_error(p, *needles)


def test_report_bad_input(tmp_path, env):
    (tmp_path / "not_a_db.sqlite").write_text(CAMPAIGN)
    missing, foreign = _cli_many([["report", "nosuch.sqlite"],
                                  ["report", "not_a_db.sqlite"]], tmp_path, env)
    _assert_user_error(missing, "nosuch.sqlite")
    _assert_user_error(foreign, "not_a_db.sqlite")


# --- run ----------------------------------------------------------------------------------------
#
# The `run` commands form one scenario, each step depending on the ones before it:
#   1. the tiny campaign, first time (records the golden run; default results path);
#   2. at once: the same run again with --expect Masked; again with --json --csv; and --fresh on
#      a copy of the finished database, stopped after 2 of its 3 trials by the CLI's simulated
#      Ctrl-C (FAULTLAB_STOP_AFTER);
#   3. the plain command again on that copy, which resumes and finishes it.
# The scenario runs on a background thread started with this module (unless pytest-xdist already
# runs tests in parallel), so it overlaps the validate tests above; the tests below wait for it.

class _Scenario(threading.Thread):
    def __init__(self, d: Path, env: dict):
        super().__init__(name="faultlab-cli-run-scenario", daemon=True)
        self.dir, self.env, self.error = d, env, None
        self.r = SimpleNamespace(dir=d, env=env, db=d / "faultlab-results" / "camp.sqlite",
                                 fresh_db=d / "fresh.sqlite")

    def run(self):
        try:
            self._steps()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test that waits
            self.error = e

    def _steps(self):
        r, d, env = self.r, self.dir, self.env
        (d / "camp.csv").write_text(CAMPAIGN)
        r.first = _cli(["run", "camp.csv"], d, env)
        assert r.first.returncode == 0 and r.db.is_file(), _show(r.first)
        r.before = _rows(r.db)
        _copy_db(r.db, r.fresh_db)
        r.fresh_original = _rows(r.fresh_db)
        fresh_args = ["run", "camp.csv", "--results", r.fresh_db.name]
        procs = [_start(["run", "camp.csv", "--expect", "Masked"], d, env),
                 _start(["run", "camp.csv", "--json", "--csv", "out.csv"], d, env),
                 _start(fresh_args + ["--fresh"], d,
                        dict(env, FAULTLAB_STOP_AFTER="2"))]
        r.expect, r.json, r.stopped = [_finish(p) for p in procs]
        r.after = _rows(r.db)
        r.after_stop = _rows(r.fresh_db)
        r.resumed = _cli(fresh_args, d, env)
        r.final = _rows(r.fresh_db)

    def result(self) -> SimpleNamespace:
        if self.ident is None:        # not started early (pytest-xdist): run it now
            self.start()
        self.join(4 * TIMEOUT)
        if self.is_alive():
            pytest.fail("the run scenario did not finish")
        if self.error is not None:
            raise self.error
        return self.r


@pytest.fixture(scope="module", autouse=True)
def _run_scenario(tmp_path_factory, faultlab_cache):
    scenario = _Scenario(tmp_path_factory.mktemp("run"), _env(faultlab_cache))
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        scenario.start()   # overlap it with the tests before the run tests
    yield scenario
    if scenario.ident is not None:
        scenario.join(4 * TIMEOUT)


@pytest.fixture
def run(_run_scenario) -> SimpleNamespace:
    """The results of the run scenario (waits for it; starts it first if it is not running)."""
    return _run_scenario.result()


@pytest.mark.framework("torch")
def test_run_table_and_summary(run):
    p = run.first
    assert p.returncode == 0, _show(p)
    assert "Traceback" not in p.stderr
    assert "golden run" in p.stderr and "3/3" in p.stderr      # progress on stderr
    for trial, outcome in EXPECTED.items():
        line = _table_line(p.stdout, trial)
        assert outcome in line.split(), line
    control = _table_line(p.stdout, "control")
    assert control.rstrip().endswith("="), control             # bit-exact with the golden run
    assert not _table_line(p.stdout, "nan").rstrip().endswith("=")
    summary = {ln.split()[0]: ln.split()[1] for ln in p.stdout.splitlines()
               if ln.split()[:1] and ln.split()[0] in ("Masked", "ImmediateINFsNaNs", "Total")
               and len(ln.split()) > 1 and ln.split()[1].isdigit()}
    assert summary == {"Masked": "2", "ImmediateINFsNaNs": "1", "Total": "3"}, p.stdout
    assert _outcomes(run.db) == EXPECTED


@pytest.mark.framework("torch")
def test_run_json(run):
    p = run.json
    assert p.returncode == 0, _show(p)
    assert p.stdout.count("\n") == 1
    doc = json.loads(p.stdout)                                  # exactly one JSON document
    assert set(doc) >= {"campaign", "digest", "results_db", "summary", "trials"}
    trials = {t["trial_id"]: t for t in doc["trials"]}
    assert {k: t["outcome"] for k, t in trials.items()} == EXPECTED
    assert trials["control"]["bit_exact"] is True
    assert trials["control"]["faults"] == []
    assert trials["nan"]["bit_exact"] is False
    assert trials["nan"]["first_nonfinite_step"] == 7         # epoch 1, step 2 of 5
    counts = {r["outcome"]: r["count"] for r in doc["summary"]}
    assert counts["Masked"] == 2 and counts["ImmediateINFsNaNs"] == 1


@pytest.mark.framework("torch")
def test_run_csv(run):
    assert run.json.returncode == 0, _show(run.json)
    with open(run.dir / "out.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    assert {r["trial_id"]: r["outcome"] for r in rows} == EXPECTED


@pytest.mark.framework("torch")
def test_run_expect_not_met_is_exit_1(run):
    p = run.expect
    assert p.returncode == 1, _show(p)
    assert "Traceback" not in p.stderr
    assert "expected every trial to be Masked" in p.stderr
    assert "ImmediateINFsNaNs" in p.stderr
    assert "Total" in p.stdout                                  # the table is still printed


@pytest.mark.framework("torch")
def test_run_again_resumes_without_redoing(run):
    p = run.expect                                              # the run again, with --expect
    assert "resuming: 3 of 3" in p.stderr, p.stderr
    assert "golden run" not in p.stderr and "trials [" not in p.stderr   # nothing ran
    assert p.stdout == run.first.stdout                        # same table, same summary
    assert run.after == run.before                             # rows untouched (seq, wall_s, ...)


@pytest.mark.framework("torch")
def test_run_fresh_reruns(run):
    p = run.stopped
    assert "resuming" not in p.stderr, p.stderr                # earlier results discarded
    assert "0/3" in p.stderr                                    # all three trials to do
    assert len(run.fresh_original) == 3 and len(run.after_stop) == 2  # the old rows are gone
    for tid, row in run.after_stop.items():
        assert row != run.fresh_original[tid], f"trial {tid} was not rerun"


@pytest.mark.framework("torch")
def test_interrupted_run_exits_130_with_results_kept(run):
    p = run.stopped
    assert p.returncode == 130, _show(p)
    assert "interrupted" in p.stderr and "Traceback" not in p.stderr
    assert len(run.after_stop) == 2                             # N=2 trials stored


@pytest.mark.framework("torch")
def test_interrupted_run_resumes_and_loses_nothing(run):
    p = run.resumed
    assert p.returncode == 0, _show(p)
    assert "resuming: 2 of 3" in p.stderr, p.stderr
    assert "1/1" in p.stderr                                    # only the missing trial ran
    assert len(run.final) == 3                                  # each trial exactly once
    for tid, row in run.after_stop.items():
        assert run.final[tid] == row, f"trial {tid} was redone or changed"
    assert _outcomes(run.fresh_db) == EXPECTED
    assert p.stdout == run.first.stdout   # deterministic: same table as the uninterrupted run


# --- report -------------------------------------------------------------------------------------

@pytest.mark.framework("torch")
def test_report_csv_and_json(run, tmp_path):
    csv_out = tmp_path / "report.csv"
    text, js = _cli_many([["report", run.db, "--csv", csv_out],
                          ["report", run.db, "--json"]], tmp_path, run.env)
    assert text.returncode == 0, _show(text)
    for trial, outcome in EXPECTED.items():
        assert outcome in _table_line(text.stdout, trial).split()
    assert "Total" in text.stdout
    with open(csv_out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["trial_id"]: r["outcome"] for r in rows} == EXPECTED
    assert js.returncode == 0, _show(js)
    doc = json.loads(js.stdout)
    assert {t["trial_id"]: t["outcome"] for t in doc["trials"]} == EXPECTED
    assert {r["outcome"]: r["count"] for r in doc["summary"]}["Total"] == 3
