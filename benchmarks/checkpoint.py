#!/usr/bin/env python
"""Checkpointing cost, side by side in one run: the faultlab engine and every baseline.

Usage:
    python benchmarks/checkpoint.py [--big] [--mib N] [--reps R] [--steps S] [--rounds K]
                                    [--threads T] [--dir DIR] [--engines a,b,...] [--tf]
                                    [--skip-state] [--skip-training] [--json]

Part 1, a big state: a 4-layer MLP with Adam whose checkpoint (parameters and both moments)
is about 128 MiB (--big: 512 MiB, 531 MB), for each engine in a fresh process (so that memory
is measured cleanly), after four untimed warm-up checkpoints, R timed ones:
  stall      how long the training thread is blocked per checkpoint: the save() call; for
             `faultlab+overlap` (the adapter's save(..., overlap=True)) the call plus what the
             next training step's optimizer waits for staging that has not finished
  persist    bytes / (save() call -> checkpoint durable), median, and its ratio to the raw
             disk bandwidth `dd if=/dev/zero of=F bs=1M count=N conv=fdatasync` measured in
             the same run, twice before each engine and once at the end (ratios to the
             median and to the best dd run)
  memory     peak extra resident memory: peak RSS minus the RSS just before the first save
             (staging pool, snapshot copies, serialisation buffers)
  next step  the training step right after each durable checkpoint minus the step just
             before it (median): cost a checkpoint leaves behind, e.g. TF's copy-on-write copy
             of a variable buffer a checkpoint still shares (noisy on a shared machine)
Part 2, the reference training workload (the campaigns' ResNet-18: width 16, 32x32 digits, 4
emulated replicas x 16, Adam; an 8 MiB state), in this process, through the torch adapter,
each checkpointer warmed by four untimed checkpoints: in each of K rounds and for each engine,
a block of S steps checkpointing every step and a block of 2S (at least 10) checkpointing
every 10 steps, each timed next to a block of as many steps without checkpoints (order
alternating between rounds); slowdown = median over rounds of (block time / its neighbour's
time) - 1. The machine's step time drifts; adjacent blocks drift together.

Part 3 (--tf), the big state in TensorFlow: the same MLP in Keras 3 with Adam (float32), each
engine in a fresh process as in part 1: faultlab+tf (the engine fed by the TF adapter), tf-sync
and tf-async (the baselines: the adapter's arrays assigned to tf.Variables of a
tf.train.Checkpoint, CheckpointManager, fsync), and TF's own way for reference,
tf-sync-native / tf-async-native: tf.train.Checkpoint(model=, optimizer=) + CheckpointManager
straight from the live variables (no adapter, no copy), the same fsync callback.

Engines: faultlab (CheckpointEngine; staging pool as large as the state, 8 MiB chunks, two
writers), faultlab+overlap (the same, staged behind the next forward/backward pass), sync
(torch.save to a temporary file, fsync, rename, directory fsync), checkfreq (snapshot +
background torch.save + fsync, one in flight), dcp-async (torch.distributed.checkpoint
.async_save, no process group, FileSystemWriter with sync_files). Checkpoints go to DIR
(default: a temporary directory in the current directory's file system); `os.sync()` runs
before each timed save. Training uses one torch thread (--threads).

A default run takes about five minutes on the 2-core development machine; --big about six;
--tf adds about two (each TF process imports TensorFlow).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MiB = 1 << 20
ENGINES = ("faultlab", "sync", "checkfreq", "dcp-async")
TRAINING_ENGINES = ("faultlab", "faultlab+overlap", "faultlab+cow", "sync", "checkfreq",
                    "dcp-async")
MODES = ("+overlap", "+cow")


def base_engine(name: str) -> str:
    for m in MODES:
        name = name.removesuffix(m)
    return name
TF_STATE_ENGINES = ("faultlab+tf", "tf-sync", "tf-async", "tf-sync-native", "tf-async-native")
REFERENCE = dict(width=16, input_size=32, replicas=4, per_replica_batch=16, dataset="digits",
                 steps_per_epoch=20, epochs=6, lr=1e-3, seed=123)


def engine_settings(name: str, state_bytes: int) -> dict:
    if name.startswith("faultlab"):
        # a staging pool as large as the state: save() returns once it is copied
        return {"max_in_flight": 2, "keep": 2, "chunk_bytes": 8 * MiB,
                "pool_bytes": max(64 * MiB, -(-state_bytes // (8 * MiB)) * 8 * MiB),
                "writers": 2}
    return {"keep": 2}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024      # Linux: KiB


def dd_rate(directory: Path, mib: int) -> float | None:
    """bytes/s of dd writing `mib` MiB with conv=fdatasync (the raw sequential bandwidth),
    after flushing what other writers left dirty."""
    from engine_rates import dd_rate as measure          # benchmarks/, this script's directory
    os.sync()
    return measure(directory, mib)


def wide_mlp(mib: int):
    """A 4-layer MLP with Adam whose checkpoint (parameters + two moments) is about `mib` MiB,
    a batch for it, and one training step."""
    import torch
    torch.manual_seed(0)
    d = max(64, int((mib * MiB / 12 / 4) ** 0.5) // 64 * 64)
    model = torch.nn.Sequential(*[torch.nn.Linear(d, d, bias=True) for _ in range(4)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x, y = torch.randn(64, d), torch.randn(64, d)

    def step():
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt, step


# -- parts 1 and 3: one engine, one process ---------------------------------------------------

class Session:
    """A model, its optimizer and one checkpointer: save(step) -> handle, train_step()."""

    overlap = False
    cow = False

    def waited(self) -> float:           # what optimizer steps waited for overlapped staging
        return 0.0


def torch_session(engine: str, mib: int, directory: Path) -> Session:
    import torch
    import torch.distributed.checkpoint  # noqa: F401  (imported before RSS is measured)

    from faultlab.backends.torch.adapter import TorchCheckpointAdapter
    from faultlab.checkpointing.api import open_checkpointer
    torch.set_num_threads(1)
    model, opt, train_step = wide_mlp(mib)
    for _ in range(2):                                 # gradients and Adam moments exist
        train_step()
    s = Session()
    adapter = TorchCheckpointAdapter(model, opt)
    s.nbytes = sum(a.nbytes for a in adapter.capture(0)[0].values())
    base_name = base_engine(engine)
    s.overlap, s.cow = engine.endswith("+overlap"), engine.endswith("+cow")
    s.ckpt = open_checkpointer(base_name, directory / engine,
                               **engine_settings(base_name, s.nbytes))
    s.save = lambda step: adapter.save(s.ckpt, step, overlap=s.overlap, cow=s.cow)
    s.train_step = train_step
    s.waited = lambda: adapter.overlap_wait_s
    s.adapter, s.opt = adapter, opt
    return s


def keras_wide_mlp(mib: int):
    """wide_mlp in Keras 3 (float32, Adam): model, optimizer, one training step."""
    import keras
    import tensorflow as tf
    keras.utils.set_random_seed(0)
    d = max(64, int((mib * MiB / 12 / 4) ** 0.5) // 64 * 64)
    model = keras.Sequential([keras.Input((d,))] + [keras.layers.Dense(d) for _ in range(4)])
    opt = keras.optimizers.Adam(1e-4)
    x, y = tf.random.stateless_normal((64, d), (1, 2)), tf.random.stateless_normal((64, d), (3, 4))

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x) - y))
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                model.trainable_variables))
    return model, opt, step


def tf_session(engine: str, mib: int, directory: Path) -> Session:
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from faultlab.backends.tf.checkpointers import fsync_tf_checkpoint
    from faultlab.checkpointing.api import SaveFuture, open_checkpointer
    from faultlab.backends.tf.adapter import TFCheckpointAdapter
    model, opt, train_step = keras_wide_mlp(mib)
    for _ in range(2):
        train_step()
    s = Session()
    adapter = TFCheckpointAdapter(model, opt)
    s.nbytes = sum(a.nbytes for a in adapter.capture(0)[0].values())
    s.train_step = train_step
    target = directory / engine
    if not engine.endswith("-native"):
        base_name = engine.removesuffix("+tf")
        s.ckpt = open_checkpointer(base_name, target, **engine_settings(base_name, s.nbytes))
        s.save = lambda step: adapter.save(s.ckpt, step)
        return s
    # TF's own way: the live variables straight into tf.train.Checkpoint. Their underlying
    # tf.Variables, not the Keras objects: TF 2.21's async option fails on a Keras 3 model at
    # the second save (keras.Variable._copy_trackable_to_cpu creates a tf.Variable inside TF's
    # traced copy function: "tf.function only supports singleton tf.Variables").
    target.mkdir(parents=True, exist_ok=True)
    variables = [v.value for v in (*model.variables, *opt.variables)]
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(variables=variables),
                                         str(target), 2)
    asynchronous = engine.startswith("tf-async")

    def save(step):
        fut = SaveFuture(step)

        def durable(path):
            fsync_tf_checkpoint(Path(path))
            fut.finish()
        manager.save(checkpoint_number=step, options=tf.train.CheckpointOptions(
            enable_async=asynchronous, experimental_write_callbacks=[durable]))
        return fut

    class Native:
        def wait_all(self):
            manager.checkpoint.sync()

        def close(self):
            manager.checkpoint.sync()
    s.ckpt, s.save = Native(), save
    return s


def child_state(engine: str, mib: int, reps: int, directory: Path) -> dict:
    make = tf_session if engine in TF_STATE_ENGINES else torch_session
    s = make(engine, mib, directory)
    base = rss_bytes()
    # Warm-up, untimed: allocations, and the first write into each of the engine's slots
    # (keep + max_in_flight = 4), which converts preallocated extents -- a long run's steady
    # state. Every engine gets the same four warm-up saves.
    for w in range(4):
        s.save(-4 + w).wait()
    stalls, persist, before, after = [], [], [], []
    for r in range(1, reps + 1):
        s.ckpt.wait_all()
        before.append(timed(s.train_step))
        os.sync()
        t0 = time.perf_counter()
        h = s.save(r)
        stall = time.perf_counter() - t0
        if s.overlap:
            # the next training step runs while staging does; its optimizer step waits for
            # whatever staging has not finished: that wait is stall too
            waited = s.waited()
            s.train_step()
            stall += s.waited() - waited
        if s.cow:
            # the next training step runs while the engine writes the frozen tensors; its
            # optimizer step updates them copy-on-write (out of place, with the writers
            # competing for memory bandwidth): what that optimizer step takes beyond a plain
            # one (measured in this process) is stall too
            st0 = s.adapter.cow_stats
            s.train_step()
            st1 = s.adapter.cow_stats
            n = st1["optimizer_steps"]["cow"] - st0["optimizer_steps"]["cow"]
            if n:
                stall += ((st1["optimizer_step_s"]["cow"] - st0["optimizer_step_s"]["cow"]) / n
                          - st0["mean_optimizer_step_s"]["plain"])
        h.wait()
        t2 = time.perf_counter()
        # when the checkpoint became durable: the engine's handle knows (an overlapped or
        # copy-on-write save may finish during the training step run above)
        inner = getattr(h, "inner", h)
        t2 = min(t2, getattr(inner, "finished_at", None) or t2)
        stalls.append(stall)
        persist.append(s.nbytes / (t2 - t0))
        # a checkpoint can also slow the step after it (paired with the step before it): TF's
        # copy-on-write variables copy a buffer a checkpoint still shares when it is updated
        after.append(timed(s.train_step))
    s.ckpt.wait_all()
    s.ckpt.close()
    peak = peak_rss_bytes()
    forced = cow_step_cost(s) if s.cow else None
    shutil.rmtree(directory / engine, ignore_errors=True)
    return {"engine": engine, "bytes": s.nbytes, "stall_s": stalls, "persist_Bps": persist,
            "extra_memory_bytes": max(0, peak - base), "train_step_s": statistics.median(before),
            "step_extra_s": [a - b for a, b in zip(after, before)],
            "cow": s.adapter.cow_stats if s.cow else None, "cow_forced": forced}


def cow_step_cost(s, reps: int = 3) -> dict:
    """What an optimizer step costs when it does run copy-on-write (here the engine usually
    finishes writing before the next optimizer step, so the timed saves rarely make one):
    the optimizer's step with every parameter and moment frozen (as by a save still being
    written) against a plain step, alternating, on the gradients of the last training step.
    The first copy-on-write step allocates its new buffers; later ones reuse the buffers the
    previous snapshot gave back, as a steady run does."""
    adapter, opt = s.adapter, s.opt
    owners = adapter.cow_tensors()
    plain, cow = [], []
    for _ in range(reps + 1):
        plain.append(timed(opt.step))
        snap = adapter.cow_freeze(owners)
        cow.append(timed(opt.step))
        snap.release()
        owners = adapter.cow_tensors()
    return {"plain_s": plain, "cow_s": cow, "frozen_bytes": sum(
        t.numel() * t.element_size() for t in owners)}


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_state_part(args, directory: Path, log, engines) -> dict:
    results, dds = {}, []
    for engine in engines:
        for _ in range(2):
            rate = dd_rate(directory, args.mib)
            if rate:
                dds.append(rate)
            log(f"  dd {args.mib} MiB conv=fdatasync: "
                f"{rate / 1e6 if rate else float('nan'):.0f} MB/s")
        out = subprocess.run([sys.executable, __file__, "--child-state", engine,
                              "--mib", str(args.mib), "--reps", str(args.reps),
                              "--dir", str(directory)], capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{engine}: benchmark child failed:\n{out.stderr[-2000:]}")
        res = json.loads(out.stdout.strip().splitlines()[-1])
        results[engine] = res
        log(f"  {engine}: stall {statistics.median(res['stall_s']) * 1e3:.0f} ms, persist "
            f"{statistics.median(res['persist_Bps']) / 1e6:.0f} MB/s, extra memory "
            f"{res['extra_memory_bytes'] / MiB:.0f} MiB")
    rate = dd_rate(directory, args.mib)
    if rate:
        dds.append(rate)
    nbytes = next(iter(results.values()))["bytes"] if results else args.mib * MiB
    step_s = statistics.median(r["train_step_s"] for r in results.values()) if results else 0
    return {"mib": args.mib, "bytes": nbytes, "dd_Bps": dds, "engines": results,
            "train_step_s": step_s}


# -- part 2: the reference training workload --------------------------------------------------

def run_training_part(args, directory: Path, log) -> dict:
    import torch

    from faultlab.backends.torch.adapter import TorchCheckpointAdapter
    from faultlab.checkpointing.api import open_checkpointer
    from faultlab.workloads.base import default_config
    from faultlab.backends.torch.trainer import TorchTrainer
    cfg = default_config("resnet18", **REFERENCE)
    trainer = TorchTrainer(cfg)
    adapter = TorchCheckpointAdapter(trainer.model, trainer.optimizer)
    for s in range(3):                                 # warm-up (allocations, Adam state)
        trainer.train_step(s)
    step = 3
    state_bytes = sum(a.nbytes for a in adapter.capture(step)[0].values())
    variants = [("none", 0)] + [(e, every) for e in args.training_engines for every in (1, 10)]
    ckpts = {}
    for engine, every in variants[1:]:                # opened once, warmed like part 1
        base = base_engine(engine)
        ckpts[engine, every] = c = open_checkpointer(base, directory / f"train-{engine}-{every}",
                                                     **engine_settings(base, state_bytes))
        for w in range(4):
            adapter.save(c, -4 + w).wait()
    # Paired blocks: each checkpointing block is timed next to a block without checkpoints
    # (order alternating between rounds), and the slowdown is the median of the pairs'
    # ratios. On a shared machine the step time drifts by tens of percent over minutes;
    # adjacent blocks drift together.
    n_steps = {1: args.steps, 10: max(10, 2 * args.steps // 10 * 10)}
    times: dict[str, list[float]] = {f"{e}/{n}": [] for e, n in variants}
    ratios: dict[str, list[float]] = {f"{e}/{n}": [] for e, n in variants[1:]}
    stalls: dict[str, list[float]] = {f"{e}/{n}": [] for e, n in variants}

    def block(engine, every, n):
        nonlocal step
        key = f"{engine}/{every}"
        ckpt = ckpts.get((engine, every))
        overlap, cow = engine.endswith("+overlap"), engine.endswith("+cow")
        waited0, saves = adapter.overlap_wait_s, 0
        cow0 = adapter.cow_stats
        t0 = time.perf_counter()
        for _ in range(n):
            trainer.train_step(step)
            step += 1
            if ckpt is not None and step % every == 0:
                s0 = time.perf_counter()
                adapter.save(ckpt, step, overlap=overlap, cow=cow)
                stalls[key].append(time.perf_counter() - s0)
                saves += 1
        if ckpt is not None:
            adapter.wait_staged()
            ckpt.wait_all()                             # its checkpoints are all durable
        dt = (time.perf_counter() - t0) / n
        times[key].append(dt)
        if overlap and saves:
            # training also waited at the optimizer's pre-hook for unfinished staging
            extra = (adapter.overlap_wait_s - waited0) / saves
            stalls[key][-saves:] = [x + extra for x in stalls[key][-saves:]]
        cow1 = adapter.cow_stats
        n_cow = cow1["optimizer_steps"]["cow"] - cow0["optimizer_steps"]["cow"]
        if cow and saves and n_cow:
            # optimizer steps that ran copy-on-write, beyond a plain optimizer step's mean
            plain = cow1["mean_optimizer_step_s"]["plain"] or 0.0
            extra = (cow1["optimizer_step_s"]["cow"] - cow0["optimizer_step_s"]["cow"]
                     - n_cow * plain) / saves
            stalls[key][-saves:] = [x + extra for x in stalls[key][-saves:]]
        return dt

    for rnd in range(args.rounds):
        for engine, every in variants[1:]:
            step += (-step) % every                     # blocks start on a checkpoint boundary
            n = n_steps[every]
            if rnd % 2 == 0:
                plain, dt = block("none", 0, n), block(engine, every, n)
            else:
                dt, plain = block(engine, every, n), block("none", 0, n)
            ratios[f"{engine}/{every}"].append(dt / plain)
            log(f"  round {rnd + 1}: {engine + '/' + str(every):22s} {dt * 1e3:7.1f} ms/step "
                f"(without checkpoints {plain * 1e3:.1f})")
    for c in ckpts.values():
        c.close()
    return {"state_bytes": state_bytes, "threads": torch.get_num_threads(),
            "steps": n_steps, "rounds": args.rounds, "step_s": times, "ratio": ratios,
            "stall_s": stalls}


# -- the report -------------------------------------------------------------------------------

def summarize_state(state: dict) -> dict:
    dd = statistics.median(state["dd_Bps"]) if state["dd_Bps"] else float("nan")
    dd_best = max(state["dd_Bps"], default=float("nan"))
    rows = {}
    for e, r in state["engines"].items():
        rows[e] = {"stall_ms": statistics.median(r["stall_s"]) * 1e3,
                   "persist_MBps": statistics.median(r["persist_Bps"]) / 1e6,
                   "persist_vs_dd": statistics.median(r["persist_Bps"]) / dd,
                   "persist_vs_best_dd": statistics.median(r["persist_Bps"]) / dd_best,
                   "extra_memory_MiB": r["extra_memory_bytes"] / MiB,
                   "step_after_extra_ms": statistics.median(r["step_extra_s"]) * 1e3}
        forced = r.get("cow_forced")
        if forced:
            rows[e]["cow_optimizer_step"] = {
                "plain_ms": statistics.median(forced["plain_s"]) * 1e3,
                "first_ms": forced["cow_s"][0] * 1e3,
                "reused_ms": statistics.median(forced["cow_s"][1:]) * 1e3}
    ref = rows.get("dcp-async", rows.get("tf-async", {})).get("stall_ms")
    for e, row in rows.items():
        row["stall_vs_async"] = row["stall_ms"] / ref if ref else None
    return {"mib": state["mib"], "bytes": state["bytes"], "dd_MBps": dd / 1e6,
            "dd_best_MBps": dd_best / 1e6, "dd_runs": len(state["dd_Bps"]),
            "train_step_ms": state["train_step_s"] * 1e3, "engines": rows}


def summarize(state: dict | None, training: dict | None, tf_state: dict | None = None) -> dict:
    out: dict = {"targets": {}}
    if state:
        out["state"] = summary = summarize_state(state)
        rows = summary["engines"]
        if "faultlab" in rows:
            f = rows["faultlab"]
            out["targets"]["persist >= 0.9 x dd (median dd)"] = f["persist_vs_dd"] >= 0.9
            out["targets"]["persist >= 0.9 x dd (best dd)"] = f["persist_vs_best_dd"] >= 0.9
        for e in ("faultlab", "faultlab+overlap", "faultlab+cow"):
            if rows.get(e, {}).get("stall_vs_async") is not None:
                out["targets"][f"{e} stall <= 1/10 of dcp async_save blocking"] = \
                    rows[e]["stall_vs_async"] <= 0.1
    if tf_state:
        out["tf_state"] = summarize_state(tf_state)
    if training:
        base = statistics.median(training["step_s"]["none/0"])
        rows = {}
        for key, rs in training["ratio"].items():
            engine, every = key.split("/")
            row = rows.setdefault(engine, {})
            row[f"slowdown_every_{every}"] = statistics.median(rs) - 1
            st = training["stall_s"][key]
            row[f"stall_ms_every_{every}"] = statistics.median(st) * 1e3 if st else None
        out["training"] = {"step_ms": base * 1e3, "state_MiB": training["state_bytes"] / MiB,
                           "engines": rows}
        best = min((r["slowdown_every_10"] for e, r in rows.items()
                    if e.startswith("faultlab")), default=None)
        if best is not None:
            out["targets"]["<= 5% slowdown every 10 steps"] = best <= 0.05
    return out


def format_table(s: dict, machine: dict) -> str:
    lines = [f"machine: {machine['cpu']}, {machine['cores']} cores, load average "
             f"{machine['loadavg']}, python {machine['python']}, torch {machine['torch']}"
             + (f", tensorflow {machine['tensorflow']}" if machine.get("tensorflow") else "")]
    for key, what, ref in (("state", "4-layer MLP + Adam, torch", "dcp-async"),
                           ("tf_state", "4-layer MLP + Adam, Keras 3 / TensorFlow", "tf-async")):
        if key not in s:
            continue
        st = s[key]
        lines += ["", f"state of {st['bytes'] / 1e6:.0f} MB ({what}, "
                  f"{st['train_step_ms']:.0f} ms/step); raw disk: dd {st['mib']} MiB "
                  f"conv=fdatasync, {st['dd_runs']} runs, median {st['dd_MBps']:.0f} MB/s, best "
                  f"{st['dd_best_MBps']:.0f} MB/s", "",
                  f"| engine | stall per checkpoint | stall / {ref}'s | next step extra | "
                  "persist MB/s | persist / dd median | persist / dd best | peak extra memory |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for e, r in st["engines"].items():
            vs = f"{r['stall_vs_async']:.3f}" if r["stall_vs_async"] is not None else "-"
            lines.append(f"| {e} | {r['stall_ms']:.0f} ms | {vs} | "
                         f"{r['step_after_extra_ms']:+.0f} ms | {r['persist_MBps']:.0f} | "
                         f"{r['persist_vs_dd']:.2f} | {r['persist_vs_best_dd']:.2f} | "
                         f"{r['extra_memory_MiB']:.0f} MiB |")
        for e, r in st["engines"].items():
            c = r.get("cow_optimizer_step")
            if c:
                lines += ["", f"{e}: an optimizer step run copy-on-write (every tensor frozen) "
                          f"takes {c['reused_ms']:.0f} ms against {c['plain_ms']:.0f} ms plain "
                          f"(x{c['reused_ms'] / c['plain_ms']:.2f}; the first one, allocating "
                          f"its buffers, {c['first_ms']:.0f} ms)"]
    if "training" in s:
        tr = s["training"]
        lines += ["", f"reference workload (ResNet-18 width 16, 4 x 16, digits 32x32; state "
                  f"{tr['state_MiB']:.1f} MiB): {tr['step_ms']:.0f} ms/step without "
                  "checkpoints", "",
                  "| engine | slowdown, every step | slowdown, every 10 | stall per "
                  "checkpoint (every step) | blocked share, every 10 |",
                  "|---|---:|---:|---:|---:|"]
        for e, r in tr["engines"].items():
            stall = r.get("stall_ms_every_1")
            blocked = r.get("stall_ms_every_10")
            share = "-" if blocked is None else f"{blocked / 10 / tr['step_ms'] * 100:.1f}%"
            lines.append(f"| {e} | {r['slowdown_every_1'] * 100:+.1f}% | "
                         f"{r['slowdown_every_10'] * 100:+.1f}% | "
                         f"{'-' if stall is None else f'{stall:.1f} ms'} | {share} |")
    if s["targets"]:
        lines += ["", "targets: " + "; ".join(f"{k}: {'met' if v else 'NOT met'}"
                                             for k, v in s["targets"].items())]
    return "\n".join(lines)


def machine_info(tf: bool = False) -> dict:
    import torch
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__,
            "tensorflow": importlib.import_module("tensorflow").__version__ if tf else None,
            "loadavg": " ".join(f"{x:.1f}" for x in os.getloadavg())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--big", action="store_true", help="a 512 MiB (537 MB) state")
    ap.add_argument("--mib", type=int, help="state size in MiB (default 128, --big 512)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5,
                    help="training steps per round checkpointing every step (twice as many "
                         "for every 10 and for none)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for training (default 1: the other core is left to "
                         "the checkpoint writers; 2 threads on this shared 2-core machine "
                         "make a step 6x slower)")
    ap.add_argument("--dir", help="where checkpoints go (default: a temporary directory here)")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--tf", action="store_true",
                    help="also part 3: the big state in Keras 3 / TensorFlow")
    ap.add_argument("--skip-state", action="store_true")
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child-state", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.mib = args.mib or (512 if args.big else 128)
    args.engines = [e for e in args.engines.split(",") if e]
    args.training_engines = [e for e in TRAINING_ENGINES
                             if base_engine(e) in args.engines]
    args.state_engines = args.training_engines
    if args.child_state:
        print(json.dumps(child_state(args.child_state, args.mib, args.reps, Path(args.dir))))
        return 0
    import torch
    torch.set_num_threads(args.threads)
    own = args.dir is None
    directory = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix=".ckpt-bench-",
                                                                      dir=Path.cwd()))
    directory.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    try:
        state = None if args.skip_state else (
            log(f"state part ({args.mib} MiB):") or
            run_state_part(args, directory, log, args.state_engines))
        tf_state = None if not args.tf else (
            log(f"TensorFlow state part ({args.mib} MiB):") or
            run_state_part(args, directory, log, TF_STATE_ENGINES))
        training = None if args.skip_training else (log("training part:") or
                                                    run_training_part(args, directory, log))
    finally:
        if own:
            shutil.rmtree(directory, ignore_errors=True)
    summary = summarize(state, training, tf_state)
    machine = machine_info(args.tf)
    if args.json:
        print(json.dumps({"machine": machine, "summary": summary, "raw": {
            "state": state, "tf_state": tf_state, "training": training}}, default=str))
    else:
        print(format_table(summary, machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
