"""Persistent concurrent checkpoints that survive kill -9 and power loss (no DL framework).

    engine = CheckpointEngine("run.ckpt", max_in_flight=2, keep=2)
    handle = engine.save(step, {"w": weights, "m": adam_m}, meta={"epoch": 3})
    ...                                   # training goes on while the checkpoint persists
    step, state, meta = recover("run.ckpt")
    state = load_step("run.ckpt", 1200).state     # the commit of a given step, verified

The engine and every baseline behind one interface (``open_checkpointer(name, directory)``,
``recover_checkpoint``; names from ``checkpointer_names()``); the framework adapters that turn
a training session into such a state are ``faultlab.torch.TorchCheckpointAdapter`` and
``faultlab.keras.TFCheckpointAdapter``. The on-disk format is documented in
docs/checkpoint_format.md.
"""

from faultlab.checkpointing.adapter import AdapterBase, Resume
from faultlab.checkpointing.api import (COMPARED, Checkpointer, Loaded, Phase, SaveFuture,
                                        checkpointer_names, open_checkpointer,
                                        recover_checkpoint)
from faultlab.checkpointing.engine import CheckpointEngine, EngineSettings, SaveHandle
from faultlab.checkpointing.recovery import CommitInfo, Restored, list_commits, load_step, recover
from faultlab.checkpointing.simdisk import CrashChoice, SimDisk
from faultlab.checkpointing.storage import OSStorage, Storage

__all__ = ["AdapterBase", "COMPARED", "CheckpointEngine", "Checkpointer", "CommitInfo",
           "CrashChoice", "EngineSettings", "Loaded", "OSStorage", "Phase", "Restored", "Resume",
           "SaveFuture", "SaveHandle", "SimDisk", "Storage", "checkpointer_names",
           "list_commits", "load_step", "open_checkpointer", "recover", "recover_checkpoint"]
