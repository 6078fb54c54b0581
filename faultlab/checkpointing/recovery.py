"""Finding and loading the newest checkpoint whose commit record and data all verify.

Recovery trusts nothing it has not checked: the header's checksum, each commit record's
checksum, the manifest's checksum (held by the record) and every data chunk's checksum (held by
the manifest). Candidates are tried newest counter first; a damaged one is skipped, so a
crash in the middle of a save, or later damage to the newest checkpoint, falls back to an
older one. It never returns data that did not verify.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from faultlab.checkpointing.api import Loaded
from faultlab.errors import CheckpointError
from faultlab.checkpointing.format import (FormatError, Geometry, Manifest, Record, decode_header, decode_manifest,
                     decode_record, digest)
from faultlab.checkpointing.storage import OSStorage, Storage

_HEADER_PROBE = 1 << 16          # bytes read to find the header (the largest block size)


@dataclass(frozen=True)
class CommitInfo:
    """A committed checkpoint: its commit counter (newer = larger), step, slot and size."""

    counter: int
    step: int
    slot: int
    data_bytes: int


class Restored(Loaded):
    """A loaded checkpoint, unpacking as (step, state, meta); `.commit` says which commit."""

    commit: CommitInfo


def _restored(step: int, state: dict, meta: dict, commit: CommitInfo) -> Restored:
    r = Restored(step, state, meta)
    r.commit = commit                      # a subclass without __slots__ has a __dict__
    return r


def read_geometry(storage: Storage) -> Geometry:
    """Decode the header; CheckpointError if the file is empty, foreign or damaged."""
    size = storage.size()
    if size == 0:
        raise CheckpointError(f"checkpoint {storage.name} is empty")
    try:
        return decode_header(storage.pread(0, min(size, _HEADER_PROBE)))
    except FormatError as e:
        raise CheckpointError(f"cannot read checkpoint {storage.name}: {e}") from None


def scan_records(storage: Storage, geom: Geometry) -> tuple[list[Record], int]:
    """Valid commit records, newest first, and the largest counter any valid record holds.
    Reads only record blocks that the file holds (a header may claim more than exist)."""
    records = []
    present = max(0, storage.size() - geom.records_offset)
    count = min(geom.slot_count, -(-present // geom.block_size))
    raw = storage.pread(geom.records_offset, count * geom.block_size)
    for slot in range(count):
        block = raw[slot * geom.block_size:(slot + 1) * geom.block_size]
        try:
            records.append(decode_record(block, geom, slot))
        except FormatError:
            continue
    records.sort(key=lambda r: (r.counter, r.slot), reverse=True)
    return records, max((r.counter for r in records), default=-1)


def _read_manifest(storage: Storage, geom: Geometry, rec: Record) -> Manifest:
    at = geom.slot_offset(rec.slot) + rec.manifest_offset
    if at + rec.manifest_bytes > storage.size():
        raise FormatError("manifest beyond the end of the file (truncated)")
    raw = storage.pread(at, rec.manifest_bytes)
    if len(raw) != rec.manifest_bytes:
        raise FormatError("manifest beyond the end of the file (truncated)")
    if digest(raw) != rec.manifest_hash:
        raise FormatError("manifest checksum mismatch")
    return decode_manifest(raw, rec)


def _read_data(storage: Storage, geom: Geometry, rec: Record, m: Manifest) -> np.ndarray:
    """Read the data region into one buffer, verifying every chunk as it arrives."""
    base = geom.slot_offset(rec.slot)
    if base + m.data_bytes > storage.size():
        raise FormatError("data beyond the end of the file (truncated)")
    data = np.empty(m.data_bytes, dtype=np.uint8)
    for i, expected in enumerate(m.chunk_hashes):
        lo = i * m.chunk_bytes
        view = data[lo:min(lo + m.chunk_bytes, m.data_bytes)]
        if storage.readinto(base + lo, view) != len(view):
            raise FormatError(f"chunk {i} beyond the end of the file (truncated)")
        if digest(view) != expected:
            raise FormatError(f"chunk {i} checksum mismatch")
    return data


def _arrays(m: Manifest, data: np.ndarray) -> dict[str, np.ndarray]:
    state = {}
    for t in m.tensors:
        if t.nbytes == 0:
            state[t.name] = np.empty(t.shape, dtype=t.dtype)
        else:
            state[t.name] = data[t.offset:t.offset + t.nbytes].view(t.dtype).reshape(t.shape)
    return state


def load_commit(storage: Storage, geom: Geometry, rec: Record) -> Restored:
    """Load one commit; FormatError saying why if any part of it fails to verify."""
    m = _read_manifest(storage, geom, rec)
    data = _read_data(storage, geom, rec, m)
    info = CommitInfo(rec.counter, rec.step, rec.slot, rec.data_bytes)
    try:
        state = _arrays(m, data)
    except (ValueError, TypeError, OverflowError, MemoryError) as e:
        # decode_manifest checked every entry; this is the last line of defence, so that an
        # entry it let through still falls back to an older commit instead of escaping
        raise FormatError(f"manifest: tensors cannot be rebuilt ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return _restored(rec.step, state, m.meta, info)


def _verify_commit(storage: Storage, geom: Geometry, rec: Record) -> None:
    m = _read_manifest(storage, geom, rec)
    base = geom.slot_offset(rec.slot)
    if base + m.data_bytes > storage.size():
        raise FormatError("data beyond the end of the file (truncated)")
    buf = np.empty(min(m.chunk_bytes, max(m.data_bytes, 1)), dtype=np.uint8)
    for i, expected in enumerate(m.chunk_hashes):
        lo = i * m.chunk_bytes
        view = buf[:min(m.chunk_bytes, m.data_bytes - lo)]
        if storage.readinto(base + lo, view) != len(view) or digest(view) != expected:
            raise FormatError(f"chunk {i} damaged")


# -- reading beside a live writer ---------------------------------------------------------
#
# The writer rewrites a slot only while holding an exclusive lock on the slot's record byte
# (engine.py), and only slots outside the newest `keep` commits. A reader pins the slot of the
# record it is about to read with a shared lock, then re-reads the record: if the lock is
# refused or the record changed, the writer reused that slot after the records were scanned,
# so the reader scans again (the slot's commit is no longer among the newest anyway). While
# pinned, the slot cannot be rewritten: a slow reader is never overtaken. On a storage
# without byte locks the re-read after a failed check still tells reuse from damage.

_RESCANS = 10_000        # scans before giving up on a file that never holds still


class _SlotReused(Exception):
    """The slot of a scanned record was reused since the scan: scan again."""


@contextmanager
def _pinned(storage: Storage, geom: Geometry, rec: Record):
    at = geom.record_offset(rec.slot)
    if not storage.lock_byte(at, exclusive=False, wait=False):
        raise _SlotReused                 # the writer holds it: it is being rewritten
    try:
        if not _record_holds(storage, geom, rec):
            raise _SlotReused
        try:
            yield
        except FormatError:
            if not _record_holds(storage, geom, rec):
                raise _SlotReused from None
            raise
    finally:
        storage.unlock_byte(at)


def _record_holds(storage: Storage, geom: Geometry, rec: Record) -> bool:
    try:
        return decode_record(storage.pread(geom.record_offset(rec.slot), geom.block_size),
                             geom, rec.slot) == rec
    except FormatError:
        return False


def _newest_that_loads(storage: Storage, geom: Geometry, choose, read):
    """Scan the records, keep those `choose(records)` returns (in order) and return
    (read(record) of the first that verifies, records, failure reasons); rescans when a
    writer reuses a slot in between."""
    for _ in range(_RESCANS):
        records = choose(scan_records(storage, geom)[0])
        reasons = []
        try:
            for rec in records:
                try:
                    with _pinned(storage, geom, rec):
                        return read(rec), records, reasons
                except FormatError as e:
                    reasons.append(f"counter {rec.counter} (step {rec.step}): {e}")
        except _SlotReused:
            continue
        return None, records, reasons
    raise CheckpointError(f"{storage.name} changed under every one of {_RESCANS} reads "
                          "(a writer reusing slots faster than they can be read)")


def verify_commit(storage: Storage, geom: Geometry, rec: Record) -> None:
    """Check one commit's manifest and data without keeping them; FormatError if damaged."""
    _verify_commit(storage, geom, rec)


def valid_commits(storage: Storage, geom: Geometry,
                  want: int | None = None) -> tuple[list[CommitInfo], int]:
    """Fully verified commits, newest first (stopping after `want` of them), and the largest
    counter that any valid record holds."""
    for _ in range(_RESCANS):
        records, max_counter = scan_records(storage, geom)
        good = []
        try:
            for rec in records:
                if want is not None and len(good) >= want:
                    break
                try:
                    with _pinned(storage, geom, rec):
                        _verify_commit(storage, geom, rec)
                except FormatError:
                    continue
                good.append(CommitInfo(rec.counter, rec.step, rec.slot, rec.data_bytes))
        except _SlotReused:
            continue
        return good, max_counter
    raise CheckpointError(f"{storage.name} changed under every one of {_RESCANS} reads")


def load_latest_from(storage: Storage, before_step: int | None = None) -> Restored:
    """The newest fully verified checkpoint in an opened storage (only those taken before
    `before_step` when given: rollback past a checkpoint that already holds a fault)."""
    geom = read_geometry(storage)

    def choose(records):
        return [r for r in records if before_step is None or r.step < before_step]

    found, records, reasons = _newest_that_loads(
        storage, geom, choose, lambda rec: load_commit(storage, geom, rec))
    if found is not None:
        return found
    size = storage.size()
    trunc = (f"; the file is truncated ({size} of {geom.file_bytes} bytes)"
             if size < geom.file_bytes else "")
    if not records:
        raise CheckpointError(f"no committed checkpoint in {storage.name}{trunc}")
    raise CheckpointError(f"no valid checkpoint in {storage.name}: "
                          f"{len(records)} commit(s) failed verification, newest "
                          f"{reasons[0]}{trunc}")


def _reader_for(target: str | os.PathLike | Storage) -> Storage:
    return target.reader() if isinstance(target, Storage) else OSStorage(target)


def recover(target: str | os.PathLike | Storage, before_step: int | None = None) -> Restored:
    """Load the newest committed checkpoint that verifies, from a path or a Storage.

    Returns (step, state, meta) with `.commit` telling which commit was used; raises a
    one-line CheckpointError when the file is missing, foreign or holds no valid checkpoint.
    Safe to run while a writer is active, in this process or another: it returns the newest
    commit that was durable when it started, or a newer one (it pins the slot it reads, so
    the writer cannot reuse it meanwhile; see _pinned).
    """
    storage = _reader_for(target)
    storage.open(write=False)
    try:
        return load_latest_from(storage, before_step)
    finally:
        storage.close()


def load_step(target: str | os.PathLike | Storage, step: int, *,
              what: str = "checkpoint") -> Restored:
    """Load the commit of step `step` (the newest one if the file holds several), verified
    against its checksums: a one-line CheckpointError naming the file when the file holds no
    commit of that step ("no {what} of step N") or when it is damaged ("{what} of step N is
    damaged"); never a silently wrong state. Reads only the record blocks and that commit's
    slot. `what` names the checkpoint in those messages (a golden run: "golden checkpoint")."""
    storage = _reader_for(target)
    storage.open(write=False)
    try:
        geom = read_geometry(storage)
        found, records, reasons = _newest_that_loads(
            storage, geom, lambda records: [r for r in records if r.step == step][:1],
            lambda rec: load_commit(storage, geom, rec))
        if found is not None:
            return found
        if not records:
            raise CheckpointError(f"{storage.name}: no {what} of step {step}")
        raise CheckpointError(f"{storage.name}: {what} of step {step} is damaged "
                              f"({reasons[0].split(': ', 1)[1]})")
    finally:
        storage.close()


def list_commits(target: str | os.PathLike | Storage) -> list[CommitInfo]:
    """Every commit in a file whose record and data verify, oldest first."""
    storage = _reader_for(target)
    storage.open(write=False)
    try:
        good, _ = valid_commits(storage, read_geometry(storage))
    finally:
        storage.close()
    return sorted(good, key=lambda c: c.counter)
