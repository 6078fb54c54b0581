"""The command line on TensorFlow: campaign files choose the framework (column / key, default
torch) and --framework overrides it; a fault-free trial run in a different worker process from
the golden run reproduces it bit for bit; the Keras-native example runs. The three ISCA-format
campaigns give their named outcomes on TF (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _clihelpers import HEADER, REPO, TINY, env_for as _env, finish as _finish, start as _start

# the pool hands trials out in file order, the first to the worker that recorded the golden
# run: the control trial, second, runs in a fresh worker process
CAMPAIGN = f"""{HEADER}
nan,tf,{TINY},fwd_output,dense_1,,0,1,2,nan,,0/0
control,tf,{TINY},,,,,,,,,
param,tf,{TINY},param,dense_2,bias,1,2,0,set,100.0,3
bwd,tf,{TINY},bwd_input,dense_2,,1,1,3,set,1e30,1/2
"""
EXPECTED = {"control": "Masked", "nan": "ImmediateINFsNaNs"}


def test_run_on_tensorflow_with_two_workers_and_the_keras_example(tmp_path, faultlab_cache):
    env = _env(faultlab_cache)
    (tmp_path / "camp.csv").write_text(CAMPAIGN)
    torch_file = tmp_path / "camp_torch.csv"
    torch_file.write_text(CAMPAIGN.replace(",tf,", ",,"))   # framework column empty: torch
    procs = [_start(["run", "camp.csv", "--workers", "2", "--json"], tmp_path, env),
             _start([], REPO, env, script=str(REPO / "examples" / "keras_custom_loop.py")),
             _start(["validate", torch_file.name, "--framework", "tf", "--json"], tmp_path,
                    env)]
    run, example, validate = [_finish(p) for p in procs]
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads(run.stdout)
    trials = {t["trial_id"]: t for t in doc["trials"]}
    assert {t["framework"] for t in trials.values()} == {"tf"}
    for trial, outcome in EXPECTED.items():
        assert trials[trial]["outcome"] == outcome, trials[trial]
    assert trials["control"]["bit_exact"] is True
    assert trials["nan"]["first_nonfinite_step"] == 7
    assert trials["param"]["outcome"] != "Crash" and trials["bwd"]["outcome"] != "Crash"
    assert example.returncode == 0, example.stdout[-2000:] + example.stderr[-2000:]
    assert "first step that differs: 6" in example.stdout
    assert "traced step functions: 1" in example.stdout
    assert validate.returncode == 0, validate.stderr[-2000:]
    assert json.loads(validate.stdout)["workloads"] == ["tf:mlp"]


def test_workloads_layers_on_tensorflow(tmp_path, faultlab_cache):
    p = _finish(_start(["workloads", "--layers", "transformer", "--framework", "tf", "--json"],
                       tmp_path, _env(faultlab_cache)))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "block_1_attn_qkv" in p.stdout and "lm_head" in p.stdout


@pytest.mark.slow
@pytest.mark.parametrize("campaign,outcome", [("inj_masked", "Masked"),
                                              ("inj_immediate_infs_nans", "ImmediateINFsNaNs"),
                                              ("inj_slow_degrade", "SlowDegrade")])
def test_isca_campaigns_give_their_outcomes_on_tensorflow(tmp_path, faultlab_cache, campaign,
                                                          outcome):
    p = _finish(_start(["run", REPO / "campaigns" / f"{campaign}.csv", "--framework", "tf",
                        "--results", tmp_path / "r.sqlite", "--expect", outcome],
                       tmp_path, _env(faultlab_cache)))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
