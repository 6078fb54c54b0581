"""A real local Ray cluster for the Ray executor's tests: a head and a worker node as separate
processes on 127.0.0.1, one CPU each, a small object store, no dashboard. One cluster per test
module (it takes a few seconds to start)."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import pytest

STORE = 80 * 1024 * 1024
#: quick node-death detection (the default health check takes ~15 s to declare a node dead)
SYSTEM_CONFIG = {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
                 "health_check_initial_delay_ms": 0}


def _node_args(**extra) -> dict:
    return dict(num_cpus=1, object_store_memory=STORE, node_ip_address="127.0.0.1", **extra)


class RayCluster(SimpleNamespace):
    """The module's cluster: `address`, `head`, `worker` (the current worker node)."""

    def add_worker(self, env: dict | None = None):
        """Start a worker node, with `env` in its environment (restored here afterwards)."""
        saved = {k: os.environ.get(k) for k in (env or {})}
        os.environ.update(env or {})
        try:
            return self.cluster.add_node(**_node_args())
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def ensure_worker(self):
        """A live worker node beside the head (a test may have removed the last one)."""
        if self.worker is None or self.worker not in self.cluster.worker_nodes:
            self.worker = self.add_worker()
        return self.worker

    def remove(self, node) -> None:
        self.cluster.remove_node(node, allow_graceful=False)
        if node is self.worker:
            self.worker = None

    def running(self, node, task: str) -> bool:
        """Whether a worker process of `node` is executing `task` now (Ray titles a busy
        worker ``ray::TASK``; its workers are the raylet's descendants)."""
        from ray._private import ray_constants
        raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
        parents: dict[int, int] = {}
        titles: dict[int, str] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read().decode(errors="replace")
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    titles[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            parents[int(entry)] = int(stat.rpartition(")")[2].split()[1])
        for pid, title in titles.items():
            if title.startswith(f"ray::{task}"):
                p = pid
                while p in parents and p > 1:
                    p = parents[p]
                    if p == raylet:
                        return True
        return False

    def alive_ids(self) -> set[str]:
        return {n["NodeID"] for n in self.cluster.global_state.node_table() if n["Alive"]}

    def wait_dead(self, node_id: str, deadline_s: float = 60.0) -> None:
        end = time.monotonic() + deadline_s
        while node_id in self.alive_ids():
            if time.monotonic() > end:
                raise AssertionError(f"node {node_id[:8]} still alive after {deadline_s}s")
            time.sleep(0.2)


@pytest.fixture(scope="module")
def ray_cluster():
    pytest.importorskip("ray", reason="needs Ray: pip install 'faultlab[ray]'")
    # Ray resolves this machine to 127.0.0.1 (else it may pick an address nothing listens on)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args=_node_args(
        include_dashboard=False, _system_config=SYSTEM_CONFIG))
    rc = RayCluster(cluster=cluster, address=cluster.address, head=cluster.head_node,
                    worker=None)
    try:
        rc.ensure_worker()
        yield rc
    finally:
        cluster.shutdown()
