"""Golden (fault-free) runs: per-step metrics and periodic checkpoints, cached on disk.

A golden run is keyed by its workload configuration (and the thread count, which can change
floating-point reduction order) and reused by every trial of every campaign on that
configuration. The cache entry is built in a temporary directory and renamed into place, so a
run interrupted while recording leaves nothing half-written behind.
"""

from __future__ import annotations

import bisect
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .errors import CheckpointError
from .workloads.base import WorkloadConfig

FORMAT = 2


def cache_root() -> Path:
    return Path(os.environ.get("FAULTLAB_CACHE", Path.home() / ".cache" / "faultlab"))


def golden_dir(config: WorkloadConfig, threads: int) -> Path:
    return cache_root() / "golden" / f"{config.framework.value}-{config.workload.replace(':', '_')}-{config.key()}-t{threads}"


def save_state(path: Path, state: dict[str, np.ndarray]) -> None:
    """Write a state as an .npz (no pickles), durably: temp file, fsync, rename."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **{k.replace("/", "|"): v for k, v in state.items()})
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_state(path: Path) -> dict[str, np.ndarray]:
    """Read a state written by save_state; never unpickles; one-line error if damaged."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k.replace("|", "/"): z[k] for k in z.files}
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint is missing") from None
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError) as e:
        raise CheckpointError(f"{path}: corrupt checkpoint ({type(e).__name__}: {e})") from None


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
    def checkpoint_before(self, step: int) -> int:
        """The latest checkpoint taken at or before `step` (training resumes from it)."""
        i = bisect.bisect_right(self.checkpoints, step) - 1
        if i < 0:
            raise CheckpointError(f"no golden checkpoint at or before step {step}")
        return self.checkpoints[i]

    def state(self, step: int) -> dict[str, np.ndarray]:
        return load_state(self.directory / f"state_{step:08d}.npz")

    def eval_after(self, steps: int) -> tuple[float, float] | None:
        return self.evals.get(steps)

    def to_json(self) -> dict:
        return {"format": FORMAT, "faultlab": __version__, "config": self.config.to_dict(),
                "loss": self.loss, "acc": self.acc,
                "evals": {str(k): list(v) for k, v in self.evals.items()},
                "checkpoints": self.checkpoints, "wall_s": self.wall_s,
                "signals": self.signals}


def eval_points(config: WorkloadConfig) -> list[int]:
    """Steps after which the golden run evaluates: every epoch end."""
    return list(range(config.steps_per_epoch, config.total_steps + 1, config.steps_per_epoch))


def record(trainer, config: WorkloadConfig, directory: Path, progress=None) -> GoldenRun:
    """Train `config` from scratch without faults, saving metrics and checkpoints."""
    import time
    t0 = time.perf_counter()
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=directory.name + ".", dir=directory.parent))
    try:
        run = GoldenRun(config, directory=tmp)
        from .detectors.signals import SignalSpec
        trainer.signal_spec = SignalSpec(history=True, params=True)
        every = config.checkpoint_interval
        evals = set(eval_points(config))
        for step in range(config.total_steps):
            if step % every == 0:
                save_state(tmp / f"state_{step:08d}.npz", trainer.get_state())
                run.checkpoints.append(step)
            m = trainer.train_step(step)
            run.loss.append(m.loss)
            run.acc.append(m.acc)
            if m.signals is not None:
                run.signals.append(m.signals.to_dict())
            if step + 1 in evals:
                e = trainer.evaluate()
                run.evals[step + 1] = (e.loss, e.acc)
            if progress:
                progress(step + 1, config.total_steps)
        run.wall_s = time.perf_counter() - t0
        (tmp / "golden.json").write_text(json.dumps(run.to_json()))
        if directory.exists() and load(config, directory) is None:
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


def load(config: WorkloadConfig, directory: Path) -> GoldenRun | None:
    """The cached golden run of `config`, or None when absent or from another version."""
    meta = directory / "golden.json"
    if not meta.is_file():
        return None
    try:
        d = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    if d.get("format") != FORMAT or d.get("faultlab") != __version__ or d.get("config") != config.to_dict():
        return None
    return GoldenRun(config, d["loss"], d["acc"],
                     {int(k): tuple(v) for k, v in d["evals"].items()}, d["checkpoints"],
                     directory, d.get("wall_s", 0.0), d.get("signals", []))
