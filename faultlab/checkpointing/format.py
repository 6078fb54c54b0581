"""The on-disk checkpoint format: header, commit records and manifests (docs/checkpoint_format.md).

Pure encode/decode functions with no I/O. Every structure carries its own checksum so that a
reader can tell "valid" from "torn, stale or foreign" without trusting anything else; all
integers are little-endian and every location is an offset, never an address.
"""

from __future__ import annotations

import json
import math
import re
import struct
import uuid
from dataclasses import dataclass

import numpy as np
import xxhash

FORMAT_VERSION = 1
HASH_XXH3_64 = 1                       # the only checksum algorithm of format version 1

HEADER_MAGIC = b"\x89FLTCKP\n"         # \x89 and \n catch text-mode and 7-bit transfers
RECORD_MAGIC = b"FLCOMMIT"
MIN_BLOCK_SIZE = 512                   # the header is stored twice within block 0
MAX_BLOCK_SIZE = 1 << 16               # readers probe the first 64 KiB for the header
MAX_SLOTS = 1 << 16                    # keep + max_in_flight; far beyond any real use
MAX_FILE_BYTES = 1 << 60               # offsets stay well inside int64 arithmetic
TENSOR_ALIGN = 64                      # every array starts at a multiple of this in its slot
MAX_NDIM = 64                          # numpy's limit
MAX_DEPTH = 64                         # nesting of a manifest's JSON (meta, dtypes) at most

_HEADER = struct.Struct("<8sHHIIIQQQQ16s")   # then an 8-byte checksum
_RECORD = struct.Struct("<8sHHIQqQQQQ16s")   # then an 8-byte checksum
_HASH = struct.Struct("<Q")
HEADER_BYTES = _HEADER.size + _HASH.size     # 80
RECORD_BYTES = _RECORD.size + _HASH.size     # 88


class FormatError(ValueError):
    """A structure failed to decode; the message says why (used to explain a fallback)."""


def digest(data) -> int:
    """The format's checksum: 64-bit XXH3 (releases the GIL on large buffers)."""
    return xxhash.xxh3_64_intdigest(data)


def align_up(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


@dataclass(frozen=True)
class Geometry:
    """The fixed layout of one checkpoint file, written once in its header."""

    block_size: int
    slot_count: int
    slot_bytes: int
    file_id: bytes

    def __post_init__(self):
        if not MIN_BLOCK_SIZE <= self.block_size <= MAX_BLOCK_SIZE \
                or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size {self.block_size} is not a power of two from "
                             f"{MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}")
        if not 1 <= self.slot_count <= MAX_SLOTS:
            raise ValueError(f"slot_count {self.slot_count} is not from 1 to {MAX_SLOTS}")
        if self.slot_bytes < self.block_size or self.slot_bytes % self.block_size:
            raise ValueError(f"slot_bytes {self.slot_bytes} is not a positive multiple of the "
                             f"block size {self.block_size}")
        if self.file_bytes > MAX_FILE_BYTES:
            raise ValueError(f"slot_bytes {self.slot_bytes} x slot_count {self.slot_count} "
                             f"makes a file of {self.file_bytes} bytes, beyond {MAX_FILE_BYTES}")
        if len(self.file_id) != 16:
            raise ValueError("file id must be 16 bytes")

    @classmethod
    def new(cls, block_size: int, slot_count: int, slot_bytes: int) -> Geometry:
        return cls(block_size, slot_count, align_up(slot_bytes, block_size), uuid.uuid4().bytes)

    @property
    def records_offset(self) -> int:
        return self.block_size                    # block 0 is the header

    @property
    def slots_offset(self) -> int:
        return self.block_size * (1 + self.slot_count)

    @property
    def file_bytes(self) -> int:
        return self.slots_offset + self.slot_count * self.slot_bytes

    def record_offset(self, slot: int) -> int:
        """Each slot's commit record has a block of its own, so writing it can tear nothing else."""
        return self.records_offset + slot * self.block_size

    def slot_offset(self, slot: int) -> int:
        return self.slots_offset + slot * self.slot_bytes


def encode_header(geom: Geometry) -> bytes:
    """Block 0: the header twice (at 0 and at block_size/2), zero padded to one block."""
    body = _HEADER.pack(HEADER_MAGIC, FORMAT_VERSION, HASH_XXH3_64, geom.block_size,
                        geom.slot_count, 0, geom.slot_bytes, geom.records_offset,
                        geom.slots_offset, geom.file_bytes, geom.file_id)
    one = body + _HASH.pack(digest(body))
    block = bytearray(geom.block_size)
    block[:HEADER_BYTES] = one
    block[geom.block_size // 2:geom.block_size // 2 + HEADER_BYTES] = one
    return bytes(block)


def _decode_one_header(raw: bytes) -> Geometry:
    if len(raw) < HEADER_BYTES:
        raise FormatError("file too short for a header")
    body, (stored,) = raw[:_HEADER.size], _HASH.unpack_from(raw, _HEADER.size)
    (magic, version, hash_algo, block_size, slot_count, _reserved, slot_bytes, records_off,
     slots_off, file_bytes, file_id) = _HEADER.unpack(body)
    if magic != HEADER_MAGIC:
        raise FormatError("not a faultlab checkpoint file (bad magic)")
    if digest(body) != stored:
        raise FormatError("header checksum mismatch")
    if version != FORMAT_VERSION:
        raise FormatError(f"unsupported checkpoint format version {version} "
                          f"(this faultlab reads version {FORMAT_VERSION})")
    if hash_algo != HASH_XXH3_64:
        raise FormatError(f"unknown checksum algorithm {hash_algo}")
    try:
        geom = Geometry(block_size, slot_count, slot_bytes, file_id)
    except ValueError as e:
        raise FormatError(f"bad header: {e}") from None
    for field, stored_value, implied in (("records_offset", records_off, geom.records_offset),
                                         ("slots_offset", slots_off, geom.slots_offset),
                                         ("file_bytes", file_bytes, geom.file_bytes)):
        if stored_value != implied:
            raise FormatError(f"bad header: {field} {stored_value} does not match the "
                              f"geometry ({implied})")
    return geom


def decode_header(block0: bytes) -> Geometry:
    """Decode block 0, falling back to the second copy when the first is damaged."""
    try:
        return _decode_one_header(block0)
    except FormatError as first:
        # The copy sits at block_size/2; the block size itself may be what is damaged in the
        # first copy, so try each possible one and accept a copy only where it says it is.
        for block_size in (1 << k for k in range(9, 17)):
            h = block_size // 2
            try:
                geom = _decode_one_header(block0[h:h + HEADER_BYTES])
            except FormatError:
                continue
            if geom.block_size == block_size:
                return geom
        raise first


@dataclass(frozen=True)
class Record:
    """A commit record: makes the manifest (and through it the data) of one slot current."""

    slot: int
    counter: int
    step: int
    manifest_offset: int          # relative to the slot
    manifest_bytes: int
    manifest_hash: int
    data_bytes: int
    file_id: bytes


def encode_record(rec: Record, block_size: int) -> bytes:
    body = _RECORD.pack(RECORD_MAGIC, FORMAT_VERSION, HASH_XXH3_64, rec.slot, rec.counter,
                        rec.step, rec.manifest_offset, rec.manifest_bytes, rec.manifest_hash,
                        rec.data_bytes, rec.file_id)
    out = bytearray(block_size)
    out[:RECORD_BYTES] = body + _HASH.pack(digest(body))
    return bytes(out)


def decode_record(raw: bytes, geom: Geometry, slot: int) -> Record:
    """Decode the record block of `slot`; FormatError if empty, torn, stale or foreign."""
    if len(raw) < RECORD_BYTES:
        raise FormatError("record block truncated")
    if raw[:8] != RECORD_MAGIC:
        raise FormatError("no commit record")
    body, (stored,) = raw[:_RECORD.size], _HASH.unpack_from(raw, _RECORD.size)
    if digest(body) != stored:
        raise FormatError("commit record checksum mismatch")
    (_magic, version, hash_algo, rec_slot, counter, step, m_off, m_len, m_hash, data_bytes,
     file_id) = _RECORD.unpack(body)
    if version != FORMAT_VERSION or hash_algo != HASH_XXH3_64:
        raise FormatError("commit record of another format version")
    if file_id != geom.file_id:
        raise FormatError("commit record belongs to another checkpoint file")
    if rec_slot != slot:
        raise FormatError("commit record names another slot")
    if m_off != align_up(data_bytes, geom.block_size):
        raise FormatError(f"commit record: manifest_offset {m_off} is not data_bytes "
                          f"{data_bytes} rounded up to the block size")
    if not (0 < m_len and m_off + m_len <= geom.slot_bytes):
        raise FormatError("commit record points outside its slot")
    if step >= 1 << 63:
        raise FormatError("commit record: step out of range")
    return Record(rec_slot, counter, step, m_off, m_len, m_hash, data_bytes, file_id)


def tombstone(block_size: int) -> bytes:
    """What a record block holds while its slot is being rewritten."""
    return bytes(block_size)


# ----------------------------------------------------------------------------------------
# Manifests


@dataclass(frozen=True)
class TensorEntry:
    """Where one array's bytes (C order) live, relative to the start of its slot."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Manifest:
    counter: int
    step: int
    chunk_bytes: int
    data_bytes: int
    chunk_hashes: tuple[int, ...]
    tensors: tuple[TensorEntry, ...]
    meta: dict

    @property
    def chunk_count(self) -> int:
        return math.ceil(self.data_bytes / self.chunk_bytes) if self.data_bytes else 0


def dtype_to_json(dtype: np.dtype):
    """A portable dtype description (the one .npy files use), JSON-able."""
    return np.lib.format.dtype_to_descr(dtype)


def dtype_from_json(descr) -> np.dtype:
    def fields(d):
        if isinstance(d, str):
            return d
        out = []
        for f in d:
            name = tuple(f[0]) if isinstance(f[0], list) else f[0]
            item = (name, fields(f[1]))
            if len(f) > 2:
                item += (tuple(f[2]),)
            out.append(item)
        return out
    return np.lib.format.descr_to_dtype(fields(descr))


def encode_manifest(m: Manifest) -> bytes:
    doc = {
        "format": FORMAT_VERSION,
        "counter": m.counter,
        "step": m.step,
        "chunk_bytes": m.chunk_bytes,
        "data_bytes": m.data_bytes,
        "chunks": [f"{h:016x}" for h in m.chunk_hashes],
        "tensors": [{"name": t.name, "dtype": dtype_to_json(t.dtype), "shape": list(t.shape),
                     "offset": t.offset, "nbytes": t.nbytes} for t in m.tensors],
        "meta": m.meta,
    }
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


_MANIFEST_KEYS = {"format", "counter", "step", "chunk_bytes", "data_bytes", "chunks", "tensors",
                  "meta"}
_TENSOR_KEYS = {"name", "dtype", "shape", "offset", "nbytes"}
_HEX16 = re.compile(r"[0-9a-f]{16}")
_MAX_INDEX = (1 << 63) - 1


def _int(v, what: str, lo: int = 0, hi: int = _MAX_INDEX) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise FormatError(f"manifest: {what} {_short(v)} is not an integer from {lo} to {hi}")
    return v


def _short(v) -> str:
    text = json.dumps(v) if isinstance(v, (int, float, str, bool)) or v is None \
        else type(v).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _no_duplicate_keys(pairs):
    doc = {}
    for k, v in pairs:
        if k in doc:
            raise FormatError(f"manifest: key {_short(k)} appears twice")
        doc[k] = v
    return doc


def _reject_constant(name):
    raise FormatError(f"manifest: {name} is not JSON")


def _keys(doc, want: set, what: str) -> None:
    if not isinstance(doc, dict):
        raise FormatError(f"manifest: {what} is not an object")
    if set(doc) != want:
        extra, missing = sorted(set(doc) - want), sorted(want - set(doc))
        raise FormatError(f"manifest: {what} " + (f"has unknown key {_short(extra[0])}" if extra
                                                  else f"lacks key {_short(missing[0])}"))


def _dtype(descr, what: str) -> np.dtype:
    try:
        dtype = dtype_from_json(descr)
    except FormatError:
        raise
    except Exception as e:         # numpy's descr parser raises many kinds; all mean "bad"
        raise FormatError(f"manifest: {what}.dtype {_short(descr)} is not a dtype "
                          f"({type(e).__name__})") from None
    if dtype.hasobject:
        raise FormatError(f"manifest: {what}.dtype {dtype} holds Python objects")
    return dtype


def _tensor(t, i: int, data_bytes: int) -> TensorEntry:
    what = f"tensors[{i}]"
    _keys(t, _TENSOR_KEYS, what)
    if not isinstance(t["name"], str):
        raise FormatError(f"manifest: {what}.name is not a string")
    dtype = _dtype(t["dtype"], what)
    if not isinstance(t["shape"], list) or len(t["shape"]) > MAX_NDIM:
        raise FormatError(f"manifest: {what}.shape is not a list of at most {MAX_NDIM} sizes")
    shape = tuple(_int(s, f"{what}.shape[{k}]") for k, s in enumerate(t["shape"]))
    # numpy refuses shapes whose elements (ignoring zero sizes) overflow its index type
    elements = math.prod(d for d in shape if d)
    if elements * max(dtype.itemsize, 1) > _MAX_INDEX:
        raise FormatError(f"manifest: {what}.shape {list(shape)} is too large for an array")
    offset = _int(t["offset"], f"{what}.offset", 0, data_bytes)
    nbytes = _int(t["nbytes"], f"{what}.nbytes", 0, data_bytes)
    if offset % TENSOR_ALIGN:
        raise FormatError(f"manifest: {what}.offset {offset} is not a multiple of "
                          f"{TENSOR_ALIGN}")
    if nbytes != math.prod(shape) * dtype.itemsize:
        raise FormatError(f"manifest: {what}.nbytes {nbytes} does not match shape "
                          f"{list(shape)} of {dtype}")
    if offset + nbytes > data_bytes:
        raise FormatError(f"manifest: {what} ends at {offset + nbytes}, beyond data_bytes "
                          f"{data_bytes}")
    return TensorEntry(t["name"], dtype, shape, offset, nbytes)


def decode_manifest(raw: bytes, rec: Record) -> Manifest:
    """Parse a manifest whose checksum already matched its record, checking every field
    against the format's rules and the record: a FormatError naming the field otherwise.
    Only the exact structure encode_manifest writes is accepted."""
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys,
                         parse_constant=_reject_constant)
    except FormatError:
        raise
    except RecursionError:
        raise FormatError("manifest: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"manifest unreadable ({type(e).__name__})") from None
    if json_depth(doc) > MAX_DEPTH:
        raise FormatError(f"manifest: nested more than {MAX_DEPTH} levels deep")
    return _manifest_from(doc, rec)


def json_depth(doc) -> int:
    """How deeply lists and objects nest in a decoded JSON value (iterative: any depth)."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (list, tuple, dict)):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in (node.values() if isinstance(node, dict)
                                                  else node))
    return deepest


def _manifest_from(doc, rec: Record) -> Manifest:
    _keys(doc, _MANIFEST_KEYS, "document")
    if type(doc["format"]) is not int or doc["format"] != FORMAT_VERSION:
        raise FormatError("manifest of another format version")
    counter = _int(doc["counter"], "counter", 0, (1 << 64) - 1)
    step = _int(doc["step"], "step", -(1 << 63))
    chunk_bytes = _int(doc["chunk_bytes"], "chunk_bytes", 1, MAX_FILE_BYTES)
    data_bytes = _int(doc["data_bytes"], "data_bytes", 0, MAX_FILE_BYTES)
    for field, value, want in (("counter", counter, rec.counter), ("step", step, rec.step),
                               ("data_bytes", data_bytes, rec.data_bytes)):
        if value != want:
            raise FormatError(f"manifest: {field} {value} does not match its commit record "
                              f"({want})")
    chunks = doc["chunks"]
    n_chunks = -(-data_bytes // chunk_bytes)
    if not isinstance(chunks, list) or len(chunks) != n_chunks:
        raise FormatError(f"manifest: chunks is not a list of {n_chunks} checksums")
    for i, h in enumerate(chunks):
        if not isinstance(h, str) or not _HEX16.fullmatch(h):
            raise FormatError(f"manifest: chunks[{i}] is not 16 lowercase hex digits")
    hashes = tuple(int(h, 16) for h in chunks)
    if not isinstance(doc["tensors"], list):
        raise FormatError("manifest: tensors is not a list")
    tensors = tuple(_tensor(t, i, data_bytes) for i, t in enumerate(doc["tensors"]))
    names: dict[str, int] = {}
    for i, t in enumerate(tensors):
        if t.name in names:
            raise FormatError(f"manifest: tensors[{i}].name {_short(t.name)} repeats "
                              f"tensors[{names[t.name]}]")
        names[t.name] = i
    spans = sorted((t.offset, t.offset + t.nbytes, i) for i, t in enumerate(tensors) if t.nbytes)
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise FormatError(f"manifest: tensors[{b}] overlaps tensors[{a}] (starts at "
                              f"{start}, before {end})")
    if not isinstance(doc["meta"], dict):
        raise FormatError("manifest: meta is not an object")
    return Manifest(counter, step, chunk_bytes, data_bytes, hashes, tensors, doc["meta"])
