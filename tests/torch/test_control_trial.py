"""The control trial: a golden run this process did not record is used only after a bit-exact
re-run of its first checkpoint interval; golden runs are keyed and stored with their
determinism fingerprint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from faultlab.determinism import DeterminismError, fingerprint
from faultlab.runner import Session
from faultlab.runner import golden as goldenmod
from faultlab.workloads.base import default_config

pytestmark = pytest.mark.framework("torch")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FAULTLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _cfg():
    return default_config("mlp", epochs=2)


def test_a_golden_run_is_keyed_and_stored_with_this_machines_fingerprint(cache):
    cfg = _cfg()
    gold = Session(threads=1).golden(cfg)
    fp = fingerprint(cfg.framework, 1)
    assert gold.recorded_here and gold.fingerprint == fp
    assert gold.directory == goldenmod.golden_dir(cfg, 1, fp)
    assert gold.directory.name.endswith(fp.digest())
    assert json.loads((gold.directory / "golden.json").read_text())["fingerprint"] == fp.to_dict()


def test_a_control_trial_reproduces_a_cached_golden_run_bit_for_bit(cache):
    cfg = _cfg()
    Session(threads=1).golden(cfg)
    other = Session(threads=1)                  # another worker: finds the cached run
    gold = other.golden(cfg)
    assert not gold.recorded_here
    checked = other.control(cfg)
    assert checked == {"steps": cfg.checkpoint_interval, "state": True}
    assert other.control(cfg) is checked        # once per configuration and process


def test_a_golden_run_the_machine_does_not_reproduce_fails_the_control_in_one_line(cache):
    cfg = _cfg()
    gold = Session(threads=1).golden(cfg)
    meta = gold.directory / "golden.json"
    d = json.loads(meta.read_text())
    d["loss"][1] = d["loss"][1] * (1 + 2 ** -20)     # what another CPU's kernels would give
    meta.write_text(json.dumps(d))
    s = Session(threads=1)
    with pytest.raises(DeterminismError) as e:
        s.control(cfg)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("control trial on ")
    assert "step 1 of mlp gives loss" in msg and "--portable" in msg


def test_the_control_checks_the_whole_state_not_only_the_loss(cache):
    import numpy as np
    cfg = _cfg()
    gold = Session(threads=1).golden(cfg)
    s = Session(threads=1)
    real = goldenmod.GoldenRun.state

    def tampered(self, step):            # a golden checkpoint one ulp off in one weight
        st = real(self, step)
        if step == self.checkpoints[1]:
            k = sorted(st)[0]
            st[k] = st[k].copy()
            st[k].flat[0] = np.nextafter(st[k].flat[0], np.inf, dtype=st[k].dtype)
        return st
    goldenmod.GoldenRun.state = tampered
    try:
        with pytest.raises(DeterminismError, match=r"the state after step \d+ of mlp differs "
                                                    r"from the golden run's \(1 array\(s\)"):
            s.control(cfg)
    finally:
        goldenmod.GoldenRun.state = real
    assert gold.checkpoints[1] == cfg.checkpoint_interval


def test_native_and_portable_runs_keep_golden_runs_of_their_own_and_reproduce_them(tmp_path):
    from faultlab.determinism import cpu_info
    if not {"avx2", "fma"} <= cpu_info()[1]:
        pytest.skip("portable mode needs AVX2 and FMA")
    camp = tmp_path / "c.csv"
    camp.write_text("trial,workload,epochs,layer,site,value,step\n"
                    "ctl,mlp,2,,,,\n")                     # fault-free: reproduces the golden run
    env = dict(os.environ, FAULTLAB_CACHE=str(tmp_path / "cache"))
    for flag in (["--native"], ["--portable"]):
        got = subprocess.run([sys.executable, "-m", "faultlab", "run", str(camp), "--json",
                              "--threads", "1", "--results", str(tmp_path / f"{flag[0][2:]}.db"),
                              *flag], capture_output=True, text=True, env=env, cwd=tmp_path,
                             timeout=600)
        assert got.returncode == 0, got.stderr
        (trial,) = json.loads(got.stdout)["trials"]
        assert trial["outcome"] == "Masked" and trial["bit_exact"], trial
    names = sorted(p.name for p in (tmp_path / "cache" / "golden").iterdir())
    assert len(names) == 2          # native and portable: two fingerprints, two golden runs
    metas = [json.loads((tmp_path / "cache" / "golden" / n / "golden.json").read_text())
             for n in names]
    assert sorted(m["fingerprint"]["portable"] for m in metas) == [False, True]
    port = next(m for m in metas if m["fingerprint"]["portable"])
    assert port["fingerprint"]["isa"] == "x86-64-v3 (portable)"
