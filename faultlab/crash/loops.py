"""Training loops a crash campaign kills and resumes: the TrainingLoop protocol, which loop
to run (LoopSpec), and loading a loop factory by name ("module:function", "file.py:function"
or a built-in loop of a backend's ``crash_loops``)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from faultlab.backends import load_backends
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


def load_factory(name: str) -> Callable[[], TrainingLoop]:
    """The loop factory a name (from factory_name) designates, its module imported (no
    allow-list check: see check_factory_allowed)."""
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
