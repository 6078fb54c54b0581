"""The contracts every checkpointer meets, and the one registry of checkpointers.

A *checkpointer* persists ``{name: numpy array}`` states with a JSON-able meta and recovers the
newest intact one. The engine (``faultlab``), its copy-on-write feed (``faultlab+cow``), the
baselines it is measured against and the negative control all implement :class:`Checkpointer`;
the framework-free ones are listed in :data:`CORE_CHECKPOINTERS`, each backend lists its own
(``Backend.checkpointers``), and :func:`checkpointer_class` finds any of them by name.

Call order of one checkpointer (the contract the crash harness and the benchmarks rely on):

0. ``open_checkpointer(name, directory, phase_hook=..., **settings)`` builds it; bad settings
   raise FaultlabError there, not at the first save.
1. ``save(step, state, meta)`` returns a :class:`SaveFuture` once the state is captured (the
   caller may change its arrays from then on; a ``borrowed`` engine save is the exception);
   up to the checkpointer's in-flight limit, training goes on while it persists.
2. ``future.wait()`` returns when that checkpoint is durable, or raises CheckpointError.
3. ``wait_all()`` waits for every save in flight; ``close()`` waits too, then releases files.
4. ``cls.recover(target)`` (through :func:`recover_checkpoint`) returns the newest checkpoint
   that loads and verifies as :class:`Loaded`, falling back to older ones.

During 1-3 a checkpointer calls ``phase_hook(phase, point, step)`` at each point a crash
campaign may kill it (:class:`Phase`); the hook never changes what is written.

Class attributes each checkpointer class declares (read by the CLI, the crash harness and the
hypothesis strategies, so no caller keeps per-engine knowledge of its own):

* ``name``: its registry name; ``framework``: the framework it needs installed, or None;
* ``loop_framework``: the framework whose training loop its saves need (faultlab+cow: the
  torch adapter's copy-on-write saves), or None when it stores any loop's arrays;
* ``file_target``: the file it keeps inside its directory, or None for a directory of its own;
* ``default_settings``: settings a kill campaign uses unless told otherwise;
* ``settings_space``: ``{setting: (choices...)}`` that property-based tests draw from.
"""

from __future__ import annotations

import enum
import importlib
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Protocol

import numpy as np

from faultlab.errors import CheckpointError, FaultlabError


class Phase(str, enum.Enum):
    """Where a checkpointer (or the training loop around it) is when a kill lands."""

    STAGING = "staging"          # the state is being captured / copied for a save
    WRITING = "writing"          # data on its way to the file
    COMMITTING = "committing"    # syncs, commit record, rename, metadata
    IDLE = "idle"                # between steps, no checkpoint in flight

    # a phase hook may receive these or the plain strings: both print as the value
    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


#: phase_hook(phase, point, step): called at every point a crash campaign may kill
PhaseHook = Callable[[str, str, int], None]


def no_hook(phase: str, point: str, step: int) -> None:
    """The phase hook of a checkpointer nobody is watching."""


class Loaded(NamedTuple):
    """A recovered checkpoint: (step, state, meta)."""

    step: int
    state: dict
    meta: dict


class SaveFuture:
    """The future of one save: done once the checkpoint is durable, or once it has failed.

    The one future type of every checkpointer (the engine's saves add their commit record as
    the result). Callbacks run in the thread that finishes the save."""

    def __init__(self, step: int):
        self.step = step
        self._event = threading.Event()
        self._result: Any = None
        self._error: CheckpointError | None = None
        self._observed = False
        self._callbacks: list[Callable[[SaveFuture], None]] = []
        self._lock = threading.Lock()
        self.finished_at: float | None = None       # time.perf_counter() when it finished

    def done(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> Any:
        """Block until durable; return the result (the engine: its CommitInfo; the others:
        the step) or raise the save's CheckpointError."""
        if not self._event.wait(timeout):
            raise TimeoutError(f"checkpoint of step {self.step} still in flight")
        if self._error is not None:
            self._observed = True
            raise self._error
        return self._result

    @property
    def error(self) -> CheckpointError | None:
        """The failure of a finished save (None while in flight or once durable)."""
        if self._error is not None:
            self._observed = True
        return self._error

    def join(self, timeout: float | None = None) -> bool:
        """Block until the save has finished, durable or failed, without raising its failure
        (nor counting it as seen); return whether it has finished."""
        return self._event.wait(timeout)

    @property
    def observed(self) -> bool:
        """Whether someone has been told of this save's failure (wait() raised it, or its
        error was read, or mark_observed() was called)."""
        return self._observed

    def mark_observed(self) -> None:
        """Count the failure as seen (its owner has reported it another way)."""
        self._observed = True

    def add_done_callback(self, fn: Callable[[SaveFuture], None]) -> None:
        """Call fn(future) when the save finishes (at once if it has)."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        """Mark the save durable (``result``) or failed (``error``, wrapped in a
        CheckpointError when it is another exception); runs the callbacks."""
        if error is not None and not isinstance(error, CheckpointError):
            error = CheckpointError(f"checkpoint of step {self.step} failed: "
                                    f"{type(error).__name__}: {error}")
        self.finished_at = time.perf_counter()
        with self._lock:
            self._result = self.step if result is None and error is None else result
            self._error = error
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)

    def __repr__(self) -> str:
        state = "pending" if not self.done() else ("failed" if self._error else "durable")
        return f"<{type(self).__name__} step={self.step} {state}>"


class Checkpointer(Protocol):
    """What the engine and every baseline provide (call order: the module docstring)."""

    name: ClassVar[str]
    framework: ClassVar[str | None]
    loop_framework: ClassVar[str | None]
    file_target: ClassVar[str | None]
    default_settings: ClassVar[Mapping[str, Any]]
    settings_space: ClassVar[Mapping[str, tuple]]

    def save(self, step: int, state: Mapping[str, np.ndarray],
             meta: Mapping | None = None) -> SaveFuture: ...

    def wait_all(self) -> None: ...

    def close(self) -> None: ...

    @property
    def in_flight(self) -> int: ...

    @classmethod
    def recover(cls, target: Path) -> Loaded: ...


# -- the registry --------------------------------------------------------------------------------

#: checkpointers that need no framework: name -> "module:Class"
CORE_CHECKPOINTERS = {
    "faultlab": "faultlab.checkpointing.hooked:EngineCheckpointer",
    "naive": "faultlab.checkpointing.naive:NaiveInPlace",
}
#: what `faultlab crash --engine all` and the checkpoint benchmark compare
COMPARED = ("faultlab", "faultlab+cow", "sync", "checkfreq", "dcp-async")


def _entries() -> dict[str, tuple[str | None, str]]:
    """name -> (framework or None, "module:Class"): the core first, then each backend's."""
    from faultlab.backends import load_backends
    out: dict[str, tuple[str | None, str]] = {n: (None, r) for n, r in CORE_CHECKPOINTERS.items()}
    for b in load_backends():
        out.update({n: (b.name, r) for n, r in b.checkpointers.items()})
    return out


def checkpointer_names() -> list[str]:
    """Every registered checkpointer (whether or not its framework is installed)."""
    return list(_entries())


def checkpointer_framework(name: str) -> str | None:
    """The framework checkpointer `name` needs, or None (FaultlabError when unknown)."""
    return _entry(name)[0]


def _entry(name: str) -> tuple[str | None, str]:
    entries = _entries()
    try:
        return entries[name]
    except KeyError:
        raise FaultlabError(f"unknown checkpoint engine {name!r} "
                            f"(one of: {', '.join(entries)})") from None


def checkpointer_class(name: str) -> type:
    """The class of checkpointer `name` (imports its module, and so its framework)."""
    framework, ref = _entry(name)
    if framework is not None:
        from faultlab.backends import load_backend
        load_backend(framework)          # a one-line error with a pip hint when missing
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def target_path(name: str, directory: str | os.PathLike) -> Path:
    """Where checkpointer `name` keeps its checkpoints inside `directory`."""
    target = checkpointer_class(name).file_target
    return Path(directory) / (target or name)


def open_checkpointer(name: str, directory: str | os.PathLike, *,
                      phase_hook: PhaseHook | None = None, **settings) -> Checkpointer:
    """A checkpointer `name` that keeps its files inside `directory`."""
    cls = checkpointer_class(name)
    Path(directory).mkdir(parents=True, exist_ok=True)
    try:
        return cls(target_path(name, directory), phase_hook=phase_hook, **settings)
    except TypeError as e:
        raise FaultlabError(f"bad settings for engine {name}: {e}") from None


def recover_checkpoint(name: str, directory: str | os.PathLike) -> Loaded:
    """The newest checkpoint `name` can recover from `directory` (CheckpointError if none:
    missing, foreign or damaged beyond every fallback)."""
    cls = checkpointer_class(name)
    target = target_path(name, directory)
    if cls.file_target is None and not target.exists():
        raise CheckpointError(f"no committed checkpoint in {target}")
    return cls.recover(target)
