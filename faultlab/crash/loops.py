"""Training loops a crash campaign kills and resumes: the TrainingLoop protocol, script-style
loops (a function that trains from a resume point, driven as a TrainingLoop by ScriptLoop),
which loop to run (LoopSpec), and loading a loop factory by name ("module:function",
"file.py:function" or a built-in loop of a backend's ``crash_loops``)."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

from faultlab.backends import entry, load_backend, load_backends, names as framework_names
from faultlab.errors import FaultlabError


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


class ResumePoint(NamedTuple):
    """What a script-style loop resumes from: the step its checkpoint was saved after and the
    state it passed to checkpoint() there (arrays come back as the framework's tensors)."""

    step: int
    state: dict


#: a script-style loop: train(resume, checkpoint, steps) -> final state (see ScriptLoop)
ScriptFunction = Callable[[ResumePoint | None, Callable[[int, Mapping], None], int], Mapping]


class ScriptLoop:
    """A script-style loop driven as a TrainingLoop, so that it runs on the same harness.

    The script is a plain function ``train(resume, checkpoint, steps) -> state``: it builds
    and seeds everything, loads ``resume.state`` when `resume` is a ResumePoint (None: a fresh
    start), trains from ``resume.step`` (or 0) to `steps`, calls ``checkpoint(k, state)``
    after step k wherever it may be checkpointed (every step, or at least every `every` steps
    the campaign saves at), and returns its final state. A state is a dict of tensors, arrays
    and plain values (``model.state_dict()``, ``optimizer.state_dict()``, RNG states...); it
    is encoded by the checkpoint adapter of the framework the script's module imported (none:
    NumPy arrays), with no global generator of its own: what the state leaves out is not
    saved.

    The script runs in a thread of the training process; step(k) lets it run until it calls
    checkpoint with a step >= k + 1 (or returns), where it waits until the campaign has taken
    the state. capture(step) encodes the state passed at `step`; finish() lets the script
    return and encodes the state it returns (the final state the campaign compares).
    """

    def __init__(self, script: ScriptFunction, steps: int):
        self.script, self.steps = script, steps
        self.name = getattr(script, "__qualname__", repr(script))
        self._resume: ResumePoint | None = None
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._at: int | None = None          # the step of the checkpoint() call waiting
        self._state: Mapping | None = None
        self._go = False
        self._done = False
        self._result: Any = None
        self._error: BaseException | None = None
        self._codec = None

    # the TrainingLoop protocol ------------------------------------------------------------

    def step(self, k: int) -> None:
        if self._at is not None and self._at >= k + 1:
            return                           # the script checkpoints less often: already there
        self._run_until(k + 1)

    def capture(self, step: int) -> tuple[dict[str, np.ndarray], dict]:
        if self._at == step and not self._done:
            return self._encode(step, self._state)
        if self._done and step == self.steps:
            return self._encode(step, self._result)
        where = (f"it called checkpoint({self._at}, ...) last" if self._at is not None else
                 "it has not called checkpoint() yet")
        raise FaultlabError(f"script loop {self.name}: the campaign saves after step {step} "
                            f"but {where}; call checkpoint(k, state) after every step k (or "
                            "pass every= a multiple of how often the script checkpoints)")

    def restore(self, state: Mapping[str, np.ndarray], meta: Mapping) -> None:
        if self._thread is not None:
            raise FaultlabError(f"script loop {self.name}: restore() after it started")
        resume = self._adapter().restore({_EXTRA + k: v for k, v in state.items()}, meta)
        self._resume = ResumePoint(int(resume.step), dict(resume.extra))
        self._at = self._resume.step

    def finish(self) -> tuple[dict[str, np.ndarray], dict]:
        """Let the script return; its final state, encoded as capture() does."""
        self._run_until(None)
        return self._encode(self.steps, self._result)

    # the script's thread ----------------------------------------------------------------

    def _checkpoint(self, step: int, state: Mapping) -> None:
        """The `checkpoint` the script calls: waits until the campaign has taken the state."""
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise FaultlabError(f"checkpoint(step, state): step must be an int, got "
                                f"{type(step).__name__}")
        step = int(step)
        last = self._at if self._at is not None else 0
        if not last < step <= self.steps:
            raise FaultlabError(f"script loop {self.name}: checkpoint({step}, ...) after "
                                f"step {last}: steps must increase, up to {self.steps}")
        if not isinstance(state, Mapping):
            raise FaultlabError(f"checkpoint(step, state): state must be a dict, got "
                                f"{type(state).__name__}")
        with self._cond:
            self._at, self._state, self._go = step, state, False
            self._cond.notify_all()
            while not self._go:
                self._cond.wait()

    def _main(self) -> None:
        try:
            result = self.script(self._resume, self._checkpoint, self.steps)
            if not isinstance(result, Mapping):
                raise FaultlabError(f"script loop {self.name} returned "
                                    f"{type(result).__name__}, not its final state (a dict)")
        except BaseException as e:           # handed to the campaign's thread
            with self._cond:
                self._error, self._done = e, True
                self._cond.notify_all()
        else:
            with self._cond:
                self._result, self._done = result, True
                self._cond.notify_all()

    def _run_until(self, target: int | None) -> None:
        """Let the script run until it waits in checkpoint(n >= target) or returns (None:
        until it returns)."""
        with self._cond:
            while True:
                if self._error is not None:
                    raise self._error
                if self._done:
                    if target is not None and target < self.steps:
                        raise FaultlabError(f"script loop {self.name} returned before step "
                                            f"{target} of {self.steps}")
                    return
                if target is not None and self._at is not None and self._at >= target \
                        and self._thread is not None and not self._go:
                    return
                if self._thread is None:
                    self._thread = threading.Thread(target=self._main, daemon=True,
                                                    name=f"faultlab-script-{self.name}")
                    self._go = True
                    self._thread.start()
                elif not self._go:
                    self._go = True
                    self._cond.notify_all()
                self._cond.wait()

    # encoding -----------------------------------------------------------------------------

    def _adapter(self):
        """The checkpoint adapter (no model, no global generators) of the first framework the
        process has imported, in registry order; none imported: NumPy arrays only."""
        if self._codec is None:
            self._codec = _NumpyCodec()
            for fw in framework_names():
                if entry(fw).package in sys.modules:
                    self._codec = load_backend(fw).checkpoint_adapter()(rng=False)
                    break
        return self._codec

    def _encode(self, step: int, state: Mapping) -> tuple[dict[str, np.ndarray], dict]:
        arrays, meta = self._adapter().capture(step, extra=dict(state))
        # every array is under the adapter's "extra/": named by the script's own keys
        return {k.removeprefix(_EXTRA): np.array(v) for k, v in arrays.items()}, meta


#: where an adapter puts the arrays of capture(extra=...)
_EXTRA = "extra/"


class _NumpyCodec:
    """capture / restore of a script's state when no framework is imported."""

    def capture(self, step: int, *, extra: Mapping) -> tuple[dict[str, np.ndarray], dict]:
        from faultlab.checkpointing.codec import Encoder
        enc = Encoder(lambda path, v: (np.array(v), {"__ndarray__": path}))
        meta = {"step": int(step), "extra": enc.encode(dict(extra), "extra")}
        return enc.arrays, meta

    def restore(self, state: Mapping[str, np.ndarray], meta: Mapping):
        from faultlab.checkpointing.adapter import Resume
        from faultlab.checkpointing.codec import decode
        return Resume(int(meta["step"]), None, decode(meta["extra"], state, lambda a, r: a))


def is_script(obj) -> bool:
    """Whether a loaded loop is a script-style function (three required parameters) rather
    than a loop factory (none); a one-line FaultlabError for anything else."""
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return False
    required = [p for p in params if p.default is p.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not required:
        return False
    if len(required) == 3 and not inspect.isclass(obj):
        return True
    name = getattr(obj, "__qualname__", repr(obj))
    raise FaultlabError(f"loop {name} takes {len(required)} argument(s): a loop factory takes "
                        "none, a script-style loop takes (resume, checkpoint, steps)")


def loop_maker(obj, steps: int) -> Callable[[], TrainingLoop]:
    """A no-argument function building the TrainingLoop of a loaded loop: the factory itself,
    or a ScriptLoop around a script-style function."""
    if is_script(obj):
        return lambda: ScriptLoop(obj, steps)
    return obj


def final_state(loop: TrainingLoop, steps: int) -> tuple[dict[str, np.ndarray], dict]:
    """The state a run ends with: capture(steps), or a ScriptLoop's finish() (the state its
    function returns)."""
    return loop.finish() if isinstance(loop, ScriptLoop) else loop.capture(steps)


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


class Sampler:
    """A stateful sampler for loops: a permutation of the dataset drawn from NumPy's global
    generator at each epoch start, and the position in it (saved through state_dict)."""

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


# -- built-in loops: each backend's crash_loops ---------------------------------------------

def builtin_loops() -> dict[str, tuple[str, str]]:
    """Every backend's built-in crash loop: name -> (framework, "module:factory"), in
    registry order (a framework's first loop is its default)."""
    out: dict[str, tuple[str, str]] = {}
    for backend in load_backends():
        for name, ref in backend.crash_loops.items():
            out.setdefault(name, (backend.name, ref))
    return out


def loop_framework(factory: str) -> str | None:
    """The framework of a built-in loop (by name or factory string); None for a user's loop
    (its factory says nothing of the framework it uses)."""
    for name, (framework, ref) in builtin_loops().items():
        if factory in (name, ref):
            return framework
    return None


def factory_name(factory: str | Callable) -> str:
    """"module:function" / "file.py:function" naming a loop factory (callables are located by
    their module's file, so a function in a test file works)."""
    if isinstance(factory, str):
        builtin = builtin_loops().get(factory)
        return builtin[1] if builtin else factory
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


def check_factory_allowed(name: str) -> None:
    """A loop factory named on the command line or in a file is imported only when allowed
    (faultlab/workloads/allow.py): the backends' built-in loops always are; a user's
    ``module:function`` or ``file.py:function`` needs ``--allow-workload`` (or an entry point,
    or ``[tool.faultlab] allow-workloads``). A SpecError otherwise, before anything is
    imported. Names given in code (LoopSpec, KillCampaign, the pytest plugin's callables) are
    the caller's choice and are not checked; the zygote and training processes only load
    names their parent passed on."""
    from faultlab.workloads.allow import check_allowed
    builtins = {n for item in builtin_loops().items() for n in (item[0], item[1][1])}
    check_allowed(name, "loop factory", builtins=builtins)


def load_factory(name: str) -> Callable:
    """The loop factory (or script-style loop: see loop_maker) a name (from factory_name)
    designates, its module imported (no allow-list check: see check_factory_allowed)."""
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
