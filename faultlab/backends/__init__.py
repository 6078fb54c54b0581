"""The one registry of frameworks.

Each framework is one folder under ``faultlab/backends/`` (the same module names in each) and
one line in :data:`REGISTRY`. Everything else in faultlab reads the frameworks from here: the
``Framework`` enum, the CLI's ``--framework`` choices, the worker pool's thread setup, the
checkpointer and crash-loop registries, the hypothesis strategies. This module imports no
framework and nothing of faultlab but its errors, so any part of the core may import it.
"""

from __future__ import annotations

import enum
import importlib
import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING

from faultlab.errors import FaultlabError

if TYPE_CHECKING:
    from faultlab.backends.base import Backend


@dataclass(frozen=True)
class BackendEntry:
    """A registry line: a framework's name, its backend package and what it needs installed."""

    name: str      #: as campaign files and ``--framework`` write it
    module: str    #: the backend package; importing it must not import the framework
    package: str   #: the distribution the framework needs (looked up, never imported here)
    extra: str     #: the pip extra that installs it


REGISTRY: tuple[BackendEntry, ...] = (
    BackendEntry("torch", "faultlab.backends.torch", "torch", "faultlab[torch]"),
    BackendEntry("tf", "faultlab.backends.tf", "tensorflow", "faultlab[tf]"),
)

#: the closed set of frameworks, one member per registry line (Framework.TORCH == "torch")
Framework = enum.Enum("Framework", [(e.name.upper(), e.name) for e in REGISTRY], type=str,
                      module=__name__, qualname="Framework")

_ENTRIES = {e.name: e for e in REGISTRY}


def names() -> list[str]:
    """Every registered framework's name, in registry order (the first is the default)."""
    return [e.name for e in REGISTRY]


def entry(framework: "Framework | str") -> BackendEntry:
    fw = framework.value if isinstance(framework, Framework) else str(framework)
    try:
        return _ENTRIES[fw]
    except KeyError:
        raise FaultlabError(f"unknown framework {fw!r} (one of: {', '.join(names())})") from None


def installed(framework: "Framework | str") -> bool:
    """Whether the framework's package can be imported (found, not imported)."""
    pkg = entry(framework).package
    try:
        return importlib.util.find_spec(pkg) is not None
    except (ImportError, ValueError):
        return False


def backend_module(framework: "Framework | str"):
    """The backend package of a framework: cheap to import (the framework itself is imported
    by the modules inside it, when a trainer, adapter or checkpointer is first used)."""
    return importlib.import_module(entry(framework).module)


def load_backend(framework: "Framework | str") -> "Backend":
    """The backend of a framework, with a pip hint when the framework is not installed."""
    e = entry(framework)
    if not installed(e.name):
        raise FaultlabError(f"framework {e.name} needs {e.package}: pip install '{e.extra}'")
    return backend_module(e.name).BACKEND


def load_backends() -> "list[Backend]":
    """The backends of every registered framework (their packages import no framework)."""
    return [backend_module(n).BACKEND for n in names()]
