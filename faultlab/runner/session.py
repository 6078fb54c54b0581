"""Golden runs and trials (framework-free: a backend supplies the trainer).

A trial restores the latest golden checkpoint at or before its injection step, trains to the
step (bit-identical to the golden run), injects, runs its horizon, evaluates at the next
evaluation point, and is classified against the golden run.
"""

from __future__ import annotations

import math
import socket
import time
from dataclasses import dataclass, field
from typing import Callable

from faultlab.runner import golden as goldenmod
from faultlab.backends import load_backend
from faultlab.backends.base import Backend, TrainerBase, check_fault
from faultlab.determinism import DeterminismError, fingerprint
from faultlab.errors import SpecError
from faultlab.outcomes import OutcomeRules, classify
from faultlab.process_faults import check_process_fault
from faultlab.results.store import TrialResult
from faultlab.trials import Trial
from faultlab.workloads.base import WorkloadConfig
from faultlab.workloads.estimate import check_fits


def trial_window(trial: Trial) -> tuple[int, int]:
    """(first injected step, exclusive end step) of a trial; the end is rounded up to the next
    evaluation point so the trial's test accuracy is comparable with the golden run's."""
    c = trial.workload
    start = trial.inject_step if trial.inject_step is not None else 0
    if trial.horizon is None:
        return start, c.total_steps
    end = start + trial.horizon + 1
    spe = c.steps_per_epoch
    return start, min(c.total_steps, -(-end // spe) * spe)


def check_window(trial: Trial, recorded_end: int | None) -> None:
    """A trial must end where its golden run has metrics: a golden run recorded to step
    `recorded_end` only (`faultlab import-isca --steps`) cannot classify a trial that runs
    past it. A one-line SpecError placed at the trial's row, before anything runs."""
    if recorded_end is None:
        return
    start, end = trial_window(trial)
    if end > recorded_end:
        where = trial.source or trial.trial_id
        tail = ("to the end of training" if trial.horizon is None
                else f"{trial.horizon} step(s) past its injection at step {start}, rounded up "
                     f"to the epoch end")
        raise SpecError(f"{where}: the trial runs to step {end} ({tail}) but the golden run of "
                        f"{trial.workload.workload} holds steps up to {recorded_end} only: "
                        f"record more of it (faultlab import-isca --steps) or shorten the "
                        f"trials (faultlab run --horizon N)")


def check_windows(trials, recorded_ends: dict) -> None:
    """check_window for every trial, with each configuration's recorded end (by key)."""
    for t in trials:
        check_window(t, recorded_ends.get(t.workload.key()))


@dataclass(frozen=True)
class DetectOptions:
    """Detection and recovery settings of a protected trial (`faultlab run --detect`)."""

    detectors: tuple[str, ...] = ("nonfinite", "history", "spike")
    thresholds: tuple[tuple[str, float], ...] = ()
    checkpoint_every: int = 10
    policy: str = "stop"

    def suite(self):
        from faultlab.detectors import default_suite
        return default_suite(self.detectors, **dict(self.thresholds))


@dataclass
class Session:
    """Trainers and golden runs of one process, reused across the trials it runs."""

    threads: int = 1
    rules: OutcomeRules = field(default_factory=OutcomeRules)
    detect: DetectOptions | None = None
    dist: object | None = None      # runner.ranks.DistOptions for multi-process trials
    #: early decision: a trial whose whole state is the golden run's, bit for bit, at a step
    #: after its last fault ends there as Masked (the rest of its window is the golden run's);
    #: False runs every trial to its horizon (faultlab run --no-early-stop)
    early_stop: bool = True
    _trainers: dict = field(default_factory=dict)
    _goldens: dict = field(default_factory=dict)
    _controlled: dict = field(default_factory=dict)

    def backend(self, config: WorkloadConfig) -> Backend:
        return load_backend(config.framework)

    def trainer(self, config: WorkloadConfig):
        key = config.key()
        if key not in self._trainers:
            self._trainers.clear()  # one live model per process keeps memory flat
            check_fits(config)      # sizes this machine cannot hold: one line, nothing built
            self._trainers[key] = self.backend(config).build_trainer(config)
        return self._trainers[key]

    def golden(self, config: WorkloadConfig, progress: Callable | None = None) -> goldenmod.GoldenRun:
        key = config.key()
        if key in self._goldens:
            return self._goldens[key]
        if config.processes > 1:            # a job of R ranks (runner/ranks.py)
            from faultlab.runner import ranks
            run = ranks.golden(config, self.threads, self.dist or ranks.DistOptions())
            self._goldens[key] = run
            return run
        fp = fingerprint(config.framework, self.threads)
        directory = goldenmod.golden_dir(config, self.threads, fp)
        run = goldenmod.load(config, directory, fp)
        if run is None:
            run = goldenmod.load_legacy(config, self.threads)   # checked by control()
        if run is None:
            check_fits(config)
            trainer = self.backend(config).build_trainer(config)  # fresh: initial weights
            run = goldenmod.record(trainer, config, directory, progress, fp)
        self._goldens[key] = run
        return run

    def install_golden(self, config: WorkloadConfig, files: dict[str, bytes]) -> goldenmod.GoldenRun:
        """Use a golden run recorded elsewhere (golden.pack's files), refused in one line when
        its fingerprint is not this process's."""
        key = config.key()
        if key not in self._goldens:
            self._goldens[key] = goldenmod.install(config, self.threads, files)
        return self._goldens[key]

    def control(self, config: WorkloadConfig) -> dict:
        """The control trial: train the golden run's first checkpoint interval again, without
        faults, and check it bit for bit (every step's loss and accuracy, and the whole state
        at the next checkpoint) against the golden run. A golden run recorded by another
        process (this machine's cache, another node, a bundle) is trusted only after it: a
        mismatch is a one-line DeterminismError naming the first step that differs, never a
        trial silently classified against the wrong reference. Once per configuration and
        process; returns what was checked."""
        key = config.key()
        if key in self._controlled:
            return self._controlled[key]
        gold = self.golden(config)
        if config.processes > 1 or not gold.checkpoints:
            return {"steps": 0, "state": False}          # rank jobs check their own golden
        c0 = gold.checkpoints[0]
        c1 = gold.checkpoints[1] if len(gold.checkpoints) > 1 else None
        self.trainer(config).set_state(gold.state(c0))
        try:
            self._replay_golden(config, gold, c0, c1)
        except DeterminismError:
            if gold.fingerprint is not None:
                raise
            # cached by an older faultlab, without a fingerprint, and not reproduced here:
            # record this machine's golden run (under its fingerprint) instead
            self._goldens.pop(key, None)
            fp = fingerprint(config.framework, self.threads)
            trainer = self.backend(config).build_trainer(config)
            self._goldens[key] = goldenmod.record(
                trainer, config, goldenmod.golden_dir(config, self.threads, fp), None, fp)
            self._trainers.clear()
        end = c1 if c1 is not None else gold.end
        self._controlled[key] = {"steps": end - c0, "state": c1 is not None}
        return self._controlled[key]

    def _replay_golden(self, config, gold, c0: int, c1: int | None) -> None:
        trainer = self.trainer(config)
        end = c1 if c1 is not None else gold.end    # an imported run may stop short
        where = f"on {socket.gethostname()}"
        for step in range(c0, end):
            m = trainer.train_step(step)
            if (m.loss, m.acc) != (gold.loss[step], gold.acc[step]):
                raise DeterminismError(
                    f"control trial {where}: step {step} of {config.workload} gives loss "
                    f"{m.loss!r} where the golden run has {gold.loss[step]!r}: this machine's "
                    f"arithmetic differs from the one that recorded it "
                    f"({gold.fingerprint.short() if gold.fingerprint else 'unknown'}); "
                    f"run with --portable, or record the golden run here")
        if c1 is not None:
            want, got = gold.state(c1), trainer.get_state()
            bad = sorted(k for k in want if k not in got or not _same_bits(want[k], got[k]))
            if bad or set(got) != set(want):
                raise DeterminismError(
                    f"control trial {where}: the state after step {c1} of {config.workload} "
                    f"differs from the golden run's ({len(bad)} array(s), first "
                    f"{(bad or sorted(set(got) ^ set(want)))[0]!r}): this machine's arithmetic "
                    f"differs from the one that recorded it; run with --portable, or record "
                    f"the golden run here")

    def validate(self, trial: Trial) -> None:
        check_fits(trial.workload)
        table = self.backend(trial.workload).operand_shapes(trial.workload)
        for f in trial.faults:
            check_fault(table, f, trial.workload)

    def _classify(self, gold, start: int, ckpt: int, end: int, losses, accs, test):
        """Outcome of a timeline (losses / accs from step `ckpt`) against the golden run."""
        first_nf = next((ckpt + i for i, x in enumerate(losses) if not math.isfinite(x)), None)
        if first_nf is None and test is not None and not math.isfinite(test[0]):
            first_nf = end - 1  # the state went non-finite without the loss showing it
        steps = range(ckpt, ckpt + len(losses))
        g_loss = [gold.loss[s] for s in steps]
        g_acc = [gold.acc[s] for s in steps]
        g_test = gold.eval_after(end)
        bit_exact = (first_nf is None and list(losses) == g_loss and list(accs) == g_acc
                     and g_test is not None and test is not None and tuple(test) == tuple(g_test))
        cls = classify(accs, g_acc, start - ckpt,
                       None if first_nf is None else first_nf - start,
                       test[1] if test else None, g_test[1] if g_test else None,
                       bit_exact, self.rules)
        return cls, first_nf, g_loss, g_acc, g_test

    def result(self, trial: Trial, campaign: str, gold, start: int, ckpt: int, end: int,
               losses, accs, test, outcome: str | None = None, bit_exact: bool = True,
               **metrics) -> TrialResult:
        """A trial's result from its timeline (losses / accs from step `ckpt`), classified
        against the golden run; `outcome` overrides the class (a crashed job), `bit_exact`
        False vetoes exactness, `metrics` adds entries."""
        cfg = trial.workload
        cls, first_nf, g_loss, g_acc, g_test = self._classify(gold, start, ckpt, end, losses,
                                                              accs, test)
        return TrialResult(
            campaign=campaign, trial_id=trial.trial_id, source=trial.source,
            framework=cfg.framework.value, workload=cfg.workload, workload_key=cfg.key(),
            faults=trial.describe_faults(), outcome=outcome or cls.outcome,
            bit_exact=cls.bit_exact and bit_exact,
            inject_step=trial.inject_step, first_nonfinite_step=first_nf,
            final_train_acc=accs[-1] if accs else None,
            final_test_acc=test[1] if test else None,
            golden_test_acc=g_test[1] if g_test else None,
            final_loss=losses[-1] if losses else None, max_acc_drop=cls.max_acc_drop,
            steps_run=len(losses), wall_s=0.0,
            metrics={"start": ckpt, "loss": losses, "acc": accs, "golden_loss": g_loss,
                     "golden_acc": g_acc, "test": list(test) if test else None,
                     "golden_test": list(g_test) if g_test else None, **metrics})

    def run_trial(self, trial: Trial, campaign: str = "") -> TrialResult:
        from faultlab.runner import ranks
        if ranks.needs_ranks(trial):        # ranks, or process faults: a real job
            return ranks.run_trial(self, trial, campaign)
        t0 = time.perf_counter()
        cfg = trial.workload
        gold = self.golden(cfg)
        check_window(trial, gold.end)
        trainer = self.trainer(cfg)
        start, end = trial_window(trial)
        ckpt = gold.checkpoint_before(start)
        trainer.set_state(gold.state(ckpt))
        losses, accs = [], []
        checks = self._convergence_checks(trial, gold, ckpt, end)
        decided = None
        for step in range(ckpt, end):
            firing = [f for f in trial.faults if f.active(step)]
            m = trainer.train_step(step, firing)
            losses.append(m.loss)
            accs.append(m.acc)
            if not math.isfinite(m.loss):
                break                       # the outcome rules decide at the first non-finite
            if step in checks and trainer.full_checksum() == gold.checksum_after(step):
                decided = step
                break
        trained = len(losses)
        test = None
        early = {}
        if decided is not None:
            # the state after `decided` is the golden run's bit for bit and no fault fires
            # later: the rest of the window is the golden run's (its metrics, its evaluation)
            losses += gold.loss[decided + 1:end]
            accs += gold.acc[decided + 1:end]
            test = gold.eval_after(end)
            early = {"early_stop": {"after_step": decided, "reason": "state bit-identical to "
                                    "the golden run's", "steps_skipped": end - decided - 1}}
        elif all(math.isfinite(x) for x in losses[-1:]):
            e = trainer.evaluate()
            test = (e.loss, e.acc)
        result = self.result(trial, campaign, gold, start, ckpt, end, losses, accs, test, **early)
        result.steps_run = trained
        if self.detect is not None:
            self._protected(trial, gold, trainer, start, ckpt, end, result)
        result.wall_s = time.perf_counter() - t0
        return result

    #: after a trial's last fault its state is compared with the golden run's after each of the
    #: first CHECK_EVERY_STEP steps, then after steps at doubling distances: a state that differs
    #: from the golden run's a few steps after the last fault practically never returns to it
    #: (a missed check costs time, never a wrong outcome)
    CHECK_EVERY_STEP = 8

    def _convergence_checks(self, trial: Trial, gold, ckpt: int, end: int) -> frozenset:
        """The steps after which run_trial compares the whole state's checksum with the golden
        run's: none without early decision, without recorded checksums, or for a fault that
        fires to the window's end."""
        if not self.early_stop or gold.checksums is None or trial.is_control:
            # a control trial is the check that a fault-free trial reproduces the golden run:
            # it runs its whole window
            return frozenset()
        last = max((s for s in range(ckpt, end) if any(f.active(s) for f in trial.faults)),
                   default=ckpt - 1)
        last = max(last, ckpt - 1)
        steps = {last + i for i in range(self.CHECK_EVERY_STEP)}
        d = self.CHECK_EVERY_STEP
        while last + d < end:
            steps.add(last + d)
            d *= 2
        # the last step of the window is not worth a check: nothing would be skipped
        return frozenset(s for s in steps if ckpt <= s < end - 1
                         and gold.checksum_after(s) is not None)

    def _protected(self, trial, gold, trainer: TrainerBase, start, ckpt, end, result) -> None:
        """Run the trial again under detection and recovery; fill the detection fields."""
        from faultlab.detectors.signals import Signals
        from faultlab.replay import Protector
        opts = self.detect
        suite = opts.suite()
        suite.warm_up(Signals.from_dict(d) for d in gold.signals[:ckpt])
        trainer.set_state(gold.state(ckpt))
        with Protector(trainer, suite, opts.checkpoint_every, opts.policy) as prot:
            run = prot.run(ckpt, end, trial.faults)
            test = None
            if run.stopped_at is None and all(math.isfinite(x) for x in run.losses[-1:]):
                e = trainer.evaluate()
                test = (e.loss, e.acc)
        cls, *_ = self._classify(gold, start, ckpt, end, run.losses, run.accs, test)
        first = run.detections[0] if run.detections else None
        result.detected = first is not None
        result.detect_step = first.step if first else None
        result.detector = first.detector if first else None
        result.recovered = run.recovered if first else None
        result.outcome_after = cls.outcome
        result.metrics["protected"] = {"loss": run.losses, "acc": run.accs,
                                       "test": list(test) if test else None,
                                       "stopped_at": run.stopped_at,
                                       "bit_exact": cls.bit_exact,
                                       "detections": [d.to_dict() for d in run.detections]}


def _same_bits(a, b) -> bool:
    import numpy as np
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def validate_trials(trials, session: Session | None = None) -> None:
    """Check every trial's workload size against this machine (workloads/estimate.py), then
    every fault of every trial against its workload's operand shapes, and every process fault
    against its workload's ranks, nodes and length (check_process_fault). Errors are one line
    placed at the trial's row."""
    session = session or Session()
    tables: dict[str, object] = {}
    for t in trials:
        key = t.workload.key()
        if key not in tables:
            where = t.source or t.trial_id
            try:
                check_fits(t.workload)
            except SpecError as e:
                col = f" column '{e.field}':" if e.field else ""
                raise SpecError(f"{where}:{col} {e}", e.field) from None
            try:
                tables[key] = session.backend(t.workload).operand_shapes(t.workload)
            except SpecError as e:     # e.g. a user workload that is not a workload factory
                raise SpecError(f"{where}: {e}", e.field) from None
        for i, f in enumerate(t.faults):
            try:
                check_fault(tables[key], f, t.workload)
            except SpecError as e:
                raise SpecError(f"{t.where(i, e.field)}: {e}", e.field) from None
        for j, p in enumerate(t.process_faults):
            try:
                check_process_fault(p, t.workload)
            except SpecError as e:
                raise SpecError(f"{t.process_where(j, e.field)}: {e}", e.field) from None
