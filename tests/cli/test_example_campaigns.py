"""The three example campaigns give their named outcome in portable mode, where the CPU
kernels are pinned to AVX2 + FMA: what any x86-64 machine with AVX2 computes (docs/cluster.md,
"Determinism across machines"). PyTorch in the default suite, TensorFlow (minutes of tracing
and training) marked slow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from faultlab.determinism import cpu_info

REPO = Path(__file__).resolve().parents[2]
NAMED = {"inj_masked": "Masked", "inj_immediate_infs_nans": "ImmediateINFsNaNs",
         "inj_slow_degrade": "SlowDegrade"}

needs_avx2 = pytest.mark.skipif(not {"avx2", "fma"} <= cpu_info()[1],
                                reason="portable mode needs an x86-64 CPU with AVX2 and FMA")


def _run_all(tmp_path: Path, framework: str) -> dict[str, dict]:
    env = dict(os.environ, FAULTLAB_CACHE=str(tmp_path / "cache"))
    env.pop("FAULTLAB_STOP_AFTER", None)
    got = {}
    for name in NAMED:
        p = subprocess.run([sys.executable, "-m", "faultlab", "run",
                            str(REPO / "campaigns" / f"{name}.csv"), "--portable",
                            "--framework", framework, "--json",
                            "--results", str(tmp_path / f"{name}.sqlite")],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1800)
        assert p.returncode == 0, p.stderr[-3000:]
        (trial,) = json.loads(p.stdout)["trials"]
        got[name] = trial
    return got


def _check(got: dict[str, dict]) -> None:
    for name, want in NAMED.items():
        t = got[name]
        assert t["outcome"] == want, (name, t["outcome"], t["final_test_acc"],
                                      t["golden_test_acc"])


@needs_avx2
@pytest.mark.framework("torch")
def test_the_example_campaigns_give_their_named_outcomes_in_portable_mode_on_torch(tmp_path):
    _check(_run_all(tmp_path, "torch"))


@needs_avx2
@pytest.mark.slow
@pytest.mark.framework("tf")
def test_the_example_campaigns_give_their_named_outcomes_in_portable_mode_on_tensorflow(tmp_path):
    _check(_run_all(tmp_path, "tf"))
