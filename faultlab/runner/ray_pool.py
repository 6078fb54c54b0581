"""Runs golden runs and trials as tasks on a Ray cluster (`faultlab run --executor ray`).

The same contract as :class:`faultlab.runner.pool.LocalPool`: ``golden(configs)`` then
``trials(trials, campaign, on_result)``, results reaching the caller as each trial ends (the
CLI stores each in SQLite on the driver at once, so a killed driver resumes losing nothing).

- One trial is one Ray task with ``max_retries=0`` and ``num_cpus=threads``: a worker that dies
  is a Crash, never a silent retry; a task past the timeout is cancelled (``force=True``) and is
  a Hang. A multi-process trial gets a placement group of one ``{"CPU": processes * threads}``
  bundle, STRICT_PACK, so its ranks sit together on one node.
- The worker process configures each framework once (threads, portable mode), before anything
  is built, and keeps one :class:`~faultlab.runner.session.Session` across tasks.
- Golden runs: every alive node's determinism fingerprint is probed first (nodes that differ
  fail the campaign in one line); each configuration's golden run is recorded once on some
  node, its files ``ray.put`` by the driver (owned by and stored on the driver's node, so a
  worker node's death loses nothing) and shipped to every trial; a control trial on every node
  re-runs the golden run's first checkpoint interval bit for bit before any trial runs there.
  Multi-process configurations make their golden job inside the trial's own process
  (``runner.ranks.golden``), as on the local pool.

Ray is imported only inside functions: importing this module works without it.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections import Counter
from typing import Callable, Iterable

from faultlab.errors import FaultlabError
from faultlab.outcomes import CRASH, HANG, OutcomeRules
from faultlab.results.store import TrialResult
from faultlab.runner.pool import failed_result
from faultlab.trials import Trial

NEEDS_RAY = "--executor ray needs Ray: pip install 'faultlab[ray]'"
#: set to "0" so Ray resolves this machine to 127.0.0.1 (a local cluster stays on loopback)
_RAY_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


# --- the worker side: runs in Ray's worker processes ----------------------------------------

_WORKER: dict = {"key": None, "session": None, "configured": set()}


def _session(threads: int, rules, detect, dist):
    """This worker process's Session (one per campaign settings, reused across tasks)."""
    key = (threads, repr(rules), repr(detect), repr(dist))
    if _WORKER["key"] != key:
        from faultlab.runner.session import Session
        _WORKER.update(key=key, session=Session(threads=threads, rules=rules, detect=detect,
                                                dist=dist))
    return _WORKER["session"]


def _configure(framework, threads: int) -> None:
    """Configure `framework` in this process once, before anything of it is built."""
    from faultlab.determinism import configure
    fw = getattr(framework, "value", framework)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if (fw, threads) not in _WORKER["configured"]:
        configure(framework, threads)
        _WORKER["configured"].add((fw, threads))


def _node() -> tuple[str, str]:
    import ray
    ctx = ray.get_runtime_context()
    ip = ""
    try:
        ip = ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - a name for messages only
        pass
    return ctx.get_node_id(), ip


def _guard(fn: Callable, *args) -> tuple:
    """("ok", value) / ("user", msg, determinism?) / ("error", msg, traceback) like pool.py."""
    from faultlab.determinism import DeterminismError
    try:
        return ("ok", fn(*args))
    except FaultlabError as e:
        return ("user", str(e), isinstance(e, DeterminismError))
    except Exception as e:  # noqa: BLE001 - a task that raises is a Crash, reported
        return ("error", f"{type(e).__name__}: {e}", traceback.format_exc())


def _probe_task(frameworks: list, threads: int) -> tuple:
    """This node's fingerprint per framework (after configuring it, as a trial would)."""
    def probe():
        from faultlab.determinism import fingerprint
        out = {}
        for fw in frameworks:
            _configure(fw, threads)
            out[getattr(fw, "value", fw)] = fingerprint(fw, threads).to_dict()
        return out
    node_id, ip = _node()
    return node_id, ip, _guard(probe)


def _golden_task(config, threads: int, rules, detect, dist) -> tuple:
    """Record (or find in this node's cache) the golden run of `config`; its files."""
    def golden():
        from faultlab.runner import golden as goldenmod
        _configure(config.framework, threads)
        session = _session(threads, rules, detect, dist)
        run = session.golden(config)
        return goldenmod.pack(run)
    return _guard(golden)


def _control_task(config, files: dict, threads: int, rules, detect, dist) -> tuple:
    """Install the shipped golden run on this node and run the control trial against it."""
    def control():
        _configure(config.framework, threads)
        session = _session(threads, rules, detect, dist)
        session.install_golden(config, files)
        return session.control(config)
    node_id, ip = _node()
    return node_id, ip, _guard(control)


def _trial_task(trial: Trial, campaign: str, files: dict | None, controlled: frozenset,
                threads: int, rules, detect, dist, early_stop: bool = True) -> tuple:
    """One trial: configure, the shipped golden run, run, classify."""
    node_id, ip = _node()

    def run():
        cfg = trial.workload
        _configure(cfg.framework, threads)
        session = _session(threads, rules, detect, dist)
        session.early_stop = early_stop
        if files is not None:
            session.install_golden(cfg, files)
            if node_id not in controlled:     # a node that joined after the control trials
                session.control(cfg)
        result = session.run_trial(trial, campaign)
        result.metrics["node"] = node_id
        result.metrics["node_ip"] = ip
        return result
    return _guard(run)


# --- the driver side ------------------------------------------------------------------------

def _import_ray():
    try:
        import ray
    except ImportError:
        raise FaultlabError(NEEDS_RAY) from None
    return ray


def _reachable(address: str, timeout: float = 5.0) -> bool:
    import socket
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def _running_cluster() -> str | None:
    """The address of a Ray cluster running on this machine (RAY_ADDRESS, or the one `ray
    start` recorded), when it answers; None otherwise."""
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env and env != "auto":
        return env
    try:
        from ray._private.utils import read_ray_address
        recorded = read_ray_address()
    except Exception:  # noqa: BLE001 - private API: no recorded cluster then
        recorded = None
    if recorded and _reachable(recorded, 2.0):
        return recorded
    return None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


class RayPool:
    """Golden runs and trials as tasks on a Ray cluster (`address`: None = a running cluster
    if there is one, else a local Ray for this run; "auto"; or "HOST:PORT")."""

    def __init__(self, workers: int = 1, threads: int = 1, rules: OutcomeRules | None = None,
                 timeout: float = 3600.0, detect=None, dist=None, address: str | None = None,
                 early_stop: bool = True):
        self.n, self.threads, self.timeout = max(1, workers), max(1, threads), timeout
        self.rules = rules or OutcomeRules()
        self.detect, self.dist = detect, dist
        self.early_stop = early_stop    # Session.early_stop of every trial
        self.address = address
        self._started = False           # this pool called ray.init (so it shuts Ray down)
        self._files: dict = {}          # config key -> ObjectRef of golden.pack's files
        self._ends: dict = {}           # config key -> the golden run's recorded end step
        self._controlled: dict = {}     # config key -> node ids whose control trial passed
        self._outstanding: dict = {}    # ObjectRef -> placement group or None
        self._fns: dict = {}            # function -> its ray.remote
        self.ray = self._connect()

    # connection --------------------------------------------------------------------------

    def _connect(self):
        address = self.address
        if address is not None and ":" not in address and address != "auto":
            raise FaultlabError(f"--address {address!r}: expected auto or HOST:PORT")
        ray = _import_ray()
        if ray.is_initialized():
            return ray
        if address is None or address == "auto":
            found = _running_cluster()
            if found is None and address == "auto":
                raise FaultlabError("--address auto: no Ray cluster is running on this machine "
                                    "(start one with `ray start --head`, or leave --address "
                                    "out to start a local Ray for this run)")
            address = found
        local = address is None or address.rpartition(":")[0].strip("[]") in _LOOPBACK
        if local:
            # a cluster on this machine: keep Ray on loopback (else the driver may resolve
            # this machine to an address nothing listens on, and hang); the variable reaches
            # the processes a local Ray starts, the constant this one (ray may be imported)
            os.environ.setdefault(_RAY_LOOPBACK_ENV, "0")
            try:
                from ray._private import ray_constants
                if os.environ.get(_RAY_LOOPBACK_ENV) == "0":
                    ray_constants.ENABLE_RAY_CLUSTER = False
            except Exception:  # noqa: BLE001 - private knob; _node_ip_address still helps
                pass
        common = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                      configure_logging=True)
        try:
            if address is None:
                ray.init(num_cpus=os.cpu_count() or 1, _node_ip_address="127.0.0.1", **common)
            else:
                if not _reachable(address):
                    raise FaultlabError(f"--address {address}: no Ray cluster answers there")
                kw = {"_node_ip_address": "127.0.0.1"} if local else {}
                common.pop("include_dashboard")
                ray.init(address=address, **kw, **common)
        except FaultlabError:
            raise
        except Exception as e:  # noqa: BLE001 - Ray's errors: one line
            raise FaultlabError(f"--executor ray: cannot connect to Ray at "
                                f"{address or 'a local cluster'} ({_one_line(e)})") from None
        self._started = True
        return ray

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._cancel_all()
        self._files.clear()
        if self._started:
            self._started = False
            try:
                self.ray.shutdown()
            except Exception:  # noqa: BLE001
                pass

    # helpers -------------------------------------------------------------------------------

    def _env(self) -> dict:
        from faultlab.determinism import portable_active, portable_env
        env = {"OMP_NUM_THREADS": str(self.threads)}
        if portable_active():
            env.update(portable_env())
        for name in ("FAULTLAB_CACHE", _RAY_LOOPBACK_ENV):
            if os.environ.get(name):
                env[name] = os.environ[name]
        return env

    def _remote(self, fn, **options):
        options.setdefault("max_retries", 0)
        options.setdefault("num_cpus", self.threads)
        options["runtime_env"] = {"env_vars": self._env()}
        if fn not in self._fns:
            self._fns[fn] = self.ray.remote(fn)
        return self._fns[fn].options(**options)

    def _alive_nodes(self) -> list[dict]:
        return [n for n in self.ray.nodes()
                if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]

    def _pin(self, node_id: str) -> dict:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)}

    def _check_capacity(self, configs) -> None:
        biggest = max((n["Resources"].get("CPU", 0) for n in self._alive_nodes()), default=0)
        for c in configs:
            need = self.threads * max(1, c.processes)
            if need > biggest:
                raise FaultlabError(
                    f"{c.workload}: a trial needs {need} CPU(s) on one node "
                    f"({max(1, c.processes)} process(es) x {self.threads} thread(s)) and the "
                    f"largest node of the Ray cluster has {biggest:g}; pass --threads")

    def _slots(self) -> int:
        """Trial tasks the alive nodes can run at once (at least one)."""
        cpus = sum(int(n["Resources"].get("CPU", 0)) // self.threads for n in self._alive_nodes())
        return max(1, min(self.n, cpus))

    def _cancel_all(self) -> None:
        for ref, pg in list(self._outstanding.items()):
            try:
                self.ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - already finished or its node is gone
                pass
            self._release(pg)
        self._outstanding.clear()

    def _release(self, pg) -> None:
        if pg is not None:
            try:
                from ray.util import remove_placement_group
                remove_placement_group(pg)
            except Exception:  # noqa: BLE001
                pass

    def _get_all(self, refs: list) -> list:
        """ray.get of `refs`, cancelling the rest on Ctrl-C."""
        for r in refs:
            self._outstanding[r] = None
        try:
            out = []
            for r in refs:
                try:
                    out.append(self.ray.get(r))
                except self.ray.exceptions.RayError as e:   # its worker or node was lost
                    out.append(("lost", _crash_line(e)))
                self._outstanding.pop(r, None)
            return out
        except BaseException:
            self._cancel_all()
            raise

    # golden runs ---------------------------------------------------------------------------

    def golden(self, configs: Iterable) -> dict[str, int]:
        """Probe the nodes' fingerprints, record each configuration's golden run once, ship it,
        and run a control trial of it on every node. FaultlabError for a user's error (a
        DeterminismError when the nodes' arithmetic differs), RuntimeError for a bug."""
        from faultlab.determinism import DeterminismError, Fingerprint
        configs = list(configs)
        if not configs:
            return {}
        self._check_capacity(configs)
        nodes = self._alive_nodes()
        # (1) every node's fingerprint, per framework
        frameworks = sorted({c.framework for c in configs}, key=lambda f: str(f))
        answers = self._get_all([self._remote(_probe_task, num_cpus=0, **self._pin(n["NodeID"]))
                                 .remote(frameworks, self.threads) for n in nodes])
        prints: dict[str, tuple[str, dict]] = {}
        for n, ans in zip(nodes, answers):
            if ans[0] == "lost":
                continue            # the node died meanwhile: no trial will run there
            node_id, ip, (kind, *rest) = ans
            if kind != "ok":
                if kind == "user":
                    raise FaultlabError(rest[0])
                raise RuntimeError(f"fingerprint probe on node {_name(ip, node_id)} failed: "
                                   f"{rest[0]}")
            prints[node_id] = (ip, rest[0])
        if not prints:
            raise FaultlabError("no node of the Ray cluster answered the fingerprint probe")
        here = self.ray.get_runtime_context().get_node_id()
        for fw in frameworks:
            fw = getattr(fw, "value", fw)
            fps = {nid: Fingerprint.from_dict(p[fw]) for nid, (_, p) in prints.items()}
            counts = Counter(fps.values())
            ref = fps[here] if here in fps else counts.most_common(1)[0][0]
            odd = [nid for nid, fp in fps.items() if fp != ref]
            if odd:
                names = ", ".join(_name(prints[n][0], n) for n in odd)
                raise DeterminismError(
                    f"Ray node(s) {names} compute differently from the others "
                    f"({fps[odd[0]].diff(ref)}): their trials would be compared with another "
                    f"machine's golden run; run with --portable, or give every node the same "
                    f"hardware, packages and environment")
        # (2) each single-process configuration's golden run, recorded once, put by the driver
        single = [c for c in configs if c.processes <= 1 and c.key() not in self._files]
        task = self._remote(_golden_task)
        answers = self._get_all([task.remote(c, self.threads, self.rules, self.detect,
                                             self.dist) for c in single])
        for c, (kind, *rest) in zip(single, answers):
            if kind == "user":
                raise (DeterminismError if rest[1] else FaultlabError)(rest[0])
            if kind != "ok":
                raise RuntimeError(f"golden run failed: {chr(10).join(map(str, rest))}")
            self._ends[c.key()] = len(json.loads(rest[0]["golden.json"])["loss"])
            self._files[c.key()] = self.ray.put(rest[0])
        # (3) a control trial of every shipped golden run on every node
        jobs = [(c, n) for c in single for n in nodes]
        answers = self._get_all([self._remote(_control_task, **self._pin(n["NodeID"])).remote(
            c, self._files[c.key()], self.threads, self.rules, self.detect, self.dist)
            for c, n in jobs])
        for (c, n), ans in zip(jobs, answers):
            if ans[0] == "lost":
                continue            # the node died meanwhile: not controlled, no trials there
            node_id, ip, (kind, *rest) = ans
            if kind == "user":
                raise (DeterminismError if rest[1] else FaultlabError)(rest[0])
            if kind != "ok":
                raise RuntimeError(f"control trial of {c.workload} on node "
                                   f"{_name(ip, node_id)} failed: "
                                   f"{chr(10).join(map(str, rest))}")
            self._controlled.setdefault(c.key(), set()).add(node_id)
        return {c.key(): self._ends[c.key()] for c in configs if c.key() in self._ends}

    # trials --------------------------------------------------------------------------------

    def _submit(self, trial: Trial, campaign: str):
        cfg = trial.workload
        from faultlab.runner.ranks import needs_ranks
        procs = max(1, cfg.processes)
        files = self._files.get(cfg.key()) if cfg.processes <= 1 else None
        controlled = frozenset(self._controlled.get(cfg.key(), ()))
        pg = None
        options = {}
        if procs > 1 or needs_ranks(trial):
            from ray.util import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
            pg = placement_group([{"CPU": procs * self.threads}], strategy="STRICT_PACK")
            options = {"num_cpus": procs * self.threads,
                       "scheduling_strategy": PlacementGroupSchedulingStrategy(
                           placement_group=pg, placement_group_bundle_index=0)}
        task = self._remote(_trial_task, **options)
        ref = task.remote(trial, campaign, files, controlled, self.threads, self.rules,
                          self.detect, self.dist, self.early_stop)
        self._outstanding[ref] = pg
        return ref

    def trials(self, trials: Iterable[Trial], campaign: str,
               on_result: Callable[[TrialResult], None]) -> None:
        ray = self.ray
        pending = list(trials)
        running: dict = {}          # ref -> (trial, started, deadline)
        try:
            while pending or running:
                slots = self._slots()
                while pending and len(running) < slots:
                    trial = pending.pop(0)
                    now = time.monotonic()
                    running[self._submit(trial, campaign)] = (trial, now, now + self.timeout)
                first = min(d for _, _, d in running.values())
                # at most a second at a time: Ctrl-C and lost nodes are noticed promptly
                ready, _ = ray.wait(list(running), num_returns=1,
                                    timeout=min(1.0, max(0.0, first - time.monotonic())))
                now = time.monotonic()
                for ref in ready:
                    trial, started, _ = running.pop(ref)
                    pg = self._outstanding.pop(ref, None)
                    self._release(pg)
                    on_result(self._collect(ref, trial, campaign, now - started))
                for ref, (trial, started, deadline) in list(running.items()):
                    if ref in ready or now < deadline:
                        continue
                    del running[ref]
                    try:
                        ray.cancel(ref, force=True)
                    except Exception:  # noqa: BLE001 - it may have just ended
                        pass
                    self._release(self._outstanding.pop(ref, None))
                    on_result(failed_result(trial, campaign, HANG,
                                            f"trial timed out after {self.timeout:g}s "
                                            f"(task cancelled)", now - started))
        except BaseException:       # Ctrl-C (also from on_result): cancel what is left
            self._cancel_all()
            raise

    def _collect(self, ref, trial: Trial, campaign: str, wall: float) -> TrialResult:
        ray = self.ray
        try:
            kind, *rest = ray.get(ref)
        except ray.exceptions.RayError as e:
            return failed_result(trial, campaign, CRASH, _crash_line(e), wall)
        if kind == "ok":
            return rest[0]
        if kind == "user" and rest[1]:
            # a node that joined after the probe computes differently: never a wrong outcome
            # (nor a Crash row that is not one): the campaign stops in one line
            from faultlab.determinism import DeterminismError
            raise DeterminismError(rest[0])
        # a FaultlabError is the user's (one line); anything else carries its traceback
        msg = rest[0] if kind == "user" else "\n".join(map(str, rest))
        return failed_result(trial, campaign, CRASH, msg, wall)


def _name(ip: str, node_id: str) -> str:
    return f"{ip} ({node_id[:8]})" if ip else node_id[:8]


def _crash_line(e: BaseException) -> str:
    """One line for a task Ray lost (its worker or node died, it was cancelled), naming the
    node when Ray's message does."""
    import re
    text = " ".join(str(e).split())
    node = re.search(r"node ID[ :=]+([0-9a-f]{8,})", text, re.I)
    ip = re.search(r"Node IP[ :=]+([0-9a-fA-F.:]+[0-9a-fA-F])", text)
    where = " ".join(x for x in (ip.group(1) if ip else "",
                                 f"({node.group(1)[:8]})" if node else "") if x)
    first = text.split(". ")[0][:200]
    return (f"Ray task lost{' on node ' + where if where else ''}: "
            f"{type(e).__name__}{': ' + first if first else ''}")
