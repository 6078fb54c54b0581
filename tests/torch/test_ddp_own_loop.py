"""faultlab.torch.Injector(distributed=True) in a user's own DDP loop, launched by torchrun
(torch.distributed.elastic) with gloo on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.framework("torch")

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out: Path, *extra: str) -> None:
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}",
           "--local-addr", "127.0.0.1", str(ROOT / "examples" / "ddp_loop.py"),
           "--out", str(out), *extra]
    got = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    # the head names the rank's own failure, the tail what the agent saw
    assert got.returncode == 0, got.stderr[:3000] + "\n...\n" + got.stderr[-2000:]


def test_a_fault_on_rank_1_changes_only_rank_1s_local_gradient(tmp_path):
    _torchrun(tmp_path / "ref", "--no-fault")
    _torchrun(tmp_path / "hit")
    ref = [np.load(tmp_path / "ref" / f"rank{r}.npz") for r in range(3)]
    hit = [np.load(tmp_path / "hit" / f"rank{r}.npz") for r in range(3)]
    for r in range(3):
        for s in (0, 1):                           # before the fault: identical everywhere
            assert np.array_equal(hit[r][f"step{s}"], ref[r][f"step{s}"])
        changed = not np.array_equal(hit[r]["step2"], ref[r]["step2"])
        assert changed == (r == 1), r
    assert hit[1]["step2"][0, 0] == 100.0
    # the all-reduce carried rank 1's corruption into every rank's (equal) parameters
    for r in range(3):
        assert np.array_equal(hit[r]["param/0.weight"], hit[0]["param/0.weight"])
    assert not np.array_equal(hit[0]["param/0.weight"], ref[0]["param/0.weight"])


def test_distributed_injector_needs_a_process_group():
    torch = pytest.importorskip("torch")
    import faultlab.torch as flt
    from faultlab.errors import SpecError
    with pytest.raises(SpecError, match="process group initialised"):
        flt.Injector(torch.nn.Linear(2, 2), distributed=True)
