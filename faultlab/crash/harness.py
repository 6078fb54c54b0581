"""Crash-consistency campaigns: kill -9 a training process at chosen instants, restart it,
verify what was recovered, and check that the run ends bit-identical to an uninterrupted one.

Kill campaigns (real processes, real SIGKILLs). A *zygote* process imports torch and the
training code once; every training process is forked from it, so a restart costs
milliseconds, not a Python start-up (TensorFlow is not fork-safe once initialised: a TF loop's
processes import it after the fork, seconds per restart). Each training process recovers the newest checkpoint,
restores the loop, trains, and checkpoints every `every` steps with the engine under test. It
announces the points it passes (the checkpointer's phase hook: staging, writing, committing;
and idle, between steps with nothing in flight) through a pipe. For each kill the parent picks
a point (`KillPoint`: a phase and which occurrence of it) and either has the process *hold*
there (it stops at that exact instant and is killed while stopped) or *races* it (it is killed
as soon as the parent reads the announcement, while it runs on: a random instant after the
point). After each kill the parent itself recovers the checkpoint and classifies it against an
uninterrupted reference run:

  exact            every array and the metadata equal the reference state of the claimed step
  mixed            every array equals the reference at *some* step, but not all the same one
  torn             some array equals the reference at no step at all
  lost-committed   recovery returned a checkpoint older than one reported durable before the
                   kill, or none at all although one was reported

and counts the steps of work lost (steps trained at the kill minus the step recovered). Every
run ends with a process that runs to the end; its final state must equal the reference bit for
bit.

Power-loss campaigns (the engine on `SimDisk`, in this process): the whole run's I/O is
logged, and at chosen crash points every power-loss image drawn there (unsynced writes
dropped, kept, torn, reordered) is recovered and classified the same way; some are resumed to
the end and compared bit for bit.

    python -m faultlab.crash.harness --zygote ...   (internal: the zygote's entry)

`faultlab crash` is the command line; `faultlab.testing` builds property-based tests on it.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, unquote

import numpy as np

from faultlab.errors import CheckpointError, FaultlabError
from faultlab.checkpointing.format import FormatError, decode_header, decode_record, digest


class CrashCampaignError(FaultlabError):
    """The campaign itself could not run (a training process failed or hung)."""


# -- what to kill and what to train ---------------------------------------------------------

class Phase(str, Enum):
    STAGING = "staging"          # the state is being captured / copied for a save
    WRITING = "writing"          # data on its way to the file
    COMMITTING = "committing"    # syncs, commit record, rename, metadata
    IDLE = "idle"                # between steps, no checkpoint in flight


#: occurrences a random plan draws from, per phase (points of that phase per checkpoint vary
#: by engine: the engine's writing points are its chunks, its committing points four syncs
#: and writes; a baseline's are its file writes and its fsync / rename)
MAX_OCCURRENCE = {Phase.STAGING: 6, Phase.WRITING: 12, Phase.COMMITTING: 8, Phase.IDLE: 6}


@dataclass(frozen=True)
class KillPoint:
    """Kill the training process at the `occurrence`-th point of `phase` it reaches (counted
    from its start). hold: it stops there and is killed while stopped (an exact instant);
    otherwise it is killed when the parent reads its announcement (a random instant after)."""

    phase: Phase
    occurrence: int = 1
    hold: bool = True

    def __post_init__(self):
        object.__setattr__(self, "phase", Phase(self.phase))
        if not isinstance(self.occurrence, int) or self.occurrence < 1:
            raise FaultlabError(f"kill point occurrence must be >= 1, got {self.occurrence!r}")

    def to_json(self) -> dict:
        return {"phase": self.phase.value, "occurrence": self.occurrence, "hold": self.hold}

    def __str__(self) -> str:
        return f"{self.phase.value}#{self.occurrence}{'' if self.hold else ' (race)'}"


def random_kill_points(rng: random.Random, n: int, hold_ratio: float = 0.75) -> list[KillPoint]:
    """n kill points drawn uniformly over the phases (seeded)."""
    out = []
    for _ in range(n):
        phase = rng.choice(list(Phase))
        out.append(KillPoint(phase, rng.randint(1, MAX_OCCURRENCE[phase]),
                             rng.random() < hold_ratio))
    return out


class TrainingLoop(Protocol):
    """A training run the campaign can kill and resume: what a loop factory returns.

    step(k) runs step k (0-based); capture(step) returns the state after `step` steps as
    ({name: numpy array}, JSON meta) -- TorchCheckpointAdapter.capture does this for torch;
    restore(state, meta) puts such a state back. Everything that decides later steps (model,
    optimizer, random generators, data position) must be in the state, and a fresh loop must
    start deterministically: the factory seeds every generator the state holds (Python
    reseeds `random` in every forked process). Training processes are forked from a zygote
    that builds one loop first; a factory whose framework is not fork-safe once initialised
    (TensorFlow) sets `factory.fork_safe = False` and every process builds its own.
    """

    def step(self, k: int) -> None: ...

    def capture(self, step: int) -> tuple[dict[str, np.ndarray], dict]: ...

    def restore(self, state: Mapping[str, np.ndarray], meta: Mapping) -> None: ...


@dataclass(frozen=True)
class LoopSpec:
    """Which training loop to run and for how long: `factory` is "module:function" or
    "path/to/file.py:function" (a function with no arguments returning a TrainingLoop)."""

    factory: str
    steps: int = 24
    every: int = 1

    def __post_init__(self):
        if self.steps < 1 or self.every < 1:
            raise FaultlabError("steps and every must be at least 1")
        if ":" not in self.factory:
            raise FaultlabError(f"loop factory {self.factory!r} is not module:function or "
                                "path.py:function")


def factory_name(factory: str | Callable) -> str:
    """"module:function" / "file.py:function" naming a loop factory (callables are located by
    their module's file, so a function in a test file works)."""
    if isinstance(factory, str):
        return WORKLOADS.get(factory, factory)
    module = sys.modules.get(factory.__module__)
    qual = factory.__qualname__
    if "<locals>" in qual or module is None:
        raise FaultlabError(f"loop factory {qual} must be a module-level function")
    path = getattr(module, "__file__", None)
    if factory.__module__ == "__main__" or factory.__module__.startswith(("test_", "conftest")) \
            or path is None or not _importable(factory.__module__):
        if path is None:
            raise FaultlabError(f"cannot locate the module of loop factory {qual}")
        return f"{Path(path).resolve()}:{qual}"
    return f"{factory.__module__}:{qual}"


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def load_factory(name: str) -> Callable[[], TrainingLoop]:
    module, _, attr = name.rpartition(":")
    try:
        if module.endswith(".py"):
            path = Path(module)
            sys.path.insert(0, str(path.parent))
            spec = importlib.util.spec_from_file_location(
                f"_faultlab_loop_{abs(hash(str(path)))}", path)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = mod
            spec.loader.exec_module(mod)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            mod = importlib.import_module(module)
        obj = mod
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj
    except (ImportError, AttributeError, OSError) as e:
        raise FaultlabError(f"cannot load loop factory {name!r}: {e}") from None


# -- built-in training loops ------------------------------------------------------------------

class TrainerLoop:
    """faultlab's own MLP workload (TorchTrainer) at a tiny size, with the torch adapter."""

    def __init__(self, width: int = 16):
        from faultlab.workloads.base import default_config
        from faultlab.backends.torch.trainer import TorchTrainer
        from faultlab.backends.torch.adapter import TorchCheckpointAdapter
        cfg = default_config("mlp", replicas=1, per_replica_batch=16, width=width,
                             steps_per_epoch=20, epochs=10, seed=0)
        random.seed(0)          # unused by the trainer, but captured: a fresh start must be
        np.random.seed(0)       # deterministic (a forked child's `random` is reseeded at fork)
        self.trainer = TorchTrainer(cfg)
        self.adapter = TorchCheckpointAdapter(self.trainer.model, self.trainer.optimizer)

    def step(self, k: int) -> None:
        self.trainer.train_step(k)

    def capture(self, step: int):
        return self.adapter.capture(step, data_position=step)

    def restore(self, state, meta) -> None:
        self.adapter.restore(state, meta)


class _Sampler:
    """A stateful sampler: a permutation of the dataset drawn from NumPy's global generator at
    each epoch start, and the position in it (saved through state_dict)."""

    def __init__(self, n: int, batch: int):
        self.n, self.batch = n, batch
        self.perm = np.random.permutation(n)
        self.pos = 0

    def next(self) -> np.ndarray:
        if self.pos + self.batch > self.n:
            self.perm, self.pos = np.random.permutation(self.n), 0
        idx = self.perm[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return idx

    def state_dict(self) -> dict:
        return {"perm": self.perm, "pos": self.pos}

    def load_state_dict(self, sd) -> None:
        self.perm, self.pos = np.array(sd["perm"]), int(sd["pos"])


class RngLoop:
    """A loop whose every step depends on carried random state: dropout and input noise (torch
    generator), batches from a sampler driven by NumPy's global generator, a coin from Python's
    random, a GradScaler under bf16 autocast. Resuming it exactly needs all of them."""

    def __init__(self):
        import torch
        from faultlab.backends.torch.adapter import TorchCheckpointAdapter
        torch.manual_seed(1)
        np.random.seed(2)
        random.seed(3)
        gen = np.random.RandomState(4)
        self.x = gen.standard_normal((256, 16)).astype(np.float32)
        self.y = (self.x[:, :4].sum(1) > 0).astype(np.int64)
        self.model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32),
                                         torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                         torch.nn.Linear(32, 2))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=3e-3)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 6, growth_interval=4)
        self.sampler = _Sampler(len(self.y), 16)
        self.adapter = TorchCheckpointAdapter(self.model, self.opt, self.scaler,
                                              data=self.sampler)
        self._torch = torch

    def step(self, k: int) -> None:
        torch = self._torch
        idx = self.sampler.next()
        x = torch.from_numpy(self.x[idx])
        if random.random() < 0.5:
            x = -x
        x = x + 0.05 * torch.randn_like(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(self.model(x).float(),
                                                     torch.from_numpy(self.y[idx]))
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()

    def capture(self, step: int):
        return self.adapter.capture(step, data_position=step)

    def restore(self, state, meta) -> None:
        self.adapter.restore(state, meta)


class KerasLoop:
    """A Keras 3 loop whose every step depends on carried state: BatchNorm, dropout (a Keras
    SeedGenerator), Adam, input noise from a tf.random.Generator, batches from a sampler on
    NumPy's global generator and a coin from Python's random; the TF adapter saves it all.
    Importing faultlab's TF backend enables op determinism."""

    def __init__(self):
        from faultlab.backends.tf import trainer as tf_trainer
        import keras
        from faultlab.backends.tf.runtime import tf
        from faultlab.backends.tf.adapter import TFCheckpointAdapter
        try:
            tf.config.threading.set_intra_op_parallelism_threads(1)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:
            pass                             # TF was initialised before (power-loss mode)
        keras.utils.set_random_seed(1)
        np.random.seed(2)
        random.seed(3)
        gen = np.random.RandomState(4)
        self.x = gen.standard_normal((256, 16)).astype(np.float32)
        self.y = (self.x[:, :4].sum(1) > 0).astype(np.int64)
        self.model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32),
                                       keras.layers.BatchNormalization(),
                                       keras.layers.ReLU(), keras.layers.Dropout(0.2),
                                       keras.layers.Dense(2)])
        self.opt = keras.optimizers.Adam(3e-3)
        self.opt.build(self.model.trainable_variables)
        self.noise = tf.random.Generator.from_seed(5)
        self.sampler = _Sampler(len(self.y), 16)
        self.adapter = TFCheckpointAdapter(self.model, self.opt, data=self.sampler,
                                           generators={"noise": self.noise})
        self._tf = tf
        self._train = tf.function(self._train_step)

    def _train_step(self, x, y, sign):
        tf = self._tf
        x = sign * x + 0.05 * self.noise.normal(tf.shape(x))
        tvars = self.model.trainable_variables
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=y, logits=self.model(x, training=True)))
        self.opt.apply_gradients(zip(tape.gradient(loss, tvars), tvars))

    def step(self, k: int) -> None:
        idx = self.sampler.next()
        sign = -1.0 if random.random() < 0.5 else 1.0
        self._train(self._tf.constant(self.x[idx]), self._tf.constant(self.y[idx]),
                    self._tf.constant(sign))

    def capture(self, step: int):
        return self.adapter.capture(step, data_position=step)

    def restore(self, state, meta) -> None:
        self.adapter.restore(state, meta)


def mlp_loop() -> TrainerLoop:
    return TrainerLoop()


def rng_loop() -> RngLoop:
    return RngLoop()


def keras_loop() -> KerasLoop:
    return KerasLoop()


# TensorFlow is not fork-safe once initialised: the zygote must not build this loop; every
# training process imports TF itself (seconds per restart instead of milliseconds).
keras_loop.fork_safe = False

WORKLOADS = {"mlp": "faultlab.crash.harness:mlp_loop",
             "rng-mlp": "faultlab.crash.harness:rng_loop",
             "keras-mlp": "faultlab.crash.harness:keras_loop"}

#: engine settings a kill campaign uses unless told otherwise: small chunks, so that one
#: checkpoint of a tiny model still has several writing points
DEFAULT_SETTINGS = {"faultlab": {"max_in_flight": 2, "keep": 2, "chunk_bytes": 4096,
                                 "pool_bytes": 16384, "writers": 2},
                    "faultlab+cow": {"max_in_flight": 2, "keep": 2, "chunk_bytes": 4096,
                                     "pool_bytes": 16384, "writers": 2},
                    "sync": {"keep": 2}, "checkfreq": {"keep": 2}, "dcp-async": {"keep": 2},
                    "tf-sync": {"keep": 2}, "tf-async": {"keep": 2}, "naive": {}}


# -- state fingerprints -------------------------------------------------------------------------

META_KEY = "__meta__"


def fingerprint(state: Mapping[str, np.ndarray], meta: Mapping) -> dict[str, str]:
    """name -> "dtype|shape|xxh3" of every array, plus the metadata's (order-insensitive)."""
    out = {}
    for name, arr in state.items():
        a = np.ascontiguousarray(arr)
        out[name] = f"{a.dtype.str}|{a.shape}|{digest(a.reshape(-1).view(np.uint8)):016x}"
    out[META_KEY] = f"{digest(json.dumps(meta, sort_keys=True).encode()):016x}"
    return out


@dataclass
class Reference:
    """Fingerprints of an uninterrupted run's state at every checkpoint step."""

    steps: dict[int, dict[str, str]]
    final_path: Path | None = None

    def __post_init__(self):
        self.index: dict[tuple[str, str], set[int]] = {}
        for step, fp in self.steps.items():
            for name, h in fp.items():
                self.index.setdefault((name, h), set()).add(step)

    def to_json(self) -> dict:
        return {"steps": {str(k): v for k, v in self.steps.items()}}

    @classmethod
    def from_json(cls, d: dict, final_path: Path | None = None) -> Reference:
        return cls({int(k): v for k, v in d["steps"].items()}, final_path)


class Verdict(str, Enum):
    EXACT = "exact"
    MIXED = "mixed"
    TORN = "torn"
    LOST = "lost-committed"
    NONE = "none"                # nothing recovered and nothing had been committed: correct


def classify(recovered, reference: Reference, newest_committed: int | None) -> tuple[Verdict, str]:
    """Judge one recovery: `recovered` is (step, state, meta) or the CheckpointError raised."""
    if isinstance(recovered, BaseException):
        if newest_committed is None:
            return Verdict.NONE, str(recovered)
        return Verdict.LOST, f"recovery failed after step {newest_committed} was committed: " \
                             f"{recovered}"
    step, state, meta = recovered
    fp = fingerprint(state, meta)
    want = reference.steps.get(step)
    if want is not None and fp == want:
        if newest_committed is not None and step < newest_committed:
            return Verdict.LOST, f"recovered step {step} but step {newest_committed} had " \
                                 "been reported durable"
        return Verdict.EXACT, ""
    matches = {name: reference.index.get((name, h), set()) for name, h in fp.items()
               if name != META_KEY}
    unknown = sorted(n for n, s in matches.items() if not s)
    if unknown or (want is not None and set(fp) != set(want)):
        return Verdict.TORN, f"step {step}: arrays matching no saved state: {unknown[:5]}"
    return Verdict.MIXED, f"step {step}: arrays from steps " \
                          f"{sorted(set().union(*matches.values()))[:8]}"


def _save_npz(path: Path, state: Mapping[str, np.ndarray], meta: Mapping) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        np.savez(f, **{k.replace("/", "|"): np.asarray(v) for k, v in state.items()},
                 **{META_KEY: np.frombuffer(json.dumps(meta, sort_keys=True).encode(),
                                            dtype=np.uint8)})
    os.replace(tmp, path)


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k.replace("|", "/"): z[k] for k in z.files}


def same_state(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> list[str]:
    """Names whose arrays differ in dtype, shape or any bit (empty: bit-identical)."""
    diff = sorted(set(a) ^ set(b))
    for name in set(a) & set(b):
        x, y = np.asarray(a[name]), np.asarray(b[name])
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            diff.append(name)
    return sorted(diff)


# -- the training process (runs in a child forked from the zygote) ---------------------------

class _Channel:
    """Lines to the parent through the shared pipe; each write is one atomic line."""

    def __init__(self, fd: int, token: int):
        self.fd, self.token = fd, token

    def send(self, kind: str, *args) -> None:
        line = " ".join([str(self.token), kind, *(quote(str(a)[:1000], safe="") for a in args)])
        os.write(self.fd, (line + "\n").encode())


class _Tracker:
    """The phase hook of a training process: counts the points it passes and stops or
    announces at the planned one."""

    def __init__(self, kill: KillPoint | None, chan: _Channel):
        self.kill, self.chan = kill, chan
        self.counts: Counter = Counter()
        self._lock = threading.Lock()

    def __call__(self, phase: str, point: str, step: int) -> None:
        kill = self.kill
        with self._lock:
            self.counts[phase] += 1
            hit = kill is not None and phase == kill.phase.value \
                and self.counts[phase] == kill.occurrence
        if hit:
            self.chan.send("hold" if kill.hold else "at", phase, point, step)
            if kill.hold:
                threading.Event().wait()          # stopped here until SIGKILL arrives

    def wants_idle(self) -> bool:
        """Whether the next idle point (a step start) is the planned kill; in-flight saves
        then drain first, so that the kill lands with nothing in flight."""
        kill = self.kill
        return kill is not None and kill.phase is Phase.IDLE \
            and self.counts[Phase.IDLE.value] + 1 == kill.occurrence


def _child_main(job: dict, fd: int) -> int:
    from faultlab.checkpointing.baselines import open_checkpointer, recover_checkpoint
    chan = _Channel(fd, job["token"])
    spec = LoopSpec(**job["loop"])
    loop = load_factory(spec.factory)()
    if job.get("record"):
        return _record_reference(loop, spec, Path(job["dir"]), chan)
    kill = KillPoint(**job["kill"]) if job.get("kill") else None
    tracker = _Tracker(kill, chan)
    engine, directory = job["engine"], Path(job["dir"])
    start = 0
    try:
        step, state, meta = recover_checkpoint(engine, directory)
    except CheckpointError as e:
        chan.send("norecover", str(e)[:200])
    else:
        try:
            loop.restore(state, meta)
            start = step
        except Exception as e:       # garbage that got past recovery (the naive engine)
            chan.send("restorefailed", f"{type(e).__name__}: {e}"[:200])
            loop = load_factory(spec.factory)()
    ckpt = open_checkpointer(engine, directory, phase_hook=tracker, **job.get("settings", {}))
    chan.send("resumed", start)

    def committed(h):
        if h.error is None:
            chan.send("committed", h.step)

    for k in range(start, spec.steps):
        if tracker.wants_idle():
            ckpt.wait_all()                  # the kill is to land with nothing in flight
        tracker(Phase.IDLE.value, "step", k)
        loop.step(k)
        chan.send("trained", k + 1)
        if (k + 1) % spec.every == 0 or k + 1 == spec.steps:
            tracker(Phase.STAGING.value, "capture", k + 1)
            if getattr(ckpt, "cow", False):
                # copy-on-write: the adapter freezes what the engine writes in place
                adapter = getattr(loop, "adapter", None)
                if not hasattr(adapter, "cow_stats"):
                    raise CheckpointError(f"engine {engine} needs a torch loop (the torch "
                                          "adapter's copy-on-write saves)")
                adapter.cow_min_bytes = ckpt.cow_min_bytes
                adapter.cow_policy = ckpt.cow_policy
                handle = adapter.save(ckpt, k + 1, data_position=k + 1, cow=True)
            else:
                state, meta = loop.capture(k + 1)
                handle = ckpt.save(k + 1, state, meta)
            handle.add_done_callback(committed)
    ckpt.wait_all()
    ckpt.close()
    state, meta = loop.capture(spec.steps)
    _save_npz(Path(job["final"]), state, meta)
    chan.send("done", spec.steps)
    return 0


def _record_reference(loop, spec: LoopSpec, out: Path, chan: _Channel) -> int:
    steps = {}
    for k in range(spec.steps):
        loop.step(k)
        if (k + 1) % spec.every == 0 or k + 1 == spec.steps:
            state, meta = loop.capture(k + 1)
            steps[k + 1] = fingerprint(state, meta)
    state, meta = loop.capture(spec.steps)
    _save_npz(out / "reference-final.npz", state, meta)
    (out / "reference.json").write_text(json.dumps(Reference(steps).to_json()))
    chan.send("done", spec.steps)
    return 0


# -- the zygote --------------------------------------------------------------------------------

def _zygote_main(argv: list[str]) -> int:
    factory, fd, threads = argv[0], int(argv[1]), int(argv[2])
    preload = argv[3].split(",") if len(argv) > 3 and argv[3] else []
    try:
        import torch
        torch.set_num_threads(threads)      # before any torch work: forked children must not
        torch.set_num_interop_threads(1)    # inherit a thread pool (OpenMP is not fork-safe)
    except ImportError:
        pass
    for mod in preload:
        importlib.import_module(mod)
    from faultlab.checkpointing import baselines  # noqa: F401  (imported once here, not in every child)
    make = load_factory(factory)
    if getattr(make, "fork_safe", True):
        make()                               # warm caches (datasets, lazy imports)
    os.write(fd, f"0 ready {os.getpid()}\n".encode())
    children: set[int] = set()
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "spawn":
            job = cmd["job"]
            pid = os.fork()
            if pid == 0:                     # the training process
                code = 1
                try:
                    sys.stdin.close()
                    os.dup2(os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND), 2)
                    code = _child_main(job, fd)
                except BaseException as e:
                    traceback.print_exc()
                    try:
                        _Channel(fd, job["token"]).send(
                            "error", f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
                    except OSError:
                        pass
                finally:
                    os._exit(code)
            children.add(pid)
            os.write(fd, f"{job['token']} spawned {pid}\n".encode())
        elif cmd["cmd"] == "reap":
            pid = cmd["pid"]
            _, status = os.waitpid(pid, 0)
            children.discard(pid)
            os.write(fd, f"{cmd['token']} reaped {os.waitstatus_to_exitcode(status)}\n".encode())
    for pid in children:                     # the parent went away: leave nothing behind
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass
    return 0


class Zygote:
    """A process that has imported the training code; forks training processes on demand."""

    def __init__(self, factory: str, workdir: Path, *, threads: int = 1,
                 preload: Sequence[str] = (), timeout: float = 120.0):
        self.factory, self.timeout = factory, timeout
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        r, w = os.pipe()
        self._r = r
        self._buf = b""
        self._pending: dict[int, list] = {}
        self._token = 0
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in [root, os.getcwd(),
                                                        env.get("PYTHONPATH", "")] if p)
        self.log = self.workdir / "zygote.log"
        with open(self.log, "ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "faultlab.crash.harness", "--zygote", factory,
                 str(w), str(threads), ",".join(preload)],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log, pass_fds=(w,),
                env=env, text=True)
        os.close(w)
        try:
            self._expect(0, "ready", timeout=max(timeout, 300.0))
        except BaseException:
            self.close()
            raise

    # messages ----------------------------------------------------------------------------

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self._r], [], [], timeout)
        if not ready:
            return False
        data = os.read(self._r, 1 << 16)
        if not data:
            raise CrashCampaignError(f"the zygote exited (log: {self.log}): {self._tail()}")
        self._buf += data
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            parts = [unquote(p) for p in line.decode().split(" ")]
            self._pending.setdefault(int(parts[0]), []).append(parts[1:])
        return True

    def next(self, token: int, timeout: float | None = None) -> list[str] | None:
        """The next message of `token` ([kind, args...]); None after `timeout` seconds."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            q = self._pending.get(token)
            if q:
                return q.pop(0)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._read(left)

    def _expect(self, token: int, kind: str, timeout: float | None = None) -> list[str]:
        while True:
            msg = self.next(token, timeout)
            if msg is None:
                raise CrashCampaignError(f"no '{kind}' from the zygote within "
                                         f"{timeout or self.timeout:.0f} s (log: {self.log}): "
                                         f"{self._tail()}")
            if msg[0] == kind:
                return msg
            if token == 0:
                continue

    def _tail(self) -> str:
        try:
            lines = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1] if lines else ""

    # commands ------------------------------------------------------------------------------

    def _send(self, cmd: dict) -> None:
        if self._proc.poll() is not None:
            raise CrashCampaignError(f"the zygote exited (log: {self.log}): {self._tail()}")
        self._proc.stdin.write(json.dumps(cmd) + "\n")
        self._proc.stdin.flush()

    def spawn(self, job: dict) -> tuple[int, int]:
        """Fork a training process for `job`; returns (token, pid)."""
        self._token += 1
        token = self._token
        job = dict(job, token=token, log=str(self.workdir / "children.log"))
        self._send({"cmd": "spawn", "job": job})
        # messages of the child may come before "spawned": keep them queued for the caller
        while True:
            q = self._pending.get(token, [])
            for i, msg in enumerate(q):
                if msg[0] == "spawned":
                    del q[i]
                    return token, int(msg[1])
            if not self._read(self.timeout):
                raise CrashCampaignError(f"the zygote did not fork within {self.timeout:.0f} s")

    def reap(self, token: int, pid: int) -> list[list[str]]:
        """Wait for the process to end; returns its remaining messages, the last being
        ["reaped", exit code] (negative: killed by that signal)."""
        self._send({"cmd": "reap", "pid": pid, "token": token})
        out = []
        while True:
            msg = self.next(token)
            if msg is None:
                raise CrashCampaignError(f"training process {pid} did not end "
                                         f"(log: {self.workdir / 'children.log'})")
            out.append(msg)
            if msg[0] == "reaped":
                return out

    def close(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            try:
                proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if getattr(self, "_r", None) is not None:
            os.close(self._r)
            self._r = None


# -- kill campaigns ------------------------------------------------------------------------------

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
        return self.verdicts[Verdict.TORN.value]

    @property
    def mixed(self) -> int:
        return self.verdicts[Verdict.MIXED.value]

    @property
    def lost(self) -> int:
        return self.verdicts[Verdict.LOST.value]

    @property
    def ok(self) -> bool:
        """No torn, mixed or lost-committed checkpoint, and every run / resume bit-identical."""
        return not (self.torn or self.mixed or self.lost) and self.runs_identical == self.runs \
            and self.resumes_identical == self.resumes

    def to_json(self) -> dict:
        lost = self.steps_lost
        return {"engine": self.engine, "mode": self.mode, "kills": self.kills,
                "recoveries": self.recoveries, "exact": self.verdicts[Verdict.EXACT.value],
                "nothing_committed": self.verdicts[Verdict.NONE.value],
                "torn": self.torn, "mixed": self.mixed, "lost_committed": self.lost,
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

    @property
    def ok(self) -> bool:
        return self.identical and all(k.verdict in (Verdict.EXACT.value, Verdict.NONE.value)
                                      for k in self.kills)

    def explain(self) -> str:
        bad = [f"{k.point} ({k.where}): {k.verdict} {k.detail}" for k in self.kills
               if k.verdict not in (Verdict.EXACT.value, Verdict.NONE.value)]
        if not self.identical:
            bad.append(f"final state differs from the uninterrupted run in {self.differing[:8]}")
        return "; ".join(bad) or "ok"

    def assert_ok(self) -> None:
        """AssertionError naming every torn / mixed / lost checkpoint and any difference."""
        if not self.ok:
            raise AssertionError(f"crash-recovery failure after {len(self.kills)} kill(s): "
                                 f"{self.explain()}")


class KillCampaign:
    """Kill campaigns of one training loop against any engine (one zygote, reused)."""

    def __init__(self, loop: LoopSpec, workdir: str | os.PathLike, *, threads: int = 1,
                 preload: Sequence[str] = (), timeout: float = 120.0,
                 zygote: Zygote | None = None):
        self.loop = loop
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._own_zygote = zygote is None
        if zygote is not None and zygote.factory != loop.factory:
            raise FaultlabError(f"zygote runs {zygote.factory}, not {loop.factory}")
        self.zygote = zygote or Zygote(loop.factory, self.workdir / "zygote", threads=threads,
                                       preload=preload, timeout=timeout)
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
        lets it finish, ending the run early), then one to the end; verify everything."""
        from faultlab.checkpointing.baselines import recover_checkpoint
        ref = self.reference()
        self._runs += 1
        directory = self.workdir / f"{engine}-run{self._runs}"
        directory.mkdir(parents=True, exist_ok=True)
        final = directory / "final.npz"
        settings = dict(DEFAULT_SETTINGS.get(engine, {}) if settings is None else settings)
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
                            final=str(final), kill=kill.to_json() if kill else None)
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
                        self._wait_reading(token, jitter * rng.random())
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
                verdict, detail = classify(recovered, ref, committed)
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
        differing = same_state(_load_npz(final), _load_npz(ref.final_path))
        return RunResult(records, not differing, differing, restarts, restore_failures)

    def _wait_reading(self, token: int, seconds: float) -> None:
        """Let `seconds` pass while still collecting the process's messages (race kills)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.zygote._read(left)

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


def _tally(rep: EngineReport, result: RunResult) -> None:
    rep.runs += 1
    rep.runs_identical += result.identical
    if not result.identical:
        rep.problems.append(f"run {rep.runs}: final state differs in {result.differing[:5]}")
    rep.problems.extend(result.restore_failures)
    for k in result.kills:
        rep.kills += 1
        rep.phases[k.phase] += 1
        rep.verdicts[k.verdict] += 1
        if k.verdict in (Verdict.EXACT.value, Verdict.NONE.value):
            rep.recoveries += 1
        else:
            rep.problems.append(f"{k.point} at {k.where}: {k.verdict}: {k.detail}")
        rep.steps_lost.append(k.steps_lost)


def _raise_child_error(msgs: Iterable[list[str]], zygote: Zygote) -> None:
    for m in msgs:
        if m and m[0] == "error":
            raise CrashCampaignError(f"training process failed: {' '.join(m[1:])} "
                                     f"(log: {zygote.workdir / 'children.log'})")


# -- power-loss campaigns (the engine on a SimDisk, in this process) ---------------------------

def _commit_log(log) -> tuple[list[tuple[int, int, int, int | None]], Any]:
    """(counter, step, op index of its record write, op index of the sync after it) for every
    commit record written, read from a SimDisk operation log."""
    geom, out, unsynced = None, [], []
    for i, op in enumerate(log):
        if op[0] == "create":
            geom = decode_header(op[2])
        elif op[0] == "write" and geom is not None:
            offset, data = op[1], op[2]
            if geom.records_offset <= offset < geom.slots_offset:
                try:
                    rec = decode_record(data, geom, (offset - geom.records_offset)
                                        // geom.block_size)
                except FormatError:
                    continue
                unsynced.append((rec.counter, rec.step, i))
        elif op[0] == "sync":
            out.extend((c, s, w, i) for c, s, w in unsynced)
            unsynced = []
    out.extend((c, s, w, None) for c, s, w in unsynced)
    return out, geom


def power_loss_campaign(factory: str | Callable, *, steps: int = 12, every: int = 1,
                        settings: Mapping | None = None, points: int | None = 60,
                        images_per_point: int = 12, resumes: int = 8, seed: int = 0,
                        block_size: int = 512, progress: Callable[[], None] | None = None,
                        cow: bool = False) -> EngineReport:
    """Run the loop with the engine on a SimDisk, then check power-loss images at `points`
    crash points (None: every operation) and resume `resumes` of them to the end. cow: save
    through the torch adapter's copy-on-write mode (engine "faultlab+cow")."""
    from faultlab.checkpointing.engine import CheckpointEngine
    from faultlab.checkpointing.recovery import recover
    from faultlab.checkpointing.simdisk import CrashChoice, SimDisk
    t0 = time.perf_counter()
    make = load_factory(factory_name(factory)) if isinstance(factory, str) else factory
    settings = dict({"max_in_flight": 2, "keep": 2, "chunk_bytes": 2048, "pool_bytes": 8192,
                     "writers": 2} if settings is None else settings)
    rep = EngineReport("faultlab+cow" if cow else "faultlab", mode="power-loss")
    disk = SimDisk(block_size=block_size, sector_size=min(512, block_size))
    loop = make()
    ref_steps: dict[int, dict[str, str]] = {}
    trained_at_op: list[tuple[int, int]] = []          # (ops logged so far, steps trained)
    with CheckpointEngine(disk, block_size=block_size, **settings) as eng:
        for k in range(steps):
            loop.step(k)
            trained_at_op.append((len(disk.log), k + 1))
            if (k + 1) % every == 0 or k + 1 == steps:
                state, meta = loop.capture(k + 1)
                ref_steps[k + 1] = fingerprint(state, meta)
                if cow:
                    loop.adapter.cow_min_bytes, loop.adapter.cow_policy = 1, "redirect"
                    loop.adapter.save(eng, k + 1, data_position=k + 1, cow=True)
                else:
                    eng.save(k + 1, state, meta)
    final_state, final_meta = loop.capture(steps)
    final = {k: np.array(v) for k, v in final_state.items()}
    final_fp = fingerprint(final_state, final_meta)
    ref = Reference(ref_steps)
    timeline, _ = _commit_log(disk.log)
    rng = random.Random(seed)
    total = len(disk.log) + 1
    chosen = set(range(total) if points is None or points >= total else
                 rng.sample(range(total), points))
    candidates = []
    for k, state in disk.crash_states():
        if k not in chosen:
            continue
        rep.crash_points += 1
        durable = [s for c, s, _, sy in timeline if sy is not None and sy < k]
        newest = max(durable, default=None)
        trained = max((t for n, t in trained_at_op if n <= k), default=0)
        images = [img for _, img in state.enumerate_images(images_per_point, seed=k)]
        if state.exists():
            images.insert(0, state.crash_image(choice=CrashChoice((0,) * len(state.pending()))))
        for image in images:
            rep.images += 1
            try:
                got = recover(image)
                recovered = (got.step, got.state, got.meta)
            except CheckpointError as e:
                recovered = e
            verdict, detail = classify(recovered, ref, newest)
            rep.verdicts[verdict.value] += 1
            rec_step = None if isinstance(recovered, BaseException) else recovered[0]
            rep.steps_lost.append(trained - (rec_step or 0))
            if verdict in (Verdict.EXACT, Verdict.NONE):
                rep.recoveries += 1
                if verdict is Verdict.EXACT:
                    candidates.append((k, recovered))
            else:
                rep.problems.append(f"crash point {k}: {verdict.value}: {detail}")
        if progress:
            progress()
    # Resume some recovered images to the end; the final state must equal the reference's.
    by_step: dict[int, tuple] = {}
    for k, rec in candidates:
        by_step.setdefault(rec[0], rec)
    picks = list(by_step.values())
    rng.shuffle(picks)
    for step, state, meta in picks[:resumes]:
        fresh = make()
        fresh.restore(state, meta)
        for k in range(step, steps):
            fresh.step(k)
        s2, m2 = fresh.capture(steps)
        rep.resumes += 1
        if fingerprint(s2, m2) == final_fp and not same_state(s2, final):
            rep.resumes_identical += 1
        else:
            rep.problems.append(f"resume from step {step}: final state differs")
    rep.runs = rep.runs_identical = 0
    rep.wall_s = time.perf_counter() - t0
    return rep


# -- one call for the command line -------------------------------------------------------------

def format_reports(reports: Sequence[EngineReport]) -> str:
    """A readable table of campaign reports."""
    lines = []
    kill = [r for r in reports if r.mode == "kill"]
    if kill:
        head = ("engine", "kills", "recoveries", "torn", "mixed", "lost-committed",
                "steps lost mean/max", "runs bit-identical", "kills by phase s/w/c/i")
        rows = []
        for r in kill:
            j = r.to_json()
            ph = "/".join(str(r.phases.get(p.value, 0)) for p in Phase)
            rows.append((r.engine, str(r.kills), str(r.recoveries), str(r.torn), str(r.mixed),
                         str(r.lost), f"{j['steps_lost_mean']:.2f} / {j['steps_lost_max']}",
                         f"{r.runs_identical}/{r.runs}", ph))
        lines += _table(head, rows)
    power = [r for r in reports if r.mode == "power-loss"]
    if power:
        if lines:
            lines.append("")
        head = ("engine (power loss)", "crash points", "images", "torn", "mixed",
                "lost-committed", "steps lost mean/max", "resumed bit-identical", "note")
        rows = []
        for r in power:
            j = r.to_json()
            rows.append((r.engine, str(r.crash_points), str(r.images), str(r.torn),
                         str(r.mixed), str(r.lost),
                         f"{j['steps_lost_mean']:.2f} / {j['steps_lost_max']}",
                         f"{r.resumes_identical}/{r.resumes}", r.note))
        lines += _table(head, rows)
    return "\n".join(lines)


def _table(head, rows) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    return [fmt.format(*head), "  ".join("-" * w for w in widths)] + [fmt.format(*r) for r in rows]


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--zygote":
        sys.exit(_zygote_main(sys.argv[2:]))
    sys.exit("usage: faultlab crash --help (this module's entry point is internal)")
