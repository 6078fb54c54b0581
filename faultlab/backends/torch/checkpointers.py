"""The torch checkpointers: the engine fed by copy-on-write saves and the baselines it is
measured against, behind faultlab.checkpointing.api's Checkpointer interface.

| name           | what it is                                                                     |
|----------------|--------------------------------------------------------------------------------|
| `faultlab+cow` | `CowEngineCheckpointer`: the engine (faultlab.checkpointing.hooked) fed by the  |
|                | torch adapter's copy-on-write saves                                            |
| `sync`         | `SyncSave`: torch.save to a temporary file, fsync, rename, fsync the directory; |
|                | save() returns when the checkpoint is durable (training waits for all of it)   |
| `checkfreq`    | `CheckFreqStyle`: snapshot into memory, persist in a background thread with    |
|                | torch.save + fsync, one persist in flight (CheckFreq, FAST'21)                 |
| `dcp-async`    | `TorchDCPAsync`: torch.distributed.checkpoint.async_save (single process, no   |
|                | process group) into a directory per checkpoint, files fsynced                  |

Each keeps the newest `keep` checkpoints, recovers the newest one that loads, and calls its
phase hook at the points a crash campaign may kill it (faultlab.checkpointing.api.Phase).
torch.distributed.checkpoint is imported on first use (it is slow to import).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from faultlab.checkpointing.api import Loaded, Phase, PhaseHook, SaveFuture, no_hook
from faultlab.checkpointing.directory import (DirectoryCheckpointer, OneInFlight, from_payload,
                                              payload_parts, recover_newest, scan)
from faultlab.checkpointing.hooked import EngineCheckpointer
from faultlab.checkpointing.storage import fsync_dir, storage_error
from faultlab.errors import CheckpointError


class CowEngineCheckpointer(EngineCheckpointer):
    """The engine fed by the torch adapter's copy-on-write saves (adapter.save(..., cow=True)):
    parameters and optimizer state are written where they are, frozen until written."""

    name = "faultlab+cow"
    framework = "torch"
    loop_framework = "torch"     # its saves come from the torch adapter's copy-on-write
    cow = True
    cow_min_bytes = 1        # freeze every tensor (a crash campaign's model is tiny) and
    cow_policy = "redirect"  # update them out of place (not "auto"'s copy for small states)


# -- torch files shared by sync and checkfreq -----------------------------------------------

_FILE_RE = re.compile(r"^step-(\d{12})\.pt$")


def _to_payload(step: int, arrays: list[tuple[str, np.ndarray]], meta: dict) -> dict:
    """A torch.save-able dict: tensors viewing the arrays (no copy) plus JSON metadata."""
    parts, info = payload_parts(step, arrays, meta)
    return {"info": json.dumps(info), "tensors": {n: torch.from_numpy(a) for n, a in parts}}


def _checkpoint_files(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of the torch checkpoint files in a directory, newest first."""
    return scan(directory, _FILE_RE)


def _load_torch_file(path: Path) -> Loaded:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint is missing") from None
    except Exception as e:                   # torch raises RuntimeError, pickle/zip errors...
        raise CheckpointError(f"{path}: corrupt or foreign checkpoint "
                              f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: not a faultlab baseline checkpoint")
    return from_payload(payload, str(path))


class _HookedFile(io.RawIOBase):
    """A write-only file object that calls the phase hook before every write."""

    def __init__(self, f, hook: PhaseHook, step: int):
        self._f, self._hook, self._step = f, hook, step

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self._hook(Phase.WRITING, "write", self._step)
        return self._f.write(b)

    def flush(self) -> None:
        self._f.flush()


def _prune(directory: Path, keep: int, remove=lambda p: p.unlink(missing_ok=True)) -> None:
    for _, path in _checkpoint_files(directory)[keep:]:
        remove(path)


def _write_torch_file(path: Path, payload: dict, hook: PhaseHook, step: int) -> None:
    """torch.save into `path`, then fsync it (data durable; the name is the caller's job)."""
    with open(path, "wb") as f:
        torch.save(payload, _HookedFile(f, hook, step) if hook is not no_hook else f)
        f.flush()
        hook(Phase.COMMITTING, "fsync", step)
        os.fsync(f.fileno())


class _TorchFiles:
    """The torch.save files of sync and checkfreq: `DIR/step-NNNNNNNNNNNN.pt`."""

    framework = "torch"

    @classmethod
    def _entries(cls, directory: Path) -> list[tuple[int, Path]]:
        return _checkpoint_files(directory)

    @classmethod
    def _load(cls, path: Path) -> Loaded:
        return _load_torch_file(path)


class SyncSave(_TorchFiles, DirectoryCheckpointer):
    """Synchronous torch.save: temporary file, fsync, rename into place, fsync the directory.

    save() returns once the checkpoint is durable, so training stalls for the whole write.
    Files are `DIR/step-NNNNNNNNNNNN.pt`; the newest `keep` are kept.
    """

    name = "sync"

    def save(self, step, state, meta=None) -> SaveFuture:
        step, arrays, meta = self._check(step, state, meta)
        self._hook(Phase.STAGING, "save", step)
        fut = SaveFuture(step)
        final = self.directory / f"step-{step:012d}.pt"
        tmp = self.directory / f".{final.name}.tmp-{os.getpid()}"
        try:
            _write_torch_file(tmp, _to_payload(step, arrays, meta), self._hook, step)
            self._hook(Phase.COMMITTING, "rename", step)
            os.replace(tmp, final)
            self._hook(Phase.COMMITTING, "dir-fsync", step)
            fsync_dir(self.directory)       # the new name must survive a power loss
            _prune(self.directory, self.keep)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            fut.finish(error=storage_error(e, "write", str(final)))
            raise fut.error from None
        fut.finish()
        return fut


class CheckFreqStyle(_TorchFiles, OneInFlight):
    """CheckFreq's two phases: snapshot the state into memory (training waits), then persist
    it in a background thread -- torch.save straight into `step-N.pt`, then fsync -- with at
    most one persist in flight: a save waits for the previous persist first (CheckFreq's
    stall). A torn file from a crash mid-persist fails to load and recovery skips it."""

    name = "checkfreq"

    def __init__(self, directory, *, keep: int = 2, phase_hook: PhaseHook | None = None):
        super().__init__(directory, keep=keep, phase_hook=phase_hook)
        self._thread: threading.Thread | None = None
        self._failure: CheckpointError | None = None
        self.extra_memory = 0

    def save(self, step, state, meta=None) -> SaveFuture:
        step, arrays, meta = self._check(step, state, meta)
        self._hook(Phase.STAGING, "save", step)
        self._join()                                   # one persist in flight
        if self._failure is not None:
            raise CheckpointError(f"checkfreq checkpointer stopped after an earlier error: "
                                  f"{self._failure}")
        snapshot = []
        for name, arr in arrays:
            self._hook(Phase.STAGING, "copy", step)
            snapshot.append((name, arr.copy()))
        self.extra_memory = max(self.extra_memory, sum(a.nbytes for _, a in snapshot))
        fut = SaveFuture(step)
        self._unseen = fut
        self._thread = threading.Thread(target=self._persist, args=(fut, snapshot, meta),
                                        name="checkfreq-persist", daemon=True)
        self._thread.start()
        return fut

    def _persist(self, fut: SaveFuture, snapshot, meta) -> None:
        step = fut.step
        path = self.directory / f"step-{step:012d}.pt"
        try:
            _write_torch_file(path, _to_payload(step, snapshot, meta), self._hook, step)
            self._hook(Phase.COMMITTING, "prune", step)
            _prune(self.directory, self.keep)
        except BaseException as e:
            self._failure = storage_error(e, "write", str(path)) if isinstance(e, OSError) \
                else CheckpointError(f"checkpoint of step {step} failed: {e}")
            path.unlink(missing_ok=True)     # not durable: recovery must not pick it up
            fut.finish(error=self._failure)
            return
        fut.finish()

    def _join(self) -> None:
        t = self._thread
        if t is not None:
            t.join()
            self._thread = None

    _drain = _join

    @property
    def in_flight(self) -> int:
        t = self._thread
        return int(t is not None and t.is_alive())


class TorchDCPAsync(OneInFlight):
    """torch.distributed.checkpoint.async_save in one process (no_dist, no process group),
    FileSystemWriter with sync_files, one directory `DIR/step-N.dcp` per checkpoint; at most
    one save in flight (a new save first waits for the previous one, as torchtitan does).
    DCP commits by writing `.metadata` last (temporary file, fsync, rename)."""

    name = "dcp-async"
    framework = "torch"
    _DIR_RE = re.compile(r"^step-(\d{12})\.dcp$")

    def __init__(self, directory, *, keep: int = 2, phase_hook: PhaseHook | None = None,
                 thread_count: int = 1):
        super().__init__(directory, keep=keep, phase_hook=phase_hook)
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        self.thread_count = thread_count

    def _writer(self, path: Path, step: int):
        from torch.distributed.checkpoint import FileSystemWriter
        hook = self._hook

        class HookedWriter(FileSystemWriter):
            def write_data(self, plan, planner):
                hook(Phase.WRITING, "write-data", step)
                return super().write_data(plan, planner)

            def finish(self, metadata, results):
                hook(Phase.COMMITTING, "metadata", step)
                return super().finish(metadata, results)

        cls = HookedWriter if hook is not no_hook else FileSystemWriter
        return cls(path, sync_files=True, thread_count=self.thread_count)

    def save(self, step, state, meta=None) -> SaveFuture:
        import torch.distributed.checkpoint as dcp
        step, arrays, meta = self._check(step, state, meta)
        self._hook(Phase.STAGING, "save", step)
        self._wait_pending()
        payload = _to_payload(step, arrays, meta)
        path = self.directory / f"step-{step:012d}.dcp"
        if path.exists():                    # left by a run that crashed before committing it
            shutil.rmtree(path, ignore_errors=True)
        try:
            path.mkdir(parents=True)
            # Step, metadata and dtypes: a small JSON file written before DCP's .metadata, so
            # the commit (.metadata renamed into place) vouches for it too.
            info = json.loads(payload["info"])
            _write_json_durably(path / "faultlab.json", info)
            inner = dcp.async_save(payload["tensors"], storage_writer=self._writer(path, step),
                                   no_dist=True)
        except OSError as e:
            raise storage_error(e, "write", str(path)) from None
        fut = SaveFuture(step)
        self._pending = self._unseen = fut

        def done(f):
            err = f.exception()
            if err is None:
                try:
                    self._hook(Phase.COMMITTING, "prune", step)
                    self._prune()
                except OSError as e:
                    err = e
            fut.finish(error=err if err is None or isinstance(err, CheckpointError) else
                       (storage_error(err, "write", str(path)) if isinstance(err, OSError)
                        else err))

        inner.add_done_callback(done)
        return fut

    def _prune(self) -> None:
        for _, path in self._entries(self.directory)[self.keep:]:
            shutil.rmtree(path, ignore_errors=True)

    def _wait_pending(self) -> None:
        fut = self._pending
        if fut is not None:
            fut.join()
            self._pending = None

    _drain = _wait_pending

    @classmethod
    def _entries(cls, directory: Path) -> list[tuple[int, Path]]:
        return scan(directory, cls._DIR_RE)

    @classmethod
    def _load(cls, path: Path) -> Loaded:
        return _load_dcp_dir(path)

    @classmethod
    def recover(cls, directory) -> Loaded:
        """Only directories whose .metadata (written last, durably) exists are committed."""
        directory = Path(directory)
        entries = [(s, p) for s, p in cls._entries(directory) if (p / ".metadata").exists()]
        return recover_newest(directory, cls._load, entries)


def _write_json_durably(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _load_dcp_dir(path: Path) -> Loaded:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    try:
        info = json.loads((path / "faultlab.json").read_text())
        reader = FileSystemReader(path)
        md = reader.read_metadata()
        template = {}
        for name, m in md.state_dict_metadata.items():
            if not isinstance(m, TensorStorageMetadata):
                raise ValueError(f"entry {name!r} is not a tensor")
            template[name] = torch.empty(m.size, dtype=m.properties.dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(template, storage_reader=reader, no_dist=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: incomplete checkpoint ({e.filename} missing)") from None
    except (Exception, CheckpointException) as e:     # DCP's is a BaseException
        raise CheckpointError(f"{path}: corrupt or foreign checkpoint "
                              f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    return from_payload({"info": json.dumps(info), "tensors": template}, str(path))
