#!/usr/bin/env python
"""Checkpointing in real multi-process data-parallel training, side by side in one run.

Usage:
    python benchmarks/distributed.py [--ranks 4] [--steps 30] [--warmup 5] [--rounds 3]
                                     [--width 2048] [--batch 256] [--reps 3] [--dir DIR]
                                     [--quick] [--json PATH]

Every job runs R ranks (default 4) on this machine under torch.distributed.elastic, the way
faultlab runs its distributed trials (faultlab/backends/torch/ranks/launch.py): a spawned
agent process runs elastic_launch (c10d rendezvous on 127.0.0.1, start_method fork,
GLOO_SOCKET_IFNAME=lo); each rank joins with a per-attempt PrefixStore and
init_process_group(store=...) as faultlab.backends.torch.ranks.worker._init does, and trains
RankTrainer (DDP on gloo, faultlab's order-fixed gradient-mean hook, one all_gather per step)
on the built-in `mlp` workload (3 layers, width --width, --batch samples per rank, Adam).
One torch thread per rank. Checkpoint files go to --dir (default: the temp directory).

Part 1, step time. In each of --rounds rounds, each variant runs in a job of its own (the
order rotates between rounds, so the machine's drift touches every variant alike):
  none     no checkpoint
  peer     faultlab's PeerMemory every step: the rank's state (views of its tensors) staged into its own
           memory domain under /dev/shm and replicated to 1 peer by the background thread over
           a gloo group of its own
  engine   the faultlab (PCcheck-style) engine every step: open_checkpointer("faultlab",
           DIR/rank<r>), save() every step with the engine's default in-flight bound
  dcp      torch.distributed.checkpoint.async_save every step (a gloo group of its own,
           FileSystemWriter with sync_files, one checkpoint_id directory per step), each step
           first waiting for the previous step's future, as users do. DCP de-duplicates the
           replicated DDP state: one rank writes each tensor, where the engine writes every
           rank's copy.
Rank 0 times each step (train step + the variant's checkpoint call) after --warmup untimed
steps. Reported: median and p90 over all rounds, and the overhead vs `none` as the median over
rounds of (variant's median / none's median in the same round). Target: peer <= 3%.

Part 2, recovery of one killed rank. One job: every rank trains --warmup steps, takes a peer
snapshot (replicated, drained), an engine checkpoint (waited for) and a DCP checkpoint
(dcp.save) of the same step, records its state's digest; then rank 1 kills itself (SIGKILL)
and the agent restarts the group. In the restarted attempt, after each rank has built its
model, --reps times (interleaved), the victim's state is loaded and checked against the
digest recorded before the kill:
  peer     its memory domain wiped first (so its copy must come from the peer holding it):
           inventory, agreement (all_gather_object, faultlab.distributed.recovery_plan),
           PeerMemory.fetch over gloo (verified by the blob's xxh3), set_state
  engine   faultlab.checkpointing.recovery.load_step of its file (verified by the engine's
           checksums), after posix_fadvise(DONTNEED) on it, set_state
  dcp      torch.distributed.checkpoint.load into tensors allocated from the checkpoint's
           metadata (a collective: every rank loads), after posix_fadvise(DONTNEED), set_state
The time runs from a barrier after the model is built to set_state done; the digest check
comes after (its result is reported, not timed). Bounds, measured in the same attempt:
  peer     state bytes / loopback gloo bandwidth: the median time of a send/recv of a buffer of
           the snapshot's size from the holder to the victim (after one warm-up transfer)
  engine   state bytes / disk read bandwidth: the median time to read a file of that size
           (written, fsynced, then posix_fadvise DONTNEED) into a buffer
Target: peer within 1.2x its bound and faster than the engine's file.

A default run takes about seven minutes on a quiet 2-core machine (15 or more on a loaded
one); --quick (a small model, few steps, one round) about one.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("none", "peer", "engine", "dcp")
LABELS = {"none": "no checkpoint",
          "peer": "peer memory (faultlab PeerMemory, 1 copy)",
          "engine": "faultlab engine (PCcheck-style file)",
          "dcp": "torch DCP async_save"}
PEER_STEP_TARGET = 0.03          # peer-memory snapshots every step: <= 3% of the step
PEER_RECOVERY_TARGET = 1.2       # peer recovery within 1.2x state bytes / gloo bandwidth
VICTIM = 1


@dataclass
class Params:
    """What a job's ranks read (pickled into the agent, inherited by the forked ranks)."""

    mode: str                    # "steps" | "recovery"
    variant: str                 # steps: one of VARIANTS
    config: object               # WorkloadConfig
    run_dir: str
    shm_root: str
    ckpt_dir: str
    warmup: int
    steps: int
    reps: int = 3
    threads: int = 1
    timeout_s: float = 300.0     # gloo and store timeout (generous: a loaded machine)
    extra: dict = field(default_factory=dict)


# --- the agent (a spawned process) -----------------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agent(p: Params, nprocs: int, port: int, max_restarts: int, out: str) -> None:
    import logging
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ["OMP_NUM_THREADS"] = str(p.threads)
    for name in ("torch.distributed.elastic", "torch.distributed", "torch.multiprocessing"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    # the ranks are forked by a fork server that imports the training code once (as
    # faultlab's own launcher does: forking from this threaded agent can deadlock a rank)
    import multiprocessing
    from faultlab.backends.torch.ranks.launch import PRELOAD
    multiprocessing.set_forkserver_preload(PRELOAD + ["torch.distributed.checkpoint",
                                                      "faultlab.checkpointing.recovery"])
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nprocs, run_id=Path(p.run_dir).name,
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{port}",
        rdzv_configs={"timeout": 120, "join_timeout": 120},
        max_restarts=max_restarts, monitor_interval=0.05, start_method="forkserver",
        local_addr="127.0.0.1", shutdown_timeout=1,
        logs_specs=DefaultLogsSpecs(log_dir=str(Path(p.run_dir) / "logs"), redirects=Std.ALL,
                                    tee=Std.NONE))
    result = {"ok": False, "error": None}
    try:
        elastic_launch(config, _rank)(p)
        result["ok"] = True
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {str(e).strip()[-2000:]}"
    Path(out).write_text(json.dumps(result))


def run_job(p: Params, nprocs: int, max_restarts: int = 0) -> float:
    """Run one job; returns its wall time. Raises with the ranks' error on failure."""
    run = Path(p.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    out = run / "agent.json"
    t0 = time.perf_counter()
    proc = multiprocessing.get_context("spawn").Process(
        target=_agent, args=(p, nprocs, _free_port(), max_restarts, str(out)),
        name="bench-elastic-agent")
    proc.start()
    proc.join()
    wall = time.perf_counter() - t0
    res = json.loads(out.read_text()) if out.exists() else \
        {"ok": False, "error": f"the agent died (exit code {proc.exitcode})"}
    if not res["ok"]:
        logs = sorted(run.glob("logs/**/error.json")) + sorted(run.glob("logs/**/stderr.log"))
        tail = ""
        for f in logs:
            text = f.read_text(errors="replace").strip()
            if text:
                tail += f"\n--- {f.relative_to(run)}\n" + "\n".join(text.splitlines()[-15:])
        raise RuntimeError(f"{p.mode}/{p.variant} job failed: {res['error']}{tail}")
    return wall


# --- the ranks ---------------------------------------------------------------------------------

def _init(p: Params):
    """Join as faultlab's worker._init does: a store prefix per attempt (the default env://
    init breaks on restarts: keys of the dead attempt are still in the agent's store)."""
    from datetime import timedelta
    import torch.distributed as dist
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    timeout = timedelta(seconds=p.timeout_s)
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                         is_master=False, timeout=timeout)
    store = dist.PrefixStore(f"faultlab-bench/{attempt}", base)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    return rank, world, attempt


def _rank(p: Params) -> None:
    from datetime import timedelta
    import torch
    import torch.distributed as dist
    from faultlab.backends.torch.ranks.trainer import RankTrainer
    torch.set_num_threads(p.threads)
    rank, world, attempt = _init(p)
    trainer = RankTrainer(p.config, rank, world)
    # a gloo group of its own for PeerMemory's replication thread / DCP's collectives
    side = dist.new_group(backend="gloo", timeout=timedelta(seconds=p.timeout_s))
    if p.mode == "steps":
        _steps(p, trainer, rank, world, side)
    elif attempt == 0:
        _before_kill(p, trainer, rank, world, side)
    else:
        _recover(p, trainer, rank, world, side)
    dist.destroy_process_group()


def _torch_state(trainer) -> dict:
    """The rank's live state as tensors, keyed as RankTrainer.get_state keys its arrays."""
    import torch
    out = {f"model/{k}": v for k, v in trainer.model.state_dict().items()}
    index = {id(q): i for i, q in enumerate(trainer.model.parameters())}
    for q, st in trainer.optimizer.state.items():
        for k, v in st.items():
            out[f"optim/{index[id(q)]}/{k}"] = v if isinstance(v, torch.Tensor) \
                else torch.tensor(v)
    return out


def _dcp_writer(path: Path):
    from torch.distributed.checkpoint import FileSystemWriter
    return FileSystemWriter(str(path), sync_files=True)


def _steps(p: Params, trainer, rank: int, world: int, side) -> None:
    import torch.distributed as dist
    from faultlab.backends.torch.ranks.peers import PeerMemory
    from faultlab.checkpointing.api import open_checkpointer
    v = p.variant
    mem = engine = None
    if v == "peer":
        mem = PeerMemory(p.shm_root, rank, world, world, 1, side)
    elif v == "engine":
        engine = open_checkpointer("faultlab", Path(p.ckpt_dir) / f"rank{rank}")
    elif v == "dcp":
        import torch.distributed.checkpoint as dcp
    fut = None
    times = []
    dist.barrier()
    for step in range(p.warmup + p.steps):
        t0 = time.perf_counter()
        trainer.train_step(step)
        if mem is not None:
            mem.snapshot(step, trainer.state_views(), {"step": step})
        elif engine is not None:
            engine.save(step, trainer.get_state(), {"step": step})
        elif v == "dcp":
            if fut is not None:
                fut.result()
            fut = dcp.async_save(_torch_state(trainer), process_group=side,
                                 storage_writer=_dcp_writer(Path(p.ckpt_dir) / f"step{step}"))
        times.append(time.perf_counter() - t0)
    if mem is not None:
        mem.drain()
        mem.close()
    if engine is not None:
        engine.wait_all()
        engine.close()
    if fut is not None:
        fut.result()
    state_bytes = sum(a.nbytes for a in trainer.get_state().values())
    dist.barrier()
    if rank == 0:
        Path(p.run_dir, "steps.json").write_text(json.dumps(
            {"step_s": times[p.warmup:], "state_bytes": state_bytes}))


def _before_kill(p: Params, trainer, rank: int, world: int, side) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from faultlab.backends.torch.ranks.peers import PeerMemory
    from faultlab.backends.torch.ranks.worker import state_digest
    from faultlab.checkpointing.api import open_checkpointer
    for step in range(p.warmup):
        trainer.train_step(step)
    step = p.warmup - 1
    state = trainer.get_state()
    mem = PeerMemory(p.shm_root, rank, world, world, 1, side)
    mem.snapshot(step, state, {"step": step})
    mem.drain()
    engine = open_checkpointer("faultlab", Path(p.ckpt_dir) / f"rank{rank}")
    engine.save(step, state, {"step": step})
    engine.wait_all()
    engine.close()
    dcp.save(_torch_state(trainer), process_group=side,
             storage_writer=_dcp_writer(Path(p.ckpt_dir) / "dcp"))
    blob = mem.store.path(rank, step).stat().st_size
    Path(p.run_dir, f"digest-r{rank}.json").write_text(json.dumps(
        {"digest": state_digest(state), "step": step, "blob_bytes": blob,
         "state_bytes": sum(a.nbytes for a in state.values())}))
    mem.close()
    dist.barrier()
    if rank == VICTIM:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(600)                  # the agent stops the survivors and restarts the group


def _drop_cache(paths) -> None:
    for path in paths:
        path = Path(path)
        files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _recover(p: Params, trainer, rank: int, world: int, side) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from faultlab.backends.torch.ranks.peers import PeerMemory
    from faultlab.backends.torch.ranks.worker import state_digest
    from faultlab.checkpointing.api import target_path
    from faultlab.checkpointing.recovery import load_step
    from faultlab.distributed import holders_of, recovery_plan
    info = json.loads(Path(p.run_dir, f"digest-r{rank}.json").read_text())
    step, nbytes = info["step"], info["blob_bytes"]
    victim = rank == VICTIM
    holder = holders_of(VICTIM, world, world, 1)[0]
    mem = PeerMemory(p.shm_root, rank, world, world, 1, side)
    target = target_path("faultlab", Path(p.ckpt_dir) / f"rank{rank}")
    dcp_dir = Path(p.ckpt_dir) / "dcp"
    out = {"peer_s": [], "engine_s": [], "dcp_s": [], "gloo_s": [], "disk_s": [],
           "verified": {"peer": [], "engine": [], "dcp": []}, "peer_sources": [],
           "peer_phases": []}

    # the bounds: gloo send/recv of the snapshot's size, holder -> victim; a cold disk read
    buf = torch.empty(nbytes, dtype=torch.uint8)
    for i in range(p.reps + 1):
        dist.barrier()
        t0 = time.perf_counter()
        if rank == holder:
            dist.send(buf, VICTIM)
        elif victim:
            dist.recv(buf, holder)
        if victim and i:
            out["gloo_s"].append(time.perf_counter() - t0)
    del buf
    if victim:
        f = Path(p.ckpt_dir) / "disk-probe.bin"
        data = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
        with open(f, "wb") as fh:
            fh.write(data.tobytes())
            fh.flush()
            os.fsync(fh.fileno())
        del data
        into = bytearray(nbytes)
        for _ in range(p.reps):
            _drop_cache([f])
            t0 = time.perf_counter()
            with open(f, "rb", buffering=0) as fh:
                view, got = memoryview(into), 0
                while got < nbytes:
                    n = fh.readinto(view[got:])
                    if not n:
                        break
                    got += n
            out["disk_s"].append(time.perf_counter() - t0)
        f.unlink()
        del into

    def check(kind: str) -> None:
        if victim:
            out["verified"][kind].append(state_digest(trainer.get_state()) == info["digest"])

    for _ in range(p.reps):
        # from peer memory: the victim's own domain wiped, its copy comes from the holder
        if victim:
            shutil.rmtree(mem.store.directory, ignore_errors=True)
        dist.barrier()
        t0 = time.perf_counter()
        inv = mem.inventory()
        gathered: list = [None] * world
        dist.all_gather_object(gathered, {"rank": rank, "inv": inv})
        invs = {g["rank"]: {int(o): s for o, s in g["inv"].items()} for g in gathered}
        plan = recovery_plan(invs, world, [])
        t1 = time.perf_counter()
        snap = mem.fetch(plan.step, plan.fetch, None)
        t2 = time.perf_counter()
        trainer.set_state(snap.arrays)
        t3 = time.perf_counter()
        dt = t3 - t0
        del snap
        if victim:
            out["peer_s"].append(dt)
            out["peer_phases"].append({"agree": t1 - t0, "fetch": t2 - t1, "set_state": t3 - t2})
            out["peer_sources"].append([plan.source, plan.step, list(plan.fetch[VICTIM])])
        check("peer")

        # from the engine's file (only the victim reads: the survivors' state is intact)
        if victim:
            _drop_cache([target])
        dist.barrier()
        if victim:
            t0 = time.perf_counter()
            trainer.set_state(dict(load_step(target, step).state))
            out["engine_s"].append(time.perf_counter() - t0)
        check("engine")

        # with DCP (a collective: every rank loads the replicated state)
        if rank == 0:
            _drop_cache([dcp_dir])
        dist.barrier()
        t0 = time.perf_counter()
        reader = FileSystemReader(str(dcp_dir))
        meta = reader.read_metadata().state_dict_metadata
        sd = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in meta.items()}
        dcp.load(sd, storage_reader=reader, process_group=side)
        trainer.set_state({k: v.numpy() for k, v in sd.items()})
        dt = time.perf_counter() - t0
        del sd
        if victim:
            out["dcp_s"].append(dt)
        check("dcp")
    mem.close()
    dist.barrier()
    if victim:
        out.update(blob_bytes=nbytes, state_bytes=info["state_bytes"], step=step)
        Path(p.run_dir, "recovery.json").write_text(json.dumps(out))


# --- the driver --------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _p90(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.9 * (len(xs) - 1))))]


def _scratch(base: Path | None, name: str) -> tuple[Path, Path, Path]:
    from faultlab.distributed import default_root
    run = Path(tempfile.mkdtemp(prefix=f"faultlab-bench-{name}-"))
    ckpt = Path(tempfile.mkdtemp(prefix=f"faultlab-bench-{name}-ckpt-", dir=base))
    return run, Path(default_root(run.name)), ckpt


def _cleanup(*paths: Path) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def measure_steps(args, config) -> dict:
    per = {v: [] for v in VARIANTS}          # per round: that round's step times
    state_bytes = None
    loads = []                                # 1-minute load average after each job
    for r in range(args.rounds):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
        for v in order:
            run, shm, ckpt = _scratch(args.dir, v)
            p = Params("steps", v, config, str(run), str(shm), str(ckpt), args.warmup,
                       args.steps)
            try:
                wall = run_job(p, args.ranks)
                got = json.loads((run / "steps.json").read_text())
            finally:
                _cleanup(run, shm, ckpt)
            per[v].append(got["step_s"])
            state_bytes = got["state_bytes"]
            load = os.getloadavg()[0]
            loads.append(load)
            print(f"  round {r + 1}/{args.rounds} {v:7s} median "
                  f"{statistics.median(got['step_s']) * 1e3:8.1f} ms  (job {wall:.1f} s, "
                  f"load average {load:.1f})", flush=True)
    base = [statistics.median(xs) for xs in per["none"]]
    rows = {}
    for v in VARIANTS:
        pooled = [x for xs in per[v] for x in xs]
        ratios = [statistics.median(xs) / b for xs, b in zip(per[v], base)]
        rows[v] = {"median_ms": statistics.median(pooled) * 1e3, "p90_ms": _p90(pooled) * 1e3,
                   "ratio": statistics.median(ratios), "round_ratios": ratios,
                   "step_ms": [[x * 1e3 for x in xs] for xs in per[v]]}
    return {"state_bytes": state_bytes, "rows": rows, "load_avg": loads}


def measure_recovery(args, config) -> dict:
    run, shm, ckpt = _scratch(args.dir, "recovery")
    p = Params("recovery", "all", config, str(run), str(shm), str(ckpt), args.warmup, 0,
               reps=args.reps)
    try:
        wall = run_job(p, args.ranks, max_restarts=1)
        got = json.loads((run / "recovery.json").read_text())
    finally:
        _cleanup(run, shm, ckpt)
    got["job_s"] = wall
    got["load_avg"] = os.getloadavg()[0]
    return got


def summarize(args, config, steps: dict | None, rec: dict | None) -> dict:
    out = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": None, "ranks": args.ranks,
           "workload": {"name": config.workload, "width": config.width,
                        "per_replica_batch": config.per_replica_batch},
           "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
           "reps": args.reps, "quick": args.quick, "targets": {}}
    import torch
    out["torch"] = torch.__version__
    if steps is not None:
        out["state_bytes"] = steps["state_bytes"]
        out["step_time"] = steps["rows"]
        out["step_load_avg"] = steps["load_avg"]
        over = steps["rows"]["peer"]["ratio"] - 1
        out["targets"]["peer every step <= 3% of the step"] = {
            "value": over, "bound": PEER_STEP_TARGET, "pass": over <= PEER_STEP_TARGET}
    if rec is not None:
        med = {k: statistics.median(rec[f"{k}_s"]) for k in ("peer", "engine", "dcp", "gloo",
                                                             "disk")}
        out["state_bytes"] = rec["state_bytes"]
        out["recovery"] = {
            "blob_bytes": rec["blob_bytes"], "state_bytes": rec["state_bytes"],
            "peer_s": med["peer"], "engine_s": med["engine"], "dcp_s": med["dcp"],
            "peer_bound_s": med["gloo"], "engine_bound_s": med["disk"],
            "gloo_MBps": rec["blob_bytes"] / med["gloo"] / 1e6,
            "disk_MBps": rec["blob_bytes"] / med["disk"] / 1e6,
            "samples": {k: rec[f"{k}_s"] for k in ("peer", "engine", "dcp", "gloo", "disk")},
            "verified": {k: all(v) and bool(v) for k, v in rec["verified"].items()},
            "peer_sources": rec["peer_sources"], "job_s": rec["job_s"],
            "load_avg": rec["load_avg"],
            "peer_phases_s": {k: statistics.median(ph[k] for ph in rec["peer_phases"])
                              for k in ("agree", "fetch", "set_state")}}
        r = out["recovery"]
        ratio = r["peer_s"] / r["peer_bound_s"]
        out["targets"]["peer recovery <= 1.2x its bound"] = {
            "value": ratio, "bound": PEER_RECOVERY_TARGET, "pass": ratio <= PEER_RECOVERY_TARGET}
        out["targets"]["peer recovery faster than the engine's file"] = {
            "value": r["peer_s"] / r["engine_s"], "bound": 1.0,
            "pass": r["peer_s"] < r["engine_s"]}
    return out


def render(out: dict) -> str:
    from faultlab.report import table
    mib = out.get("state_bytes", 0) / (1 << 20)
    lines = [f"CPU: {out['cpu']} ({out['cores']} cores); torch {out['torch']}; "
             f"{out['ranks']} ranks (gloo, loopback, torch.distributed.elastic)",
             f"workload: mlp width {out['workload']['width']}, "
             f"{out['workload']['per_replica_batch']} samples per rank, Adam; "
             f"state per rank {out.get('state_bytes', 0):,} bytes ({mib:.1f} MiB)"]
    if "step_time" in out:
        rows = out["step_time"]
        body = []
        for v in VARIANTS:
            r = rows[v]
            body.append([LABELS[v], f"{r['median_ms']:.1f}", f"{r['p90_ms']:.1f}",
                         "-" if v == "none" else f"{r['ratio']:.3f}x",
                         "-" if v == "none" else f"{(r['ratio'] - 1) * 100:+.1f}%",
                         "<= +3.0%" if v == "peer" else ""])
        la = out["step_load_avg"]
        lines += ["", f"Step time, checkpoint every step ({out['steps']} timed steps after "
                      f"{out['warmup']} warm-up, x {out['rounds']} rounds, rank 0; "
                      f"1-min load average after the jobs {min(la):.1f}-{max(la):.1f})",
                  table(["variant", "median ms", "p90 ms", "vs none", "overhead", "target"],
                        body, right=(1, 2, 3, 4))]
    if "recovery" in out:
        r = out["recovery"]
        v = r["verified"]
        body = [
            ["peer memory (fetch over gloo)", f"{r['peer_s'] * 1e3:.1f}",
             f"{r['peer_bound_s'] * 1e3:.1f}", f"{r['peer_s'] / r['peer_bound_s']:.2f}x",
             f"gloo {r['gloo_MBps']:.0f} MB/s", "yes" if v["peer"] else "NO"],
            ["faultlab engine file (load_step)", f"{r['engine_s'] * 1e3:.1f}",
             f"{r['engine_bound_s'] * 1e3:.1f}", f"{r['engine_s'] / r['engine_bound_s']:.2f}x",
             f"disk {r['disk_MBps']:.0f} MB/s", "yes" if v["engine"] else "NO"],
            ["torch DCP load", f"{r['dcp_s'] * 1e3:.1f}", f"{r['engine_bound_s'] * 1e3:.1f}",
             f"{r['dcp_s'] / r['engine_bound_s']:.2f}x", "disk (as engine)",
             "yes" if v["dcp"] else "NO"]]
        ph = r["peer_phases_s"]
        lines += ["", f"Recovery of rank {VICTIM} after SIGKILL and restart, median of "
                      f"{out['reps']} ({r['blob_bytes']:,} bytes; load average "
                      f"{r['load_avg']:.1f}); peer = agree {ph['agree'] * 1e3:.1f} + fetch "
                      f"{ph['fetch'] * 1e3:.1f} + set_state {ph['set_state'] * 1e3:.1f} ms",
                  table(["source", "ms", "bound ms", "vs bound", "bound from", "state ok"],
                        body, right=(1, 2, 3))]
    loads = out.get("step_load_avg", []) + ([out["recovery"]["load_avg"]]
                                            if "recovery" in out else [])
    if loads and max(loads) > (out["cores"] or 1):
        lines += ["", f"WARNING: 1-minute load average up to {max(loads):.1f} on {out['cores']} "
                      f"cores: other processes shared the CPUs, the times are inflated and noisy"]
    if out["targets"]:
        lines += [""]
        for name, t in out["targets"].items():
            val = (f"{t['value'] * 100:+.1f}%" if "3%" in name else f"{t['value']:.2f}x")
            lines.append(f"{'PASS' if t['pass'] else 'FAIL'}  {name} (measured {val})")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per job (30)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (5)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of the step jobs (3)")
    ap.add_argument("--reps", type=int, default=None, help="recoveries of each kind (3)")
    ap.add_argument("--width", type=int, default=None, help="mlp width (2048)")
    ap.add_argument("--batch", type=int, default=None, help="samples per rank (256)")
    ap.add_argument("--dir", type=Path, default=None,
                    help="where checkpoint files go (default: the temp directory)")
    ap.add_argument("--quick", action="store_true",
                    help="a small model, few steps, one round: a smoke test")
    ap.add_argument("--skip-steps", action="store_true")
    ap.add_argument("--skip-recovery", action="store_true")
    ap.add_argument("--json", type=Path, default=None, metavar="PATH")
    args = ap.parse_args(argv)
    q = args.quick
    for name, full, quick in (("steps", 30, 4), ("warmup", 5, 2), ("rounds", 3, 1),
                              ("reps", 3, 1), ("width", 2048, 256), ("batch", 256, 32)):
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)
    if args.ranks < 2:
        ap.error("--ranks must be at least 2")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    from faultlab.workloads.base import default_config
    config = default_config("mlp", processes=args.ranks, width=args.width,
                            per_replica_batch=args.batch)
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores)", flush=True)
    steps = rec = None
    if not args.skip_steps:
        print("step time:", flush=True)
        steps = measure_steps(args, config)
    if not args.skip_recovery:
        print("recovery:", flush=True)
        rec = measure_recovery(args, config)
    out = summarize(args, config, steps, rec)
    print()
    print(render(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
