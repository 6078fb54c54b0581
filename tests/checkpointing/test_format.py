"""The on-disk structures decode to what was encoded, and reject anything torn, stale or foreign."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from faultlab.checkpointing.format import (HEADER_BYTES, FormatError, Geometry, Manifest, Record,
                                           TensorEntry, decode_header, decode_manifest,
                                           decode_record, dtype_from_json, dtype_to_json,
                                           encode_header, encode_manifest, encode_record,
                                           tombstone)


def geom(**kw) -> Geometry:
    return Geometry.new(kw.get("block", 4096), kw.get("slots", 4), kw.get("slot_bytes", 65536))


def test_header_round_trips_and_places_two_copies_in_block_zero():
    g = geom(block=1024)
    block = encode_header(g)
    assert len(block) == 1024
    assert block[:HEADER_BYTES] == block[512:512 + HEADER_BYTES]
    assert decode_header(block) == g


@pytest.mark.parametrize("block", [512, 4096, 65536])
def test_header_falls_back_to_its_second_copy_when_the_first_is_damaged(block):
    g = geom(block=block, slot_bytes=block * 4)
    raw = bytearray(encode_header(g))
    raw[0:HEADER_BYTES] = bytes(HEADER_BYTES)
    assert decode_header(bytes(raw)) == g


def test_header_with_both_copies_damaged_is_rejected():
    g = geom(block=512)
    raw = bytearray(encode_header(g))
    raw[20] ^= 1
    raw[256 + 20] ^= 1
    with pytest.raises(FormatError, match="checksum"):
        decode_header(bytes(raw))


def test_foreign_bytes_are_not_a_header():
    with pytest.raises(FormatError, match="not a faultlab checkpoint"):
        decode_header(b"PK\x03\x04" + bytes(4092))


def test_record_round_trips_and_tombstone_is_no_record():
    g = geom()
    rec = Record(2, 17, -5, 8192, 300, 0xDEADBEEF, 8000, g.file_id)
    assert decode_record(encode_record(rec, g.block_size), g, 2) == rec
    with pytest.raises(FormatError):
        decode_record(tombstone(g.block_size), g, 2)


def test_record_of_another_file_or_slot_is_rejected():
    g, other = geom(), geom()
    rec = Record(1, 3, 3, 4096, 10, 1, 10, other.file_id)
    with pytest.raises(FormatError, match="another checkpoint file"):
        decode_record(encode_record(rec, g.block_size), g, 1)
    rec = Record(1, 3, 3, 4096, 10, 1, 10, g.file_id)
    with pytest.raises(FormatError, match="another slot"):
        decode_record(encode_record(rec, g.block_size), g, 2)


@given(st.integers(0, 87), st.integers(1, 255))
def test_any_single_byte_change_in_a_record_is_detected(pos, xor):
    g = geom()
    raw = bytearray(encode_record(Record(0, 9, 9, 4096, 64, 5, 100, g.file_id), g.block_size))
    raw[pos] ^= xor
    with pytest.raises(FormatError):
        decode_record(bytes(raw), g, 0)


@given(hnp.array_dtypes(allow_subarrays=True) | hnp.scalar_dtypes())
def test_dtype_description_round_trips_through_json(dtype):
    import json
    if dtype.hasobject:
        return
    assert dtype_from_json(json.loads(json.dumps(dtype_to_json(dtype)))) == dtype


def test_manifest_round_trips():
    g = geom()
    m = Manifest(4, 10, 4096, 5000, (1, 2), (TensorEntry("a", np.dtype(">f4"), (10, 2), 0, 80),
                                            TensorEntry("é", np.dtype("u1"), (), 128, 1)),
                 {"lr": 0.1, "tags": ["x"]})
    raw = encode_manifest(m)
    rec = Record(0, 4, 10, 8192, len(raw), 0, 5000, g.file_id)
    assert decode_manifest(raw, rec) == m


def test_manifest_that_disagrees_with_its_record_is_rejected():
    g = geom()
    m = Manifest(4, 10, 4096, 100, (7,), (), {})
    rec = Record(0, 5, 10, 4096, 1, 0, 100, g.file_id)
    with pytest.raises(FormatError, match="does not match"):
        decode_manifest(encode_manifest(m), rec)
