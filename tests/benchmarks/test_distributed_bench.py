"""Smoke test of benchmarks/distributed.py: a --quick run on 2 ranks produces every variant's
step time and every recovery path's time, all positive, and the loaded states verify. No
timing is asserted (the numbers depend on the machine)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.framework("torch")
def test_distributed_bench_quick(tmp_path):
    out = tmp_path / "dist.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "distributed.py"), "--quick", "--ranks", "2",
         "--dir", str(tmp_path), "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["ranks"] == 2 and doc["state_bytes"] > 0
    for v in ("none", "peer", "engine", "dcp"):
        row = doc["step_time"][v]
        assert row["median_ms"] > 0 and row["p90_ms"] > 0 and row["ratio"] > 0, v
    rec = doc["recovery"]
    for k in ("peer_s", "engine_s", "dcp_s", "peer_bound_s", "engine_bound_s", "gloo_MBps",
              "disk_MBps"):
        assert rec[k] > 0, k
    assert rec["verified"] == {"peer": True, "engine": True, "dcp": True}
    # the peer path really fetched the killed rank's copy from a peer
    assert all(src[0] == "memory" and src[2][0] == "peer" for src in rec["peer_sources"])
    assert set(doc["targets"]) == {"peer every step <= 3% of the step",
                                   "peer recovery <= 1.2x its bound",
                                   "peer recovery faster than the engine's file"}
    assert "PASS" in proc.stdout or "FAIL" in proc.stdout
