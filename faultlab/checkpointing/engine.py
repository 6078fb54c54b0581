"""The persistent concurrent checkpoint engine (PCcheck-style), free of any DL framework.

`save()` copies the state into a bounded pool of staging buffers and returns; writer threads
hash and write the chunks with positional writes into a slot of a preallocated file, and the
last one commits: data durable -> checksummed commit record in its own block -> durable.
Slots of the newest `keep` commits and of saves in flight are never reused, so a crash at any
instant leaves at least the newest durable commit intact, and recovery finds it.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from faultlab.checkpointing import tuning
from faultlab.checkpointing.api import SaveFuture
from faultlab.errors import CheckpointError
from faultlab.checkpointing.format import (Geometry, Manifest, Record, align_up, digest, encode_header,
                     encode_manifest, encode_record, tombstone)
from faultlab.checkpointing.layout import Layout, byte_view, check_step, encode_meta, normalize_state, plan, stage_chunk
from faultlab.checkpointing.pool import BufferPool
from faultlab.checkpointing.recovery import CommitInfo, Restored, read_geometry, recover, valid_commits
from faultlab.checkpointing.storage import OSStorage, Storage

_CHUNK, _FINALIZE = "chunk", "finalize"


class SaveHandle(SaveFuture):
    """The future of one engine save: done once its commit is durable, or once it has failed.

    A SaveFuture whose result is the save's CommitInfo; `counter` is its commit counter
    (newer saves have larger ones). Callbacks run in a writer thread."""

    def __init__(self, counter: int, step: int):
        super().__init__(step)
        self.counter = counter

    def wait(self, timeout: float | None = None) -> CommitInfo:
        """Block until durable; return its CommitInfo or raise its CheckpointError."""
        return super().wait(timeout)

    @property
    def commit(self) -> CommitInfo | None:
        """The commit (None while in flight or when the save failed)."""
        return self._result

    def __repr__(self) -> str:
        state = "pending" if not self.done() else ("failed" if self._error else "committed")
        return f"<SaveHandle counter={self.counter} step={self.step} {state}>"


@dataclass
class _SaveJob:
    handle: SaveHandle
    slot: int
    layout: Layout
    manifest_offset: int
    meta: dict
    hashes: list
    remaining: int                       # chunks not yet written + 1 until staging ends
    verify: Callable[[], str | None] | None = None   # borrowed saves: last check before commit

    def __post_init__(self):
        self.lock = threading.Lock()


@dataclass(frozen=True)
class EngineSettings:
    """The engine's effective tuning (after `auto` probing, rounding and the file's geometry)."""

    chunk_bytes: int
    pool_bytes: int
    writers: int
    max_in_flight: int
    keep: int


class CheckpointEngine:
    """Concurrent, crash-consistent checkpoints of {name: numpy array} states into one file.

    target: a path (an OSStorage is made for it) or a Storage. An existing file is reopened
    (taking the writer lock): its newest `keep` commits that verify are protected, and
    counters continue after every commit record it holds; its geometry (slot count and size,
    block size) wins over the arguments. A new file is created at the first save, with
    keep + max_in_flight slots sized from that state, or at once when slot_bytes is given.

    max_in_flight: saves persisting at once (save() blocks beyond it). keep: committed
    checkpoints never overwritten. chunk_bytes: unit of staging, hashing and writing.
    pool_bytes: staging memory (a state larger than it streams through it). writers: writer
    threads. Each of the last three may be "auto": a short probe of the storage picks it.

    The call order of one save (the contract recovery and the crash campaigns rely on; for
    one save, each step starts after the previous one, except that writers take chunks as
    soon as step 3 queues them):

    1. **admit** (in ``save()``, the caller's thread): wait for a free slot (neither one of
       the newest ``keep`` commits nor a save in flight) and lock its record byte
       exclusively (a slot a live ``recover()`` is reading holds a shared lock: another free
       slot is taken, or the save waits for that reader); take the next commit counter. The
       slot's old commit is no longer protected from here on; the lock is released at step 7
       (or when the save fails).
    2. **tombstone** (caller's thread): overwrite the slot's commit record with a tombstone,
       unsynced, so that recovery never reads the slot's old record with its new data.
    3. **stage** (caller's thread): copy the state, chunk by chunk, into staging buffers and
       queue each chunk to the writers (a borrowed save queues views of the arrays instead).
       ``save()`` returns here; the caller may change the arrays (not a borrowed save's).
    4. **write** (writer threads, chunks in any order and concurrently): hash each chunk and
       ``pwrite`` it at its place in the slot; its staging buffer goes back to the pool.
    5. **verify** (a writer, once every chunk is written, under the commit lock that
       serialises the commits of all saves): a borrowed save's ``verify()``; a message it
       returns fails the save, nothing is committed.
    6. **commit record**: write the manifest (chunk hashes, tensors, meta) after the data,
       ``sync_data`` (data and manifest durable), then write the slot's checksummed commit
       record.
    7. **durable**: ``sync_data`` again -- the commit point; then the slot counts as
       committed, the handle finishes with its CommitInfo and its callbacks run.

    A write or sync error at any step stops the engine (every later save fails; earlier
    commits stay intact and recoverable); a save that fails before step 7 leaves its slot
    without a valid record.
    """

    borrows = True          # save(..., borrowed=True) writes arrays where they are

    def __init__(self, target: str | os.PathLike | Storage, *, max_in_flight: int = 2,
                 keep: int = 2, chunk_bytes: int | str = tuning.DEFAULT_CHUNK_BYTES,
                 pool_bytes: int | str = tuning.DEFAULT_POOL_BYTES,
                 writers: int | str = tuning.DEFAULT_WRITERS, slot_bytes: int | None = None,
                 block_size: int = 4096):
        if max_in_flight < 1 or keep < 1:
            raise CheckpointError("max_in_flight and keep must be at least 1")
        self._storage = target if isinstance(target, Storage) else OSStorage(target)
        if "auto" in (chunk_bytes, pool_bytes, writers):
            probed = tuning.probe(self._storage)
            chunk_bytes = probed.chunk_bytes if chunk_bytes == "auto" else chunk_bytes
            pool_bytes = probed.pool_bytes if pool_bytes == "auto" else pool_bytes
            writers = probed.writers if writers == "auto" else writers
        if min(chunk_bytes, pool_bytes, writers) < 1:
            raise CheckpointError("chunk_bytes, pool_bytes and writers must be positive")
        self._keep, self._max_in_flight = keep, max_in_flight
        self._block_size = block_size
        self._geom: Geometry | None = None
        self._committed: dict[int, CommitInfo] = {}       # slot -> commit it holds
        self._in_flight: dict[int, _SaveJob] = {}         # slot -> save writing it
        self._next_counter = 0
        self._failure: CheckpointError | None = None
        self._failed: list[SaveHandle] = []
        self._closed = False
        self._opened = False
        self._cond = threading.Condition()
        self._create_lock = threading.Lock()
        self._commit_lock = threading.Lock()
        if self._storage.exists():
            self._reopen()
        elif slot_bytes is not None:
            self._create(slot_bytes)
        self._chunk_bytes = align_up(int(chunk_bytes), self._block_size)
        capacity = max(1, int(pool_bytes) // self._chunk_bytes)
        self._pool = BufferPool(self._chunk_bytes, capacity)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._local = threading.local()              # writers' scratch for borrowed saves
        self._writers = [threading.Thread(target=self._writer_loop, daemon=True,
                                          name=f"ckpt-writer-{i}") for i in range(int(writers))]
        for t in self._writers:
            t.start()

    # -- opening and creating ----------------------------------------------------------

    def _reopen(self) -> None:
        self._storage.open(write=True)
        self._opened = True
        try:
            geom = read_geometry(self._storage)
            size = self._storage.size()
            if size < geom.file_bytes:
                raise CheckpointError(f"checkpoint {self._storage.name} is truncated ({size} of "
                                      f"{geom.file_bytes} bytes); recover() what it holds and "
                                      "write to a new file")
            if geom.slot_count - self._keep < 1:
                raise CheckpointError(f"checkpoint {self._storage.name} has {geom.slot_count} "
                                      f"slots: keep={self._keep} leaves none to save into")
            # Only the newest `keep` verified commits need protecting; reading further back
            # would cost a whole slot per commit for slots that are reused first anyway.
            good, max_counter = valid_commits(self._storage, geom, want=self._keep)
        except BaseException:
            self._storage.close()
            raise
        self._geom, self._block_size = geom, geom.block_size
        self._max_in_flight = min(self._max_in_flight, geom.slot_count - self._keep)
        self._committed = {c.slot: c for c in good}
        self._next_counter = max_counter + 1

    def _create(self, slot_bytes: int) -> None:
        try:
            geom = Geometry.new(self._block_size, self._keep + self._max_in_flight, slot_bytes)
        except ValueError as e:
            raise CheckpointError(f"bad checkpoint geometry: {e}") from None
        self._storage.create(geom.file_bytes, encode_header(geom))
        self._opened = True
        self._geom = geom

    # -- public API ----------------------------------------------------------------------

    @classmethod
    def slot_bytes_for(cls, *states: Mapping[str, np.ndarray], meta: Mapping | None = None,
                       chunk_bytes: int = tuning.DEFAULT_CHUNK_BYTES,
                       block_size: int = 4096) -> int:
        """The slot size the engine gives a new file for the largest of `states` (saved with
        `meta`, in chunks of `chunk_bytes`): its data, block-aligned, plus a reserve of twice
        the widest manifest it could need and one block. The engine sizes the slots of a file
        it creates at the first save this way; pass more (``slot_bytes=``) for states that
        grow later in a run."""
        chunk_bytes = align_up(int(chunk_bytes), block_size)
        meta = encode_meta(meta)
        need = 0
        for state in states:
            layout = plan(normalize_state(state), chunk_bytes)
            need = max(need, _slot_need(layout, _manifest_bound(layout, 2**63 - 1, meta),
                                        block_size))
        return need

    @property
    def staging_bytes(self) -> int:
        """Staging memory allocated so far (bytes; the pool allocates buffers on first use)."""
        return self._pool.allocated_bytes

    @property
    def settings(self) -> EngineSettings:
        return EngineSettings(self._chunk_bytes, self._pool.capacity * self._chunk_bytes,
                              len(self._writers), self._max_in_flight, self._keep)

    @property
    def geometry(self) -> Geometry | None:
        """The file's layout (None until the file exists)."""
        return self._geom

    @property
    def in_flight(self) -> int:
        with self._cond:
            return len(self._in_flight)

    def committed(self) -> list[CommitInfo]:
        """Commits this file still holds (durable and not overwritten), oldest first."""
        with self._cond:
            return sorted(self._committed.values(), key=lambda c: c.counter)

    def save(self, step: int, state: Mapping[str, np.ndarray], meta: Mapping | None = None, *,
             timeout: float | None = None, borrowed: bool = False,
             verify: Callable[[], str | None] | None = None) -> SaveHandle:
        """Stage `state` and return once it is copied; persisting continues in the background
        (admit -> tombstone -> stage here, then write -> verify -> commit record -> durable
        in the writers: the call order in the class docstring).

        Blocks while max_in_flight saves are in flight (TimeoutError after `timeout` seconds)
        and while the staging pool is full. The arrays may be modified as soon as it returns.

        borrowed=True: nothing is copied now. The writers hash and write the arrays where they
        are (chunks that mix several small arrays are assembled in a staging buffer by the
        writer), so save() returns after admission; the caller must keep the arrays unchanged
        until the handle is done (the torch adapter's copy-on-write mode does so without a
        copy). verify(), if given, runs after the last chunk is written and before the commit
        record: a message it returns fails this save (nothing committed, the engine goes on).
        """
        self._check_usable()
        step = check_step(step)
        arrays = normalize_state(state)
        meta = encode_meta(meta)
        layout = plan(arrays, self._chunk_bytes)
        manifest_len = _manifest_bound(layout, step, meta)
        manifest_offset = align_up(layout.data_bytes, self._block_size)
        with self._create_lock:
            if self._geom is None:
                self._create(_slot_need(layout, manifest_len, self._block_size))
        needed = manifest_offset + manifest_len
        if needed > self._geom.slot_bytes:
            raise CheckpointError(f"state of step {step} needs {needed} bytes per slot but "
                                  f"{self._storage.name} has slots of {self._geom.slot_bytes}; "
                                  f"start a new file or pass slot_bytes>={needed}")
        job = self._admit(step, layout, manifest_offset, meta, timeout)
        job.verify = verify
        try:
            # Invalidate the slot's old record before overwriting its data, so recovery does
            # not have to read a whole slot to find it stale. Not synced: the data sync of
            # this save makes it durable before the new record is written.
            self._storage.pwrite(self._geom.record_offset(job.slot),
                                 tombstone(self._geom.block_size))
        except CheckpointError as e:
            self._fail(e)
            self._staged(job, 0)
            return job.handle
        if borrowed:
            self._lend(job, arrays)
        else:
            self._stage(job, arrays)
        return job.handle

    def wait_all(self) -> None:
        """Wait for every save in flight; raise the first failure nobody has looked at yet."""
        with self._cond:
            pending = [j.handle for j in self._in_flight.values()]
        for h in pending:
            h.join()
        with self._cond:
            unseen = [h for h in self._failed if not h.observed]
        if unseen:
            for h in unseen:
                h.mark_observed()
            raise unseen[0].error

    def load_latest(self, before_step: int | None = None) -> Restored:
        """The newest checkpoint in the file whose record and data verify (see recover());
        with `before_step`, the newest taken before that step."""
        if not self._storage.exists():
            raise CheckpointError(f"no checkpoint file at {self._storage.name}")
        return recover(self._storage, before_step)

    def close(self) -> None:
        """Finish the saves in flight, stop the writers and close the file (idempotent)."""
        if self._closed:
            return
        try:
            self.wait_all()
        finally:
            self._closed = True
            for _ in self._writers:
                self._jobs.put(None)
            for t in self._writers:
                t.join()
            if self._opened:
                self._storage.close()

    def __enter__(self) -> CheckpointEngine:
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            try:
                self.close()
            except CheckpointError:
                pass                     # do not mask the exception already propagating

    # -- save pipeline -------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._closed:
            raise CheckpointError("checkpoint engine is closed")
        if self._failure is not None:
            with self._cond:
                for h in self._failed:       # the caller is being told now
                    h.mark_observed()
            raise CheckpointError(f"checkpoint engine stopped after an earlier error "
                                  f"(reopen the file to go on): {self._failure}")

    def _free_slots(self) -> list[int]:
        """Slots a new save may take, best first: neither one of the newest `keep` commits
        nor a save in flight; a slot holding nothing, then the one with the oldest commit."""
        newest = sorted(self._committed.values(), key=lambda c: c.counter)[-self._keep:]
        protected = {c.slot for c in newest} | set(self._in_flight)
        free = [s for s in range(self._geom.slot_count) if s not in protected]
        return sorted(free, key=lambda s: self._committed[s].counter if s in self._committed
                      else -1)

    def _admit(self, step: int, layout: Layout, manifest_offset: int, meta: dict,
               timeout: float | None) -> _SaveJob:
        deadline = None if timeout is None else time.monotonic() + timeout
        held = None               # a slot lock taken while waiting for a reader, not yet used
        try:
            while True:
                with self._cond:
                    while True:
                        self._check_usable()
                        free = (self._free_slots()
                                if len(self._in_flight) < self._max_in_flight else [])
                        if free:
                            break
                        left = None if deadline is None else deadline - time.monotonic()
                        if left is not None and left <= 0:
                            raise TimeoutError(f"{len(self._in_flight)} checkpoints still "
                                               "in flight")
                        self._cond.wait(left)
                    # A slot is rewritten only under an exclusive lock on its record byte; a
                    # recover() reading the slot holds a shared one (recovery.py), so the
                    # writer takes another free slot rather than overwrite data being read.
                    slot = held if held in free else None
                    for s in free:
                        if slot is not None:
                            break
                        if self._storage.lock_byte(self._geom.record_offset(s), exclusive=True,
                                                   wait=False):
                            slot = s
                    if slot is not None:
                        if held is not None and held != slot:
                            self._storage.unlock_byte(self._geom.record_offset(held))
                        held = None
                        counter, self._next_counter = self._next_counter, self._next_counter + 1
                        self._committed.pop(slot, None)
                        job = _SaveJob(SaveHandle(counter, step), slot, layout, manifest_offset,
                                       meta, [0] * len(layout.chunks), len(layout.chunks) + 1)
                        self._in_flight[slot] = job
                        return job
                    want = free[0]
                if held is not None:                 # no longer free: give it back, retry
                    self._storage.unlock_byte(self._geom.record_offset(held))
                    held = None
                # Every free slot is being read by a recover() elsewhere: wait for the reader
                # of the best one (outside the condition, so commits can proceed meanwhile).
                held = self._wait_for_reader(want, deadline)
        except BaseException:
            if held is not None:
                self._storage.unlock_byte(self._geom.record_offset(held))
            raise

    def _wait_for_reader(self, slot: int, deadline: float | None) -> int:
        at = self._geom.record_offset(slot)
        if deadline is None:
            self._storage.lock_byte(at, exclusive=True, wait=True)
            return slot
        pause = 0.001
        while not self._storage.lock_byte(at, exclusive=True, wait=False):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"slot {slot} of {self._storage.name} is being read by a "
                                   "recovering process")
            time.sleep(min(pause, left))                 # a reader's lock has no waitable
            pause = min(pause * 2, 0.05)                 # event with a timeout: back off
        return slot

    def _stage(self, job: _SaveJob, arrays: list[tuple[str, np.ndarray]]) -> None:
        sources = [byte_view(a) if a.nbytes else None for _, a in arrays]
        submitted = 0
        for i in range(len(job.layout.chunks)):
            buf = self._pool.acquire()
            if self._failure is not None:
                self._pool.release(buf)
                break
            n = stage_chunk(job.layout, i, sources, buf)
            self._jobs.put((_CHUNK, job, i, buf, n))
            submitted += 1
        self._staged(job, submitted)

    def _lend(self, job: _SaveJob, arrays: list[tuple[str, np.ndarray]]) -> None:
        """Queue every chunk with its sources instead of a copy (borrowed save)."""
        sources = [byte_view(a) if a.nbytes else None for _, a in arrays]
        for i in range(len(job.layout.chunks)):
            self._jobs.put((_CHUNK, job, i, sources, job.layout.chunk_length(i)))
        self._staged(job, len(job.layout.chunks))

    def _chunk_view(self, job: _SaveJob, i: int, sources: list) -> np.ndarray:
        """Chunk i of a borrowed save: a view of its one source array or, when it mixes
        arrays or alignment gaps, assembled in this writer's own scratch buffer (not the
        pool: a writer waiting for a pool buffer behind queued chunks that hold them all
        would deadlock)."""
        pieces, n = job.layout.chunks[i], job.layout.chunk_length(i)
        if len(pieces) == 1 and pieces[0].dst == 0 and pieces[0].length == n:
            p = pieces[0]
            return sources[p.tensor][p.src:p.src + n]
        scratch = getattr(self._local, "scratch", None)
        if scratch is None or len(scratch) < job.layout.chunk_bytes:
            scratch = self._local.scratch = np.empty(job.layout.chunk_bytes, dtype=np.uint8)
        stage_chunk(job.layout, i, sources, scratch)
        return scratch[:n]

    def _staged(self, job: _SaveJob, submitted: int) -> None:
        self._done_with(job, 1 + len(job.layout.chunks) - submitted)

    def _done_with(self, job: _SaveJob, parts: int) -> None:
        with job.lock:
            job.remaining -= parts
            last = job.remaining == 0
        if last:
            self._jobs.put((_FINALIZE, job))

    def _fail(self, error: CheckpointError) -> None:
        # Any write or sync error stops the engine: after a failed fsync the page cache may
        # have dropped dirty data while a later fsync reports success, so no later commit
        # could be trusted. Earlier commits are already durable and stay intact.
        with self._cond:
            if self._failure is None:
                self._failure = error
            self._cond.notify_all()

    def _writer_loop(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            if item[0] == _FINALIZE:
                self._finalize(item[1])
                continue
            _, job, i, buf, n = item
            # a staged chunk comes in a pool buffer; a borrowed one as its job's sources
            pooled = buf if isinstance(buf, np.ndarray) else None
            try:
                if self._failure is None:
                    if pooled is None:
                        view = self._chunk_view(job, i, buf)
                    else:
                        view = buf[:n]
                    job.hashes[i] = digest(view)
                    self._storage.pwrite(self._geom.slot_offset(job.slot)
                                         + i * job.layout.chunk_bytes, view)
            except CheckpointError as e:
                self._fail(e)
            except Exception as e:           # a bug must not hang the caller's wait()
                self._fail(CheckpointError(f"checkpoint writer failed: {type(e).__name__}: {e}"))
            finally:
                if pooled is not None:
                    self._pool.release(pooled)
                # drop this chunk's references to a borrowed save's arrays before the save
                # may finish: its owner recycles their memory only when nobody holds them
                item = buf = view = pooled = None
                self._done_with(job, 1)

    def _finalize(self, job: _SaveJob) -> None:
        info, error = None, None
        try:
            with self._commit_lock:
                cause = self._failure
                rejected = job.verify() if cause is None and job.verify is not None else None
                if rejected:
                    # the borrowed arrays changed while being written: this save's slot holds
                    # no record (its tombstone stands), nothing is committed, the engine goes on
                    error = CheckpointError(f"checkpoint of step {job.handle.step} not "
                                            f"committed: {rejected}")
                elif cause is None:
                    try:
                        info = self._commit(job)
                    except CheckpointError as e:
                        self._fail(e)
                        cause = e
                if cause is not None:
                    error = CheckpointError(f"checkpoint of step {job.handle.step} failed: "
                                            f"{cause}")
        except Exception as e:
            self._fail(CheckpointError(f"checkpoint commit failed: {type(e).__name__}: {e}"))
            error = self._failure
        # Readers may pin the slot again: its new record (or its tombstone) is in place.
        self._storage.unlock_byte(self._geom.record_offset(job.slot))
        with self._cond:
            del self._in_flight[job.slot]
            if info is not None:
                self._committed[job.slot] = info
            else:
                self._failed.append(job.handle)
            self._cond.notify_all()
        job.handle.finish(info, error)

    def _commit(self, job: _SaveJob) -> CommitInfo:
        geom, st, h = self._geom, self._storage, job.handle
        raw = encode_manifest(_manifest(job.layout, h.counter, h.step, job.meta, job.hashes))
        if job.manifest_offset + len(raw) > geom.slot_bytes:      # never spill into a neighbour
            raise CheckpointError(f"manifest of step {h.step} does not fit its slot")
        st.pwrite(geom.slot_offset(job.slot) + job.manifest_offset, raw)
        # Data and manifest must be durable before the record that vouches for them exists:
        # otherwise a power loss could keep the record and lose what it points at.
        st.sync_data()
        record = Record(job.slot, h.counter, h.step, job.manifest_offset, len(raw), digest(raw),
                        job.layout.data_bytes, geom.file_id)
        st.pwrite(geom.record_offset(job.slot), encode_record(record, geom.block_size))
        # The commit point. Without this sync the record could sit in a volatile drive cache
        # after wait() has said the checkpoint is safe (PCcheck's unsynced pointer).
        st.sync_data()
        return CommitInfo(h.counter, h.step, job.slot, job.layout.data_bytes)


def _manifest_bound(layout: Layout, step: int, meta: dict) -> int:
    """The encoded length of a save's manifest, sized with the widest counter and fixed-width
    chunk hashes: the real manifest, encoded at commit time, can only be shorter."""
    return len(encode_manifest(_manifest(layout, 2**63 - 1, step, meta,
                                         [0] * len(layout.chunks))))


def _slot_need(layout: Layout, manifest_len: int, block_size: int) -> int:
    """The slot size a new file gets for this layout: the data, block-aligned, then a reserve
    of twice the manifest plus one block (the state's metadata may grow a little)."""
    return (align_up(layout.data_bytes, block_size)
            + align_up(2 * manifest_len + 4096, block_size))


def _manifest(layout: Layout, counter: int, step: int, meta: dict, hashes) -> Manifest:
    return Manifest(counter, step, layout.chunk_bytes, layout.data_bytes, tuple(hashes),
                    layout.tensors, meta)
