"""The engine behind the Checkpointer interface (``faultlab``), its I/O reported to a phase hook.

    ckpt = open_checkpointer("faultlab", directory, phase_hook=hook)   # faultlab.checkpointing.api
    future = ckpt.save(step, state, meta)      # CheckpointEngine.save: a SaveHandle
    future.wait()                              # durable: its CommitInfo

With a phase hook, the engine's file is an OSStorage that calls the hook before each write and
sync, telling them apart by offset: the slot's tombstone (``staging``), data chunks
(``writing``), the data sync, the commit record, its sync and the commit point
(``committing``). The hook never changes what is written. The torch backend's
``faultlab+cow`` (faultlab.backends.torch.checkpointers) is this class fed by copy-on-write
saves.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from faultlab.checkpointing.api import Loaded, Phase, PhaseHook, no_hook
from faultlab.checkpointing.engine import CheckpointEngine, SaveHandle
from faultlab.checkpointing.format import decode_header
from faultlab.checkpointing.recovery import recover as engine_recover
from faultlab.checkpointing.storage import OSStorage


class HookedStorage(OSStorage):
    """An OSStorage that reports the engine's I/O to a phase hook before doing it."""

    def __init__(self, path, hook: PhaseHook):
        super().__init__(path)
        self._hook = hook
        self._geom = None
        self._local = threading.local()
        self.step = -1                       # the save being staged (set by the caller)

    def create(self, size: int, header: bytes) -> None:
        self._geom = decode_header(header)
        super().create(size, header)

    def open(self, *, write: bool) -> None:
        super().open(write=write)
        if write:
            self._geom = decode_header(self.pread(0, 1 << 16))

    def pwrite(self, offset: int, data) -> None:
        g = self._geom
        if g is None or offset < g.records_offset:
            pass                                                 # the header, at creation
        elif offset < g.slots_offset:
            if not any(memoryview(data).cast("B")):
                self._hook(Phase.STAGING, "tombstone", self.step)      # in save(): slot taken
            else:
                self._local.record = True
                self._hook(Phase.COMMITTING, "record", -1)
        else:
            self._hook(Phase.WRITING, "chunk", -1)
        super().pwrite(offset, data)

    def sync_data(self) -> None:
        record = getattr(self._local, "record", False)
        self._hook(Phase.COMMITTING, "record-sync" if record else "data-sync", -1)
        super().sync_data()
        if record:
            self._local.record = False
            self._hook(Phase.COMMITTING, "durable", -1)


class EngineCheckpointer:
    """CheckpointEngine behind the Checkpointer interface (path: the checkpoint file)."""

    name = "faultlab"
    framework = None
    loop_framework = None
    file_target = "faultlab.ckpt"
    #: small chunks, so that one checkpoint of a tiny model still has several writing points
    default_settings = {"max_in_flight": 2, "keep": 2, "chunk_bytes": 4096, "pool_bytes": 16384,
                        "writers": 2}
    settings_space = {"max_in_flight": (1, 2, 3), "keep": (1, 2, 3),
                      "chunk_bytes": (4096, 8192, 16384, 65536),
                      "pool_bytes": (4096, 8192, 16384, 32768, 65536, 262144),
                      "writers": (1, 2, 3)}
    borrows = True          # save(..., borrowed=True): see CheckpointEngine.save

    def __init__(self, path: str | os.PathLike, *, phase_hook: PhaseHook | None = None,
                 **settings):
        self.path = Path(path)
        self._hook = phase_hook or no_hook
        self._storage = HookedStorage(self.path, self._hook) if phase_hook else None
        self.engine = CheckpointEngine(self._storage or self.path, **settings)

    def save(self, step, state, meta=None, **borrow) -> SaveHandle:
        self._hook(Phase.STAGING, "save", int(step))
        if self._storage is not None:
            self._storage.step = int(step)
        return self.engine.save(step, state, meta, **borrow)

    def wait_all(self) -> None:
        self.engine.wait_all()

    def close(self) -> None:
        self.engine.close()

    @property
    def in_flight(self) -> int:
        return self.engine.in_flight

    @property
    def extra_memory(self) -> int:
        """Staging memory allocated so far (bytes)."""
        return self.engine.staging_bytes

    @staticmethod
    def recover(path) -> Loaded:
        step, state, meta = engine_recover(path)
        return Loaded(step, state, meta)
