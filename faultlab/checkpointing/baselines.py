"""Checkpointers behind one interface: the engine and the baselines it is measured against.

    ckpt = open_checkpointer("checkfreq", directory)      # or "faultlab", "sync", "dcp-async"
    handle = ckpt.save(step, state, meta)                 # state: {name: numpy array}
    handle.wait()                                         # durable (or raises CheckpointError)
    ckpt.close()
    step, state, meta = recover_checkpoint("checkfreq", directory)

| name        | what it is                                                                        |
|-------------|-----------------------------------------------------------------------------------|
| `faultlab`  | `CheckpointEngine` (one preallocated file, concurrent staged writers)             |
| `sync`      | `SyncSave`: torch.save to a temporary file, fsync, rename, fsync the directory;   |
|             | save() returns when the checkpoint is durable (training waits for all of it)      |
| `checkfreq` | `CheckFreqStyle`: snapshot into memory, persist in a background thread with       |
|             | torch.save + fsync, one persist in flight (CheckFreq, FAST'21)                    |
| `dcp-async` | `TorchDCPAsync`: torch.distributed.checkpoint.async_save (single process, no      |
|             | process group) into a directory per checkpoint, files fsynced                     |
| `naive`     | `NaiveInPlace`: a negative control that overwrites one file in place without      |
|             | fsync or checksums; the crash campaign must catch it tearing checkpoints          |
| `tf-sync`   | `TFCheckpoint`: the arrays in tf.Variables of a tf.train.Checkpoint, written by a |
|             | tf.train.CheckpointManager, files and directory fsynced; save() returns durable   |
| `tf-async`  | `TFAsyncCheckpoint`: the same with TF's `CheckpointOptions(enable_async=True)`    |

Every checkpointer keeps the newest `keep` checkpoints, recovers the newest one that loads and
verifies, and takes a `phase_hook(phase, point, step)` that it calls at the points a crash
campaign may kill it: "staging" (the state is being copied), "writing" (data on its way to the
file), "committing" (syncs, record, rename) -- faultlab.crash.harness uses it. Only this
module's torch-based classes import torch, its TF-based ones TensorFlow, and only when used.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import threading
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

from faultlab.errors import CheckpointError, FaultlabError
from faultlab.checkpointing.engine import CheckpointEngine
from faultlab.checkpointing.format import decode_header, dtype_from_json, dtype_to_json
from faultlab.checkpointing.layout import check_step, encode_meta, normalize_state
from faultlab.checkpointing.recovery import recover as _engine_recover
from faultlab.checkpointing.storage import OSStorage, _fsync_dir, storage_error

PhaseHook = Callable[[str, str, int], None]

STAGING, WRITING, COMMITTING = "staging", "writing", "committing"


class Loaded(NamedTuple):
    """A recovered checkpoint: (step, state, meta)."""

    step: int
    state: dict
    meta: dict


class Handle(Protocol):
    """The future of one save."""

    step: int

    def wait(self, timeout: float | None = None) -> Any: ...

    def done(self) -> bool: ...

    def add_done_callback(self, fn: Callable[[Any], None]) -> None: ...

    @property
    def error(self) -> BaseException | None: ...


class Checkpointer(Protocol):
    """What the engine and every baseline provide (see the module docstring)."""

    name: str

    def save(self, step: int, state: Mapping[str, np.ndarray],
             meta: Mapping | None = None) -> Handle: ...

    def wait_all(self) -> None: ...

    def close(self) -> None: ...

    @property
    def in_flight(self) -> int: ...


class Future:
    """A minimal save future for the baselines (same surface as the engine's SaveHandle)."""

    def __init__(self, step: int):
        self.step = step
        self._event = threading.Event()
        self._error: CheckpointError | None = None
        self._callbacks: list = []
        self._lock = threading.Lock()

    def done(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> int:
        if not self._event.wait(timeout):
            raise TimeoutError(f"checkpoint of step {self.step} still in flight")
        if self._error is not None:
            raise self._error
        return self.step

    @property
    def error(self) -> CheckpointError | None:
        return self._error

    def add_done_callback(self, fn) -> None:
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    def finish(self, error: BaseException | None = None) -> None:
        if error is not None and not isinstance(error, CheckpointError):
            error = CheckpointError(f"checkpoint of step {self.step} failed: "
                                    f"{type(error).__name__}: {error}")
        with self._lock:
            self._error = error
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)

    def __repr__(self) -> str:
        state = "pending" if not self.done() else ("failed" if self._error else "committed")
        return f"<Future step={self.step} {state}>"


def _no_hook(phase: str, point: str, step: int) -> None:
    pass


# -- the engine -----------------------------------------------------------------------------

class _HookedStorage(OSStorage):
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
                self._hook(STAGING, "tombstone", self.step)      # in save(): slot taken
            else:
                self._local.record = True
                self._hook(COMMITTING, "record", -1)
        else:
            self._hook(WRITING, "chunk", -1)
        super().pwrite(offset, data)

    def sync_data(self) -> None:
        record = getattr(self._local, "record", False)
        self._hook(COMMITTING, "record-sync" if record else "data-sync", -1)
        super().sync_data()
        if record:
            self._local.record = False
            self._hook(COMMITTING, "durable", -1)


class EngineCheckpointer:
    """CheckpointEngine behind the Checkpointer interface (path: the checkpoint file)."""

    name = "faultlab"
    framework = None
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
        self._hook = phase_hook or _no_hook
        self._storage = _HookedStorage(self.path, self._hook) if phase_hook else None
        self.engine = CheckpointEngine(self._storage or self.path, **settings)

    def save(self, step, state, meta=None, **borrow):
        self._hook(STAGING, "save", int(step))
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
        return self.engine._pool.allocated_bytes

    @staticmethod
    def recover(path) -> Loaded:
        step, state, meta = _engine_recover(path)
        return Loaded(step, state, meta)


class CowEngineCheckpointer(EngineCheckpointer):
    """The engine fed by the torch adapter's copy-on-write saves (adapter.save(..., cow=True)):
    parameters and optimizer state are written where they are, frozen until written."""

    name = "faultlab+cow"
    framework = "torch"
    cow = True
    cow_min_bytes = 1        # freeze every tensor (a crash campaign's model is tiny) and
    cow_policy = "redirect"  # update them out of place (not "auto"'s copy for small states)


# -- torch files shared by sync and checkfreq -----------------------------------------------

_FILE_RE = re.compile(r"^step-(\d{12})\.pt$")
_FORMAT = "faultlab-baseline/1"


def _torch():
    try:
        import torch
    except ImportError:
        raise FaultlabError("this checkpointer needs torch: "
                            "pip install 'faultlab[torch]'") from None
    return torch


# dtypes torch and TensorFlow both hold exactly (native byte order, no structure); others
# travel as bytes with their NumPy description in the payload's info
_NATIVE_DTYPES = {np.dtype(t) for t in (np.bool_, np.int8, np.uint8, np.int16, np.uint16,
                                        np.int32, np.uint32, np.int64, np.uint64, np.float16,
                                        np.float32, np.float64, np.complex64, np.complex128)}


def _payload_parts(step: int, arrays: list[tuple[str, np.ndarray]], meta: dict,
                   native: set = _NATIVE_DTYPES) -> tuple[list[tuple[str, np.ndarray]], dict]:
    """The arrays in framework-native dtypes (others viewed as bytes, no copy) and the JSON
    info that names them and carries step, metadata and the original dtypes."""
    parts, raw = [], {}
    for name, arr in arrays:
        if arr.dtype not in native:
            raw[name] = {"descr": dtype_to_json(arr.dtype), "shape": list(arr.shape)}
            arr = arr.reshape(-1).view(np.uint8)
        parts.append((name, arr))
    info = {"format": _FORMAT, "step": step, "meta": meta, "raw": raw,
            "names": [n for n, _ in arrays]}
    return parts, info


def _to_payload(step: int, arrays: list[tuple[str, np.ndarray]], meta: dict) -> dict:
    """A torch.save-able dict: tensors viewing the arrays (no copy) plus JSON metadata."""
    torch = _torch()
    parts, info = _payload_parts(step, arrays, meta)
    return {"info": json.dumps(info), "tensors": {n: torch.from_numpy(a) for n, a in parts}}


def _from_payload(payload, where: str) -> Loaded:
    """The inverse of _payload_parts: payload = {"info": JSON text, "tensors": {name: tensor
    or array}}."""
    try:
        info = json.loads(payload["info"])
        if info.get("format") != _FORMAT:
            raise ValueError(f"format {info.get('format')!r}")
        tensors, raw = payload["tensors"], info["raw"]
        state = {}
        for name in info["names"]:
            arr = np.asarray(tensors[name])
            if name in raw:
                arr = arr.view(dtype_from_json(raw[name]["descr"])).reshape(raw[name]["shape"])
            state[name] = arr
        return Loaded(int(info["step"]), state, info["meta"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{where}: not a faultlab baseline checkpoint ({e})") from None


def _scan(directory: Path, pattern: re.Pattern, name: Callable[[re.Match], str] | None = None
          ) -> list[tuple[int, Path]]:
    """(step, path) of the entries of a directory whose name matches `pattern` (group 1: the
    step), newest first; `name(match)` names the path (default: the entry itself)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(((int(m.group(1)), directory / (name(m) if name else n)) for n in names
                   if (m := pattern.match(n))), reverse=True)


def _checkpoint_files(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of the torch checkpoint files in a directory, newest first."""
    return _scan(directory, _FILE_RE)


def _load_torch_file(path: Path) -> Loaded:
    torch = _torch()
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint is missing") from None
    except Exception as e:                   # torch raises RuntimeError, pickle/zip errors...
        raise CheckpointError(f"{path}: corrupt or foreign checkpoint "
                              f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: not a faultlab baseline checkpoint")
    return _from_payload(payload, str(path))


def _recover_newest(directory: Path, load: Callable[[Path], Loaded],
                    entries: list[tuple[int, Path]]) -> Loaded:
    reasons = []
    for step, path in entries:
        try:
            loaded = load(path)
        except CheckpointError as e:
            reasons.append(str(e))
            continue
        if loaded.step != step:
            reasons.append(f"{path}: holds step {loaded.step}")
            continue
        return loaded
    if not entries:
        raise CheckpointError(f"no committed checkpoint in {directory}")
    raise CheckpointError(f"no valid checkpoint in {directory}: {len(entries)} candidate(s) "
                          f"failed, newest: {reasons[0]}")


class _HookedFile(io.RawIOBase):
    """A write-only file object that calls the phase hook before every write."""

    def __init__(self, f, hook: PhaseHook, step: int):
        self._f, self._hook, self._step = f, hook, step

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self._hook(WRITING, "write", self._step)
        return self._f.write(b)

    def flush(self) -> None:
        self._f.flush()


def _prune(directory: Path, keep: int, remove=lambda p: p.unlink(missing_ok=True)) -> None:
    for _, path in _checkpoint_files(directory)[keep:]:
        remove(path)


def _write_torch_file(path: Path, payload: dict, hook: PhaseHook, step: int) -> None:
    """torch.save into `path`, then fsync it (data durable; the name is the caller's job)."""
    torch = _torch()
    with open(path, "wb") as f:
        torch.save(payload, _HookedFile(f, hook, step) if hook is not _no_hook else f)
        f.flush()
        hook(COMMITTING, "fsync", step)
        os.fsync(f.fileno())


class _DirectoryCheckpointer:
    name = "?"
    framework = "torch"
    file_target = None
    default_settings = {"keep": 2}
    settings_space = {"keep": (1, 2, 3)}
    _framework = staticmethod(_torch)          # checks that the framework is installed

    def __init__(self, directory: str | os.PathLike, *, keep: int = 2,
                 phase_hook: PhaseHook | None = None):
        if keep < 1:
            raise CheckpointError("keep must be at least 1")
        self.directory = Path(directory)
        self.keep = keep
        self._hook = phase_hook or _no_hook
        self._closed = False
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise storage_error(e, "create", str(self.directory)) from None
        self._framework()

    def _check(self, step, state, meta):
        if self._closed:
            raise CheckpointError(f"{self.name} checkpointer is closed")
        return check_step(step), normalize_state(state), encode_meta(meta)

    def wait_all(self) -> None:
        pass

    def close(self) -> None:
        if not self._closed:
            try:
                self.wait_all()
            finally:
                self._closed = True

    @property
    def in_flight(self) -> int:
        return 0

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        try:
            self.close()
        except CheckpointError:
            if exc_type is None:
                raise

    @classmethod
    def recover(cls, directory) -> Loaded:
        directory = Path(directory)
        return _recover_newest(directory, _load_torch_file, _checkpoint_files(directory))


class _OneInFlight(_DirectoryCheckpointer):
    """A checkpointer with at most one save in flight (`_pending`): wait_all() drains it and
    raises the failure of the newest save (`_unseen`) that nobody has waited for."""

    _pending: Future | None = None
    _unseen: Future | None = None

    def _drain(self) -> None:
        raise NotImplementedError

    def wait_all(self) -> None:
        self._drain()
        fut, self._unseen = self._unseen, None
        if fut is not None and fut.error is not None:
            raise fut.error

    @property
    def in_flight(self) -> int:
        fut = self._pending
        return int(fut is not None and not fut.done())


class SyncSave(_DirectoryCheckpointer):
    """Synchronous torch.save: temporary file, fsync, rename into place, fsync the directory.

    save() returns once the checkpoint is durable, so training stalls for the whole write.
    Files are `DIR/step-NNNNNNNNNNNN.pt`; the newest `keep` are kept.
    """

    name = "sync"

    def save(self, step, state, meta=None) -> Future:
        step, arrays, meta = self._check(step, state, meta)
        self._hook(STAGING, "save", step)
        fut = Future(step)
        final = self.directory / f"step-{step:012d}.pt"
        tmp = self.directory / f".{final.name}.tmp-{os.getpid()}"
        try:
            _write_torch_file(tmp, _to_payload(step, arrays, meta), self._hook, step)
            self._hook(COMMITTING, "rename", step)
            os.replace(tmp, final)
            self._hook(COMMITTING, "dir-fsync", step)
            _fsync_dir(self.directory)       # the new name must survive a power loss
            _prune(self.directory, self.keep)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            fut.finish(storage_error(e, "write", str(final)))
            raise fut.error from None
        fut.finish()
        return fut


class CheckFreqStyle(_OneInFlight):
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

    def save(self, step, state, meta=None) -> Future:
        step, arrays, meta = self._check(step, state, meta)
        self._hook(STAGING, "save", step)
        self._join()                                   # one persist in flight
        if self._failure is not None:
            raise CheckpointError(f"checkfreq checkpointer stopped after an earlier error: "
                                  f"{self._failure}")
        snapshot = []
        for name, arr in arrays:
            self._hook(STAGING, "copy", step)
            snapshot.append((name, arr.copy()))
        self.extra_memory = max(self.extra_memory, sum(a.nbytes for _, a in snapshot))
        fut = Future(step)
        self._unseen = fut
        self._thread = threading.Thread(target=self._persist, args=(fut, snapshot, meta),
                                        name="checkfreq-persist", daemon=True)
        self._thread.start()
        return fut

    def _persist(self, fut: Future, snapshot, meta) -> None:
        step = fut.step
        path = self.directory / f"step-{step:012d}.pt"
        try:
            _write_torch_file(path, _to_payload(step, snapshot, meta), self._hook, step)
            self._hook(COMMITTING, "prune", step)
            _prune(self.directory, self.keep)
        except BaseException as e:
            self._failure = storage_error(e, "write", str(path)) if isinstance(e, OSError) \
                else CheckpointError(f"checkpoint of step {step} failed: {e}")
            path.unlink(missing_ok=True)     # not durable: recovery must not pick it up
            fut.finish(self._failure)
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


class TorchDCPAsync(_OneInFlight):
    """torch.distributed.checkpoint.async_save in one process (no_dist, no process group),
    FileSystemWriter with sync_files, one directory `DIR/step-N.dcp` per checkpoint; at most
    one save in flight (a new save first waits for the previous one, as torchtitan does).
    DCP commits by writing `.metadata` last (temporary file, fsync, rename)."""

    name = "dcp-async"
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
                hook(WRITING, "write-data", step)
                return super().write_data(plan, planner)

            def finish(self, metadata, results):
                hook(COMMITTING, "metadata", step)
                return super().finish(metadata, results)

        cls = HookedWriter if hook is not _no_hook else FileSystemWriter
        return cls(path, sync_files=True, thread_count=self.thread_count)

    def save(self, step, state, meta=None) -> Future:
        import torch.distributed.checkpoint as dcp
        step, arrays, meta = self._check(step, state, meta)
        self._hook(STAGING, "save", step)
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
        fut = Future(step)
        self._pending = self._unseen = fut

        def done(f):
            err = f.exception()
            if err is None:
                try:
                    self._hook(COMMITTING, "prune", step)
                    self._prune()
                except OSError as e:
                    err = e
            fut.finish(err if err is None or isinstance(err, CheckpointError) else
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
            fut._event.wait()
            self._pending = None

    _drain = _wait_pending

    @classmethod
    def _entries(cls, directory: Path) -> list[tuple[int, Path]]:
        return _scan(directory, cls._DIR_RE)

    @classmethod
    def recover(cls, directory) -> Loaded:
        directory = Path(directory)
        entries = [(s, p) for s, p in cls._entries(directory) if (p / ".metadata").exists()]
        return _recover_newest(directory, _load_dcp_dir, entries)


def _write_json_durably(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _load_dcp_dir(path: Path) -> Loaded:
    torch = _torch()
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
    return _from_payload({"info": json.dumps(info), "tensors": template}, str(path))


# -- TensorFlow: tf.train.Checkpoint + CheckpointManager, synchronous or TF's async ------------

def _tf():
    try:
        from faultlab.backends.tf.runtime import tf
    except ImportError:
        raise FaultlabError("this checkpointer needs TensorFlow: "
                            "pip install 'faultlab[tf]'") from None
    return tf


def fsync_tf_checkpoint(prefix: Path, hook: PhaseHook = _no_hook, step: int = -1) -> None:
    """fsync a written TF checkpoint `prefix` (data files, index) and its directory: TF's
    writer does neither, and the names it renamed or created must survive a power loss too."""
    hook(COMMITTING, "fsync", step)
    for path in (*prefix.parent.glob(f"{prefix.name}.data-*"),
                 prefix.with_name(prefix.name + ".index")):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    hook(COMMITTING, "dir-fsync", step)
    _fsync_dir(prefix.parent)


def _write_point(hook: PhaseHook, step: list):
    """A trackable without tensors whose serialisation -- in the thread that writes, TF's
    async thread included -- is the "writing" point of the phase hook."""
    tf = _tf()

    # not converted by autograph (TF's async copy runs in a tf.function): plain Python calls
    class WritePoint(tf.__internal__.tracking.Trackable):
        @tf.autograph.experimental.do_not_convert
        def _serialize_to_tensors(self):
            hook(WRITING, "serialize", step[0])
            return {}

        @tf.autograph.experimental.do_not_convert
        def _copy_trackable_to_cpu(self, object_map):     # async: nothing to copy
            object_map[self] = self

    return WritePoint()


class TFCheckpoint(_OneInFlight):
    """tf.train.Checkpoint + tf.train.CheckpointManager (`DIR/ckpt-N.index`, `.data-*`): the
    arrays are assigned to CPU tf.Variables held by the checkpoint (the step, metadata and
    names in a string variable), so TF's own writer writes them. TF does not fsync: a write
    callback, run before the manager records the checkpoint and deletes old ones, fsyncs the
    new files and the directory; the save is durable then. TF renames the data file into place
    and then writes the index (in place: a kill can tear it, and TF's reader then refuses it).

    tf-sync: save() returns once the checkpoint is durable. tf-async:
    `CheckpointOptions(enable_async=True)`: save() waits for the previous write, copies the
    variables (TF's own CPU copy) and returns; TF's thread writes, then the callback fsyncs."""

    name = "tf-sync"
    framework = "tf"
    asynchronous = False
    _framework = staticmethod(_tf)
    _INDEX_RE = re.compile(r"^ckpt-(-?\d+)\.index$")
    _INFO_KEY = "info/.ATTRIBUTES/VARIABLE_VALUE"
    # TF stores a bool as 0 / 1: NumPy bools holding other bytes would not round-trip
    _NATIVE = _NATIVE_DTYPES - {np.dtype(np.bool_)}

    def __init__(self, directory, *, keep: int = 2, phase_hook: PhaseHook | None = None):
        super().__init__(directory, keep=keep, phase_hook=phase_hook)
        self._bound: tuple | None = None        # (signature, checkpoint, manager, variables)
        self._info = None
        self._step = [0]                        # the step being written (for the hook)
        self._failure: CheckpointError | None = None
        self.extra_memory = 0

    def _bind(self, parts):
        """The checkpoint and manager for arrays of these dtypes and shapes (new ones when
        they change: TF's async helper binds the variables it found at the first save)."""
        tf = _tf()
        signature = tuple((a.dtype.str, a.shape) for _, a in parts)
        if self._bound is None or self._bound[0] != signature:
            self._sync()
            with tf.device("/cpu:0"):
                variables = [tf.Variable(a, trainable=False) for _, a in parts]
                self._info = tf.Variable("", trainable=False)
            ckpt = tf.train.Checkpoint(info=self._info, tensors=variables,
                                       point=_write_point(self._hook, self._step))
            manager = tf.train.CheckpointManager(ckpt, str(self.directory), self.keep)
            self._bound = (signature, ckpt, manager, variables)
            self.extra_memory = sum(a.nbytes for _, a in parts) * (2 if self.asynchronous else 1)
        return self._bound[1:]

    def save(self, step, state, meta=None) -> Future:
        tf = _tf()
        step, arrays, meta = self._check(step, state, meta)
        self._hook(STAGING, "save", step)
        self._raise_failure()
        parts, info = _payload_parts(step, arrays, meta, self._NATIVE)
        ckpt, manager, variables = self._bind(parts)
        for (_, arr), var in zip(parts, variables):
            self._hook(STAGING, "assign", step)
            var.assign(arr)
        self._info.assign(json.dumps(info))
        fut = Future(step)
        options = tf.train.CheckpointOptions(enable_async=self.asynchronous,
                                             experimental_write_callbacks=[
                                                 lambda path: self._durable(fut, path)])
        prefix = self.directory / f"ckpt-{step}"
        try:
            self._step[0] = step      # TF's thread is done with the previous step by now
            manager.save(checkpoint_number=step, options=options)
        except Exception as e:          # TF's OpErrors, or a failure of the previous write
            self._fail(fut, e, prefix)
            raise fut.error from None
        if self.asynchronous:
            self._pending = self._unseen = fut
        elif not fut.done():
            fut.finish()
        return fut

    def _durable(self, fut: Future, path: str) -> None:
        """TF's write callback (in TF's writing thread): fsync, then the save is durable."""
        prefix = Path(path)
        try:
            fsync_tf_checkpoint(prefix, self._hook, fut.step)
        except OSError as e:
            self._fail(fut, e, prefix)
            raise
        fut.finish()

    def _fail(self, fut: Future, error: BaseException, prefix: Path) -> None:
        if isinstance(error, CheckpointError):
            err = error
        elif isinstance(error, OSError):
            err = storage_error(error, "write", str(prefix))
        else:
            err = CheckpointError(f"cannot write checkpoint {prefix}: {type(error).__name__}: "
                                  f"{' '.join(str(error).split())[:300]}")
        if self.asynchronous:
            self._failure = self._failure or err
        if not fut.done():
            fut.finish(err)

    def _sync(self) -> None:
        """Wait for TF's async write; a write that did not reach its callback failed."""
        fut = self._pending
        if self._bound is None or fut is None:
            return
        self._bound[1].sync()
        self._pending = None
        # TF keeps a failure of its thread for its next save, or re-raises it at exit with a
        # traceback: take it over (the thread has finished that write; nothing else reads it)
        helper = getattr(self._bound[1], "_async_checkpointer_impl", None)
        error = getattr(helper, "_async_error", None)
        if error is not None:
            helper._async_error = None
        if not fut.done():
            self._fail(fut, error or CheckpointError("TF's async writer failed"),
                       self.directory / f"ckpt-{fut.step}")

    def _raise_failure(self) -> None:
        self._sync()
        if self._failure is not None:
            raise CheckpointError(f"{self.name} checkpointer stopped after an earlier error: "
                                  f"{self._failure}")

    def _drain(self) -> None:
        self._sync()

    @classmethod
    def _entries(cls, directory: Path) -> list[tuple[int, Path]]:
        return _scan(directory, cls._INDEX_RE, lambda m: f"ckpt-{m.group(1)}")

    @classmethod
    def recover(cls, directory) -> Loaded:
        directory = Path(directory)
        return _recover_newest(directory, cls._load, cls._entries(directory))

    @classmethod
    def _load(cls, prefix: Path) -> Loaded:
        """Read a checkpoint with TF's reader (it verifies every tensor's CRC32C)."""
        tf = _tf()
        try:
            reader = tf.train.load_checkpoint(str(prefix))
            info = reader.get_tensor(cls._INFO_KEY).decode()
            tensors = {name: reader.get_tensor(f"tensors/{i}/.ATTRIBUTES/VARIABLE_VALUE")
                       for i, name in enumerate(json.loads(info)["names"])}
        except (tf.errors.OpError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{prefix}: corrupt or foreign checkpoint "
                                  f"({type(e).__name__}: {' '.join(str(e).split())[:200]})"
                                  ) from None
        return _from_payload({"info": info, "tensors": tensors}, str(prefix))


class TFAsyncCheckpoint(TFCheckpoint):
    __doc__ = TFCheckpoint.__doc__
    name = "tf-async"
    asynchronous = True


# -- a negative control -----------------------------------------------------------------------

class NaiveInPlace:
    """What not to do, kept to prove that the crash campaign catches it: one file, rewritten
    in place on every save -- a JSON header first (naming the new step), then each array at
    its offset -- with no fsync, no checksum and nothing to fall back on. Recovery trusts
    whatever the file holds. The header is written first, so a crash mid-save yields a
    checkpoint that claims the new step while holding old (mixed) or half-written (torn) data.
    """

    name = "naive"
    framework = None
    file_target = "naive.ckpt"
    default_settings: dict = {}
    settings_space: dict = {}
    _HEADER = 1 << 16

    def __init__(self, path: str | os.PathLike, *, phase_hook: PhaseHook | None = None):
        self.path = Path(path)
        self._hook = phase_hook or _no_hook
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def save(self, step, state, meta=None) -> Future:
        step, arrays, meta = check_step(step), normalize_state(state), encode_meta(meta)
        self._hook(STAGING, "save", step)
        entries, pos = [], self._HEADER
        for name, arr in arrays:
            entries.append({"name": name, "descr": dtype_to_json(arr.dtype),
                            "shape": list(arr.shape), "offset": pos})
            pos += arr.nbytes
        header = json.dumps({"step": step, "meta": meta, "tensors": entries}).encode()
        if len(header) > self._HEADER:
            raise CheckpointError("naive checkpointer: header too large")
        os.pwrite(self._fd, header.ljust(self._HEADER, b" "), 0)
        for (name, arr), e in zip(arrays, entries):
            self._hook(WRITING, "write", step)
            os.pwrite(self._fd, arr.tobytes(), e["offset"])
        fut = Future(step)
        fut.finish()
        return fut

    def wait_all(self) -> None:
        pass

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def in_flight(self) -> int:
        return 0

    @staticmethod
    def recover(path) -> Loaded:
        path = Path(path)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise CheckpointError(f"no checkpoint file at {path}") from None
        try:
            head = json.loads(raw[:NaiveInPlace._HEADER].decode().rstrip())
            state = {}
            for e in head["tensors"]:
                dt = dtype_from_json(e["descr"])
                n = int(np.prod(e["shape"], dtype=np.int64)) * dt.itemsize
                chunk = raw[e["offset"]:e["offset"] + n].ljust(n, b"\0")
                state[e["name"]] = np.frombuffer(chunk, dtype=dt).reshape(e["shape"]).copy()
            return Loaded(int(head["step"]), state, head["meta"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable naive checkpoint ({e})") from None


# -- registry: faultlab.checkpointing.api (re-exported while the classes move) ---------------

from faultlab.checkpointing.api import (COMPARED, checkpointer_names as engine_names,  # noqa: E402
                                        open_checkpointer, recover_checkpoint, target_path)

TF_ENGINES = ("tf-sync", "tf-async")
