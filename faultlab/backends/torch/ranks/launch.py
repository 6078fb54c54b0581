"""Start a multi-process job under torch.distributed.elastic on loopback and collect its
results.

The caller's process does not run the ranks itself: it starts one agent process (spawned:
nothing of the caller's threads or torch state is inherited), which imports the training code
once and runs torch's LocalElasticAgent (``elastic_launch``, the engine behind torchrun) with a
c10d rendezvous on 127.0.0.1. The agent forks the rank processes (fast restarts: the modules
are already imported), watches them, and when one dies or fails restarts the whole worker
group, up to ``max_restarts`` times. Results come back through files in the run directory
(faultlab/backends/torch/ranks/worker.py), so a rank killed mid-write loses nothing written
before.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from faultlab.errors import FaultlabError


@dataclass
class JobOutcome:
    """How the agent's run ended."""

    ok: bool                 # every rank finished
    restarts: int            # worker-group restarts the agent made
    error: str | None        # why not, one line
    wall_s: float


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_port(port: int) -> None:
    """A one-line FaultlabError when `port` on 127.0.0.1 cannot be listened on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise FaultlabError(f"port {port} on 127.0.0.1 is already in use ({e.strerror}); "
                                f"choose another with --port, or 0 for a free one") from None


def _agent(job, nprocs: int, port: int, max_restarts: int, join_timeout: int, out: str) -> None:
    import json
    import logging
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ["OMP_NUM_THREADS"] = str(job.threads)
    for name in ("torch.distributed.elastic", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    # imported here, once: the ranks are forked from this process
    import faultlab.backends.torch.ranks.peers  # noqa: F401
    import faultlab.backends.torch.ranks.trainer  # noqa: F401
    from faultlab.backends.torch.ranks.worker import rank_main
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch
    logs = Path(job.run_dir) / "logs"
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nprocs, run_id=Path(job.run_dir).name,
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{port}",
        rdzv_configs={"timeout": join_timeout, "join_timeout": join_timeout},
        max_restarts=max_restarts, monitor_interval=0.05, start_method="fork",
        local_addr="127.0.0.1", shutdown_timeout=1,
        logs_specs=DefaultLogsSpecs(log_dir=str(logs), redirects=Std.ALL, tee=Std.NONE))
    result = {"ok": False, "error": None}
    try:
        elastic_launch(config, rank_main)(job)
        result["ok"] = True
    except ChildFailedError as e:
        first = e.get_first_failure()[1]
        msg = first.message if isinstance(first.message, str) else json.dumps(first.message)
        result["error"] = (f"rank {first.local_rank} failed after {max_restarts} restarts "
                           f"(exit code {first.exitcode}): {msg.strip().splitlines()[-1] if msg.strip() else 'no message'}")
    except Exception as e:       # rendezvous failures: a rank that never joins
        result["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    Path(out).write_text(json.dumps(result))


def run_job(job, nprocs: int, *, port: int = 0, max_restarts: int = 8,
            join_timeout: int = 60) -> JobOutcome:
    """Run `job` (a worker.RankJob) on `nprocs` ranks; wait for the agent to finish."""
    import json
    if port:
        check_port(port)
    else:
        port = free_port()
    run_dir = Path(job.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "agent.json"
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    p = ctx.Process(target=_agent, args=(job, nprocs, port, max_restarts, join_timeout,
                                         str(out)), name="faultlab-elastic-agent")
    p.start()
    p.join()
    wall = time.perf_counter() - t0
    if not out.exists():
        return JobOutcome(False, 0, f"the elastic agent died (exit code {p.exitcode})", wall)
    res = json.loads(out.read_text())
    from faultlab.runner.ranks import read_jsonl
    restarts = max((r.get("attempt", 0) for r in read_jsonl(run_dir / "timeline.jsonl")),
                   default=0)
    return JobOutcome(bool(res["ok"]), restarts, res["error"], wall)


def clear_memory(shm_root: str | os.PathLike) -> None:
    shutil.rmtree(shm_root, ignore_errors=True)
