"""Property-based crash-recovery testing for your own training loops.

* `faultlab.testing.strategies`: hypothesis strategies for kill points, kill plans, engine
  settings and fault specs.
* `crash_lab`: a session-scoped pytest fixture (the `faultlab.testing.plugin` pytest plugin,
  installed with the package) whose `run(make_loop, kills=..., engine=..., settings=...)`
  SIGKILLs a real training process at each kill point, restarts it from the recovered
  checkpoint, and returns a RunResult (`assert_ok()`: no torn, mixed or lost-committed
  checkpoint, final state bit-identical to an uninterrupted run).
* `TrainingLoop`: what `make_loop()` returns -- step(k), capture(step), restore(state, meta);
  `TorchCheckpointAdapter` does capture / restore for torch. Or a script-style loop instead
  of a factory: ``train(resume: ResumePoint | None, checkpoint, steps) -> state``, a plain
  function that trains from ``resume.step`` and calls ``checkpoint(k, state)`` after step k.
* `CrashVerdict` (alias `Verdict`): exact, mixed, torn (bytes that match no state the loop
  saved), incomplete-state (exactly what the loop saved, but the resumed run differs: the
  loop's capture / restore leave part of its state out), lost-committed, none.

Every name is imported on first use, so that importing this package (as pytest does for the
plugin) imports neither torch nor the crash harness. A worked example:
examples/test_my_training_crash.py; the guide: docs/checkpointing.md.
"""

from __future__ import annotations

from faultlab.lazy import lazy_exports

#: name -> (module, attribute)
_EXPORTS = {
    "KillPoint": ("faultlab.crash.points", "KillPoint"),
    "KillRecord": ("faultlab.crash.kill", "KillRecord"),
    "RunResult": ("faultlab.crash.kill", "RunResult"),
    "Phase": ("faultlab.checkpointing.api", "Phase"),
    "TrainingLoop": ("faultlab.crash.loops", "TrainingLoop"),
    "ResumePoint": ("faultlab.crash.loops", "ResumePoint"),
    "CrashVerdict": ("faultlab.crash.verdicts", "CrashVerdict"),
    "Verdict": ("faultlab.crash.verdicts", "CrashVerdict"),     # the name users know
    "Resume": ("faultlab.checkpointing.adapter", "Resume"),
    "TorchCheckpointAdapter": ("faultlab.backends.torch.adapter", "TorchCheckpointAdapter"),
    # the plugin, so that pytest (which registers it from the entry point) imports it first
    # and can rewrite it; the strategies, so that an environment without hypothesis can
    # load the plugin
    "CrashLab": ("faultlab.testing.plugin", "CrashLab"),
    "crash_lab": ("faultlab.testing.plugin", "crash_lab"),
    "strategies": ("faultlab.testing.strategies", None),
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
