"""The on-disk checkpoint format: header, commit records and manifests (docs/checkpoint_format.md).

Pure encode/decode functions with no I/O. Every structure carries its own checksum so that a
reader can tell "valid" from "torn, stale or foreign" without trusting anything else; all
integers are little-endian and every location is an offset, never an address.
"""

from __future__ import annotations

import json
import math
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
        if self.block_size < MIN_BLOCK_SIZE or self.block_size & (self.block_size - 1):
            raise ValueError(f"block size must be a power of two >= {MIN_BLOCK_SIZE}")
        if self.slot_count < 1 or self.slot_bytes < self.block_size \
                or self.slot_bytes % self.block_size:
            raise ValueError("slot count must be >= 1 and slot size a multiple of the block size")
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
    if (records_off, slots_off, file_bytes) != (geom.records_offset, geom.slots_offset,
                                                geom.file_bytes):
        raise FormatError("bad header: inconsistent offsets")
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
    if not (data_bytes <= m_off and m_off + m_len <= geom.slot_bytes and m_len > 0):
        raise FormatError("commit record points outside its slot")
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


def _int(v, what: str, lo: int = 0) -> int:
    if type(v) is not int or v < lo:
        raise FormatError(f"manifest: bad {what}")
    return v


def decode_manifest(raw: bytes, rec: Record) -> Manifest:
    """Parse and sanity-check a manifest whose checksum already matched its record."""
    try:
        doc = json.loads(raw.decode("utf-8"))
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_VERSION:
            raise FormatError("manifest of another format version")
        chunk_bytes = _int(doc["chunk_bytes"], "chunk size", 1)
        data_bytes = _int(doc["data_bytes"], "data size")
        hashes = tuple(int(h, 16) for h in doc["chunks"])
        tensors = []
        for t in doc["tensors"]:
            dtype = dtype_from_json(t["dtype"])
            shape = tuple(_int(s, "shape") for s in t["shape"])
            offset, nbytes = _int(t["offset"], "offset"), _int(t["nbytes"], "size")
            if not isinstance(t["name"], str) or dtype.hasobject \
                    or nbytes != math.prod(shape) * dtype.itemsize \
                    or offset + nbytes > data_bytes:
                raise FormatError("manifest: inconsistent tensor entry")
            tensors.append(TensorEntry(t["name"], dtype, shape, offset, nbytes))
        meta = doc["meta"]
        if not isinstance(meta, dict):
            raise FormatError("manifest: meta is not an object")
        m = Manifest(_int(doc["counter"], "counter"), doc["step"], chunk_bytes, data_bytes,
                     hashes, tuple(tensors), meta)
    except FormatError:
        raise
    except (KeyError, TypeError, ValueError, UnicodeDecodeError, AttributeError,
            IndexError) as e:
        raise FormatError(f"manifest unreadable ({type(e).__name__})") from None
    if (m.counter, m.step, m.data_bytes) != (rec.counter, rec.step, rec.data_bytes):
        raise FormatError("manifest does not match its commit record")
    if len(m.chunk_hashes) != m.chunk_count:
        raise FormatError("manifest: wrong number of chunk checksums")
    return m
