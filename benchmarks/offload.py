#!/usr/bin/env python
"""Offloaded training (offload = window:N, docs/offload.md) side by side with the same run
without offload, in one process.

Usage:
    python benchmarks/offload.py [--workload resnet18] [--windows 1,4,16] [--width 16]
                                 [--input-size 32] [--batch 16] [--replicas 1] [--steps 4]
                                 [--rounds 3] [--saves 5] [--threads 1] [--json]

For each configuration (no offload, then window:N for each N), one trainer, all built first:

  step       median seconds of one train_step, measured in blocks of --steps steps, the blocks
             of every configuration interleaved round by round (--rounds), so that a machine
             whose speed drifts shifts every configuration alike. Ratio: offloaded / none.
             Bound: the run without offload (on a CPU every host <-> "device" copy is a
             memcpy the run without offload does not do; nothing can overlap a GPU's PCIe).
  resident   peak bytes of windowed (device-side) parameter storage, counted by the window as
             layers are fetched and released, against the bound it must meet: the N largest
             layers' bytes, and against the whole parameter set (what the run without offload
             keeps on the device). Host store bytes are the parameters + Adam moments.
  stall      what the training thread waits per checkpoint: get_state() and a borrowed
             CheckpointEngine.save() (median of --saves, each waited for before the next).
             Without offload get_state copies every array; with offload it returns views of
             the host store. Ratio: offloaded / none; bound: 0 copies (views only).
  next step  the step right after each save minus the median step: what copy-on-write of the
             lent host tensors costs the host optimizer step (none: 0 by construction).

Numbers depend on the machine's load: run `uptime` next to it and record both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", default="resnet18")
    ap.add_argument("--windows", default="1,4,16")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--saves", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)

    import torch
    from faultlab.backends import load_backend
    from faultlab.checkpointing.engine import CheckpointEngine
    from faultlab.workloads.base import default_config
    torch.set_num_threads(a.threads)
    backend = load_backend("torch")
    kw = dict(width=a.width, input_size=a.input_size, per_replica_batch=a.batch,
              replicas=a.replicas, dataset="digits", steps_per_epoch=1000, epochs=1)
    if a.workload == "mlp":
        kw.update(input_size=8)
    names = ["none"] + [f"window:{int(n)}" for n in a.windows.split(",")]
    trainers = {n: backend.new_trainer(default_config(a.workload, offload="" if n == "none"
                                                       else n, **kw)) for n in names}
    step = 0
    for t in trainers.values():          # warm-up (Adam's moments appear at step 0)
        t.train_step(0)
        t.train_step(1)
    step = 2
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(a.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            t = trainers[n]
            t0 = time.perf_counter()
            for s in range(a.steps):
                t.train_step(step + s)
            times[n].append((time.perf_counter() - t0) / a.steps)
        step += a.steps
    out: dict = {"workload": a.workload, "config": kw, "threads": a.threads, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for n in names:
            t = trainers[n]
            s0 = t.get_state()
            eng = CheckpointEngine(Path(tmp) / f"{n.replace(':', '_')}.ckpt", max_in_flight=2,
                                   keep=2, slot_bytes=int(1.1 * CheckpointEngine.slot_bytes_for(
                                       s0, s0)))
            del s0
            stalls, nexts = [], []
            st = step
            for i in range(a.saves):
                t0 = time.perf_counter()
                h = eng.save(st, t.get_state(), borrowed=True)
                stalls.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                t.train_step(st)
                nexts.append(time.perf_counter() - t0)
                h.wait()
                st += 1
            eng.close()
            step_s = statistics.median(times[n])
            row = {"config": n, "step_s": step_s, "stall_s": statistics.median(stalls),
                   "next_step_extra_s": statistics.median(nexts) - step_s}
            if n != "none":
                units = sorted((u.nbytes for u in t.units), reverse=True)
                N = t.config.offload_window
                row.update(peak_resident_bytes=t.window.peak_bytes,
                           window_bound_bytes=sum(units[:N]), param_bytes=sum(units),
                           fetches=t.window.fetches, sync_fetches=t.window.sync_fetches)
            out["rows"].append(row)
    base = out["rows"][0]
    for row in out["rows"]:
        row["step_ratio"] = row["step_s"] / base["step_s"]
        row["stall_ratio"] = row["stall_s"] / base["stall_s"]
    for t in trainers.values():
        if hasattr(t, "close"):
            t.close()
    if a.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"{a.workload} {kw}, torch threads {a.threads}, {a.rounds} rounds x {a.steps} steps")
    print(f"{'config':<10} {'step ms':>8} {'x none':>7} {'stall ms':>9} {'x none':>7} "
          f"{'next+ ms':>9} {'resident KiB':>13} {'bound KiB':>10} {'all KiB':>8} {'sync':>5}")
    for row in out["rows"]:
        res = (f"{row['peak_resident_bytes'] / 1024:>13.1f} {row['window_bound_bytes'] / 1024:>10.1f}"
               f" {row['param_bytes'] / 1024:>8.1f} {row['sync_fetches']:>5}"
               if "peak_resident_bytes" in row else f"{'-':>13} {'-':>10} {'-':>8} {'-':>5}")
        print(f"{row['config']:<10} {row['step_s'] * 1e3:>8.1f} {row['step_ratio']:>7.2f} "
              f"{row['stall_s'] * 1e3:>9.2f} {row['stall_ratio']:>7.2f} "
              f"{row['next_step_extra_s'] * 1e3:>9.1f} {res}")
    print("bounds: step -> the run without offload; resident -> the N largest layers (bound "
          "KiB), never more; stall -> 0 copies (views of the host store)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
