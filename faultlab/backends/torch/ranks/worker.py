"""A rank's entry point under the elastic agent: join, recover, train, fire process faults.

Every attempt (the first, and each restart after a rank died or hung) runs :func:`rank_main`
in a fresh process forked by the agent:

1. join the job's process group (gloo on loopback; a store prefix per attempt, so keys of a
   dead attempt never leak into the next; a short timeout, so a dead or hung rank stalls the
   others seconds, not gloo's default 30 minutes);
2. recover: every rank reports the snapshots its memory domain holds (verified) and the steps
   its engine file holds (committed); all agree on the recovery point (agree.recovery_plan)
   and fetch their state from their own memory, a peer's, or the engine's file;
3. train from there; each step ends with one collective (RankTrainer), detection when the job
   is protected (every rank reaches the same verdict and rolls back to the same step);
   snapshots every `snapshot_every` steps into peer memory, the engine persists every
   `persist_every` steps;
4. process faults fire where the job says (markers in the run directory make each fire once
   per trial, even across restarts); value faults fire once per (fault, step) likewise.

Rank 0 writes the run's timeline (one JSON line per step run, the attempt it ran in) and
events (recoveries, detections, rollbacks, faults fired) under the run directory; every rank
writes its final state's digest.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import xxhash

from faultlab import jsonlines
from faultlab.process_faults import KillPhase, ProcessKind
from faultlab.runner.ranks import RankJob, read_jsonl


def _append(path: Path, record: dict) -> None:
    jsonlines.append(path, record)


def _mark(run_dir: Path, key: str) -> bool:
    """Create marker `key` if absent: True for the one caller that created it."""
    d = run_dir / "fired"
    d.mkdir(exist_ok=True)
    try:
        fd = os.open(d / key, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def state_digest(state: dict[str, np.ndarray]) -> str:
    h = xxhash.xxh3_64()
    for k in sorted(state):
        a = np.ascontiguousarray(state[k])
        h.update(k.encode())
        h.update(str(a.dtype).encode())
        h.update(repr(a.shape).encode())
        h.update(a.tobytes())
    return f"{h.intdigest():016x}"


class _Faults:
    """The process faults of this rank and the once-only markers."""

    def __init__(self, job: RankJob, rank: int, ranks_per_node: int, store, attempt: int):
        self.job, self.rank, self.rpn = job, rank, ranks_per_node
        self.run_dir = Path(job.run_dir)
        self.store = store
        self.attempt = attempt
        self.node = rank // ranks_per_node
        self.mine = [(i, f) for i, f in enumerate(job.process_faults)
                     if (f.kind is ProcessKind.KILL_NODE and f.node == self.node)
                     or (f.kind is not ProcessKind.KILL_NODE and f.rank == rank)]

    def at(self, step: int, phase: str) -> None:
        for i, f in self.mine:
            if f.step != step or f.phase.value != phase:
                continue
            if not _mark(self.run_dir, f"p{i}"):
                continue
            _append(self.run_dir / "events.jsonl",
                    {"event": "fault", "fault": f.to_dict(), "attempt": self.attempt,
                     "rank": self.rank, "time": time.time()})
            if f.kind is ProcessKind.HANG:
                os.kill(os.getpid(), signal.SIGSTOP)
                continue                 # (resumed only by the agent's SIGKILL)
            if f.kind is ProcessKind.KILL_NODE:
                import shutil
                # the node's other processes die first, then its memory goes: a receiver
                # thread of a dying rank must not publish a copy into the wiped memory after
                # the wipe (a copy the next attempt would count on and then not find)
                pids = []
                for r in range(self.node * self.rpn, (self.node + 1) * self.rpn):
                    if r != self.rank:
                        try:
                            pid = int(self.store.get(f"pid/{r}"))
                            os.kill(pid, signal.SIGKILL)
                            pids.append(pid)
                        except (ProcessLookupError, ValueError, RuntimeError):
                            pass          # already dead, or never published its pid
                _wait_dead(pids)
                # the node's memory goes with it, at once: renamed away (atomic: the next
                # attempt sees all of it or none of it, even if this process is killed
                # while removing it), then removed
                node = Path(self.job.shm_root) / f"node{self.node}"
                gone = node.with_name(f".lost-{node.name}-{os.getpid()}")
                try:
                    os.rename(node, gone)
                except FileNotFoundError:
                    gone = None
                if gone is not None:
                    shutil.rmtree(gone, ignore_errors=True)
            os.kill(os.getpid(), signal.SIGKILL)


def _wait_dead(pids, limit_s: float = 10.0) -> None:
    """Until every process in `pids` is gone or a zombie (SIGKILL is delivered
    asynchronously; a zombie runs nothing). Polls /proc: no event says when another
    process has died."""
    deadline = time.monotonic() + limit_s
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{pid}/stat", "rb") as fh:
                    state = fh.read().rsplit(b")", 1)[1].split()[0]
            except (FileNotFoundError, ProcessLookupError, IndexError):
                break
            if state in (b"Z", b"X"):
                break
            time.sleep(0.001)


def _init(job: RankJob):
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    # joining may take long (a loaded machine forks and builds R models); once joined, a
    # collective that waits longer than timeout_s means a dead or hung rank
    join = timedelta(seconds=max(job.join_timeout_s, job.timeout_s))
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                         is_master=False, timeout=join)
    store = dist.PrefixStore(f"faultlab/{attempt}", base)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=join)
    short = timedelta(seconds=job.timeout_s)
    main = dist.new_group(backend="gloo", timeout=short)     # training, recovery
    repl = dist.new_group(backend="gloo", timeout=short)     # the replication thread
    return rank, world, attempt, store, main, repl


def rank_main(job: RankJob) -> dict:
    """One rank of one attempt (see the module docstring); returns a small summary."""
    from faultlab.backends.torch.ranks.peers import PeerMemory
    from faultlab.backends.torch.ranks.trainer import RankTrainer, SoloTrainer
    from faultlab.checkpointing.api import open_checkpointer, target_path
    from faultlab.checkpointing.recovery import list_commits, load_step
    from faultlab.distributed import inventory_from_json, inventory_to_json, recovery_plan

    torch.set_num_threads(job.threads)
    t_start = time.perf_counter()
    rank, world, attempt, store, group, repl = _init(job)
    t_joined = time.perf_counter()
    cfg = job.config
    run_dir = Path(job.run_dir)
    rpn = world // cfg.nodes
    store.set(f"pid/{rank}", str(os.getpid()))
    pids = run_dir / "pids"          # for harnesses that kill ranks from outside
    pids.mkdir(exist_ok=True)
    tmp = pids / f".rank{rank}.tmp"
    tmp.write_text(f"{os.getpid()} {attempt}")
    os.replace(tmp, pids / f"rank{rank}")
    faults = _Faults(job, rank, rpn, store, attempt)
    # one rank: the single-process trainer (its emulated replicas all live in this process)
    cls = SoloTrainer if world == 1 else RankTrainer
    trainer = cls(cfg, rank, world, group=group, zero=job.zero, fsdp=job.fsdp)
    t_built = time.perf_counter()

    def mine(f) -> bool:
        return world == 1 or f.replica == rank
    trainer.check_faults([f for f in job.faults if mine(f)])
    grads = trainer.record_local_grads() if job.record_grads else None
    suite = None
    if job.detect is not None:
        suite = job.detect.suite()
        spec = suite.spec
        import dataclasses
        trainer.signal_spec = dataclasses.replace(spec, replicas=True, params=True)
    mem = PeerMemory(job.shm_root, rank, world, rpn, job.copies, repl,
                     hook=lambda phase, step: faults.at(step, phase))
    edir = run_dir / "engine" / f"rank{rank}"

    saving = [-1]       # the step of the engine's save in flight (one at a time, K apart)

    def engine_hook(phase, point, step):
        # the engine's writer threads report step -1: the save in flight is `saving`
        step = saving[0] if step == -1 else step
        if point == "chunk":                       # data on its way to the file
            faults.at(step, KillPhase.PERSISTING.value)
        elif point == "record":                    # data durable, commit record next
            faults.at(step, KillPhase.COMMITTING.value)
    engine = open_checkpointer(job.engine, edir, phase_hook=engine_hook)
    target = target_path(job.engine, edir)
    events = run_dir / "events.jsonl"
    timeline = run_dir / "timeline.jsonl"
    end = job.end_step

    recoveries = [0]

    def recover(before: int | None, reason: str) -> int:
        """Agree on a recovery point (<= before) and load it; returns the next step."""
        t0 = time.perf_counter()
        mem.drain()
        inv = {o: [s for s in steps if before is None or s <= before]
               for o, steps in mem.inventory().items()}
        try:
            disk = [c.step for c in list_commits(target) if before is None or c.step <= before]
        except Exception:
            disk = []
        # agreed through the job's TCPStore (the attempt's prefix): every rank publishes what
        # it holds, verified, and reads everyone's; all compute the same plan
        n = recoveries[0]
        store.set(f"inv/{n}/{rank}", json.dumps({"inv": inventory_to_json(inv),
                                                 "disk": sorted(disk)}))
        keys = [f"inv/{n}/{r}" for r in range(world)]
        store.wait(keys, timedelta(seconds=job.timeout_s))
        invs, common = {}, None
        for r, k in enumerate(keys):
            d = json.loads(store.get(k))
            invs[r] = inventory_from_json(d["inv"])
            common = set(d["disk"]) if common is None else common & set(d["disk"])
        plan = recovery_plan(invs, world, sorted(common or ()))
        if plan.source == "memory":
            snap = mem.fetch(plan.step, plan.fetch, group)
            state = snap.arrays if snap is not None else None
        elif plan.source == "disk":
            state = dict(load_step(target, plan.step).state)
        else:
            state = None
        mem.truncate_after(-1 if plan.step is None else plan.step)
        recoveries[0] += 1
        mem.generation = attempt * 100_000 + recoveries[0]
        if state is not None:
            trainer.set_state(state)
        elif before is not None or attempt > 0:
            trainer.set_state(_initial_state(cfg))
        nxt = 0 if plan.step is None else plan.step + 1
        dt = time.perf_counter() - t0
        if rank == 0 and (attempt > 0 or before is not None):
            _append(events, {"event": "recovery", "reason": reason, "attempt": attempt,
                             "source": plan.source, "step": plan.step,
                             "fetch": {str(k): list(v) for k, v in plan.fetch.items()},
                             "disk_newest": max(common) if common else None,
                             "rejected": len(mem.store.last_rejected),
                             "seconds": dt, "join_s": t_joined - t_start,
                             "build_s": t_built - t_joined, "time": time.time()})
        return nxt

    step = 0
    try:
        step = recover(None, "restart" if attempt else "start")
        if suite is not None and step > 0:
            _warm_up(suite, timeline, step)
        back = 1
        last_detect = None
        while step < end:
            faults.at(step, KillPhase.STEP.value)
            firing = []
            for i, f in enumerate(job.faults):
                if mine(f) and f.active(step) and _mark(run_dir, f"v{i}-{step}"):
                    firing.append(f)
            m = trainer.train_step(step, firing)
            verdict = suite.observe(m.signals) if suite is not None else None
            if verdict is not None:
                back = back * 2 if last_detect == step else 1
                last_detect = step
                if rank == 0:
                    _append(events, {"event": "detection", "detector": verdict.detector,
                                     "step": step, "reason": verdict.reason,
                                     "attempt": attempt, "time": time.time()})
                step = recover(step - back, f"detection at step {step}")
                continue
            if rank == 0:
                _append(timeline, {"attempt": attempt, "step": step, "loss": m.loss,
                                   "acc": m.acc, "time": time.time(),
                                   "signals": m.signals.to_dict() if m.signals else None})
            if grads is not None:
                np.savez(run_dir / f"grads-r{rank}-s{step}.npz",
                         **{k: v.numpy() for k, v in grads.items()})
            due_snap = (step + 1) % job.snapshot_every == 0
            due_persist = job.persist_every and (step + 1) % job.persist_every == 0
            if due_snap:                # views of the live tensors: copied while staged
                mem.snapshot(step, trainer.state_views(), {"step": step})
            if due_persist:
                saving[0] = step
                engine.save(step, trainer.get_state(), {"step": step})
            step += 1
        mem.drain()
        engine.wait_all()
    except RuntimeError as e:          # gloo: a peer died, or a collective timed out
        _watchdog(e, store, rank, world, step, attempt, events)
        raise
    finally:
        mem.close()
    state = trainer.get_state()
    digest = state_digest(state)
    out = {"rank": rank, "attempt": attempt, "digest": digest,
           "checksum": str(trainer.state_checksum())}
    if rank == 0 or job.fsdp:          # FSDP2's forward is collective: every rank runs it
        e = trainer.evaluate()
        out["test"] = [e.loss, e.acc]
    gathered = [None] * world
    dist.all_gather_object(gathered, out, group=group)
    if rank == 0:
        tmp = run_dir / "final.json.tmp"
        tmp.write_text(json.dumps({"ranks": gathered, "test": out["test"]}))
        os.replace(tmp, run_dir / "final.json")
    engine.close()
    dist.destroy_process_group()
    return {"rank": rank, "digest": digest}


def _watchdog(error: Exception, store, rank: int, world: int, step: int, attempt: int,
              events: Path) -> None:
    """A collective failed: record it, and SIGKILL every other rank of this attempt. A rank
    that hangs (stopped, or spinning outside any collective) holds the job until the agent
    gives up waiting for it to exit; killing the attempt's ranks lets the agent restart the
    group at once. (They are single-machine pids, published in the attempt's store.)"""
    _append(events, {"event": "collective-failed", "rank": rank, "step": step,
                     "attempt": attempt, "error": str(error).strip().splitlines()[0][:200]
                     if str(error).strip() else type(error).__name__, "time": time.time()})
    for r in range(world):
        if r == rank:
            continue
        try:
            os.kill(int(store.get(f"pid/{r}")), signal.SIGKILL)
        except (ProcessLookupError, ValueError, RuntimeError, OSError):
            pass                  # already dead, or never published its pid


def _initial_state(cfg) -> dict:
    """The state a fresh run starts from (seeded initial weights, empty optimizer state)."""
    from faultlab.backends.torch.trainer import build_workload
    wl = build_workload(cfg, with_data=False)
    return {f"model/{k}": v.detach().numpy().copy() for k, v in wl.model.state_dict().items()}


def _warm_up(suite, timeline: Path, upto: int) -> None:
    """Feed the detectors the signals of the steps before `upto` (as the timeline has them)."""
    from faultlab.detectors.signals import Signals
    last: dict[int, dict] = {}
    for rec in read_jsonl(timeline):
        if rec.get("signals") and rec["step"] < upto:
            last[rec["step"]] = rec["signals"]
    suite.warm_up(Signals.from_dict(last[s]) for s in sorted(last))
