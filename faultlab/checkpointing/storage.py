"""The layer between the checkpoint engine and the OS: one checkpoint file, replaceable in tests.

`Storage` is the interface the engine and recovery use; `OSStorage` is a real file, and
`SimDisk` (simdisk.py) an in-memory disk that can lose unsynced writes the way a power cut
does. Errors that a user can meet (no space, I/O error, a second writer, a missing file) leave
this layer as one-line CheckpointErrors.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import struct
import threading
from abc import ABC, abstractmethod
from pathlib import Path

from faultlab.errors import CheckpointError


def storage_error(exc: OSError, action: str, name: str) -> CheckpointError:
    """Translate an OSError into a one-line CheckpointError naming the file and the cause."""
    if exc.errno == errno.ENOSPC or exc.errno == errno.EDQUOT:
        why = "no space left on the device"
    elif exc.errno == errno.EIO:
        why = "I/O error reported by the device"
    else:
        why = exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
    return CheckpointError(f"cannot {action} checkpoint {name}: {why}")


class Storage(ABC):
    """One checkpoint file. Offsets are absolute byte offsets in the file.

    Lifecycle: `exists()`, then either `create(size, header)` (new file, opened for writing)
    or `open(write=...)`; then positional I/O; then `close()`. Opening for writing takes an
    exclusive writer lock: a second writer is refused with CheckpointError.
    """

    name: str = "storage"

    @abstractmethod
    def exists(self) -> bool:
        """Whether the file exists (with content)."""

    @abstractmethod
    def create(self, size: int, header: bytes) -> None:
        """Atomically create a preallocated file of `size` bytes that starts with `header`.

        On return the file, its header and its directory entry are durable, and the file is
        open for writing with the writer lock held. Refused if the file already exists.
        """

    @abstractmethod
    def open(self, *, write: bool) -> None:
        """Open the existing file; `write` takes the writer lock."""

    @abstractmethod
    def pwrite(self, offset: int, data) -> None:
        """Write all of `data` (any buffer) at `offset`."""

    @abstractmethod
    def readinto(self, offset: int, buf) -> int:
        """Fill `buf` from `offset`; return the bytes read (short only at end of file)."""

    @abstractmethod
    def reader(self) -> Storage:
        """An independent, unopened handle for reading the same file (used by recovery)."""

    def pread(self, offset: int, n: int) -> bytes:
        buf = bytearray(n)
        got = self.readinto(offset, memoryview(buf))
        return bytes(buf[:got])

    @abstractmethod
    def sync_data(self) -> None:
        """Make every write so far durable (fdatasync: data plus what is needed to read it)."""

    @abstractmethod
    def sync_all(self) -> None:
        """Make every write and all file metadata durable (fsync)."""

    @abstractmethod
    def size(self) -> int:
        """Current size of the file in bytes."""

    @abstractmethod
    def close(self) -> None:
        """Release the file (and the writer lock). Idempotent."""

    def lock_byte(self, offset: int, *, exclusive: bool, wait: bool) -> bool:
        """Take an advisory lock on byte `offset` for this handle: shared (a reader pinning a
        slot) or exclusive (the writer rewriting it). Without `wait`, return False at once
        when another handle holds a conflicting lock. Locks are released by `unlock_byte`
        or `close`. The default takes no lock and always succeeds: a storage that several
        handles (a writer and live readers) share must override it (OSStorage, SimDisk)."""
        return True

    def unlock_byte(self, offset: int) -> None:
        """Release this handle's lock on byte `offset` (no-op when it holds none)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ByteLocks:
    """In-memory advisory byte locks shared by the handles of one simulated file: shared
    locks exclude exclusive ones; a handle's own locks never conflict with each other."""

    def __init__(self):
        self._cond = threading.Condition()
        self._held: dict[int, dict[int, bool]] = {}      # offset -> {holder id: exclusive}

    def _free_for(self, offset: int, holder: int, exclusive: bool) -> bool:
        others = {h: x for h, x in self._held.get(offset, {}).items() if h != holder}
        return not others or (not exclusive and not any(others.values()))

    def lock(self, holder: object, offset: int, *, exclusive: bool, wait: bool) -> bool:
        with self._cond:
            while not self._free_for(offset, id(holder), exclusive):
                if not wait:
                    return False
                self._cond.wait()
            self._held.setdefault(offset, {})[id(holder)] = exclusive
            return True

    def unlock(self, holder: object, offset: int | None = None) -> None:
        """Release `holder`'s lock at `offset`, or all of its locks."""
        with self._cond:
            for off in ([offset] if offset is not None else list(self._held)):
                owners = self._held.get(off)
                if owners is not None and owners.pop(id(holder), None) is not None:
                    if not owners:
                        del self._held[off]
            self._cond.notify_all()


# struct flock for F_OFD_SETLK(W): l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks)
_FLOCK = struct.Struct("hhqqi4x")
_OFD_LOCKS = hasattr(fcntl, "F_OFD_SETLK")


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make the entries of a directory durable (a name just created, renamed or removed)."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class OSStorage(Storage):
    """A checkpoint file on a real file system, with positional I/O that releases the GIL."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.name = str(self.path)
        self._fd: int | None = None

    def exists(self) -> bool:
        return self.path.exists()

    def reader(self) -> OSStorage:
        return OSStorage(self.path)

    def _lock(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CheckpointError(f"checkpoint {self.name} is already open for writing "
                                  "by another engine or process") from None

    def create(self, size: int, header: bytes) -> None:
        # Build the whole file under a temporary name and link it into place: a crash never
        # leaves a half-initialised file at `path`, and link() (unlike rename) fails if a
        # concurrent writer created `path` first.
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise storage_error(e, "create", self.name) from None
        try:
            self._lock(fd)
            try:
                os.posix_fallocate(fd, 0, size)
            except (AttributeError, OSError) as e:
                if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
                    raise
                os.ftruncate(fd, size)       # file system without fallocate: sparse file
            self._fd = fd
            self.pwrite(0, header)
            os.fsync(fd)                     # size, extents and header durable before linking
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                raise CheckpointError(f"checkpoint {self.name} was created concurrently by "
                                      "another writer") from None
            os.unlink(tmp)
            fsync_dir(self.path.parent)     # the new directory entry must survive a crash
        except BaseException as e:
            self._fd = None
            os.close(fd)
            tmp.unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise storage_error(e, "create", self.name) from None
            raise

    def open(self, *, write: bool) -> None:
        try:
            fd = os.open(self.path, (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC)
        except FileNotFoundError:
            raise CheckpointError(f"no checkpoint file at {self.name}") from None
        except OSError as e:
            raise storage_error(e, "open", self.name) from None
        if write:
            try:
                self._lock(fd)
            except BaseException:
                os.close(fd)
                raise
        self._fd = fd

    def _require_fd(self) -> int:
        if self._fd is None:
            raise CheckpointError(f"checkpoint {self.name} is not open")
        return self._fd

    def pwrite(self, offset: int, data) -> None:
        fd = self._require_fd()
        view = memoryview(data).cast("B")
        try:
            while view:
                n = os.pwrite(fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as e:
            raise storage_error(e, "write", self.name) from None

    def readinto(self, offset: int, buf) -> int:
        fd = self._require_fd()
        view = memoryview(buf).cast("B")
        total = 0
        try:
            while total < len(view):
                n = os.preadv(fd, [view[total:]], offset + total)
                if n == 0:
                    break
                total += n
        except OSError as e:
            raise storage_error(e, "read", self.name) from None
        return total

    def sync_data(self) -> None:
        try:
            os.fdatasync(self._require_fd())
        except OSError as e:
            raise storage_error(e, "sync", self.name) from None

    def sync_all(self) -> None:
        try:
            os.fsync(self._require_fd())
        except OSError as e:
            raise storage_error(e, "sync", self.name) from None

    def size(self) -> int:
        try:
            return os.fstat(self._require_fd()).st_size
        except OSError as e:
            raise storage_error(e, "stat", self.name) from None

    def lock_byte(self, offset: int, *, exclusive: bool, wait: bool) -> bool:
        # Open-file-description locks (Linux): owned by this handle's descriptor, so a reader
        # and a writer in one process exclude each other as two processes do (POSIX record
        # locks would not). Where they are missing no lock is taken; readers then rely on
        # re-reading the commit record (recovery.py).
        if not _OFD_LOCKS:
            return True
        fd = self._require_fd()
        arg = _FLOCK.pack(fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK, os.SEEK_SET,
                          offset, 1, 0)
        while True:
            try:
                fcntl.fcntl(fd, fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK, arg)
                return True
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    return False
                if e.errno in (errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP):
                    return True              # a file system without byte locks
                raise storage_error(e, "lock", self.name) from None

    def unlock_byte(self, offset: int) -> None:
        if not _OFD_LOCKS or self._fd is None:
            return
        try:
            fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK,
                        _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, offset, 1, 0))
        except OSError:
            pass                             # nothing held; closing releases it anyway

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)                     # closing releases the flock and byte locks
