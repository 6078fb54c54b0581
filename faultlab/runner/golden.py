"""Golden (fault-free) runs: per-step metrics and periodic checkpoints, cached on disk.

A golden run is keyed by its workload configuration and its determinism fingerprint (library
versions, the instruction set the math kernels use or portable mode's cap, the thread count,
the device: faultlab.determinism) and reused by every trial of every campaign on that
configuration whose fingerprint is the same. The fingerprint is stored with the run; one made
elsewhere (a cluster's golden run, a fetched bundle) is installed here only where the
fingerprints match. The cache entry is built in a temporary directory and renamed into place, so a
run interrupted while recording leaves nothing half-written behind.

Checkpoints are written by the checkpoint engine into one file, `golden.ckpt`, whose `keep` is
the number of checkpoints the run takes, so none is ever overwritten: training goes on while
they persist, each is checksummed, and a trial loads exactly the one it needs (the record
blocks, then that checkpoint's slot). A damaged one is a one-line CheckpointError.
"""

from __future__ import annotations

import bisect
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from faultlab import __version__
from faultlab.checkpointing.engine import CheckpointEngine
from faultlab.checkpointing.recovery import load_step
from faultlab.determinism import DeterminismError, Fingerprint, fingerprint
from faultlab.errors import CheckpointError
from faultlab.workloads.base import WorkloadConfig

FORMAT = 6                          # 6: an exact state checksum after every step; 5: the determinism fingerprint in the key and the file; 4: TF golden runs record every signal; 3: checkpoints in one engine file (1, 2: .npz files)
CHECKPOINT_FILE = "golden.ckpt"


def cache_root() -> Path:
    return Path(os.environ.get("FAULTLAB_CACHE", Path.home() / ".cache" / "faultlab"))


def golden_dir(config: WorkloadConfig, threads: int, fp: Fingerprint | None = None) -> Path:
    """Where the golden run of `config` at `threads` threads with fingerprint `fp` (this
    process's, by default) is cached."""
    fp = fp or fingerprint(config.framework, threads)
    return cache_root() / "golden" / (
        f"{config.framework.value}-{config.workload.replace(':', '_')}-{config.key()}"
        f"-t{threads}-{fp.digest()}")


#: slot headroom over the engine's size for the states seen when the file is made (the
#: engine's rule, CheckpointEngine.slot_bytes_for), for states that grow a little later
SLOT_MARGIN = 0.25


@dataclass
class GoldenRun:
    """The fault-free reference of one configuration."""

    config: WorkloadConfig
    loss: list[float] = field(default_factory=list)    # per step
    acc: list[float] = field(default_factory=list)     # per step
    evals: dict[int, tuple[float, float]] = field(default_factory=dict)  # after k steps
    checkpoints: list[int] = field(default_factory=list)  # state after k steps saved
    directory: Path | None = None
    wall_s: float = 0.0
    signals: list[dict] = field(default_factory=list)  # per step: detectors' signals
    fingerprint: Fingerprint | None = None             # of the machine that recorded it
    recorded_here: bool = False     # recorded by this process (it needs no control trial)
    #: per step: bits.state_checksum of the whole state after it (TrainerBase.full_checksum),
    #: as decimal strings (exact in JSON); None before an imported run's origin
    checksums: list[str | None] | None = None

    @property
    def end(self) -> int:
        """Exclusive end of the recorded steps: the configuration's total, or less for a run
        recorded from an imported checkpoint with a step limit (runner/isca_import.py)."""
        return len(self.loss)

    def checksum_after(self, step: int) -> int | None:
        """The exact state checksum after training step `step`, or None if not recorded."""
        c = self.checksums
        if c is None or not 0 <= step < len(c) or c[step] is None:
            return None
        return int(c[step])

    def checkpoint_before(self, step: int) -> int:
        """The latest checkpoint taken at or before `step` (training resumes from it)."""
        i = bisect.bisect_right(self.checkpoints, step) - 1
        if i < 0:
            raise CheckpointError(f"no golden checkpoint at or before step {step}")
        return self.checkpoints[i]

    def state(self, step: int) -> dict[str, np.ndarray]:
        """The checkpointed state after `step` steps (a step in `checkpoints`), verified
        against its checksums; a one-line CheckpointError if it is missing or damaged (never a
        silently wrong state)."""
        return load_step(self.directory / CHECKPOINT_FILE, step, what="golden checkpoint").state

    def eval_after(self, steps: int) -> tuple[float, float] | None:
        return self.evals.get(steps)

    def to_json(self) -> dict:
        return {"format": FORMAT, "faultlab": __version__, "config": self.config.to_dict(),
                "loss": self.loss, "acc": self.acc,
                "evals": {str(k): list(v) for k, v in self.evals.items()},
                "checkpoints": self.checkpoints, "wall_s": self.wall_s,
                "signals": self.signals, "checksums": self.checksums,
                "fingerprint": self.fingerprint.to_dict() if self.fingerprint else None}


def eval_points(config: WorkloadConfig) -> list[int]:
    """Steps after which the golden run evaluates: every epoch end."""
    return list(range(config.steps_per_epoch, config.total_steps + 1, config.steps_per_epoch))


def record(trainer, config: WorkloadConfig, directory: Path, progress=None,
           fp: Fingerprint | None = None) -> GoldenRun:
    """Train `config` from scratch without faults, saving metrics and checkpoints; `fp` is
    the fingerprint of the process recording it."""
    import time
    t0 = time.perf_counter()
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=directory.name + ".", dir=directory.parent))
    try:
        run = GoldenRun(config, directory=tmp, fingerprint=fp, recorded_here=True,
                        checksums=[])
        from faultlab.detectors.signals import SignalSpec
        # everything, exactly (bound=0: exact max |m| per kernel): detectors warm up on these
        # and false-positive rates are measured on them
        trainer.signal_spec = SignalSpec(history=True, grads=True, bound=0.0, params=True)
        every = config.checkpoint_interval
        evals = set(eval_points(config))
        engine, first = None, None
        try:
            for step in range(config.total_steps):
                if step % every == 0:
                    state = trainer.get_state()         # a copy
                    if engine is None:
                        first = (step, state)           # saved once slots can be sized
                    else:
                        # a copy nobody else holds: written as it is (borrowed), while
                        # training goes on
                        engine.save(step, state, borrowed=True)
                    run.checkpoints.append(step)
                m = trainer.train_step(step)
                if engine is None:
                    # Slots are sized when the file is made; before the first step an optimizer
                    # may hold no state yet (Adam's moments appear at step 0), so size them
                    # from the state after it. keep = every checkpoint of the run: no slot is
                    # reused, the file holds them all (plus max_in_flight spare slots).
                    engine = CheckpointEngine(
                        tmp / CHECKPOINT_FILE, max_in_flight=2,
                        keep=len(range(0, config.total_steps, every)),
                        slot_bytes=int((1 + SLOT_MARGIN) * CheckpointEngine.slot_bytes_for(
                            first[1], trainer.get_state())))
                    engine.save(*first, borrowed=True)
                    first = None
                run.loss.append(m.loss)
                run.acc.append(m.acc)
                run.checksums.append(str(trainer.full_checksum()))
                if m.signals is not None:
                    run.signals.append(m.signals.to_dict())
                if step + 1 in evals:
                    e = trainer.evaluate()
                    run.evals[step + 1] = (e.loss, e.acc)
                if progress:
                    progress(step + 1, config.total_steps)
        finally:
            if engine is not None:
                engine.close()                          # every checkpoint durable
        run.wall_s = time.perf_counter() - t0
        (tmp / "golden.json").write_text(json.dumps(run.to_json()))
        if directory.exists() and load(config, directory, fp) is None:
            shutil.rmtree(directory, ignore_errors=True)   # stale (older format or version)
        try:
            os.rename(tmp, directory)   # atomic; fails if another process got there first
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)   # theirs is equivalent: same config
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    run.directory = directory
    return run


def load(config: WorkloadConfig, directory: Path, fp: Fingerprint | str | None = None) -> GoldenRun | None:
    """The cached golden run of `config`, or None when absent, from another version, or (with
    `fp`) recorded under another fingerprint."""
    meta = directory / "golden.json"
    if not meta.is_file():
        return None
    try:
        d = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    if d.get("faultlab") != __version__ or d.get("config") != config.to_dict():
        return None
    legacy = fp == LEGACY
    if d.get("format") != (LEGACY_FORMAT if legacy else FORMAT):
        return None
    got = Fingerprint.from_dict(d["fingerprint"]) if d.get("fingerprint") else None
    if fp is not None and not legacy and got != fp:
        return None
    return GoldenRun(config, d["loss"], d["acc"],
                     {int(k): tuple(v) for k, v in d["evals"].items()}, d["checkpoints"],
                     directory, d.get("wall_s", 0.0), d.get("signals", []), got,
                     checksums=d.get("checksums"))


#: golden runs cached before fingerprints (format 4) sit at the key without one; they are used
#: only after a control trial on this machine reproduces them (Session.control)
LEGACY = "legacy"
LEGACY_FORMAT = 4


def legacy_dir(config: WorkloadConfig, threads: int) -> Path:
    return cache_root() / "golden" / (
        f"{config.framework.value}-{config.workload.replace(':', '_')}-{config.key()}-t{threads}")


def load_legacy(config: WorkloadConfig, threads: int) -> GoldenRun | None:
    """A golden run an older faultlab cached (no fingerprint), or None."""
    return load(config, legacy_dir(config, threads), LEGACY)


#: the files of a golden run (what pack / install carry between machines)
FILES = ("golden.json", CHECKPOINT_FILE)


def pack(run: GoldenRun) -> dict[str, bytes]:
    """A golden run's files as bytes, to ship to another machine (a Ray object, a bundle):
    its metrics and fingerprint (strict JSON) and the engine's checkpoint file, whose every
    checkpoint is checksummed. Nothing in it is ever executed or unpickled."""
    return {name: (run.directory / name).read_bytes() for name in FILES}


def install(config: WorkloadConfig, threads: int, files: dict[str, bytes]) -> GoldenRun:
    """Install a golden run made elsewhere (`pack`'s files) into this machine's cache, after
    checking its fingerprint is this process's: a golden run from a machine whose arithmetic
    differs is refused in one line, never compared against silently. Idempotent; the entry
    appears atomically."""
    if set(files) != set(FILES):
        raise DeterminismError(f"a golden run needs exactly the files {', '.join(FILES)}, "
                               f"got {', '.join(sorted(files)) or 'none'}")
    try:
        d = json.loads(files["golden.json"])
    except ValueError as e:
        raise DeterminismError(f"golden.json of a shipped golden run is not JSON ({e})") from None
    if d.get("config") != config.to_dict():
        raise DeterminismError(f"the shipped golden run is of another configuration than "
                               f"{config.workload} ({config.key()})")
    if not d.get("fingerprint"):
        raise DeterminismError("the shipped golden run has no determinism fingerprint")
    theirs = Fingerprint.from_dict(d["fingerprint"])
    ours = fingerprint(config.framework, threads)
    if theirs != ours:
        raise DeterminismError(
            f"the golden run of {config.workload} was made on a machine whose arithmetic "
            f"differs from this one ({theirs.diff(ours)}): run with --portable on both, or "
            f"record the golden run here")
    directory = golden_dir(config, threads, ours)
    run = load(config, directory, ours)
    if run is not None:
        return run
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=directory.name + ".", dir=directory.parent))
    try:
        for name, blob in files.items():
            (tmp / name).write_bytes(blob)
        if directory.exists():
            shutil.rmtree(directory, ignore_errors=True)    # stale: failed the load above
        try:
            os.rename(tmp, directory)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)          # another worker installed it
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    run = load(config, directory, ours)
    if run is None:
        raise DeterminismError(f"the shipped golden run of {config.workload} is unreadable")
    return run


def cached_signals(configs: Iterable[WorkloadConfig], threads: int) -> list[dict]:
    """The per-step detector signals of the cached golden runs of `configs` (those recorded
    with `threads` threads); configurations without a cached run contribute nothing."""
    signals: list[dict] = []
    for cfg in {c.key(): c for c in configs}.values():
        run = load(cfg, golden_dir(cfg, threads), fingerprint(cfg.framework, threads))
        if run is not None:
            signals += run.signals
    return signals
