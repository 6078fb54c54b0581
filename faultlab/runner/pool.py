"""Runs golden runs and trials in worker processes.

Each worker is a spawned process holding one live trainer; a worker that dies turns its trial
into a Crash and one that overruns the deadline is killed and its trial becomes a Hang. Either
way a fresh worker replaces it and the campaign goes on. Results reach the caller as each trial
ends (the CLI writes them to the results store at once).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Callable, Iterable

from faultlab.determinism import configure
from faultlab.errors import FaultlabError
from faultlab.outcomes import CRASH, HANG, OutcomeRules
from faultlab.results.store import TrialResult
from faultlab.trials import Trial


def _worker_main(conn, threads: int, rules: OutcomeRules, detect=None, dist=None,
                 early_stop: bool = True) -> None:
    # the thread count changes reduction order, so it is part of a run: each framework's
    # runtime is configured by its backend before the worker's first task for it
    os.environ["OMP_NUM_THREADS"] = str(threads)
    from faultlab.runner.session import Session
    session = Session(threads=threads, rules=rules, detect=detect, dist=dist,
                      early_stop=early_stop)
    configured: set = set()
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        kind, payload, campaign = task
        try:
            fw = (payload if kind == "golden" else payload.workload).framework
            if fw not in configured:
                configure(fw, threads)
                configured.add(fw)
            if kind == "golden":
                run = session.golden(payload)
                if not run.recorded_here:       # made earlier: check this machine agrees
                    session.control(payload)
                conn.send(("ok", getattr(run, "end", None)))
            else:
                conn.send(("ok", session.run_trial(payload, campaign)))
        except FaultlabError as e:
            conn.send(("user", str(e)))
        except Exception as e:  # noqa: BLE001 - a trial that raises is a Crash, reported
            conn.send(("error", f"{type(e).__name__}: {e}", traceback.format_exc()))


@dataclass
class _Worker:
    proc: mp.Process
    conn: object
    task: tuple | None = None
    deadline: float = 0.0


def failed_result(trial: Trial, campaign: str, outcome: str, error: str, wall: float) -> TrialResult:
    cfg = trial.workload
    return TrialResult(campaign=campaign, trial_id=trial.trial_id, source=trial.source,
                       framework=cfg.framework.value, workload=cfg.workload,
                       workload_key=cfg.key(), faults=trial.describe_faults(), outcome=outcome,
                       bit_exact=False, inject_step=trial.inject_step, wall_s=wall, error=error)


class LocalPool:
    """A pool of trial workers on this machine."""

    def __init__(self, workers: int = 1, threads: int = 1, rules: OutcomeRules | None = None,
                 timeout: float = 3600.0, detect=None, dist=None, early_stop: bool = True):
        self.n, self.threads, self.timeout = max(1, workers), threads, timeout
        self.early_stop = early_stop    # Session.early_stop of every trial
        self.detect = detect   # runner.DetectOptions: protected trials (faultlab run --detect)
        self.dist = dist       # runner.ranks.DistOptions: multi-process trials
        self.rules = rules or OutcomeRules()
        self._ctx = mp.get_context("spawn")
        self._workers: list[_Worker] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        p = self._ctx.Process(target=_worker_main,
                              args=(child, self.threads, self.rules, self.detect, self.dist,
                                    self.early_stop),
                              daemon=True)
        p.start()
        child.close()
        return _Worker(p, parent)

    def close(self) -> None:
        for w in self._workers:
            try:
                w.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        for w in self._workers:
            w.proc.join(timeout=5)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join()
        self._workers.clear()

    def _run(self, tasks: list[tuple], on_done: Callable, on_fail: Callable) -> None:
        pending = list(tasks)
        while len(self._workers) < min(self.n, len(pending)):
            self._workers.append(self._spawn())
        while pending or any(w.task for w in self._workers):
            for w in self._workers:
                if w.task is None and pending:
                    w.task = pending.pop(0)
                    w.deadline = time.monotonic() + self.timeout
                    w.conn.send(w.task)
            busy = [w for w in self._workers if w.task]
            timeout = max(0.0, min(w.deadline for w in busy) - time.monotonic())
            ready = wait([w.conn for w in busy] + [w.proc.sentinel for w in busy], timeout)
            for i, w in enumerate(list(self._workers)):
                if not w.task:
                    continue
                if w.conn in ready:
                    try:
                        msg = w.conn.recv()
                    except (EOFError, OSError):
                        msg = None
                    if msg is not None:
                        task, w.task = w.task, None
                        if msg[0] == "ok":
                            on_done(task, msg[1])
                        else:  # an unexpected exception carries its traceback along
                            on_fail(task, msg[0], "\n".join(msg[1:]))
                        continue
                dead = not w.proc.is_alive() or w.proc.sentinel in ready
                late = time.monotonic() > w.deadline
                if dead or late:
                    if not dead:
                        w.proc.kill()
                    w.proc.join()
                    task = w.task
                    code = w.proc.exitcode
                    self._workers[i] = self._spawn()
                    on_fail(task, "hang" if late and not dead else "crash",
                            f"trial timed out after {self.timeout:.0f}s" if late and not dead
                            else f"worker died (exit code {code})")

    def golden(self, configs: Iterable) -> dict[str, int]:
        """Record (or find cached) golden runs, in parallel across configurations; returns
        each single-process configuration's recorded end step (GoldenRun.end), by key."""
        errors, ends = [], {}

        def done(task, end):
            if end is not None:
                ends[task[1].key()] = end
        self._run([("golden", c, "") for c in configs], done,
                  lambda t, kind, msg: errors.append((kind, msg)))
        for kind, msg in errors:
            if kind == "user":
                raise FaultlabError(msg)
            raise RuntimeError(f"golden run failed: {msg}")  # a bug: keep it loud
        return ends

    def trials(self, trials: Iterable[Trial], campaign: str,
               on_result: Callable[[TrialResult], None]) -> None:
        started: dict[str, float] = {}
        user_errors = []

        def done(task, result):
            on_result(result)

        def fail(task, kind, msg):
            trial = task[1]
            wall = time.monotonic() - started.get(trial.trial_id, time.monotonic())
            if kind == "user":
                user_errors.append(msg)
            on_result(failed_result(trial, campaign, HANG if kind == "hang" else CRASH, msg, wall))

        tasks = []
        for t in trials:
            started[t.trial_id] = time.monotonic()
            tasks.append(("trial", t, campaign))
        self._run(tasks, done, fail)
