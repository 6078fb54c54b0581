"""Property-based crash-recovery testing for your own training loops.

* `faultlab.testing.strategies`: hypothesis strategies for kill points, kill plans and engine
  settings.
* `crash_lab`: a session-scoped pytest fixture (the `faultlab` pytest plugin, installed with
  the package) whose `run(make_loop, kills=..., engine=..., settings=...)` SIGKILLs a real
  training process at each kill point, restarts it from the recovered checkpoint, and returns
  a RunResult (`assert_ok()`: no torn, mixed or lost-committed checkpoint, final state
  bit-identical to an uninterrupted run).
* `TrainingLoop`: what `make_loop()` returns -- step(k), capture(step), restore(state, meta);
  `TorchCheckpointAdapter` does capture / restore for torch.

A worked example: examples/test_my_training_crash.py; the guide: docs/checkpointing.md.
"""

from faultlab.backends.torch.adapter import Resume, TorchCheckpointAdapter
from faultlab.crash.harness import (KillPoint, KillRecord, Phase, RunResult, TrainingLoop,
                                   Verdict)


def __getattr__(name):
    # Imported on first use only: the pytest plugin, so that pytest (which registers it from
    # the entry point) imports it first and can rewrite it; the strategies, so that loading
    # the plugin in an environment without hypothesis costs nothing and breaks nothing.
    import importlib
    if name in ("CrashLab", "crash_lab"):
        return getattr(importlib.import_module(".plugin", __name__), name)
    if name == "strategies":
        return importlib.import_module(".strategies", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["CrashLab", "KillPoint", "KillRecord", "Phase", "Resume", "RunResult",
           "TorchCheckpointAdapter", "TrainingLoop", "Verdict", "crash_lab", "strategies"]
