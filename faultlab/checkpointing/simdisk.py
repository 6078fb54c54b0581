"""An in-memory disk that forgets, reorders and tears unsynced writes, for crash testing.

Modelled on SQLite's crash VFS and ALICE: the disk keeps the durable content apart from the
writes issued since the last sync, tracked per block. A power loss keeps, drops or tears
(at sector granularity) each unsynced block write independently, applying the survivors in
any order; `crash_image` draws one such outcome, `enumerate_images` walks many of them
systematically. Writes and syncs can be made to fail (ENOSPC, EIO), and every operation is
logged so that `crash_states` can rebuild the disk at each instant of a run.
"""

from __future__ import annotations

import errno
import itertools
import os
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from faultlab.errors import CheckpointError
from faultlab.checkpointing.format import digest as _digest
from faultlab.checkpointing.storage import ByteLocks, Storage, storage_error


@dataclass(frozen=True)
class PendingWrite:
    """A written-but-unsynced piece of one block: bytes `data` at file `offset`."""

    seq: int
    offset: int
    data: bytes

    def sectors(self, sector_size: int) -> range:
        last = (self.offset + len(self.data) - 1) // sector_size
        return range(self.offset // sector_size, last + 1)


@dataclass(frozen=True)
class CrashChoice:
    """One power-loss outcome for a list of pending writes.

    masks[i] says which sectors of pending write i reached the disk (bit j = its j-th sector):
    0 = dropped, all bits = kept, anything else = torn. `order` is the order in which the
    survivors landed (indices into the pending list); None = the order they were issued.
    """

    masks: tuple[int, ...]
    order: tuple[int, ...] | None = None


@dataclass(frozen=True)
class _Fault:
    kind: str
    remaining: int
    err: int


class SimDisk(Storage):
    """One simulated checkpoint file on a simulated disk (thread-safe)."""

    def __init__(self, *, block_size: int = 4096, sector_size: int = 512, name: str = "simdisk"):
        if block_size % sector_size or sector_size <= 0:
            raise ValueError("block size must be a multiple of the sector size")
        self.block_size, self.sector_size, self.name = block_size, sector_size, name
        self._durable: bytearray | None = None     # None: the file does not exist
        self._view: bytearray | None = None        # what reads see: durable + pending
        self._pending: list[PendingWrite] = []
        self._seq = 0
        self._log: list[tuple] = []
        self._faults: list[_Fault] = []
        self._counts = {"write": 0, "sync": 0}
        self._writer = False
        self._handle_open = False
        self._lock = threading.RLock()
        self._byte_locks = ByteLocks()        # shared with the readers of this disk

    # -- construction helpers ------------------------------------------------------------

    @classmethod
    def from_bytes(cls, data: bytes, **kw) -> SimDisk:
        """A disk whose file durably holds `data`."""
        disk = cls(**kw)
        disk._durable, disk._view = bytearray(data), bytearray(data)
        disk._log.append(("image", bytes(data)))
        return disk

    def _blank_like(self) -> SimDisk:
        return SimDisk(block_size=self.block_size, sector_size=self.sector_size, name=self.name)

    # -- Storage ------------------------------------------------------------------------

    def exists(self) -> bool:
        with self._lock:
            return self._durable is not None or self._view is not None

    def create(self, size: int, header: bytes) -> None:
        with self._lock:
            if self.exists():
                raise CheckpointError(f"checkpoint {self.name} was created concurrently by "
                                      "another writer")
            self._take_writer()
            # Creation is atomic and durable, as OSStorage's link-into-place is.
            image = bytearray(size)
            image[:len(header)] = header
            self._durable, self._view = image, bytearray(image)
            self._log.append(("create", size, bytes(header)))

    def open(self, *, write: bool) -> None:
        with self._lock:
            if not self.exists():
                raise CheckpointError(f"no checkpoint file at {self.name}")
            if write:
                self._take_writer()

    def _take_writer(self) -> None:
        if self._writer:
            raise CheckpointError(f"checkpoint {self.name} is already open for writing "
                                  "by another engine or process")
        self._writer = True
        self._handle_open = True

    def close(self) -> None:
        with self._lock:
            if self._handle_open:
                self._writer = self._handle_open = False
        self._byte_locks.unlock(self)

    def lock_byte(self, offset: int, *, exclusive: bool, wait: bool) -> bool:
        return self._byte_locks.lock(self, offset, exclusive=exclusive, wait=wait)

    def unlock_byte(self, offset: int) -> None:
        self._byte_locks.unlock(self, offset)

    def reader(self) -> Storage:
        return _Reader(self)

    def size(self) -> int:
        with self._lock:
            return len(self._view) if self._view is not None else 0

    def readinto(self, offset: int, buf) -> int:
        view = memoryview(buf).cast("B")
        with self._lock:
            src = self._view or b""
            n = max(0, min(len(view), len(src) - offset))
            view[:n] = src[offset:offset + n]
            return n

    def pwrite(self, offset: int, data) -> None:
        data = bytes(memoryview(data).cast("B"))
        with self._lock:
            self._maybe_fail("write")
            if self._view is None:
                raise CheckpointError(f"checkpoint {self.name} is not open")
            self._apply_write(offset, data)
            self._log.append(("write", offset, data))

    def sync_data(self) -> None:
        with self._lock:
            self._maybe_fail("sync")
            self._apply_sync()
            self._log.append(("sync",))

    sync_all = sync_data       # the file never changes size, so there is no metadata to add

    # -- internals ----------------------------------------------------------------------

    def _apply_write(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        if end > len(self._view):
            self._view.extend(bytes(end - len(self._view)))
        self._view[offset:end] = data
        pos = offset
        while pos < end:                   # one pending write per block touched
            stop = min(end, (pos // self.block_size + 1) * self.block_size)
            self._pending.append(PendingWrite(self._seq, pos, data[pos - offset:stop - offset]))
            self._seq += 1
            pos = stop

    def _apply_sync(self) -> None:
        self._durable = bytearray(self._view)
        self._pending.clear()

    def _maybe_fail(self, kind: str) -> None:
        self._counts[kind] += 1
        for i, f in enumerate(self._faults):
            if f.kind == kind:
                if f.remaining <= 1:
                    del self._faults[i]
                    raise storage_error(OSError(f.err, os.strerror(f.err)), kind, self.name)
                self._faults[i] = _Fault(kind, f.remaining - 1, f.err)
                return

    # -- fault injection ----------------------------------------------------------------

    def inject_fault(self, kind: str, nth: int = 1, err: int = errno.EIO) -> None:
        """Make the nth next `kind` ("write" or "sync") operation fail with errno `err`.

        A failed write changes nothing; a failed sync leaves the pending writes pending (they
        may or may not survive a crash), as after a failed fsync on Linux.
        """
        if kind not in ("write", "sync") or nth < 1:
            raise ValueError("kind must be 'write' or 'sync' and nth >= 1")
        with self._lock:
            self._faults.append(_Fault(kind, nth, err))

    @property
    def op_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    # -- crash images -------------------------------------------------------------------

    def pending(self) -> tuple[PendingWrite, ...]:
        with self._lock:
            return tuple(self._pending)

    def durable_bytes(self) -> bytes | None:
        with self._lock:
            return None if self._durable is None else bytes(self._durable)

    def current_bytes(self) -> bytes | None:
        """What a reader sees now (durable content plus every unsynced write)."""
        with self._lock:
            return None if self._view is None else bytes(self._view)

    def _full_mask(self, w: PendingWrite) -> int:
        return (1 << len(w.sectors(self.sector_size))) - 1

    def image_bytes(self, choice: CrashChoice) -> bytes | None:
        """The durable content after a power loss that resolved pending writes as `choice` says."""
        with self._lock:
            if self._durable is None:
                return None
            pending = self._pending
            if len(choice.masks) != len(pending):
                raise ValueError(f"choice has {len(choice.masks)} masks for "
                                 f"{len(pending)} pending writes")
            out = bytearray(self._durable)
            ss = self.sector_size
            for i in (choice.order if choice.order is not None else range(len(pending))):
                w, mask = pending[i], choice.masks[i]
                if not mask:
                    continue
                for j, sector in enumerate(w.sectors(ss)):
                    if mask >> j & 1:
                        lo, hi = max(sector * ss, w.offset), min((sector + 1) * ss,
                                                                 w.offset + len(w.data))
                        out[lo:hi] = w.data[lo - w.offset:hi - w.offset]
            return bytes(out)

    def _image(self, choice: CrashChoice) -> SimDisk:
        disk = self._blank_like()
        data = self.image_bytes(choice)
        if data is not None:
            disk._durable, disk._view = bytearray(data), bytearray(data)
            disk._log.append(("image", data))
        return disk

    def random_choice(self, rng: random.Random) -> CrashChoice:
        """Each pending write independently dropped, kept or torn; survivors in random order."""
        with self._lock:
            masks = []
            for w in self._pending:
                full = self._full_mask(w)
                r = rng.random()
                masks.append(0 if r < 1 / 3 else full if r < 2 / 3 else rng.getrandbits(
                    full.bit_length()))
            order = list(range(len(masks)))
            rng.shuffle(order)
            return CrashChoice(tuple(masks), tuple(order))

    def crash_image(self, rng: random.Random | int | None = None,
                    choice: CrashChoice | None = None) -> SimDisk:
        """A new disk holding what survives a power loss now (a random outcome by default)."""
        if choice is None:
            rng = rng if isinstance(rng, random.Random) else random.Random(rng)
            choice = self.random_choice(rng)
        return self._image(choice)

    def enumerate_choices(self, limit: int, seed: int = 0) -> Iterator[CrashChoice]:
        """Crash outcomes, most telling first, at most `limit` of them.

        In-order prefixes (a disk that persists writes in issue order), each write alone
        dropped / alone kept / torn, every keep-or-drop subset when there are few enough, then
        seeded random outcomes with tears and reordering.
        """
        with self._lock:
            pending = list(self._pending)
        n = len(pending)
        full = [self._full_mask(w) for w in pending]
        seen: set[CrashChoice] = set()

        def fresh(choice: CrashChoice) -> bool:
            if choice in seen:
                return False
            seen.add(choice)
            return True

        def structured() -> Iterator[CrashChoice]:
            for k in range(n + 1):
                yield CrashChoice(tuple(full[:k]) + (0,) * (n - k))
            for i in range(n):
                yield CrashChoice(tuple(0 if j == i else full[j] for j in range(n)))
                yield CrashChoice(tuple(full[j] if j == i else 0 for j in range(n)))
                if full[i] > 1:            # tear: first half of the sectors only
                    half = (1 << ((full[i].bit_length() + 1) // 2)) - 1
                    yield CrashChoice(tuple(half if j == i else full[j] for j in range(n)))
            if n <= 12:
                for bits in itertools.product((0, 1), repeat=n):
                    yield CrashChoice(tuple(full[j] if bits[j] else 0 for j in range(n)))

        produced = 0
        for choice in structured():
            if produced >= limit:
                return
            if fresh(choice):
                produced += 1
                yield choice
        rng = random.Random(seed)
        attempts = 0
        while produced < limit and attempts < 4 * limit:
            attempts += 1
            choice = self.random_choice(rng)
            if fresh(choice):
                produced += 1
                yield choice

    def enumerate_images(self, limit: int, seed: int = 0) -> Iterator[tuple[CrashChoice, SimDisk]]:
        """(choice, disk) for up to `limit` distinct power-loss images of the disk as it is now."""
        seen_images: set[bytes | None] = set()
        for choice in self.enumerate_choices(limit, seed):
            data = self.image_bytes(choice)
            key = data if data is None else _digest(data)
            if key in seen_images:
                continue
            seen_images.add(key)
            yield choice, self._image(choice)

    # -- replay -------------------------------------------------------------------------

    @property
    def log(self) -> tuple[tuple, ...]:
        """Every successful mutating operation so far: ("create"|"image"|"write"|"sync", ...)."""
        with self._lock:
            return tuple(self._log)

    def crash_states(self) -> Iterator[tuple[int, SimDisk]]:
        """(k, disk as it was after the first k logged operations), for k = 0 .. len(log).

        Each yielded disk is a frozen copy with its own pending writes, ready for
        crash_image / enumerate_images.
        """
        log = self.log
        disk = self._blank_like()
        yield 0, disk._copy()
        for k, op in enumerate(log, 1):
            kind = op[0]
            if kind == "create":
                image = bytearray(op[1])
                image[:len(op[2])] = op[2]
                disk._durable, disk._view = image, bytearray(image)
            elif kind == "image":
                disk._durable, disk._view = bytearray(op[1]), bytearray(op[1])
            elif kind == "write":
                disk._apply_write(op[1], op[2])
            elif kind == "sync":
                disk._apply_sync()
            yield k, disk._copy()

    def _copy(self) -> SimDisk:
        with self._lock:
            disk = self._blank_like()
            if self._durable is not None:
                disk._durable, disk._view = bytearray(self._durable), bytearray(self._view)
            disk._pending = list(self._pending)
            disk._seq = self._seq
            return disk


class _Reader(Storage):
    """A read-only handle on a SimDisk (what a recovering process would open)."""

    def __init__(self, disk: SimDisk):
        self._disk, self.name = disk, disk.name

    def exists(self) -> bool:
        return self._disk.exists()

    def reader(self) -> Storage:
        return _Reader(self._disk)

    def create(self, size: int, header: bytes) -> None:
        raise CheckpointError(f"checkpoint {self.name} is open read-only")

    def open(self, *, write: bool) -> None:
        if write:
            raise CheckpointError(f"checkpoint {self.name} is open read-only")
        if not self._disk.exists():
            raise CheckpointError(f"no checkpoint file at {self.name}")

    def pwrite(self, offset: int, data) -> None:
        raise CheckpointError(f"checkpoint {self.name} is open read-only")

    def readinto(self, offset: int, buf) -> int:
        return self._disk.readinto(offset, buf)

    def sync_data(self) -> None:
        pass

    sync_all = sync_data

    def size(self) -> int:
        return self._disk.size()

    def lock_byte(self, offset: int, *, exclusive: bool, wait: bool) -> bool:
        return self._disk._byte_locks.lock(self, offset, exclusive=exclusive, wait=wait)

    def unlock_byte(self, offset: int) -> None:
        self._disk._byte_locks.unlock(self, offset)

    def close(self) -> None:
        self._disk._byte_locks.unlock(self)
