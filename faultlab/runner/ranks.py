"""Multi-process trials (framework-free): a trial of a workload with ``processes > 1``, or one
with process faults (kill, hang, kill_node), runs as a real job of R ranks under the
framework's launcher (torch.distributed.elastic; see docs/distributed.md) and is compared with
the golden run of the same configuration, which is itself such a job without faults.

A trial runs once unprotected: value faults fire, process faults take ranks away and the job
recovers from the agreed snapshot (peer memory, or the engine's file) so its end can be
compared with the golden run's. With detection (``faultlab run --protect`` / ``--detect``) it
runs again with every rank checking the detectors each step (one collective) and rolling back
together. The result records per trial the faults, what fired, every recovery (source, step,
time), the steps lost, restarts, detection and its latency, the outcomes before and after.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from faultlab import jsonlines
from faultlab.backends import load_backend
from faultlab.results.store import TrialResult
from faultlab.trials import Trial
from faultlab.workloads.base import WorkloadConfig

#: the golden timeline's format tag
FORMAT = "faultlab-distributed-golden/1"


@dataclass
class RankJob:
    """Everything a rank needs; the runner makes it, the backend's ranks read it."""

    config: WorkloadConfig
    run_dir: str
    shm_root: str
    faults: tuple = ()               # value FaultSpecs (replica = rank)
    process_faults: tuple = ()       # ProcessFaults
    end: int | None = None           # exclusive end step (default: the configuration's)
    snapshot_every: int = 1          # steps between snapshots into peer memory
    persist_every: int = 10          # steps between the engine's persistent checkpoints
    copies: int = 1                  # peers holding each rank's snapshot
    detect: object | None = None     # runner.session.DetectOptions, or None
    zero: bool = False               # ZeroRedundancyOptimizer (sharded optimizer state)
    fsdp: bool = False               # FSDP2 fully_shard (sharded parameters and state)
    timeout_s: float = 10.0          # collective timeout: a dead or hung rank stalls seconds
    join_timeout_s: float = 120.0    # joining the process group (fork, build, handshake)
    threads: int = 1
    engine: str = "faultlab"         # the persistent checkpointer
    record_grads: bool = False       # tests: keep each step's local (pre-all-reduce) gradients
    port: int = 0                    # rendezvous port on 127.0.0.1 (0: a free one)
    max_restarts: int = 8

    @property
    def end_step(self) -> int:
        return self.end if self.end is not None else self.config.total_steps


_JOB_FIELDS = ("run_dir", "shm_root", "end", "snapshot_every", "persist_every", "copies",
               "zero", "fsdp", "timeout_s", "join_timeout_s", "threads", "engine", "record_grads", "port", "max_restarts")


def job_to_json(job: RankJob) -> str:
    """A job as text for the agent process: the workload and faults as a one-trial columnar
    campaign (the format's own writer; nothing pickled), the rest as JSON."""
    from faultlab.campaigns.columnar import format_columnar
    trial = Trial("job", job.config, tuple(job.faults), process_faults=tuple(job.process_faults))
    d = {k: getattr(job, k) for k in _JOB_FIELDS}
    d["campaign"] = format_columnar([trial])
    d["workload"] = job.config.workload
    if job.detect is not None:
        det = job.detect
        d["detect"] = {"detectors": list(det.detectors), "thresholds": [list(t) for t in
                                                                        det.thresholds],
                       "checkpoint_every": det.checkpoint_every, "policy": det.policy}
    return json.dumps(d)


def job_from_json(text: str) -> RankJob:
    """The job job_to_json wrote (its workload was checked by the process that wrote it,
    so it is allowed here: docs/workloads.md, "Allowing your code")."""
    from faultlab.campaigns.columnar import parse_columnar
    from faultlab.runner.session import DetectOptions
    from faultlab.workloads.allow import allowing
    from faultlab.workloads.base import is_user_workload
    d = json.loads(text)
    name = d["workload"]
    with allowing([name] if is_user_workload(name) else []):
        (trial,) = parse_columnar(d["campaign"], "<job>")
    det = d.get("detect")
    detect = None if det is None else DetectOptions(
        tuple(det["detectors"]), tuple(tuple(t) for t in det["thresholds"]),
        det["checkpoint_every"], det["policy"])
    return RankJob(trial.workload, faults=trial.faults, process_faults=trial.process_faults,
                   detect=detect, **{k: d[k] for k in _JOB_FIELDS})


@dataclass
class DistOptions:
    """How multi-process trials run (faultlab run --snapshot-every / --persist-every / ...)."""

    snapshot_every: int = 1
    persist_every: int = 10
    copies: int = 1
    zero: bool = False
    timeout_s: float = 10.0
    port: int = 0
    fsdp: bool = False


def check_port(port: int) -> None:
    """A one-line FaultlabError when `port` on 127.0.0.1 cannot be listened on."""
    import socket
    from faultlab.errors import FaultlabError
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise FaultlabError(f"port {port} on 127.0.0.1 is already in use ({e.strerror}); "
                                f"choose another with --port, or 0 for a free one") from None


def read_jsonl(path: Path) -> list[dict]:
    """The complete records of a job's JSON-lines file (faultlab.jsonlines)."""
    return jsonlines.read(path)


@dataclass
class JobRecord:
    """What a job left in its run directory."""

    loss: dict[int, float] = field(default_factory=dict)   # step -> loss of its last run
    acc: dict[int, float] = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)
    final: dict | None = None
    attempts: int = 0
    ok: bool = False
    error: str | None = None
    wall_s: float = 0.0

    @classmethod
    def read(cls, run_dir: Path, outcome) -> "JobRecord":
        rec = cls(ok=outcome.ok, error=outcome.error, wall_s=outcome.wall_s)
        for r in read_jsonl(run_dir / "timeline.jsonl"):
            rec.loss[r["step"]] = r["loss"]
            rec.acc[r["step"]] = r["acc"]
            rec.attempts = max(rec.attempts, r["attempt"])
        rec.events = read_jsonl(run_dir / "events.jsonl")
        for e in rec.events:
            rec.attempts = max(rec.attempts, e.get("attempt", 0))
        f = run_dir / "final.json"
        if f.exists():
            rec.final = json.loads(f.read_text())
        return rec

    def series(self, end: int) -> tuple[list[float], list[float]]:
        steps = range(0, end)
        if not all(s in self.loss for s in steps):
            got = [s for s in steps if s in self.loss]
            steps = range(0, (max(got) + 1) if got else 0)
        return [self.loss[s] for s in steps], [self.acc[s] for s in steps]


@dataclass
class DistributedGolden:
    """The fault-free job of one configuration: per-step metrics, final test, state digests."""

    config: WorkloadConfig
    loss: list[float]
    acc: list[float]
    test: tuple[float, float]
    digests: list[str]
    wall_s: float

    def eval_after(self, steps: int):
        return self.test if steps == self.config.total_steps else None

    def to_json(self) -> dict:
        return {"format": FORMAT, "config": self.config.to_dict(), "loss": self.loss,
                "acc": self.acc, "test": list(self.test), "digests": self.digests,
                "wall_s": self.wall_s}


def _scratch(prefix: str) -> tuple[Path, Path]:
    """A run directory and a shared-memory root for one job."""
    from faultlab.distributed import default_root
    run = Path(tempfile.mkdtemp(prefix=f"faultlab-{prefix}-"))
    return run, Path(default_root(run.name))


def run_job(job: RankJob) -> JobRecord:
    """Run a job through its framework's launcher and read what it left behind."""
    backend = load_backend(job.config.framework)
    outcome = backend.run_ranks(job)
    return JobRecord.read(Path(job.run_dir), outcome)


def golden(config: WorkloadConfig, threads: int, opts: DistOptions) -> DistributedGolden:
    """The configuration's golden job, cached beside the single-process golden runs."""
    from faultlab.runner.golden import golden_dir
    # the sharding changes how gradients are summed: a golden job per mode
    mode = "fsdp" if opts.fsdp else "zero" if opts.zero else "ddp"
    path = golden_dir(config, threads) / f"distributed-{mode}.json"
    if path.exists():
        d = json.loads(path.read_text())
        if d.get("format") == FORMAT:
            return DistributedGolden(config, d["loss"], d["acc"], tuple(d["test"]),
                                     d["digests"], d["wall_s"])
    run, shm = _scratch("golden")
    try:
        job = RankJob(config, str(run), str(shm), snapshot_every=opts.snapshot_every,
                      persist_every=opts.persist_every, copies=opts.copies, zero=opts.zero,
                      fsdp=opts.fsdp,
                      timeout_s=opts.timeout_s, threads=threads, port=opts.port, max_restarts=0)
        rec = run_job(job)
        if not rec.ok or rec.final is None:
            from faultlab.errors import FaultlabError
            raise FaultlabError(f"the golden run of {config.workload} on {config.processes} "
                                f"processes failed: {rec.error}")
        loss, acc = rec.series(config.total_steps)
        g = DistributedGolden(config, loss, acc, tuple(rec.final["test"]),
                              [r["digest"] for r in rec.final["ranks"]], rec.wall_s)
    finally:
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(g.to_json()))
    os.replace(tmp, path)
    return g


#: sites whose tensors FSDP2 shards across ranks
_SHARDED_SITES = ("param", "opt_state", "grad_wt")


def check_options(trials, opts: DistOptions | None) -> None:
    """Faults the run's options cannot take, as one line at the row: with --fsdp a rank holds
    a shard of every parameter, gradient and optimizer state (faults on them need DDP or
    --zero); --zero and --fsdp together."""
    from faultlab.errors import SpecError
    if opts is None:
        return
    if opts.zero and opts.fsdp:
        raise SpecError("--zero and --fsdp both shard the optimizer state: choose one")
    if not opts.fsdp:
        return
    for t in trials:
        if t.workload.processes < 2:
            continue
        for i, f in enumerate(t.faults):
            if f.site.value in _SHARDED_SITES:
                raise SpecError(f"{t.where(i, 'site')}: site {f.site.value} is not supported "
                                f"with --fsdp (each rank holds a shard of {f.layer}'s "
                                f"parameters, gradients and optimizer state); use DDP or "
                                f"--zero", "site")


def _detections(rec: JobRecord) -> list[dict]:
    """Each detection of a protected job with the rollback that answered it: the keys the
    single-process Protector reports (results/coverage.py reads them): recovery seconds, the
    steps replayed, and where the state came from."""
    out = []
    for i, e in enumerate(rec.events):
        if e["event"] != "detection":
            continue
        r = next((x for x in rec.events[i + 1:] if x["event"] == "recovery"
                  and x["reason"] == f"detection at step {e['step']}"), None)
        back = None if r is None else (0 if r["step"] is None else r["step"] + 1)
        out.append({"step": e["step"], "detector": e["detector"], "reason": e["reason"],
                    "recovery_s": r["seconds"] if r else None,
                    "steps_replayed": e["step"] - back + 1 if back is not None else 0,
                    "source": r["source"] if r else None,
                    "rolled_back_to": r["step"] if r else None})
    return out


def needs_ranks(trial: Trial) -> bool:
    return trial.workload.processes > 1 or bool(trial.process_faults)


def _summary(rec: JobRecord, trial: Trial) -> dict:
    """Faults fired, recoveries (source, step, seconds), steps lost, restarts."""
    fired = [e for e in rec.events if e["event"] == "fault"]
    recoveries = [e for e in rec.events if e["event"] == "recovery"]
    lost = 0
    for f, r in zip(fired, [e for e in recoveries if e["reason"] == "restart"]):
        f_step = f["fault"]["step"]
        done = f_step + (0 if f["fault"].get("phase", "step") == "step" else 1)
        resumed = 0 if r["step"] is None else r["step"] + 1
        lost += max(0, done - resumed)
    torn = int(not rec.ok and any(w in (rec.error or "") for w in
                                  ("SnapshotError", "CheckpointError", "FormatError")))
    sums = {r.get("checksum") for r in (rec.final or {}).get("ranks", ())}
    mixed = int(not trial.faults and len(sums) > 1)
    lost_committed = sum(1 for e in recoveries if e.get("disk_newest") is not None
                         and (e["step"] is None or e["step"] < e["disk_newest"]))
    # downtime: from a fault firing to the restarted ranks holding their recovered state
    down = []
    for i, e in enumerate(rec.events):
        if e["event"] == "recovery" and e["reason"] == "restart":
            before = [x for x in rec.events[:i] if x["event"] == "fault"]
            if before:
                down.append(e["time"] - before[-1]["time"])
    return {"fired": [e["fault"] for e in fired], "torn": torn, "mixed": mixed,
            "lost_committed": lost_committed, "downtime_s": down,
            "recoveries": [{k: e[k] for k in ("reason", "source", "step", "seconds")}
                           for e in recoveries],
            "steps_lost": lost, "restarts": rec.attempts,
            "detections": [e for e in rec.events if e["event"] == "detection"],
            "error": rec.error, "wall_s": rec.wall_s}


def run_trial(session, trial: Trial, campaign: str = "") -> TrialResult:
    """A multi-process trial (see the module docstring)."""
    t0 = time.perf_counter()
    cfg = trial.workload
    opts = getattr(session, "dist", None) or DistOptions()
    gold = golden(cfg, session.threads, opts)
    end = cfg.total_steps
    start = trial.inject_step or 0

    def one(detect) -> tuple[JobRecord, list, list, tuple | None]:
        run, shm = _scratch("trial")
        try:
            job = RankJob(cfg, str(run), str(shm), tuple(trial.faults),
                          tuple(trial.process_faults), snapshot_every=opts.snapshot_every,
                          persist_every=(detect.checkpoint_every if detect is not None
                                         else opts.persist_every),
                          copies=opts.copies, detect=detect, zero=opts.zero, fsdp=opts.fsdp,
                          timeout_s=opts.timeout_s, threads=session.threads, port=opts.port)
            rec = run_job(job)
        finally:
            shutil.rmtree(run, ignore_errors=True)
            shutil.rmtree(shm, ignore_errors=True)
        losses, accs = rec.series(end)
        test = tuple(rec.final["test"]) if rec.final else None
        return rec, losses, accs, test

    rec, losses, accs, test = one(None)
    digests_equal = bool(rec.final) and [r["digest"] for r in rec.final["ranks"]] == gold.digests
    result = session.result(trial, campaign, gold, start, 0, end, losses, accs, test,
                            outcome=None if rec.ok else "Crash", bit_exact=digests_equal,
                            processes=cfg.processes, digests_equal=digests_equal,
                            distributed=_summary(rec, trial))
    if session.detect is not None:
        detect = session.detect
        if cfg.processes > 1 and "divergence" not in detect.detectors:
            import dataclasses
            detect = dataclasses.replace(detect, detectors=detect.detectors + ("divergence",))
        prec, plosses, paccs, ptest = one(detect)
        pcls, *_ = session._classify(gold, start, 0, end, plosses, paccs, ptest)
        dets = _detections(prec)
        first = dets[0] if dets else None
        result.detected = first is not None
        result.detect_step = first["step"] if first else None
        result.detector = first["detector"] if first else None
        pdig = bool(prec.final) and [r["digest"] for r in prec.final["ranks"]] == gold.digests
        result.recovered = (pcls.bit_exact and pdig) if first else None
        result.outcome_after = pcls.outcome if prec.ok else "Crash"
        result.metrics["protected"] = {"loss": plosses, "acc": paccs,
                                       "test": list(ptest) if ptest else None,
                                       "bit_exact": pcls.bit_exact and pdig,
                                       "detections": dets,
                                       "distributed": _summary(prec, trial)}
    result.wall_s = time.perf_counter() - t0
    return result
