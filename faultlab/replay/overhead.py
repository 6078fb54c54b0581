"""What protection costs, measured end to end and side by side (framework-free).

`detection_overhead` trains one workload with and without detectors, interleaved in blocks in
one process, and reports per-step medians and their ratio; `replay_overhead` trains with
periodic persistent checkpoints and, in the rerun variant, a rollback-and-replay every
`rerun_every` steps, and reports the end-to-end slowdown and the recovery time against its
bound (checkpoint load at disk read bandwidth plus the replayed steps). The ISCA'23 artifact's
amortised figures are printed beside ours for comparison.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from faultlab.backends import load_backend
from faultlab.detectors import DetectorSuite, Verdict, default_suite
from faultlab.detectors.signals import Signals, SignalSpec
from faultlab.workloads.base import WorkloadConfig, default_config

#: the reference training workload: the CPU-sized ResNet-18 the campaigns use
REFERENCE = default_config("resnet18", width=16, input_size=32, replicas=4, per_replica_batch=16,
                           dataset="digits", steps_per_epoch=20, epochs=6, lr=1e-3, seed=123)
#: the artifact's figures: detection 0.016% (check run 10,000x a step, amortised), recovery
#: 0.12% (re-executing two iterations every ten, amortised over 320 recoveries)
ARTIFACT = {"detection_overhead": 0.00016, "recovery_overhead": 0.0012}


def reference(workload: str | None, framework: str | None = None) -> WorkloadConfig:
    if workload in (None, "reference"):
        cfg = REFERENCE
    else:
        cfg = default_config(workload)
        if cfg.workload == "resnet18":   # the artifact's full size does not fit a CPU run
            cfg = REFERENCE
    return cfg.replace(framework=framework) if framework else cfg


@dataclass
class Variant:
    name: str
    spec: SignalSpec | None
    suite: DetectorSuite | None


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def detection_overhead(config: WorkloadConfig, steps: int = 60, block: int = 2,
                       variants: dict[str, list[str]] | None = None, progress=None) -> dict:
    """Per-step time with no detection and with each detector set, interleaved by block."""
    variants = variants or {"nonfinite+history": ["nonfinite", "history"],
                            "all (nonfinite, history, spike)": ["nonfinite", "history", "spike"],
                            "abft": ["abft"]}
    trainer = load_backend(config.framework).build_trainer(config)
    vs = [Variant("none", None, None)] + [
        Variant(n, (s := default_suite(d)).spec, s) for n, d in variants.items()]
    times: dict[str, list[float]] = {v.name: [] for v in vs}
    total = config.total_steps
    step = 0
    for v in vs:    # warm-up: the first step allocates optimizer state, and a TF trainer
        trainer.signal_spec = v.spec    # traces its step once per set of signals
        trainer.train_step(step % total)
        step += 1
    rounds = max(1, steps // block)
    for r in range(rounds):
        order = vs[r % len(vs):] + vs[:r % len(vs)]
        for v in order:
            trainer.signal_spec = v.spec
            for _ in range(block):
                t0 = time.perf_counter()
                m = trainer.train_step(step % total)
                if v.suite is not None:
                    v.suite.observe(m.signals)
                times[v.name].append(time.perf_counter() - t0)
                step += 1
        if progress:
            progress(r + 1, rounds)
    trainer.signal_spec = None
    base = _median(times["none"])
    isolated = {"none": 0.0}
    for v in vs[1:]:
        cost = trainer.signal_cost(v.spec, v.suite)
        if cost is not None:
            isolated[v.name] = cost
    # paired: each block against the no-detection block of the same round, which saw the
    # same machine load; the median of those ratios is the estimate least disturbed by noise
    def paired(name):
        n = len(times[name]) // block
        return _median([sum(times[name][i * block:(i + 1) * block]) /
                        sum(times["none"][i * block:(i + 1) * block]) for i in range(n)])
    rows = [{"variant": v.name, "median_ms": 1e3 * _median(times[v.name]),
             "ratio": _median(times[v.name]) / base, "paired": paired(v.name),
             "isolated_ms": 1e3 * isolated[v.name] if v.name in isolated else None,
             "isolated_ratio": 1 + isolated[v.name] / base if v.name in isolated else None,
             "steps": len(times[v.name])} for v in vs]
    return {"workload": config.to_dict(), "rows": rows, "artifact": ARTIFACT["detection_overhead"]}


def time_signals(collect, suite: DetectorSuite | None = None, repeats: int = 50) -> float:
    """Median seconds of `collect()` (a trainer collecting one step's Signals on its live
    state) plus the suite's verdicts and its per-checkpoint snapshot: what detection adds to
    a step, timed in isolation (the trainers' `signal_cost`)."""
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sig = collect()
        if suite is not None:
            suite.snapshot()  # what a protected run keeps per checkpoint, amortised
            for d in suite.detectors:
                d.observe(sig)
        ts.append(time.perf_counter() - t0)
    return _median(ts)


def false_positives(signals: list[dict], names: list[str] | None = None) -> dict:
    """Run detectors over a golden run's signals: every verdict is a false positive."""
    suite = default_suite(names)
    alarms = [v for v in (suite.observe(Signals.from_dict(d)) for d in signals) if v]
    return {"steps": len(signals), "alarms": len(alarms),
            "rate": len(alarms) / len(signals) if signals else 0.0,
            "first": [a.__dict__ for a in alarms[:5]]}


class _Periodic:
    """A synthetic detection every `every` steps, on a step's first execution only: makes the
    rerun variant roll back and replay as a real detection would, without a fault."""

    name = "periodic"
    needs = SignalSpec(history=False)
    PERSISTENT = ("fired",)

    def __init__(self, every: int, offset: int | None = None):
        # mid-way between checkpoints by default: the expected replay length of a real fault
        self.every, self.fired = every, set()
        self.offset = every // 2 if offset is None else offset

    def observe(self, s: Signals) -> Verdict | None:
        if s.step and s.step % self.every == self.offset and s.step not in self.fired:
            self.fired.add(s.step)
            return Verdict(self.name, s.step, "scheduled rerun")
        return None


def replay_overhead(config: WorkloadConfig, steps: int = 60, checkpoint_every: int = 10,
                    rerun_every: int = 10, repeats: int = 1, directory: str | None = None,
                    progress=None) -> dict:
    """Time per step of three runs advanced in lock-step, one step each in turn (so load from
    elsewhere hits all alike): plain, with periodic persistent checkpoints, and with
    checkpoints plus a rollback-and-replay every `rerun_every` steps (mid-way between
    checkpoints). Each variant has its own trainer; the sum of its step times is its cost."""
    from faultlab.replay import Protector, ProtectedRun
    backend = load_backend(config.framework)
    steps = min(steps, config.total_steps)
    names = ("plain", "checkpoint", "rerun")
    wall = {n: 0.0 for n in names}
    recoveries = []
    tmp = Path(directory or tempfile.mkdtemp(prefix="faultlab-replay-"))
    state_bytes = 0
    own_steps: list[float] = []     # the rerun variant's first executions of its steps
    for r in range(repeats):
        # three live trainers (a backend may hand out one reused trainer per configuration)
        trainers = {n: backend.new_trainer(config)
                    for n in names}
        prots = {n: Protector(trainers[n], DetectorSuite([_Periodic(rerun_every if n == "rerun" else 10**9)]),
                              checkpoint_every, directory=tmp / f"{n}{r}") for n in names[1:]}
        for t in trainers.values():    # warm-up outside the timing (a TF step traces once)
            initial = t.get_state()
            t.train_step(0)
            t.set_state(initial)
        outs = {n: ProtectedRun(0) for n in names[1:]}
        gens = {n: prots[n].steps(0, steps, (), outs[n]) for n in names[1:]}

        def plain():
            for s in range(steps):
                trainers["plain"].train_step(s)
                yield s
        gens["plain"] = plain()
        live = list(names)
        k = 0
        while live:
            order = live[k % len(live):] + live[:k % len(live)]
            k += 1
            for n in order:
                t0 = time.perf_counter()
                try:
                    next(gens[n])
                except StopIteration:
                    live.remove(n)
                wall[n] += time.perf_counter() - t0
            if progress and k % 10 == 0:
                progress(k, steps)
        for n in names[1:]:
            prots[n].close()
        recoveries += [d.to_dict() for d in outs["rerun"].detections]
        own_steps += outs["rerun"].step_s
        state_bytes = sum(a.nbytes for a in trainers["plain"].get_state().values())
    plain_s = wall["plain"]
    step_s = plain_s / (steps * repeats)
    rows = [{"variant": n, "wall_s": wall[n], "ratio": wall[n] / plain_s} for n in names]
    rec = {"count": len(recoveries),
           "median_recovery_s": _median([d["recovery_s"] for d in recoveries]),
           "median_load_s": _median([d["load_s"] for d in recoveries]),
           "median_replay_s": _median([d["replay_s"] for d in recoveries]),
           "median_steps_replayed": _median([d["steps_replayed"] for d in recoveries]),
           "step_s": step_s}
    # The bound: the checkpoint load at 0.9x the disk's read bandwidth (measured with
    # O_DIRECT: the disk's own) plus the replayed steps, each at what the same protected
    # run's own first executions of a step cost (a replayed step is that step again: same
    # trainer, same detection signals). Beside it, the stricter bound with the load priced at
    # the page cache's bandwidth (where a recent checkpoint is read from), and the one with
    # the replayed steps priced at the unprotected run's step.
    cache_bw = disk_read_bandwidth(tmp)
    disk_bw = disk_read_bandwidth(tmp, direct=True)
    replayed = rec["median_steps_replayed"] * _median(own_steps)
    rec["own_step_s"] = _median(own_steps)
    rec["read_bandwidth_mb_s"] = disk_bw / 1e6
    rec["cache_read_mb_s"] = cache_bw / 1e6
    rec["load_bound_s"] = state_bytes / (0.9 * disk_bw)
    rec["bound_s"] = rec["load_bound_s"] + replayed
    rec["cache_bound_s"] = state_bytes / (0.9 * cache_bw) + replayed
    rec["plain_bound_s"] = rec["load_bound_s"] + rec["median_steps_replayed"] * step_s
    return {"workload": config.to_dict(), "rows": rows, "recovery": rec,
            "state_mb": state_bytes / 1e6, "artifact": ARTIFACT["recovery_overhead"]}


def disk_read_bandwidth(directory: Path, nbytes: int = 64 << 20,
                        direct: bool = False) -> float:
    """Sequential read bandwidth of a freshly written, synced file (bytes/s). direct=False:
    as a recent checkpoint is read, through the page cache that still holds it. direct=True:
    the disk's own, with O_DIRECT (the page cache bypassed; where the file system refuses
    O_DIRECT, the file's cached pages are dropped first instead)."""
    import mmap
    import os
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "bandwidth.probe"
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(nbytes >> 20):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    try:
        fd = None
        if direct:
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
            except OSError:
                fd = None
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            if direct and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        buf = mmap.mmap(-1, 8 << 20)           # page-aligned, as O_DIRECT requires
        try:
            t0 = time.perf_counter()
            while os.readv(fd, [buf]) > 0:
                pass
            dt = time.perf_counter() - t0
        finally:
            buf.close()
            os.close(fd)
    finally:
        path.unlink()
    return nbytes / dt
