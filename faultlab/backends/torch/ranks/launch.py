"""Start a multi-process job under torch.distributed.elastic on loopback and collect its
results.

The caller's process does not run the ranks itself: it starts one agent process (a fresh
``python -m``: nothing of the caller's threads or torch state is inherited), which runs torch's
LocalElasticAgent (``elastic_launch``, the engine behind torchrun) with a c10d rendezvous on
127.0.0.1. The ranks are forked by multiprocessing's fork server, which has imported the
training code once (fast restarts, and no thread of the agent is forked); the agent watches
them, and when one dies or fails restarts the whole worker group, up to ``max_restarts``
times. Results come back through files in the run directory
(faultlab/backends/torch/ranks/worker.py), so a rank killed mid-write loses nothing written
before.
"""

from __future__ import annotations

import json
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


#: what the fork server imports before it forks any rank
PRELOAD = ["torch", "torch.distributed", "torch.nn.parallel", "faultlab.backends.torch.trainer",
           "faultlab.backends.torch.ranks.trainer", "faultlab.backends.torch.ranks.peers",
           "faultlab.backends.torch.ranks.worker", "faultlab.checkpointing.engine",
           "faultlab.backends.torch.ranks.warm"]


def _agent(job, nprocs: int, port: int, max_restarts: int, join_timeout: int, out: str) -> None:
    """The agent process: torch's LocalElasticAgent through elastic_launch."""
    import json
    import logging
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ["OMP_NUM_THREADS"] = str(job.threads)
    for name in ("torch.distributed.elastic", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)
    # The ranks are forked by multiprocessing's fork server, a single-threaded process that
    # imports the training code once: fast restarts, and no rank inherits a lock some thread
    # of this agent (its store, its monitor) held at the fork, which deadlocked a rank's
    # start now and then when the ranks were forked from here.
    import multiprocessing
    multiprocessing.set_forkserver_preload(PRELOAD)
    from faultlab.backends.torch.ranks.worker import rank_main
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch
    logs = Path(job.run_dir) / "logs"
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nprocs, run_id=Path(job.run_dir).name,
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{port}",
        rdzv_configs={"timeout": join_timeout, "join_timeout": join_timeout},
        max_restarts=max_restarts, monitor_interval=0.05, start_method="forkserver",
        local_addr="127.0.0.1", shutdown_timeout=1,
        logs_specs=DefaultLogsSpecs(log_dir=str(logs), redirects=Std.ALL, tee=Std.NONE))
    result = {"ok": False, "error": None}
    try:
        elastic_launch(config, rank_main)(job)
        result["ok"] = True
    except ChildFailedError as e:
        first = e.get_first_failure()[1]
        msg = first.message if isinstance(first.message, str) else json.dumps(first.message)
        last = msg.strip().splitlines()[-1] if msg.strip() else "no message"
        if isinstance(first.message, dict):
            last = str(first.message.get("message", last))
        result["error"] = (f"rank {first.local_rank} failed after {max_restarts} restart(s) "
                           f"(exit code {first.exitcode}): {last}")
    except Exception as e:       # rendezvous failures: a rank that never joins
        text = str(e).strip()
        result["error"] = f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
    tmp = Path(out + ".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, out)


def main(argv=None) -> int:
    """``python -m faultlab.backends.torch.ranks.launch JOB.json``: the agent process."""
    import sys
    from faultlab.runner.ranks import job_from_json
    args = list(sys.argv[1:] if argv is None else argv)
    path = Path(args[0])
    spec = json.loads(path.read_text())
    job = job_from_json(spec["job"])
    _agent(job, spec["nprocs"], spec["port"], spec["max_restarts"], spec["join_timeout"],
           spec["out"])
    return 0


def run_job(job, nprocs: int, *, port: int = 0, max_restarts: int = 8,
            join_timeout: int = 60) -> JobOutcome:
    """Run `job` (a runner.ranks.RankJob) on `nprocs` ranks; wait for the agent to finish.
    The agent is a fresh Python process (``python -m faultlab.backends.torch.ranks.launch``;
    the caller may be a daemonic pool worker, which multiprocessing forbids children)."""
    import subprocess
    import sys
    from faultlab.runner.ranks import check_port, job_to_json, read_jsonl
    if port:
        check_port(port)
    else:
        port = free_port()
    run_dir = Path(job.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "agent.json"
    out.unlink(missing_ok=True)
    spec = run_dir / "job.json"
    spec.write_text(json.dumps({"job": job_to_json(job), "nprocs": nprocs, "port": port,
                                "max_restarts": max_restarts, "join_timeout": join_timeout,
                                "out": str(out)}))
    t0 = time.perf_counter()
    with open(run_dir / "agent.log", "wb") as log:
        proc = subprocess.run([sys.executable, "-m", "faultlab.backends.torch.ranks.launch",
                               str(spec)], stdout=log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    if not out.exists():
        tail = (run_dir / "agent.log").read_text(errors="replace").strip().splitlines()[-1:]
        return JobOutcome(False, 0, f"the elastic agent died (exit code {proc.returncode})"
                                    + (f": {tail[0]}" if tail else ""), wall)
    res = json.loads(out.read_text())
    restarts = max((r.get("attempt", 0) for r in read_jsonl(run_dir / "timeline.jsonl")),
                   default=0)
    return JobOutcome(bool(res["ok"]), restarts, res["error"], wall)


def clear_memory(shm_root: str | os.PathLike) -> None:
    shutil.rmtree(shm_root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
