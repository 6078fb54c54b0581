"""Kill campaigns: SIGKILL training processes forked from a zygote at chosen points, recover
after each kill, classify the recovery, and compare each run's end with the reference."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from faultlab.checkpointing.api import checkpointer_class, recover_checkpoint
from faultlab.crash.loops import LoopSpec
from faultlab.crash.points import KillPoint, random_kill_points
from faultlab.crash.verdicts import (OK_VERDICTS, CrashVerdict, Reference, classify,
                                     differing as differing_names, first_divergence,
                                     incomplete_detail, load_state_npz, read_saved,
                                     same_state)
from faultlab.crash.zygote import CrashCampaignError, Zygote
from faultlab.errors import CheckpointError, FaultlabError


@dataclass
class KillRecord:
    """One kill: where, what was reported and trained, what recovery returned."""

    point: str
    phase: str
    where: str
    trained: int
    committed: int | None
    recovered: int | None
    verdict: str
    detail: str = ""

    @property
    def steps_lost(self) -> int:
        return self.trained - (self.recovered or 0)


@dataclass
class EngineReport:
    """Per-engine results of a kill campaign (or of a power-loss campaign: mode)."""

    engine: str
    mode: str = "kill"
    kills: int = 0
    recoveries: int = 0
    verdicts: Counter = field(default_factory=Counter)
    steps_lost: list[int] = field(default_factory=list)
    runs: int = 0
    runs_identical: int = 0
    phases: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    images: int = 0
    crash_points: int = 0
    resumes: int = 0
    resumes_identical: int = 0
    wall_s: float = 0.0
    note: str = ""

    @property
    def torn(self) -> int:
        return self.verdicts[CrashVerdict.TORN.value]

    @property
    def mixed(self) -> int:
        return self.verdicts[CrashVerdict.MIXED.value]

    @property
    def lost(self) -> int:
        return self.verdicts[CrashVerdict.LOST.value]

    @property
    def incomplete(self) -> int:
        """Recoveries of whole checkpoints of a loop whose saved state is incomplete."""
        return self.verdicts[CrashVerdict.INCOMPLETE.value]

    @property
    def ok(self) -> bool:
        """No torn, mixed or lost-committed checkpoint, no incomplete loop state, and every
        run / resume bit-identical."""
        return not (self.torn or self.mixed or self.lost or self.incomplete) \
            and self.runs_identical == self.runs and self.resumes_identical == self.resumes

    def to_json(self) -> dict:
        lost = self.steps_lost
        return {"engine": self.engine, "mode": self.mode, "kills": self.kills,
                "recoveries": self.recoveries, "exact": self.verdicts[CrashVerdict.EXACT.value],
                "nothing_committed": self.verdicts[CrashVerdict.NONE.value],
                "torn": self.torn, "mixed": self.mixed, "lost_committed": self.lost,
                "incomplete_state": self.incomplete,
                "steps_lost_total": sum(lost),
                "steps_lost_mean": round(sum(lost) / len(lost), 3) if lost else 0.0,
                "steps_lost_max": max(lost, default=0),
                "runs": self.runs, "runs_bit_identical": self.runs_identical,
                "kills_by_phase": dict(self.phases), "crash_points": self.crash_points,
                "images": self.images, "resumes": self.resumes,
                "resumes_bit_identical": self.resumes_identical, "ok": self.ok,
                "problems": self.problems[:20], "wall_s": round(self.wall_s, 2),
                "note": self.note}


@dataclass
class RunResult:
    """One training run killed a number of times and finished."""

    kills: list[KillRecord]
    identical: bool
    differing: list[str]
    restarts: int
    restore_failures: list[str] = field(default_factory=list)
    #: when the run went elsewhere than the uninterrupted one while every checkpoint it
    #: recovered was whole (exactly what the loop saved): the one-line explanation, naming
    #: the arrays that differ after the resume ("" otherwise)
    incomplete_state: str = ""
    #: the run's checkpoint directory
    directory: Path | None = None

    @property
    def saved_log(self) -> Path | None:
        """The fingerprints of every state the run's processes saved (verdicts.read_saved)."""
        return None if self.directory is None else _saved_log(self.directory)

    @property
    def ok(self) -> bool:
        return self.identical and all(k.verdict in OK_VERDICTS for k in self.kills)

    @property
    def verdict(self) -> CrashVerdict:
        """The run's verdict: the worst of its kills' (torn, mixed, lost-committed before
        incomplete-state), incomplete-state for a whole-checkpoint run that did not end
        bit-identical, else exact."""
        got = {k.verdict for k in self.kills}
        for v in (CrashVerdict.TORN, CrashVerdict.MIXED, CrashVerdict.LOST):
            if v.value in got:
                return v
        if CrashVerdict.INCOMPLETE.value in got or self.incomplete_state:
            return CrashVerdict.INCOMPLETE
        return CrashVerdict.EXACT

    def explain(self) -> str:
        bad = [f"{k.point} ({k.where}): {k.verdict} {k.detail}" for k in self.kills
               if k.verdict not in OK_VERDICTS and not (
                   self.incomplete_state and k.verdict == CrashVerdict.INCOMPLETE.value)]
        if self.incomplete_state:
            bad.append(f"{CrashVerdict.INCOMPLETE.value}: {self.incomplete_state}")
        if not self.identical:
            bad.append(f"final state differs from the uninterrupted run in {self.differing[:8]}")
        bad.extend(self.restore_failures)
        return "; ".join(bad) or "ok"

    def assert_ok(self) -> None:
        """AssertionError naming every torn / mixed / lost checkpoint, the arrays of a loop
        whose state is incomplete, and any difference."""
        if not self.ok:
            raise AssertionError(f"crash-recovery failure after {len(self.kills)} kill(s): "
                                 f"{self.explain()}")


class KillCampaign:
    """Kill campaigns of one training loop against any engine (one zygote, reused).

    engines: the checkpointers it will run (the zygote preloads what they need)."""

    def __init__(self, loop: LoopSpec, workdir: str | os.PathLike, *, threads: int = 1,
                 preload: Sequence[str] = (), engines: Sequence[str] = (),
                 timeout: float = 120.0, zygote: Zygote | None = None):
        self.loop = loop
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._own_zygote = zygote is None
        if zygote is not None and zygote.factory != loop.factory:
            raise FaultlabError(f"zygote runs {zygote.factory}, not {loop.factory}")
        self.zygote = zygote or Zygote(loop.factory, self.workdir / "zygote", threads=threads,
                                       preload=preload, engines=engines, timeout=timeout)
        self._reference: Reference | None = None
        self._runs = 0

    def close(self) -> None:
        if self._own_zygote:
            self.zygote.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _job(self, **kw) -> dict:
        return dict(loop=asdict(self.loop), **kw)

    def reference(self) -> Reference:
        """The uninterrupted run (recorded once, in a forked process like the others)."""
        if self._reference is None:
            out = self.workdir / "reference"
            out.mkdir(parents=True, exist_ok=True)
            token, pid = self.zygote.spawn(self._job(record=True, dir=str(out)))
            msgs = self.zygote.reap(token, pid)
            _raise_child_error(msgs, self.zygote)
            if msgs[-1][1] != "0":
                raise CrashCampaignError(f"the reference run failed (exit {msgs[-1][1]}; log: "
                                         f"{self.zygote.workdir / 'children.log'})")
            self._reference = Reference.from_json(json.loads((out / "reference.json")
                                                             .read_text()),
                                                  out / "reference-final.npz")
        return self._reference

    def run(self, engine: str, kills: Sequence[KillPoint], *, settings: Mapping | None = None,
            jitter: float = 0.0, rng: random.Random | None = None,
            on_kill: Callable[[KillRecord], None] | None = None,
            max_restarts: int | None = None) -> RunResult:
        """One run: a process per kill point, in order (a point the process never reaches
        lets it finish, ending the run early), then one to the end; verify everything.
        settings: the engine's (default: its class's default_settings)."""
        ref = self.reference()
        self._runs += 1
        directory = self.workdir / f"{engine}-run{self._runs}"
        directory.mkdir(parents=True, exist_ok=True)
        final = directory / "final.npz"
        saved_log = _saved_log(directory)
        saved_log.unlink(missing_ok=True)    # a directory reused from an earlier campaign
        settings = dict(checkpointer_class(engine).default_settings if settings is None
                        else settings)
        rng = rng or random.Random(0)
        plan = list(kills)
        records: list[KillRecord] = []
        committed: int | None = None
        restarts = 0
        expected_resume = 0
        restore_failures: list[str] = []
        finished = False
        while not finished:
            kill = plan.pop(0) if plan else None
            if max_restarts is not None and restarts >= max_restarts:
                kill = None
            job = self._job(engine=engine, dir=str(directory), settings=settings,
                            final=str(final), saved=str(saved_log),
                            kill=kill.to_json() if kill else None)
            token, pid = self.zygote.spawn(job)
            restarts += 1
            trained, killed_at, resumed = 0, None, None
            seen = []
            while True:
                msg = self.zygote.next(token)
                seen.append(msg)
                if msg is None:
                    os.kill(pid, signal.SIGKILL)
                    self.zygote.reap(token, pid)
                    raise CrashCampaignError(f"training process {pid} ({engine}) sent nothing "
                                             f"for {self.zygote.timeout:.0f} s")
                kind = msg[0]
                if kind == "resumed":
                    resumed = int(msg[1])
                    trained = resumed
                elif kind == "trained":
                    trained = int(msg[1])
                elif kind == "committed":
                    committed = max(committed or 0, int(msg[1]))
                elif kind in ("hold", "at"):
                    if jitter and kind == "at":
                        self._wait_reading(jitter * rng.random())
                    os.kill(pid, signal.SIGKILL)
                    killed_at = msg[1:]
                    break
                elif kind in ("done", "error"):
                    break
            msgs = self.zygote.reap(token, pid)
            for m in msgs:                      # sent before it died
                if m[0] == "committed":
                    committed = max(committed or 0, int(m[1]))
                elif m[0] == "trained":
                    trained = max(trained, int(m[1]))
                elif m[0] == "resumed":
                    resumed = int(m[1])
            _raise_child_error(seen + msgs, self.zygote)
            failed = [m for m in seen + msgs if m[0] == "restorefailed"]
            if failed:
                restore_failures.append(f"restart {restarts}: restoring the recovered "
                                        f"checkpoint failed: {' '.join(failed[0][1:])}")
            elif resumed is not None and resumed != expected_resume:
                raise CrashCampaignError(f"{engine}: training resumed at step {resumed} but "
                                         f"recovery gave {expected_resume}")
            code = int(msgs[-1][1])
            if code == -signal.SIGKILL and kill is None:
                raise CrashCampaignError(f"training process of {engine} was killed by someone "
                                         "else (out of memory?)")
            if code == -signal.SIGKILL:
                try:
                    recovered = recover_checkpoint(engine, directory)
                except CheckpointError as e:
                    recovered = e
                verdict, detail = classify(recovered, ref, committed, read_saved(saved_log))
                rec_step = None if isinstance(recovered, BaseException) else recovered.step
                expected_resume = rec_step or 0
                # what the next process resumes from is the new durable base: judging later
                # kills against it keeps one loss from being counted again at every kill
                committed = rec_step
                record = KillRecord(str(kill), kill.phase.value,
                                    "/".join(killed_at[:2]) if killed_at else "after exit",
                                    trained, committed, rec_step, verdict.value, detail)
                records.append(record)
                if on_kill:
                    on_kill(record)
            elif code == 0:
                finished = True
            else:
                raise CrashCampaignError(f"training process of {engine} exited with code "
                                         f"{code} (log: {self.zygote.workdir / 'children.log'})")
        differing = same_state(load_state_npz(final), load_state_npz(ref.final_path))
        incomplete = ""
        whole = all(r.verdict in (*OK_VERDICTS, CrashVerdict.INCOMPLETE.value) for r in records)
        if whole and not restore_failures and (differing or any(
                r.verdict == CrashVerdict.INCOMPLETE.value for r in records)):
            first = first_divergence(read_saved(saved_log), ref)
            if first is not None:
                incomplete = incomplete_detail(first.step, first.resumed,
                                               differing_names(first.fp, ref.steps[first.step]),
                                               run=True)
            else:                    # it went elsewhere after its last checkpoint
                resumed = max((r.recovered or 0 for r in records), default=0)
                incomplete = incomplete_detail(self.loop.steps, resumed, differing, run=True)
        return RunResult(records, not differing, differing, restarts, restore_failures,
                         incomplete, directory)

    def _wait_reading(self, seconds: float) -> None:
        """Let `seconds` pass while still collecting the process's messages (race kills)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.zygote.read(left)

    def campaign(self, engine: str, kills: int, *, seed: int = 0, settings: Mapping | None = None,
                 kills_per_run: int = 20, jitter: float = 0.0,
                 on_kill: Callable[[KillRecord], None] | None = None) -> EngineReport:
        """`kills` SIGKILLs at random points (seeded), over as many runs as it takes; each run
        ends with a process that finishes and is compared bit for bit."""
        rng = random.Random(f"{seed}-{engine}")
        rep = EngineReport(engine)
        t0 = time.perf_counter()
        while rep.kills < kills:
            n = min(kills_per_run, kills - rep.kills)
            result = self.run(engine, random_kill_points(rng, n), settings=settings,
                              jitter=jitter, rng=rng, on_kill=on_kill, max_restarts=n)
            _tally(rep, result)
        rep.wall_s = time.perf_counter() - t0
        return rep


def _saved_log(directory: Path) -> Path:
    """Beside the checkpoint directory, not in it (a checkpointer owns its directory)."""
    return directory.with_name(directory.name + ".saved.jsonl")


def _tally(rep: EngineReport, result: RunResult) -> None:
    rep.runs += 1
    rep.runs_identical += result.identical
    if not result.identical:
        rep.problems.append(f"run {rep.runs}: final state differs in {result.differing[:5]}")
    if result.incomplete_state:
        rep.problems.append(f"run {rep.runs}: {CrashVerdict.INCOMPLETE.value}: "
                            f"{result.incomplete_state}")
    rep.problems.extend(result.restore_failures)
    for k in result.kills:
        rep.kills += 1
        rep.phases[k.phase] += 1
        rep.verdicts[k.verdict] += 1
        if k.verdict in OK_VERDICTS:
            rep.recoveries += 1
        else:
            rep.problems.append(f"{k.point} at {k.where}: {k.verdict}: {k.detail}")
        rep.steps_lost.append(k.steps_lost)


def _raise_child_error(msgs: Iterable[list[str]], zygote: Zygote) -> None:
    for m in msgs:
        if m and m[0] == "error":
            raise CrashCampaignError(f"training process failed: {' '.join(m[1:])} "
                                     f"(log: {zygote.workdir / 'children.log'})")
