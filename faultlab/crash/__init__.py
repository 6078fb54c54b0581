"""The crash-consistency harness: kill and power-loss campaigns against checkpointers.

Modules: ``points`` (where to kill), ``loops`` (what to train), ``verdicts`` (judging a
recovery), ``zygote`` (the forking process and the training child), ``kill`` (kill campaigns),
``power`` (power-loss campaigns on SimDisk), ``policy`` (engines and loop of a campaign) and
``report`` (the text report). The names below are re-exported lazily, so that
``python -m faultlab.crash.zygote`` and ``import faultlab.crash`` stay cheap.
"""

from __future__ import annotations

from faultlab.lazy import lazy_exports

_EXPORTS = {
    "points": ("KillPoint", "MAX_OCCURRENCE", "Phase", "random_kill_points"),
    "loops": ("LoopSpec", "ResumePoint", "Sampler", "ScriptLoop", "TrainingLoop",
              "builtin_loops", "factory_name", "final_state", "is_script", "load_factory",
              "loop_framework", "loop_maker"),
    "verdicts": ("CrashVerdict", "Reference", "Saved", "classify", "fingerprint",
                 "load_state_npz", "read_saved", "same_state", "save_state_npz"),
    "zygote": ("CrashCampaignError", "Zygote"),
    "kill": ("EngineReport", "KillCampaign", "KillRecord", "RunResult"),
    "power": ("POWER_LOSS_ENGINES", "power_loss_campaign", "power_loss_report"),
    "policy": ("CampaignSetup", "campaign_setup"),
    "report": ("format_reports",),
}
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
__getattr__, __dir__ = lazy_exports(__name__, {name: f"{__name__}.{module}"
                                               for module, names in _EXPORTS.items()
                                               for name in names})
