"""faultlab: hardware-style fault injection, detection and recovery for DL training.

The public API is a set of small modules: ``faultlab.torch`` and ``faultlab.keras`` (faults,
protection and checkpoints in your own loop), ``faultlab.checkpointing`` (the persistent
concurrent checkpoint engine), ``faultlab.testing`` (crash-recovery property tests, a pytest
plugin), ``faultlab.results`` (the results store and its exports). The fault model's values
are re-exported here with ``fault(...)``, the framework-free fault builder, and
``allowing([...])``: a context manager in which the user code named
(entries as for ``--allow-workload``) may be loaded from campaign files (docs/workloads.md,
"Allowing your code"); importing ``faultlab`` imports neither a framework nor NumPy.
"""

from __future__ import annotations

from faultlab.lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {n: "faultlab.faults" for n in (
    "FaultSpec", "ValueSpec", "PositionSpec", "Duration", "Site", "ValueModel", "BitLayout",
    "PositionMode", "DurationKind", "Framework", "fault")}
_EXPORTS.update({"FaultlabError": "faultlab.errors", "SpecError": "faultlab.errors",
                 "CheckpointError": "faultlab.errors", "load_campaign": "faultlab.campaigns",
                 "WorkloadConfig": "faultlab.workloads.base",
                 "default_config": "faultlab.workloads.base",
                 "allowing": "faultlab.workloads.allow"})

__all__ = ["__version__", *sorted(_EXPORTS)]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
