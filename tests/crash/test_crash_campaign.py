"""Crash campaigns: real SIGKILLs of real training processes at chosen points, restart from
the recovered checkpoint, verify every recovery, and end bit-identical to an uninterrupted run;
power-loss images of the engine on a simulated disk; the `faultlab crash` command.

Every training process is forked from a zygote that has imported torch once, so a kill and a
restart cost tens of milliseconds and a hundred kills fit the default suite.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from faultlab import cli
from faultlab.checkpointing.api import COMPARED, Phase
from faultlab.crash import (CrashVerdict, KillPoint, Reference, classify, fingerprint,
                            power_loss_campaign)
from faultlab.errors import CheckpointError
from faultlab.testing import strategies as fst
from faultlab.testing.plugin import crash_lab  # noqa: F401  (the plugin's fixture)

#: every campaign here trains one of the torch backend's crash loops
pytestmark = pytest.mark.framework("torch")

ROOT = Path(__file__).resolve().parents[2]


def test_one_hundred_kills_of_the_engine_lose_nothing_and_every_run_ends_identical(crash_lab):
    report = crash_lab.campaign("mlp", steps=24).campaign("faultlab", 100, seed=11)
    assert report.kills >= 100
    assert report.ok, report.problems[:5]
    assert (report.torn, report.mixed, report.lost) == (0, 0, 0)
    assert report.recoveries == report.kills
    assert report.runs >= 2 and report.runs_identical == report.runs
    assert set(report.phases) == {p.value for p in Phase}       # every phase was hit


def test_kills_of_copy_on_write_saves_lose_nothing(crash_lab):
    """faultlab+cow: the engine writes parameters and optimizer state where they are while the
    next steps update them out of place; a kill at any point still leaves whole checkpoints."""
    report = crash_lab.campaign("mlp", steps=24).campaign("faultlab+cow", 40, seed=7)
    assert report.kills >= 40
    assert report.ok, report.problems[:5]
    assert (report.torn, report.mixed, report.lost) == (0, 0, 0)
    assert report.runs_identical == report.runs


@pytest.mark.parametrize("engine", ["sync", "checkfreq", "dcp-async"])
def test_the_baselines_survive_kills_too(crash_lab, engine):
    report = crash_lab.campaign("mlp", steps=24).campaign(engine, 12, seed=5)
    assert report.kills >= 12
    assert report.ok, report.problems[:5]


def test_held_kills_land_exactly_at_their_points(crash_lab):
    plan = [KillPoint(Phase.COMMITTING, 3), KillPoint(Phase.IDLE, 2),
            KillPoint(Phase.WRITING, 4), KillPoint(Phase.STAGING, 2)]
    result = crash_lab.run("mlp", kills=plan, steps=16)
    assert [k.where.split("/")[0] for k in result.kills] == ["committing", "idle", "writing",
                                                             "staging"]
    result.assert_ok()
    assert result.restarts == len(plan) + 1


def test_the_campaign_catches_a_checkpointer_that_tears(crash_lab):
    """The negative control writes in place without fsync or checksums: a kill mid-save
    leaves a checkpoint that claims the new step over old or half-written arrays."""
    plan = [KillPoint(Phase.WRITING, 3), KillPoint(Phase.WRITING, 7)]
    result = crash_lab.run("mlp", kills=plan, engine="naive", steps=10)
    assert {k.verdict for k in result.kills} & {CrashVerdict.TORN.value,
                                                 CrashVerdict.MIXED.value}
    assert not result.ok
    with pytest.raises(AssertionError, match="torn|mixed"):
        result.assert_ok()


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario=fst.crash_scenarios(names=COMPARED, max_kills=3))
def test_any_engine_any_kill_plan_on_a_loop_that_carries_every_rng_state(crash_lab, scenario):
    engine, engine_settings, plan = scenario
    crash_lab.run("rng-mlp", kills=plan, engine=engine, settings=engine_settings,
                  steps=10).assert_ok()


def test_power_loss_images_recover_a_whole_checkpoint_and_resume_identical():
    report = power_loss_campaign("rng-mlp", steps=8, points=40, images_per_point=10,
                                 resumes=4, seed=2)
    assert report.ok, report.problems[:5]
    assert report.crash_points == 40 and report.images > 300
    assert report.resumes == report.resumes_identical == 4


# -- the verdicts -----------------------------------------------------------------------------

def _states():
    a = {"w": np.arange(4.0), "b": np.zeros(2)}
    b = {"w": np.arange(4.0) + 1, "b": np.ones(2)}
    return a, b


def test_classify_tells_exact_mixed_torn_lost_and_nothing():
    a, b = _states()
    ref = Reference({1: fingerprint(a, {"s": 1}), 2: fingerprint(b, {"s": 2})})
    assert classify((2, b, {"s": 2}), ref, 1)[0] is CrashVerdict.EXACT
    assert classify((2, b, {"s": 2}), ref, None)[0] is CrashVerdict.EXACT
    assert classify((1, a, {"s": 1}), ref, 2)[0] is CrashVerdict.LOST   # older than committed
    assert classify((2, {"w": b["w"], "b": a["b"]}, {"s": 2}), ref, 1)[0] \
        is CrashVerdict.MIXED
    torn = {"w": np.concatenate([a["w"][:2], b["w"][2:]]), "b": b["b"]}
    assert classify((2, torn, {"s": 2}), ref, 1)[0] is CrashVerdict.TORN
    assert classify((2, {"w": b["w"]}, {"s": 2}), ref, 1)[0] is CrashVerdict.TORN  # array missing
    assert classify(CheckpointError("no committed checkpoint"), ref, None)[0] \
        is CrashVerdict.NONE
    assert classify(CheckpointError("damaged"), ref, 1)[0] is CrashVerdict.LOST


# -- the command line --------------------------------------------------------------------------

def test_the_crash_command_prints_one_json_document_and_exits_0(tmp_path, capsys):
    rc = cli.main(["crash", "--kills", "4", "--steps", "6", "--json", "--dir", str(tmp_path),
                   "--seed", "3", "--results", str(tmp_path / "crash.sqlite")])
    out = capsys.readouterr().out
    doc = json.loads(out)
    assert rc == 0 and doc["ok"] and doc["mode"] == "kill"
    assert doc["results_db"] == str(tmp_path / "crash.sqlite") and doc["run_id"]
    (eng,) = doc["engines"]
    assert eng["engine"] == "faultlab" and eng["kills"] == 4
    assert {"torn", "mixed", "lost_committed", "steps_lost_mean", "runs_bit_identical",
            "recoveries"} <= set(eng)


def test_the_power_loss_mode_reports_every_engine(capsys):
    rc = cli.main(["crash", "--power-loss", "--engine", "all", "--points", "8", "--images",
                   "4", "--steps", "3", "--no-results"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "engine (power loss)" in out and "not modeled" in out
    for name in COMPARED:
        assert name in out


@pytest.mark.parametrize("argv, message", [
    (["--engine", "faultlab+cow", "--workload", "keras-mlp"], "needs a torch loop"),
    (["--kills", "0"], "--kills must be at least 1"),
    (["--engine", "nope"], "unknown engine 'nope'"),
    (["--workload", "nomodule"], "not module:function"),
])
def test_bad_crash_flags_are_one_line_errors(capsys, argv, message):
    assert cli.main(["crash", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


# -- long runs ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_thousand_kills_of_the_engine(crash_lab):
    report = crash_lab.campaign("rng-mlp", steps=30).campaign("faultlab", 1000, seed=21)
    assert report.ok, report.problems[:5]


@pytest.mark.slow
@pytest.mark.parametrize("engine", list(COMPARED))
def test_two_hundred_kills_per_engine(crash_lab, engine):
    report = crash_lab.campaign("mlp", steps=24).campaign(engine, 200, seed=8)
    assert report.ok, report.problems[:5]


@pytest.mark.slow
def test_every_power_loss_crash_point():
    report = power_loss_campaign("mlp", steps=10, points=None, images_per_point=30, resumes=20)
    assert report.ok, report.problems[:5]


@pytest.mark.slow
def test_the_documented_example_passes():
    import subprocess
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(ROOT / "examples" / "test_my_training_crash.py")],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:]
