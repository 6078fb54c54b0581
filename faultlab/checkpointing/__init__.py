"""Persistent concurrent checkpoints that survive kill -9 and power loss (no DL framework).

    engine = CheckpointEngine("run.ckpt", max_in_flight=2, keep=2)
    handle = engine.save(step, {"w": weights, "m": adam_m}, meta={"epoch": 3})
    ...                                   # training goes on while the checkpoint persists
    step, state, meta = recover("run.ckpt")
    state = load_step("run.ckpt", 1200).state     # the commit of a given step, verified

The on-disk format is documented in docs/checkpoint_format.md.
"""

from faultlab.checkpointing.api import Loaded, SaveFuture
from faultlab.checkpointing.engine import CheckpointEngine, EngineSettings, SaveHandle
from faultlab.checkpointing.recovery import CommitInfo, Restored, list_commits, load_step, recover
from faultlab.checkpointing.simdisk import CrashChoice, SimDisk
from faultlab.checkpointing.storage import OSStorage, Storage

__all__ = ["CheckpointEngine", "CommitInfo", "CrashChoice", "EngineSettings", "Loaded",
           "OSStorage", "Restored", "SaveFuture", "SaveHandle", "SimDisk", "Storage",
           "list_commits", "load_step", "recover"]
