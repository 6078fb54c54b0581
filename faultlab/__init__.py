"""faultlab: hardware-style fault injection, detection and recovery for DL training.

The public API is a set of small modules: ``faultlab.torch`` and ``faultlab.keras`` (faults,
protection and checkpoints in your own loop), ``faultlab.checkpointing`` (the persistent
concurrent checkpoint engine), ``faultlab.testing`` (crash-recovery property tests, a pytest
plugin), ``faultlab.results`` (the results store and its exports). The fault model's values
are re-exported here; importing ``faultlab`` imports neither a framework nor NumPy.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_NAMES = {n: "faultlab.faults" for n in (
    "FaultSpec", "ValueSpec", "PositionSpec", "Duration", "Site", "ValueModel", "BitLayout",
    "PositionMode", "DurationKind", "Framework")}
_NAMES.update({"FaultlabError": "faultlab.errors", "SpecError": "faultlab.errors",
               "CheckpointError": "faultlab.errors", "load_campaign": "faultlab.campaigns",
               "WorkloadConfig": "faultlab.workloads.base",
               "default_config": "faultlab.workloads.base"})

__all__ = ["__version__", *sorted(_NAMES)]


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_NAMES[name]), name)
    globals()[name] = value
    return value
