"""`faultlab import-isca`: the ISCA'23 artifact's per-epoch golden checkpoints as faultlab's
golden run of the artifact's full-size ResNet-18 (framework-free; the backend reads the
checkpoint: faultlab/backends/<framework>/isca_import.py; docs/isca_import.md).

What the golden run becomes. The artifact loads ``ISCA_AE_CKPT/epoch_{E-1}`` to replay an
injection at ``target_epoch`` E (reproduce_injections.py): the file ``epoch_K`` is the state after
K + 1 epochs. ``--epoch E`` (the artifact's target_epoch) therefore reads ``epoch_{E-1}`` and makes
it the golden run's checkpoint at step E * steps_per_epoch (the origin). From there faultlab
trains on, fault-free, with its own trainer, recording every step's loss / accuracy / detector
signals, the evaluation at every epoch end and a checkpoint every checkpoint interval, exactly as
a golden run it records from scratch (runner/golden.py). A trial then restores the latest
checkpoint at or before its injection step, which is the imported one or one faultlab trained
from it, and is compared with the fault-free trajectory of the same arithmetic. The artifact's
logged metrics (expected_results/fault_free.txt) are not used: they come from another machine,
data order and augmentation, so no trial here could match them bit for bit.

Limits. One origin per configuration (a golden run is keyed by its configuration): trials that
inject before the origin have no checkpoint (a one-line CheckpointError); later artifact epochs
are not used (faultlab's own continuation stands in for them). Steps before the origin have no
metrics (null in golden.json) and no detector signals (the detectors' warm-up of a --detect
trial then starts at the origin). ``steps`` shortens the recording (CI): a trial whose window
goes past the recorded steps cannot be classified, and ISCA files without a horizon run to the
end of training.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from faultlab.backends import entry, installed, load_backend
from faultlab.errors import FaultlabError, printable
from faultlab.runner import golden as goldenmod
from faultlab.workloads.base import WorkloadConfig, default_config

_EPOCH_FILE = re.compile(r"^epoch_(\d+)\.index$")


def isca_config(framework: str = "tf") -> WorkloadConfig:
    """The configuration the artifact's injection files give (model resnet18, learning_rate
    0.001, seed 123, everything else the full-size defaults: 8 replicas x 128, 49 steps an
    epoch, 80 epochs)."""
    return default_config("resnet18", framework=framework, lr=1e-3, seed=123)


def available_epochs(directory: str | os.PathLike) -> list[int]:
    """The K of every ``epoch_K`` checkpoint (its .index file) in `directory`, sorted."""
    d = Path(directory)
    if not d.is_dir():
        raise FaultlabError(f"{printable(d)}: no such directory (the artifact's ISCA_AE_CKPT "
                            f"folder, e.g. from faultlab fetch or gdown --folder)")
    return sorted(int(m.group(1)) for p in d.iterdir() if (m := _EPOCH_FILE.match(p.name)))


def choose_epoch(directory: str | os.PathLike, epoch: int | None,
                 config: WorkloadConfig) -> int:
    """The epoch the golden run starts at (`epoch`, or the earliest one the folder allows),
    checked: its checkpoint file epoch_{epoch-1} must be there."""
    have = available_epochs(directory)
    if not have:
        raise FaultlabError(f"{printable(directory)}: no artifact checkpoint (epoch_K.index) in it")
    if epoch is None:
        epoch = have[0] + 1
    if not 1 <= epoch < config.epochs:
        raise FaultlabError(f"--epoch must be between 1 and {config.epochs - 1} (the epoch the "
                            f"golden run starts at), got {epoch}")
    if epoch - 1 not in have:
        need = printable(Path(directory) / f"epoch_{epoch - 1}")
        raise FaultlabError(f"--epoch {epoch} needs {need} (the state after {epoch} epochs); "
                            f"the folder has epoch_"
                            f"{', epoch_'.join(map(str, have))}")
    return epoch


def _backend_module(framework: str):
    e = entry(framework)
    name = f"{e.module}.isca_import"
    if importlib.util.find_spec(name) is None:
        raise FaultlabError(f"import-isca reads the artifact's TensorFlow checkpoints into the "
                            f"TensorFlow backend: --framework {e.name} has no importer (use "
                            f"--framework tf)")
    if not installed(e.name):
        raise FaultlabError(f"--framework {e.name} needs {e.package}: pip install '{e.extra}'")
    return importlib.import_module(name)


@dataclass
class ImportReport:
    """What `import_isca` did."""

    checkpoint: str                  # the artifact file read (prefix)
    epoch: int                       # the epoch the golden run starts at
    origin: int                      # its step
    end: int                         # recorded up to this step (exclusive)
    directory: Path                  # the golden run
    config: WorkloadConfig
    threads: int
    variables: int                   # faultlab variables matched
    optimizer: str                   # "imported" or "fresh"
    iterations: int
    folded: dict[str, float] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    replaced: bool = False           # an earlier golden run of this configuration was replaced
    wall_s: float = 0.0

    def to_json(self) -> dict:
        return {"checkpoint": self.checkpoint, "epoch": self.epoch, "origin_step": self.origin,
                "end_step": self.end, "golden_dir": str(self.directory),
                "workload_key": self.config.key(), "threads": self.threads,
                "variables": self.variables, "optimizer": self.optimizer,
                "iterations": self.iterations, "conv_bias_folded": self.folded,
                "ignored": self.ignored, "replaced": self.replaced, "wall_s": self.wall_s}


def import_isca(directory: str | os.PathLike, epoch: int | None = None, framework: str = "tf",
                steps: int | None = None, threads: int = 0, config: WorkloadConfig | None = None,
                say: Callable[[str], None] = lambda m: None,
                progress: Callable[[int, int], None] | None = None) -> ImportReport:
    """Import `directory`/epoch_{epoch-1} as the golden run of `config` (the artifact's
    full-size configuration by default) at `threads` threads (faultlab run's default: this
    machine's cores); record `steps` steps from it (default: to the end of training)."""
    from faultlab.determinism import configure, fingerprint
    from faultlab.runner.campaign import default_threads
    t0 = time.perf_counter()
    config = config or isca_config(framework)
    if config.workload != "resnet18" or config.width != 64:
        raise FaultlabError("import-isca fills the artifact's ResNet-18 at full width (64)")
    epoch = choose_epoch(directory, epoch, config)
    origin = epoch * config.steps_per_epoch
    if steps is not None and steps < 0:
        raise FaultlabError(f"--steps must be at least 0, got {steps}")
    end = config.total_steps if steps is None else min(config.total_steps, origin + steps)
    threads = threads or default_threads(1)
    if threads < 1:
        raise FaultlabError(f"--threads must be at least 1, got {threads}")
    fw = config.framework.value
    mod = _backend_module(fw)
    configure(fw, threads)                       # before the framework initialises
    prefix = str(Path(directory) / f"epoch_{epoch - 1}")
    say(f"reading {printable(prefix)} (the state after {epoch} epochs, step {origin})")
    imported = mod.check(prefix, config)         # every variable matched before training
    from faultlab.workloads.estimate import check_fits
    check_fits(config)
    say(f"building {config.workload} ({config.replicas} x {config.per_replica_batch}, "
        f"{threads} thread(s))")
    trainer = load_backend(fw).build_trainer(config)
    iterations = imported.iterations if imported.moments and imported.iterations is not None \
        else (origin if imported.moments else 0)
    mod.load_into(trainer, imported, iterations)
    fp = fingerprint(fw, threads)
    target = goldenmod.golden_dir(config, threads, fp)
    replaced = target.exists()
    provenance = {"source": "ISCA_AE", "checkpoint": prefix, "epoch": epoch,
                  "origin_step": origin, "end_step": end,
                  "optimizer": "imported" if imported.moments else "fresh",
                  "iterations": iterations, "conv_bias_folded": imported.folded}
    say(f"recording steps {origin}..{end} from it")
    if progress is None:
        def progress(done, total):
            if done % config.steps_per_epoch == 0 or done == total:
                say(f"  step {origin + done} of {end} ({time.perf_counter() - t0:.0f} s)")
    record_from(trainer, config, target, origin, end, fp, provenance, progress)
    return ImportReport(prefix, epoch, origin, end, target, config, threads,
                        len(imported.weights), "imported" if imported.moments else "fresh",
                        iterations, imported.folded, imported.ignored, replaced,
                        time.perf_counter() - t0)


def checkpoint_steps(config: WorkloadConfig, origin: int, end: int) -> list[int]:
    """Where the imported golden run saves: the origin, every checkpoint interval after it
    (on the same grid as a golden run recorded from scratch) and the last recorded step (so
    the control trial always has a second checkpoint to compare the state with)."""
    every = config.checkpoint_interval
    steps = [origin] + [s for s in range(origin + 1, end) if s % every == 0]
    if end > origin and end not in steps:
        steps.append(end)
    return steps


def record_from(trainer, config: WorkloadConfig, directory: Path, origin: int, end: int, fp,
                provenance: dict, progress=None) -> goldenmod.GoldenRun:
    """Record a golden run from the trainer's current state at step `origin` up to `end`
    (golden.record's loop, started mid-run), into `directory` (replacing what is there),
    atomically."""
    from faultlab.checkpointing.engine import CheckpointEngine
    from faultlab.detectors.signals import SignalSpec
    t0 = time.perf_counter()
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=directory.name + ".", dir=directory.parent))
    try:
        run = goldenmod.GoldenRun(config, loss=[None] * origin, acc=[None] * origin,
                                  directory=tmp, fingerprint=fp, recorded_here=True,
                                  checksums=[None] * origin)
        trainer.signal_spec = SignalSpec(history=True, grads=True, bound=0.0, params=True)
        saves = checkpoint_steps(config, origin, end)
        evals = set(goldenmod.eval_points(config))
        state = trainer.get_state()                  # Adam's moments exist: sized now
        engine = CheckpointEngine(
            tmp / goldenmod.CHECKPOINT_FILE, max_in_flight=2, keep=len(saves),
            slot_bytes=int((1 + goldenmod.SLOT_MARGIN) * CheckpointEngine.slot_bytes_for(state)))
        try:
            for step in range(origin, end):
                if step in saves:
                    engine.save(step, state if step == origin else trainer.get_state(),
                                borrowed=True)
                    run.checkpoints.append(step)
                m = trainer.train_step(step)
                run.loss.append(m.loss)
                run.acc.append(m.acc)
                run.checksums.append(str(trainer.full_checksum()))
                if m.signals is not None:
                    run.signals.append(m.signals.to_dict())
                if step + 1 in evals:
                    e = trainer.evaluate()
                    run.evals[step + 1] = (e.loss, e.acc)
                if progress:
                    progress(step + 1 - origin, end - origin)
            if end in saves or end == origin:
                engine.save(end, state if end == origin else trainer.get_state(), borrowed=True)
                run.checkpoints.append(end)
        finally:
            engine.close()
        run.wall_s = time.perf_counter() - t0
        doc = run.to_json()
        doc["imported"] = provenance
        (tmp / "golden.json").write_text(json.dumps(doc))
        if directory.exists():
            shutil.rmtree(directory)                 # the import replaces it
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    run.directory = directory
    return run
