#!/usr/bin/env python
"""Portable mode: what pinning the CPU kernels to AVX2 + FMA costs the reference training step,
and whether it makes the run independent of the machine's instruction set, for torch and TF.

Usage:
    python benchmarks/portable.py [--frameworks torch,tf] [--steps N] [--repeats R]
                                  [--warmup W] [--exact-steps E] [--threads T] [--extra]
                                  [--quick] [--json]

Reference workloads: torch, the campaigns' small ResNet-18 of benchmarks/injector_overhead.py
(width 16, 32x32 digits, 4 emulated replicas x 16 samples, seed 123); TF, the ResNet-18 of
benchmarks/tf_injector_overhead.py (the same, on 2 MirroredStrategy replicas).

Every mode runs in a process of its own (the kernels are chosen when the framework starts):

  native            the machine as it is (any dispatch variable in the caller's environment
                    removed), no portable mode.
  capped            native, but capped to AVX2 the way an AVX2 machine's dispatch would choose:
                    ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2,
                    MKL_ENABLE_INSTRUCTIONS=AVX2 -- the emulated "other machine".
  portable          portable mode entered in a native process: the backend's
                    portable.ENV put into os.environ before the framework is imported,
                    portable.apply() after it is configured (as faultlab --portable does).
  portable@capped   portable mode entered in the capped environment (must equal `portable`).
  --extra adds, timed: torch `portable-aten-conv` (portable with torch.backends.mkldnn
  disabled: convolutions through ATen im2col + MKL GEMM) and TF `portable-opts-flip` (portable
  with TF_ENABLE_ONEDNN_OPTS flipped: Eigen kernels instead of oneDNN's custom ops).

Bit-exactness: each process first trains --exact-steps steps from the seeded initial state and
reports the sha256 of its final state (every array, sorted by name) and the loss bit patterns.
Printed: native vs capped (does the instruction set change the run here at all?), portable vs
portable@capped (the claim: portable mode overrides every native choice), portable vs capped
(portable mode here computes what the capped run computes).

Timing: then, per repeat, --steps rounds; a round runs one training step in each timed process
(native, portable, extras), the starting process rotating, so a burst of load from elsewhere
hits neighbours alike; --warmup untimed steps per process first. A repeat's value is the median
of its steps; `median ms` / `min ms` are the median / minimum over repeats; `ratio` = median /
native median; `paired` = median over all rounds of step / the native step of the same round
(the estimate least disturbed by other processes). Bound: portable <= 1.5x native (on
`paired`), printed PASS/FAIL. --quick: fewer steps and repeats, no extras (about 3 minutes on a
loaded 2-core machine).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BOUND = 1.5
#: environment variables that steer kernel dispatch: removed from every mode's base environment
DISPATCH_PREFIXES = ("ATEN_CPU_CAPABILITY", "MKL_", "ONEDNN_", "DNNL_", "TF_ENABLE_ONEDNN_OPTS")
#: the emulated AVX2 machine: what dispatch picks on a CPU without AVX-512
CAPPED = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
          "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
REFERENCE = {
    "torch": dict(width=16, input_size=32, replicas=4, per_replica_batch=16, dataset="digits",
                  steps_per_epoch=20, epochs=6, lr=1e-3, seed=123),
    "tf": dict(width=16, input_size=32, replicas=2, per_replica_batch=16, dataset="digits",
               steps_per_epoch=20, epochs=6, lr=1e-3, seed=123),
}
TAG = "@@portable-bench "


# ------------------------------------------------------------------------------------------
# worker: one mode of one framework, driven over stdin/stdout
# ------------------------------------------------------------------------------------------

def _send(obj) -> None:
    sys.stdout.write(TAG + json.dumps(obj) + "\n")
    sys.stdout.flush()


def worker(fw: str, mode: str, threads: int, exact_steps: int) -> int:
    import importlib
    portable = importlib.import_module(f"faultlab.backends.{fw}.portable")
    if mode.startswith("portable"):
        env = dict(portable.ENV)
        if mode == "portable-opts-flip":
            env["TF_ENABLE_ONEDNN_OPTS"] = "0" if env.get("TF_ENABLE_ONEDNN_OPTS") == "1" else "1"
        os.environ.update(env)            # before the framework is imported, as enter_portable
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import numpy as np
    from faultlab.backends import load_backend
    from faultlab.workloads.base import default_config
    backend = load_backend(fw)
    backend.configure(threads)
    if mode.startswith("portable"):
        portable.apply()
        if mode == "portable-aten-conv":
            import torch
            torch.backends.mkldnn.enabled = False
    if fw == "torch":
        import random
        import torch
        random.seed(123)
        np.random.seed(123)
        torch.manual_seed(123)
    cfg = default_config("resnet18", framework=fw, **REFERENCE[fw])
    t0 = time.perf_counter()
    trainer = backend.new_trainer(cfg)
    losses, step = [], 0
    for step in range(exact_steps):
        m = trainer.train_step(step)
        losses.append(np.float64(m.loss).view(np.uint64).item())
    build_s = time.perf_counter() - t0
    state = trainer.get_state()
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(np.ascontiguousarray(state[k]).tobytes())
    kern = backend.kernels()
    _send({"ready": True, "state": h.hexdigest(), "losses": losses, "kernels": kern,
           "build_and_exact_s": round(build_s, 2)})
    step = exact_steps
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("quit"):
            break
        ms = []
        for _ in range(int(cmd["steps"])):
            s = time.perf_counter()
            trainer.train_step(step)
            ms.append((time.perf_counter() - s) * 1e3)
            step += 1
        _send({"ms": ms})
    return 0


# ------------------------------------------------------------------------------------------
# parent
# ------------------------------------------------------------------------------------------

class Proc:
    def __init__(self, fw, mode, args):
        env = {k: v for k, v in os.environ.items() if not k.startswith(DISPATCH_PREFIXES)}
        if mode in ("capped", "portable@capped"):
            env.update(CAPPED)
        env["OMP_NUM_THREADS"] = str(args.threads)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        self.fw, self.mode = fw, mode
        self.p = subprocess.Popen(
            [sys.executable, __file__, "--worker", fw, mode, "--threads", str(args.threads),
             "--exact-steps", str(args.exact_steps)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=env, cwd=ROOT)
        self.ready = None
        self.samples: list[list[float]] = []

    def recv(self):
        for line in self.p.stdout:
            if line.startswith(TAG):
                return json.loads(line[len(TAG):])
        err = self.p.stderr.read()
        raise RuntimeError(f"{self.fw}/{self.mode} worker died:\n{err[-3000:]}")

    def ask(self, steps: int) -> list[float]:
        self.p.stdin.write(json.dumps({"steps": steps}) + "\n")
        self.p.stdin.flush()
        return self.recv()["ms"]

    def close(self):
        try:
            self.p.stdin.write(json.dumps({"quit": True}) + "\n")
            self.p.stdin.flush()
            self.p.wait(timeout=60)
        except Exception:
            self.p.kill()


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def run_framework(fw, args, t_start):
    modes = ["native", "capped", "portable", "portable@capped"]
    extra = {"torch": "portable-aten-conv", "tf": "portable-opts-flip"}[fw]
    if args.extra:
        modes.append(extra)
    timed = ["native", "portable"] + ([extra] if args.extra else [])
    procs = {}
    # build and the exact run: at most two processes at a time (2 cores), not timed
    pending = list(modes)
    while pending:
        batch, pending = pending[:args.parallel], pending[args.parallel:]
        started = [Proc(fw, m, args) for m in batch]
        for p in started:
            p.ready = p.recv()
            procs[p.mode] = p
            log(f"{fw}/{p.mode}: built + {args.exact_steps} exact steps in "
                f"{p.ready['build_and_exact_s']} s ({time.perf_counter() - t_start:.0f} s)")
        for p in started:
            if p.mode not in timed:
                p.close()
    try:
        for p in (procs[m] for m in timed):
            p.ask(args.warmup)
        rnd = 0
        for r in range(args.repeats):
            for m in timed:
                procs[m].samples.append([])
            for _ in range(args.steps):
                k = rnd % len(timed)
                rnd += 1
                for m in timed[k:] + timed[:k]:
                    procs[m].samples[-1].extend(procs[m].ask(1))
            log(f"{fw}: repeat {r + 1}/{args.repeats} ({time.perf_counter() - t_start:.0f} s)")
    finally:
        for m in timed:
            procs[m].close()

    st = {m: procs[m].ready["state"] for m in modes}
    ls = {m: procs[m].ready["losses"] for m in modes}
    exact = {
        "native_vs_capped_equal": st["native"] == st["capped"],
        "portable_vs_portable_at_capped_equal": (st["portable"] == st["portable@capped"]
                                                 and ls["portable"] == ls["portable@capped"]),
        "portable_vs_capped_equal": st["portable"] == st["capped"],
    }
    if args.extra:
        exact[f"{extra}_vs_portable_equal"] = st[extra] == st["portable"]
    base = procs["native"].samples
    bmed = statistics.median(statistics.median(b) for b in base)
    bmin = min(statistics.median(b) for b in base)
    rows = []
    for m in timed:
        blocks = [statistics.median(b) for b in procs[m].samples]
        pairs = [(x, y) for rx, ry in zip(procs[m].samples, base) for x, y in zip(rx, ry)]
        paired = statistics.median(x / y for x, y in pairs)
        rows.append({"framework": fw, "mode": m, "median_ms": statistics.median(blocks),
                     "min_ms": min(blocks), "ratio": statistics.median(blocks) / bmed,
                     "ratio_min": min(blocks) / bmin, "paired": paired,
                     "bound": None if m == "native" else BOUND,
                     "verdict": None if m == "native" else ("PASS" if paired <= BOUND else "FAIL"),
                     "state": st[m][:12],
                     "kernels": procs[m].ready["kernels"],
                     "samples_ms": procs[m].samples})
    import importlib
    env = importlib.import_module(f"faultlab.backends.{fw}.portable").ENV
    beyond = [f"{k}={v}" for k, v in env.items()
              if k not in CAPPED and not k.endswith("_MAX_CPU_ISA")]
    return {"framework": fw, "modes": modes, "states": st, "losses": ls, "exact": exact,
            "pins_beyond_cap": beyond,
            "kernels": {m: procs[m].ready["kernels"] for m in modes}, "rows": rows}


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frameworks", default="torch,tf", help="comma-separated (torch,tf)")
    p.add_argument("--steps", type=int, default=6, help="timed rounds per repeat (6)")
    p.add_argument("--repeats", type=int, default=5, help="repeats (5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per process (2)")
    p.add_argument("--exact-steps", type=int, default=6,
                   help="steps from the initial state whose final state is compared (6)")
    p.add_argument("--threads", type=int, default=1, help="framework threads per process (1)")
    p.add_argument("--parallel", type=int, default=2,
                   help="processes built at once during the (untimed) build + exact run (2)")
    p.add_argument("--extra", action="store_true",
                   help="also time the alternatives portable mode did not choose")
    p.add_argument("--quick", action="store_true",
                   help="--steps 3 --repeats 3 --warmup 1 --exact-steps 3, no extras")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--worker", nargs=2, metavar=("FW", "MODE"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.repeats, a.warmup, a.exact_steps, a.extra = 3, 3, 1, 3, False
    for k in ("steps", "repeats", "exact_steps", "threads", "parallel"):
        if getattr(a, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be at least 1")
    return a


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def main(argv=None) -> int:
    a = _args(argv)
    if a.worker:
        return worker(a.worker[0], a.worker[1], a.threads, a.exact_steps)
    fws = [f.strip() for f in a.frameworks.split(",") if f.strip()]
    from faultlab.backends import installed
    started = _dt.datetime.now(_dt.timezone.utc)
    load0 = _loadavg()
    t0 = time.perf_counter()
    results = []
    for fw in fws:
        if not installed(fw):
            log(f"{fw}: not installed, skipped")
            continue
        results.append(run_framework(fw, a, t0))
    load1 = _loadavg()
    cli = list(sys.argv[1:] if argv is None else argv)
    command = "python " + " ".join(shlex.quote(x) for x in
                                   [os.path.relpath(__file__, ROOT)] + cli)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = {}
    for r in results:
        k = r["kernels"]["native"]
        versions[r["framework"]] = k.get("torch") or k.get("tensorflow")
    doc = {"benchmark": "portable", "command": command,
           "date_utc": started.strftime("%Y-%m-%d %H:%M UTC"),
           "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "usable_cores": usable,
                       "python": platform.python_version(), **versions},
           "threads": a.threads, "steps": a.steps, "repeats": a.repeats, "warmup": a.warmup,
           "exact_steps": a.exact_steps, "capped_env": CAPPED, "bound": BOUND,
           "loadavg_start": load0, "loadavg_end": load1,
           "wall_s": round(time.perf_counter() - t0, 1), "results": results}
    verdicts = [r["verdict"] for res in results for r in res["rows"]
                if r["mode"] == "portable"]
    exact_ok = all(res["exact"]["portable_vs_portable_at_capped_equal"] for res in results)
    if a.json:
        print(json.dumps(doc, indent=2))
        return 0 if exact_ok and all(v == "PASS" for v in verdicts) else 1

    print("faultlab portable mode -- reference ResNet-18 (width 16, 32x32 digits, 16 samples a "
          "replica; torch 4 emulated replicas, TF 2 MirroredStrategy replicas)")
    print(f"date     {doc['date_utc']}; {doc['machine']['cpu']}, {usable} usable cores, "
          f"{a.threads} thread(s) per process; "
          + "; ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"load     {load0} -> {load1}")
    print(f"command  {command}")
    print(f"timing   {a.repeats} repeats x {a.steps} rounds, {a.warmup} warm-up steps per "
          f"process; exact run {a.exact_steps} steps; wall {doc['wall_s']} s")
    print("capped   (the emulated AVX2 machine) "
          + " ".join(f"{k}={v}" for k, v in CAPPED.items()))
    print()
    head = (f"{'framework':<10}{'mode':<20}{'median ms':>10}{'min ms':>9}{'ratio':>7}"
            f"{'paired':>8}{'bound':>7}  {'verdict':<8}{'bit-exact':<10}state")
    print(head)
    print("-" * (len(head) + 12))
    for res in results:
        ex = res["exact"]["portable_vs_portable_at_capped_equal"]
        for r in res["rows"]:
            b = f"{r['bound']:.1f}x" if r["bound"] else "-"
            bit = ("yes" if ex else "NO") if r["mode"] == "portable" else "-"
            print(f"{r['framework']:<10}{r['mode']:<20}{r['median_ms']:>10.1f}{r['min_ms']:>9.1f}"
                  f"{r['ratio']:>7.3f}{r['paired']:>8.3f}{b:>7}  {(r['verdict'] or '-'):<8}"
                  f"{bit:<10}{r['state']}")
    print()
    print(f"bit-exactness over the first {a.exact_steps} steps (sha256 of the final state; "
          f"'bit-exact' = portable from native == portable from capped):")
    for res in results:
        fw, st = res["framework"], res["states"]
        e = res["exact"]
        verdict = ("EQUAL (the ISA changes nothing here)" if e["native_vs_capped_equal"]
                   else "differ (the problem is real here)")
        print(f"  {fw}: native {st['native'][:12]} vs capped {st['capped'][:12]}: {verdict}")
        print(f"  {fw}: portable {st['portable'][:12]} vs portable@capped "
              f"{st['portable@capped'][:12]}: "
              f"{'EQUAL (bit-exact)' if e['portable_vs_portable_at_capped_equal'] else 'DIFFER'}"
              f"; portable vs capped: {'equal' if e['portable_vs_capped_equal'] else 'differ'}"
              + ("" if e["portable_vs_capped_equal"] else
                 f" (portable mode pins more than the capped run does: "
                 f"{', '.join(sorted(res['pins_beyond_cap']))})"))
        for k, v in e.items():
            if k.endswith("_vs_portable_equal"):
                print(f"  {fw}: {k.replace('_vs_portable_equal', '')} vs portable: "
                      f"{'equal' if v else 'differ'}")
    print()
    print("kernels (each backend's portable.kernels(), read in each process):")
    for res in results:
        for m in res["modes"]:
            k = {n: v for n, v in res["kernels"][m].items() if n not in ("torch", "tensorflow")}
            name = f"{res['framework']}/{m}"
            print(f"  {name:<28} " + ", ".join(f"{n}={v}" for n, v in k.items()))
    busy = load0 and load1 and max(load0[0], load1[0]) > usable + 0.5
    if busy:
        print()
        print(f"WARNING: the machine was busy (load {load0} -> {load1} on {usable} cores): "
              f"absolute times are inflated; trust 'paired' most.")
    print()
    for res in results:
        for r in res["rows"]:
            if r["verdict"]:
                print(f"{r['verdict']}  {res['framework']} {r['mode']} <= {BOUND}x native "
                      f"(paired {r['paired']:.3f}x)")
        print(f"{'PASS' if res['exact']['portable_vs_portable_at_capped_equal'] else 'FAIL'}  "
              f"{res['framework']} portable from native == portable from capped, bit for bit")
    return 0 if exact_ok and all(v == "PASS" for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
