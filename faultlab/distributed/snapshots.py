"""In-memory snapshots (Gemini-style): one rank's state at one step as one self-checking blob,
and the per-node store of such blobs in host memory that outlives the training process.

No framework here: a state is ``{name: numpy array}`` plus a JSON-able ``meta`` dict; the
torch side turns tensors into arrays (or copies them straight into the buffer that
:func:`encode_into` / :meth:`SnapshotStore.open_write` hand out).

Blob layout (all integers little-endian)::

    offset  size  field
    0       8     magic            b"FLSNAP01"
    8       2     version          1
    10      2     hash_algo        1 = xxh3_64 (the only one)
    12      4     owner            rank whose state this is (uint32)
    16      8     step             int64, >= 0
    24      8     generation       int64, >= 0: the job epoch (restart count) that wrote it
    32      8     manifest_len     bytes of the JSON manifest, >= 2
    40      8     payload_len      bytes of the payload, a multiple of 64
    48      8     body_hash        xxh3_64 of blob[64:total] (manifest, padding, payload)
    56      8     header_hash      xxh3_64 of blob[0:56]
    64      M     manifest         UTF-8 JSON, exactly {"tensors": [...], "meta": {...}}
    64+M    pad   zero bytes up to P = align64(64 + M)
    P       L     payload          the arrays' bytes, C order, each at a multiple of 64

    total = P + L; a blob is exactly `total` bytes (no more, no less).

A manifest tensor entry is exactly ``{"name": str, "dtype": str, "shape": [int, ...],
"offset": int}``; ``dtype`` is numpy's canonical ``dtype.str`` of a bool / integer /
unsigned / float / complex dtype (``"<f4"``, ``"|b1"``, ``">i8"``); ``offset`` is relative to
the payload and must be exactly where the canonical layout puts it (the first array at 0,
each next one at the end of the previous rounded up to 64; ``payload_len`` is the end of the
last one rounded up to 64). Names are unique; their order is the arrays' order.

Decoding never unpickles and trusts no field: the header checksum, then the lengths against
the blob's size, then the body checksum, then every manifest field; anything wrong is a
:class:`SnapshotError` whose one-line message names the field. Decoding allocates nothing the
size of which a blob field chooses beyond the blob's own size (arrays are views into the
blob; ``copy=True`` copies at most the payload).
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import re
import shutil
import struct
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from faultlab.errors import FaultlabError, printable

MAGIC = b"FLSNAP01"
VERSION = 1
HASH_XXH3_64 = 1
ALIGN = 64
MAX_NDIM = 64
MAX_DEPTH = 64                                 # JSON nesting of a manifest (meta included)
MAX_MANIFEST = 1 << 32
MAX_PAYLOAD = 1 << 56
MAX_OWNER = (1 << 32) - 1
MAX_INT64 = (1 << 63) - 1
_HEADER = struct.Struct("<8sHHIqqQQQ")         # then the 8-byte header hash
_HASH = struct.Struct("<Q")
HEADER_BYTES = _HEADER.size + _HASH.size       # 64
_KINDS = frozenset("biufc")
_DTYPE_RE = re.compile(r"[<>|][biufc][0-9]{1,2}")
_MANIFEST_KEYS = {"tensors", "meta"}
_TENSOR_KEYS = {"name", "dtype", "shape", "offset"}


class SnapshotError(FaultlabError):
    """A snapshot blob, file or published inventory is malformed, corrupt or missing."""


class _Missing(SnapshotError):
    """The file asked for does not exist (never written, pruned or wiped)."""


def _digest(data) -> int:
    return xxhash.xxh3_64_intdigest(data)


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _short(v) -> str:
    text = json.dumps(v) if isinstance(v, (int, float, str, bool)) or v is None \
        else type(v).__name__
    text = printable(text)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class Snapshot:
    """A decoded snapshot: `arrays` are views into the blob unless decoded with copy=True."""

    owner: int
    step: int
    generation: int
    arrays: dict[str, np.ndarray]
    meta: dict


# -- encoding -----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Plan:
    manifest: bytes
    arrays: tuple[tuple[str, np.ndarray, int], ...]     # name, array, offset in the payload
    payload_offset: int
    payload_len: int

    @property
    def total(self) -> int:
        return self.payload_offset + self.payload_len


def _check_int(v, what: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= int(v) <= hi:
        raise SnapshotError(f"snapshot: {what} {_short(v if isinstance(v, int) else str(v))} "
                            f"is not an integer from {lo} to {hi}")
    return int(v)


def _plan(arrays: Mapping[str, Any], meta: Mapping) -> _Plan:
    if not isinstance(arrays, Mapping):
        raise SnapshotError("snapshot: arrays is not a mapping of names to arrays")
    if not isinstance(meta, Mapping):
        raise SnapshotError("snapshot: meta is not a dict")
    entries, docs, end = [], [], 0
    for name, value in arrays.items():
        if not isinstance(name, str):
            raise SnapshotError(f"snapshot: array name {_short(str(name))} is not a string")
        arr = value if isinstance(value, np.ndarray) else np.asarray(value)
        dt = arr.dtype
        if dt.kind not in _KINDS or dt.fields is not None or dt.subdtype is not None:
            raise SnapshotError(f"snapshot: array {_short(name)} has dtype {dt}, not a bool or "
                                "numeric dtype")
        if arr.ndim > MAX_NDIM:
            raise SnapshotError(f"snapshot: array {_short(name)} has more than {MAX_NDIM} "
                                "dimensions")
        offset = _align(end)
        end = offset + arr.nbytes
        entries.append((name, arr, offset))
        docs.append({"name": name, "dtype": dt.str, "shape": list(arr.shape),
                     "offset": offset})
    try:
        manifest = json.dumps({"tensors": docs, "meta": dict(meta)}, separators=(",", ":"),
                              ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as e:
        raise SnapshotError(f"snapshot: meta is not JSON-able ({printable(e)})") from None
    except UnicodeEncodeError:
        raise SnapshotError("snapshot: meta or an array name is not valid Unicode") from None
    if _json_depth(meta) + 1 > MAX_DEPTH:           # the manifest's root holds meta
        raise SnapshotError(f"snapshot: meta is nested more than {MAX_DEPTH - 1} levels deep")
    if len(manifest) > MAX_MANIFEST:
        raise SnapshotError(f"snapshot: manifest of {len(manifest)} bytes is beyond "
                            f"{MAX_MANIFEST}")
    return _Plan(manifest, tuple(entries), _align(HEADER_BYTES + len(manifest)), _align(end))


def snapshot_size(arrays: Mapping[str, Any], meta: Mapping) -> int:
    """The exact size in bytes of the blob of this state (for a preallocated buffer)."""
    return _plan(arrays, meta).total


def _encode_plan(plan: _Plan, buf, owner: int, step: int, generation: int) -> int:
    owner = _check_int(owner, "owner", 0, MAX_OWNER)
    step = _check_int(step, "step", 0, MAX_INT64)
    generation = _check_int(generation, "generation", 0, MAX_INT64)
    with memoryview(buf) as outer:
        mv = outer if outer.format == "B" and outer.ndim == 1 else outer.cast("B")
        try:
            if mv.readonly:
                raise SnapshotError("snapshot: the buffer to encode into is read-only")
            if len(mv) < plan.total:
                raise SnapshotError(f"snapshot: buffer of {len(mv)} bytes is smaller than the "
                                    f"snapshot ({plan.total} bytes)")
            m_end = HEADER_BYTES + len(plan.manifest)
            mv[HEADER_BYTES:m_end] = plan.manifest
            mv[m_end:plan.payload_offset] = bytes(plan.payload_offset - m_end)
            pos = plan.payload_offset                       # end of what is written so far
            for _name, arr, offset in plan.arrays:
                start = plan.payload_offset + offset
                mv[pos:start] = bytes(start - pos)
                if arr.size:
                    dst = np.frombuffer(mv, dtype=arr.dtype, count=arr.size, offset=start)
                    np.copyto(dst.reshape(arr.shape), arr, casting="no")
                    del dst
                pos = start + arr.nbytes
            mv[pos:plan.total] = bytes(plan.total - pos)
            body_hash = _digest(mv[HEADER_BYTES:plan.total])
            head = _HEADER.pack(MAGIC, VERSION, HASH_XXH3_64, owner, step, generation,
                                len(plan.manifest), plan.payload_len, body_hash)
            mv[:HEADER_BYTES] = head + _HASH.pack(_digest(head))
        finally:
            if mv is not outer:
                mv.release()
    return plan.total


def encode_into(buf, owner: int, step: int, arrays: Mapping[str, Any], meta: Mapping,
                generation: int = 0) -> int:
    """Write the blob into `buf` (a writable buffer of at least snapshot_size bytes, e.g. a
    memoryview of shared memory): one copy per array, straight into place. Returns the bytes
    used; bytes of `buf` past them are left alone."""
    return _encode_plan(_plan(arrays, meta), buf, owner, step, generation)


def encode_snapshot(owner: int, step: int, arrays: Mapping[str, Any], meta: Mapping,
                    generation: int = 0) -> bytes:
    """The blob of `owner`'s state at `step` (see the module docstring for the layout)."""
    plan = _plan(arrays, meta)
    out = bytearray(plan.total)
    _encode_plan(plan, out, owner, step, generation)
    return bytes(out)


# -- decoding -----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Header:
    owner: int
    step: int
    generation: int
    manifest_len: int
    payload_len: int
    body_hash: int

    @property
    def payload_offset(self) -> int:
        return _align(HEADER_BYTES + self.manifest_len)

    @property
    def total(self) -> int:
        return self.payload_offset + self.payload_len


def _bytes_view(blob) -> memoryview:
    try:
        mv = memoryview(blob)
    except TypeError:
        raise SnapshotError(f"snapshot: a {type(blob).__name__} is not a bytes-like "
                            "blob") from None
    if mv.format != "B" or mv.ndim != 1:
        if not mv.c_contiguous:
            raise SnapshotError("snapshot: blob buffer is not contiguous")
        mv = mv.cast("B")
    return mv


def _header(mv: memoryview) -> _Header:
    if len(mv) < HEADER_BYTES:
        raise SnapshotError(f"snapshot: blob of {len(mv)} bytes is shorter than the "
                            f"{HEADER_BYTES}-byte header")
    if mv[:8] != MAGIC:
        raise SnapshotError("snapshot: header.magic is not FLSNAP01 (not a snapshot)")
    (stored,) = _HASH.unpack_from(mv, _HEADER.size)
    if _digest(mv[:_HEADER.size]) != stored:
        raise SnapshotError("snapshot: header.header_hash does not match the header")
    (_m, version, algo, owner, step, generation, m_len, p_len,
     body_hash) = _HEADER.unpack_from(mv, 0)
    if version != VERSION:
        raise SnapshotError(f"snapshot: header.version {version} is not {VERSION}")
    if algo != HASH_XXH3_64:
        raise SnapshotError(f"snapshot: header.hash_algo {algo} is not {HASH_XXH3_64} "
                            "(xxh3_64)")
    if step < 0:
        raise SnapshotError(f"snapshot: header.step {step} is negative")
    if generation < 0:
        raise SnapshotError(f"snapshot: header.generation {generation} is negative")
    if not 2 <= m_len <= MAX_MANIFEST:
        raise SnapshotError(f"snapshot: header.manifest_len {m_len} is not from 2 to "
                            f"{MAX_MANIFEST}")
    if p_len > MAX_PAYLOAD or p_len % ALIGN:
        raise SnapshotError(f"snapshot: header.payload_len {p_len} is not a multiple of "
                            f"{ALIGN} up to {MAX_PAYLOAD}")
    return _Header(owner, step, generation, m_len, p_len, body_hash)


def peek_header(blob) -> tuple[int, int, int, int]:
    """(owner, step, generation, total_len) from the first 64 bytes of a blob, after the
    header's own checksum (the body is not checked: use decode_snapshot for that)."""
    with _bytes_view(blob) as mv:
        h = _header(mv)
    return h.owner, h.step, h.generation, h.total


def _json_depth(doc) -> int:
    deepest, stack = 0, [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (list, tuple, dict)):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in (node.values() if isinstance(node, dict)
                                                  else node))
    return deepest


def _no_duplicates(pairs):
    doc = {}
    for k, v in pairs:
        if k in doc:
            raise SnapshotError(f"snapshot: manifest key {_short(k)} appears twice")
        doc[k] = v
    return doc


def _no_constant(name):
    raise SnapshotError(f"snapshot: manifest holds {name}, which is not JSON")


def parse_json(raw, what: str):
    """Strict JSON: UTF-8, no duplicate keys, no NaN / Infinity, at most MAX_DEPTH deep."""
    try:
        doc = json.loads(bytes(raw).decode("utf-8") if not isinstance(raw, str) else raw,
                         object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except SnapshotError as e:
        raise SnapshotError(str(e).replace("snapshot: manifest", what, 1)) from None
    except RecursionError:
        raise SnapshotError(f"{what} is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise SnapshotError(f"{what} is not valid JSON ({type(e).__name__})") from None
    if _json_depth(doc) > MAX_DEPTH:
        raise SnapshotError(f"{what} is nested more than {MAX_DEPTH} levels deep")
    return doc


def _keys(doc, want: set, what: str) -> None:
    if not isinstance(doc, dict):
        raise SnapshotError(f"snapshot: {what} is not an object")
    if set(doc) != want:
        extra, missing = sorted(set(doc) - want), sorted(want - set(doc))
        raise SnapshotError(f"snapshot: {what} " + (f"has unknown key {_short(extra[0])}"
                                                    if extra else
                                                    f"lacks key {_short(missing[0])}"))


def _dtype(s, what: str) -> np.dtype:
    if not isinstance(s, str) or not _DTYPE_RE.fullmatch(s):
        raise SnapshotError(f"snapshot: {what}.dtype {_short(s)} is not a bool or numeric "
                            "dtype string")
    try:
        dt = np.dtype(s)
    except TypeError:
        raise SnapshotError(f"snapshot: {what}.dtype {_short(s)} is not a dtype") from None
    if dt.kind not in _KINDS or dt.fields is not None or dt.subdtype is not None \
            or dt.hasobject or dt.str != s:
        raise SnapshotError(f"snapshot: {what}.dtype {_short(s)} is not a canonical bool or "
                            "numeric dtype")
    return dt


def _manifest(raw, payload_len: int) -> tuple[list[tuple[str, np.dtype, tuple, int]], dict]:
    doc = parse_json(raw, "snapshot: manifest")
    _keys(doc, _MANIFEST_KEYS, "manifest")
    if not isinstance(doc["tensors"], list):
        raise SnapshotError("snapshot: manifest.tensors is not a list")
    if not isinstance(doc["meta"], dict):
        raise SnapshotError("snapshot: manifest.meta is not an object")
    out, names, end = [], set(), 0
    for i, t in enumerate(doc["tensors"]):
        what = f"manifest.tensors[{i}]"
        _keys(t, _TENSOR_KEYS, what)
        name = t["name"]
        if not isinstance(name, str):
            raise SnapshotError(f"snapshot: {what}.name is not a string")
        if name in names:
            raise SnapshotError(f"snapshot: {what}.name {_short(name)} repeats an earlier one")
        names.add(name)
        dt = _dtype(t["dtype"], what)
        shape = t["shape"]
        if not isinstance(shape, list) or len(shape) > MAX_NDIM:
            raise SnapshotError(f"snapshot: {what}.shape is not a list of at most {MAX_NDIM} "
                                "sizes")
        for k, d in enumerate(shape):
            if type(d) is not int or not 0 <= d <= MAX_PAYLOAD:
                raise SnapshotError(f"snapshot: {what}.shape[{k}] {_short(d)} is not an "
                                    f"integer from 0 to {MAX_PAYLOAD}")
        # the bytes must lie inside the payload; an empty array's other sizes are bounded too
        # (numpy refuses shapes whose product, zeros left out, overflows its index type)
        if math.prod(shape) * dt.itemsize > payload_len \
                or math.prod(d for d in shape if d) * dt.itemsize > MAX_PAYLOAD:
            raise SnapshotError(f"snapshot: {what}.shape {_short(str(shape))} does not fit "
                                f"the payload of {payload_len} bytes")
        offset = t["offset"]
        want = _align(end)
        if type(offset) is not int or offset != want:
            raise SnapshotError(f"snapshot: {what}.offset {_short(offset)} is not {want} "
                                "(the canonical layout)")
        end = offset + math.prod(shape) * dt.itemsize
        if end > payload_len:
            raise SnapshotError(f"snapshot: {what} ends at {end}, beyond header.payload_len "
                                f"{payload_len}")
        out.append((name, dt, tuple(shape), offset))
    if _align(end) != payload_len:
        raise SnapshotError(f"snapshot: header.payload_len {payload_len} is not {_align(end)} "
                            "(the end of the last array, aligned)")
    return out, doc["meta"]


def _verify(mv: memoryview) -> tuple[_Header, list, dict]:
    h = _header(mv)
    if len(mv) != h.total:
        raise SnapshotError(f"snapshot: blob length {len(mv)} is not header total {h.total} "
                            f"({'truncated' if len(mv) < h.total else 'extended'})")
    if _digest(mv[HEADER_BYTES:h.total]) != h.body_hash:
        raise SnapshotError("snapshot: header.body_hash does not match the manifest and "
                            "payload")
    m_end = HEADER_BYTES + h.manifest_len
    tensors, meta = _manifest(mv[HEADER_BYTES:m_end], h.payload_len)
    return h, tensors, meta


def _arrays(mv: memoryview, h: _Header, tensors, copy: bool) -> dict[str, np.ndarray]:
    out = {}
    for name, dt, shape, offset in tensors:
        count = math.prod(shape)
        if count == 0:
            arr = np.empty(shape, dt)
        else:
            arr = np.frombuffer(mv, dtype=dt, count=count,
                                offset=h.payload_offset + offset).reshape(shape)
            if copy:
                arr = arr.copy()
        out[name] = arr
    return out


def verify_snapshot(blob) -> tuple[int, int, int]:
    """Verify a blob fully (both checksums, every field) without decoding arrays, so no view
    of `blob` outlives the call; returns (owner, step, generation)."""
    mv = _bytes_view(blob)
    try:
        h, _tensors, _meta = _verify(mv)
    finally:
        mv.release()
    return h.owner, h.step, h.generation


def decode_snapshot(blob, copy: bool = False) -> Snapshot:
    """Verify both checksums and every field, then decode. With copy=False (default) the
    arrays are views into `blob` (read-only when `blob` is); copy=True makes them own their
    memory. SnapshotError naming the field when anything is wrong."""
    mv = _bytes_view(blob)
    h, tensors, meta = _verify(mv)
    return Snapshot(h.owner, h.step, h.generation, _arrays(mv, h, tensors, copy), meta)


# -- the store ----------------------------------------------------------------------------

_NAME_RE = re.compile(r"owner(0|[1-9][0-9]*)-step(0|[1-9][0-9]*)\.snap")
_TMP_RE = re.compile(r"\.owner(0|[1-9][0-9]*)-step(0|[1-9][0-9]*)\.([0-9]+)-([0-9]+)\.tmp")
_SPARE_RE = re.compile(r"\.spare\.([0-9]+)-([0-9]+)\.tmp")
#: pruned files a store keeps for reuse (per writing process)
SPARES = 2
#: map every page of a snapshot file at once (Linux), not one fault at a time
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def default_root(job_id: str) -> Path:
    """Where a job's node directories live: ``$FAULTLAB_SHM_ROOT/<job_id>`` when that variable
    is set, else ``/dev/shm/faultlab-<uid>/<job_id>`` when /dev/shm is a writable directory
    (tmpfs: survives the training process, not the machine), else the same under the temp
    directory."""
    job = str(job_id)
    if not job or job in (".", "..") or "/" in job or "\0" in job or os.sep in job:
        raise SnapshotError(f"job id {_short(job)} is not a plain file name")
    env = os.environ.get("FAULTLAB_SHM_ROOT")
    if env:
        return Path(env) / job
    uid = os.getuid() if hasattr(os, "getuid") else 0
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        return shm / f"faultlab-{uid}" / job
    return Path(tempfile.gettempdir()) / f"faultlab-{uid}" / job


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PendingWrite:
    """A snapshot being written into its temp file (see SnapshotStore.open_write): `buffer`
    is a writable memoryview of exactly `size` bytes backed by the file (shared memory on
    tmpfs); fill it (encode_into, or one copy per tensor into views of it), drop every view
    of it, then commit() to publish it atomically, or abort() (also what leaving a `with`
    block without committing does)."""

    def __init__(self, store: SnapshotStore, owner: int, step: int, size: int):
        self._store, self.owner, self.step, self.size = store, owner, step, size
        store._dir.mkdir(parents=True, exist_ok=True)
        self.tmp = store._dir / (f".owner{owner}-step{step}.{os.getpid()}-"
                                 f"{threading.get_ident()}.tmp")
        # a file this process pruned earlier, when one is spare: its memory is allocated
        # already (allocating and zeroing ~50 MB of tmpfs, then freeing it at the prune,
        # cost more than the copy itself)
        reused = store._take_spare(self.tmp, size)
        flags = os.O_RDWR if reused else os.O_RDWR | os.O_CREAT | os.O_TRUNC
        self._fd = os.open(self.tmp, flags, 0o600)
        try:
            if reused:
                pass                     # the same size: every page is there already
            # reserve the memory now: a store into a mapped hole of a full tmpfs is SIGBUS,
            # while fallocate fails cleanly (ENOSPC)
            elif hasattr(os, "posix_fallocate"):
                try:
                    os.posix_fallocate(self._fd, 0, size)
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                        raise
                    os.ftruncate(self._fd, size)
            else:
                os.ftruncate(self._fd, size)
            self._map = mmap.mmap(self._fd, size, flags=mmap.MAP_SHARED | _POPULATE)
        except BaseException:
            os.close(self._fd)
            _unlink(self.tmp)
            raise
        self.buffer = memoryview(self._map)
        self._done = False

    def _close(self) -> None:
        self.buffer.release()
        try:
            self._map.close()
        finally:
            os.close(self._fd)

    def commit(self, durable: bool = False) -> Path:
        """Verify the header, publish the file under its final name (atomic rename), prune.
        durable=True also flushes file and directory to the disk (not needed on tmpfs)."""
        if self._done:
            raise SnapshotError("snapshot: write already committed or aborted")
        self._done = True
        try:
            owner, step, generation, total = peek_header(self.buffer)
            if (owner, step, total) != (self.owner, self.step, self.size):
                raise SnapshotError(f"snapshot: buffer holds owner {owner} step {step} of "
                                    f"{total} bytes, not owner {self.owner} step {self.step} "
                                    f"of {self.size}")
            if durable:
                self._map.flush()
                os.fsync(self._fd)
        except BaseException:
            self._close()
            _unlink(self.tmp)
            raise
        self._close()
        return self._store._publish(self.tmp, owner, step, generation, durable)

    def abort(self) -> None:
        if not self._done:
            self._done = True
            self._close()
            _unlink(self.tmp)

    def __enter__(self) -> PendingWrite:
        return self

    def __exit__(self, *exc) -> None:
        self.abort()


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class SnapshotStore:
    """One node's snapshots in its host memory: files ``root/node{node}/owner{r}-step{s}.snap``.

    Writes go to a temp file (``.owner{r}-step{s}.{pid}-{thread}.tmp``) and are published by
    an atomic rename, so a kill at any instant leaves the old complete set, or the new one,
    plus maybe a temp file that readers ignore and the next write or scan removes once its
    writer is dead. After publishing (owner, step, generation) the owner's copies are pruned:
    those of an older generation at a newer step (an abandoned timeline) go, then all but
    the newest `keep` steps. Readers verify every file fully; several processes may write
    and read one directory at once.

    After a recovery to step s, every rank should call truncate_after(s) before training
    resumes, so that no copy of an abandoned step can mix into a later recovery. Writers of
    one directory must share a PID namespace (a temp file's writer is judged dead by its pid).
    """

    def __init__(self, root: str | os.PathLike, node: int, *, keep: int = 2):
        self.root = Path(root)
        self.node = _check_int(node, "node", 0, MAX_OWNER)
        self.keep = _check_int(keep, "keep", 1, 1 << 20)
        self.last_rejected: list[tuple[Path, str]] = []

    def __repr__(self) -> str:
        return f"SnapshotStore({str(self.root)!r}, node={self.node}, keep={self.keep})"

    @property
    def _dir(self) -> Path:
        return self.root / f"node{self.node}"

    @property
    def directory(self) -> Path:
        return self._dir

    def path(self, owner: int, step: int) -> Path:
        return self._dir / f"owner{int(owner)}-step{int(step)}.snap"

    # writing

    def open_write(self, owner: int, step: int, size: int) -> PendingWrite:
        """A temp file of `size` bytes mapped as a writable buffer: the zero-extra-copy path
        (``encode_into(pending.buffer, ...)`` then ``pending.commit()``)."""
        owner = _check_int(owner, "owner", 0, MAX_OWNER)
        step = _check_int(step, "step", 0, MAX_INT64)
        size = _check_int(size, "size", HEADER_BYTES, MAX_PAYLOAD)
        self._sweep_tmp()
        return PendingWrite(self, owner, step, size)

    def write(self, owner: int, step: int, arrays: Mapping[str, Any], meta: Mapping,
              generation: int = 0, *, durable: bool = False) -> Path:
        """Encode this state straight into a mapped temp file and publish it (see the class
        docstring); returns the published path."""
        plan = _plan(arrays, meta)
        _check_int(generation, "generation", 0, MAX_INT64)
        with self.open_write(owner, step, plan.total) as pending:
            _encode_plan(plan, pending.buffer, owner, step, generation)
            return pending.commit(durable)

    def put_blob(self, blob, *, durable: bool = False) -> tuple[int, int]:
        """Store a copy received from a peer after verifying it fully; (owner, step). A blob
        that does not verify raises SnapshotError and nothing is written."""
        mv = _bytes_view(blob)
        h, _tensors, _meta = _verify(mv)
        with self.open_write(h.owner, h.step, h.total) as pending:
            pending.buffer[:] = mv
            pending.commit(durable)
        return h.owner, h.step

    def _publish(self, tmp: Path, owner: int, step: int, generation: int,
                 durable: bool) -> Path:
        final = self.path(owner, step)
        try:
            os.replace(tmp, final)
        except BaseException:
            _unlink(tmp)
            raise
        if durable:
            _fsync_dir(self._dir)
        self._prune(owner, step, generation)
        return final

    def _owner_steps(self, owner: int) -> list[int]:
        steps = []
        for name in self._names():
            m = _NAME_RE.fullmatch(name)
            if m and int(m.group(1)) == owner:
                steps.append(int(m.group(2)))
        return sorted(steps)

    def _prune(self, owner: int, step: int, generation: int) -> None:
        steps = self._owner_steps(owner)
        gone = set()
        for s in steps:
            if s > step:
                g = self._generation_of(owner, s)
                if g is not None and g < generation:      # an abandoned timeline
                    _unlink(self.path(owner, s))
                    gone.add(s)
        left = [s for s in steps if s not in gone]
        for s in left[:-self.keep]:
            self._recycle(self.path(owner, s))

    def _generation_of(self, owner: int, step: int) -> int | None:
        try:
            with open(self.path(owner, step), "rb") as f:
                return peek_header(f.read(HEADER_BYTES))[2]
        except (OSError, SnapshotError):
            return None

    def truncate_after(self, step: int) -> list[tuple[int, int]]:
        """Remove every copy of a step newer than `step` (after agreeing to recover to
        `step`); returns the (owner, step) pairs removed."""
        removed = []
        for name in self._names():
            m = _NAME_RE.fullmatch(name)
            if m and int(m.group(2)) > step:
                _unlink(self._dir / name)
                removed.append((int(m.group(1)), int(m.group(2))))
        return sorted(removed)

    def wipe(self) -> None:
        """Remove the node's directory (what losing the node does to its memory)."""
        shutil.rmtree(self._dir, ignore_errors=True)

    # reading

    def _names(self) -> list[str]:
        try:
            return os.listdir(self._dir)
        except FileNotFoundError:
            return []

    def _recycle(self, path: Path) -> None:
        """A pruned copy: kept as a spare file of this process for the next write (at most
        SPARES of them), else removed. A spare is never listed or read."""
        me = str(os.getpid())
        mine = [n for n in self._names()
                if (m := _SPARE_RE.fullmatch(n)) and m.group(1) == me]
        if len(mine) >= SPARES:
            _unlink(path)
            return
        used = {int(_SPARE_RE.fullmatch(n).group(2)) for n in mine}
        k = next(i for i in range(SPARES + 1) if i not in used)
        try:
            os.rename(path, self._dir / f".spare.{me}-{k}.tmp")
        except FileNotFoundError:
            pass                  # removed meanwhile (a wipe or truncate): nothing to keep

    def _take_spare(self, tmp: Path, size: int) -> bool:
        """Rename one of this process's spare files of exactly `size` bytes to `tmp`: True
        when there was one. A spare of another size is removed, never resized: a reader that
        mapped the file while it was published must not find it shorter (SIGBUS)."""
        me = str(os.getpid())
        for n in self._names():
            m = _SPARE_RE.fullmatch(n)
            if not (m and m.group(1) == me):
                continue
            path = self._dir / n
            try:
                if os.stat(path).st_size != size:
                    _unlink(path)
                    continue
                os.rename(path, tmp)
                return True
            except FileNotFoundError:        # another thread took it
                continue
        return False

    def _sweep_tmp(self) -> list[Path]:
        removed = []
        for name in self._names():
            s = _SPARE_RE.fullmatch(name)
            if s and not _pid_alive(int(s.group(1))):
                _unlink(self._dir / name)
                removed.append(self._dir / name)
                continue
            m = _TMP_RE.fullmatch(name)
            if m and not _pid_alive(int(m.group(3))):
                _unlink(self._dir / name)
                removed.append(self._dir / name)
        return removed

    def _map(self, owner: int, step: int):
        path = self.path(owner, step)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise _Missing(f"snapshot: no copy of owner {owner} step {step} on node "
                           f"{self.node}") from None
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_BYTES:
                raise SnapshotError(f"snapshot: {printable(path)} of {size} bytes is shorter "
                                    f"than the {HEADER_BYTES}-byte header")
            return mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)

    def _check_file(self, owner: int, step: int) -> tuple[_Header, list, dict, mmap.mmap]:
        mm = self._map(owner, step)
        try:
            with memoryview(mm) as mv:
                h, tensors, meta = self._verify_named(mv, owner, step)
        except BaseException:
            mm.close()
            raise
        return h, tensors, meta, mm

    def read(self, owner: int, step: int, copy: bool = True) -> Snapshot:
        """The verified snapshot of `owner` at `step`. copy=True: the file read once into one
        private 64-byte-aligned buffer that the arrays view (writable); copy=False: read-only
        views of the file's mapping (a published file is never changed in place, only
        replaced or removed, so the mapping stays what was verified)."""
        if not copy:
            h, tensors, meta, mm = self._check_file(owner, step)
            return Snapshot(h.owner, h.step, h.generation,
                            _arrays(memoryview(mm), h, tensors, False), meta)
        buf = self._read_aligned(owner, step)
        mv = memoryview(buf)
        h, tensors, meta = self._verify_named(mv, owner, step)
        return Snapshot(h.owner, h.step, h.generation, _arrays(mv, h, tensors, False), meta)

    def _read_aligned(self, owner: int, step: int) -> np.ndarray:
        path = self.path(owner, step)
        try:
            f = open(path, "rb", buffering=0)
        except FileNotFoundError:
            raise _Missing(f"snapshot: no copy of owner {owner} step {step} on node "
                           f"{self.node}") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            raw = np.empty(size + ALIGN, np.uint8)
            start = (-raw.ctypes.data) % ALIGN
            buf = raw[start:start + size]
            with memoryview(buf) as mv:
                got = 0
                while got < size:
                    n = f.readinto(mv[got:])
                    if not n:
                        break
                    got += n
        return buf[:got]

    def _verify_named(self, mv: memoryview, owner: int, step: int):
        h, tensors, meta = _verify(mv)
        if (h.owner, h.step) != (owner, step):
            raise SnapshotError(f"snapshot: file name says owner {owner} step {step}, "
                                f"header.owner/step say {h.owner} {h.step}")
        return h, tensors, meta

    def map_blob(self, owner: int, step: int) -> mmap.mmap:
        """The verified blob of `owner` at `step` as a read-only mapping of its file (no copy:
        a published file is only ever replaced or removed, never changed in place). Close
        it when done."""
        h, tensors, meta, mm = self._check_file(owner, step)
        return mm

    def read_blob(self, owner: int, step: int) -> bytes:
        """The verified blob of `owner` at `step` (to send to a rank that needs it)."""
        try:
            with open(self.path(owner, step), "rb") as f:
                blob = f.read()
        except FileNotFoundError:
            raise _Missing(f"snapshot: no copy of owner {owner} step {step} on node "
                           f"{self.node}") from None
        with memoryview(blob) as mv:
            self._verify_named(mv, owner, step)
        return blob

    def inventory(self) -> dict[int, list[int]]:
        """owner -> sorted steps whose copies here verify fully. Torn, corrupt or misnamed
        files are skipped and listed in `last_rejected` as (path, reason); temp files of dead
        writers are removed; files that vanish while scanned (pruned) are simply absent."""
        self._sweep_tmp()
        rejected: list[tuple[Path, str]] = []
        out: dict[int, list[int]] = {}
        for name in sorted(self._names()):
            m = _NAME_RE.fullmatch(name)
            if not m:
                continue
            owner, step = int(m.group(1)), int(m.group(2))
            try:
                *_, mm = self._check_file(owner, step)
            except _Missing:
                continue                        # pruned or replaced since it was listed
            except SnapshotError as e:
                rejected.append((self._dir / name, str(e)))
                continue
            except (OSError, ValueError) as e:
                rejected.append((self._dir / name, f"unreadable ({type(e).__name__})"))
                continue
            mm.close()
            out.setdefault(owner, []).append(step)
        self.last_rejected = rejected
        return {o: sorted(s) for o, s in sorted(out.items())}
