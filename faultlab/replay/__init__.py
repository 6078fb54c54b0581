"""Rollback to the last persisted checkpoint, deterministic replay, transient-or-not."""

from faultlab.replay.rollback import Detection, Policy, ProtectedRun, Protector, refires_on_replay

__all__ = ["Detection", "Policy", "ProtectedRun", "Protector", "refires_on_replay"]
