"""Damaged, truncated and foreign files: recovery falls back or refuses, never returns wrong
data."""

from __future__ import annotations

import functools
import io
import zipfile

import numpy as np
import pytest
from ckpt_helpers import assert_same_state, random_state
from hypothesis import given, settings
from hypothesis import strategies as st

from faultlab.checkpointing import CheckpointEngine, SimDisk, recover
from faultlab.checkpointing.format import HEADER_BYTES, decode_record
from faultlab.errors import CheckpointError

BLOCK = 512


@functools.cache
def reference_file():
    """A file holding three commits (keep=2, three slots), with what each one must load as."""
    disk = SimDisk(block_size=BLOCK)
    expected = {}
    with CheckpointEngine(disk, keep=2, max_in_flight=1, block_size=BLOCK,
                          chunk_bytes=1024) as eng:
        for i in range(3):
            state = random_state(i, {"w": 200 + 10 * i, "b": 64})
            info = eng.save(10 + i, state, {"i": i}).wait()
            expected[info.counter] = (10 + i, state, {"i": i})
        geom = eng.geometry
        newest = eng.committed()[-1]
    return disk.current_bytes(), expected, geom, newest


def check_recovery(image: bytes):
    """A one-line CheckpointError, or a checkpoint equal to what was saved under its counter."""
    _, expected, _, _ = reference_file()
    try:
        r = recover(SimDisk.from_bytes(image, block_size=BLOCK))
    except CheckpointError as e:
        assert "\n" not in str(e)
        return None
    step, state, meta = expected[r.commit.counter]
    assert (r.step, r.meta) == (step, meta)
    assert_same_state(r.state, state)
    return r


def newest_ranges():
    _, _, geom, newest = reference_file()
    base = geom.slot_offset(newest.slot)
    return [range(0, geom.block_size),                         # header block (both copies)
            range(geom.record_offset(newest.slot), geom.record_offset(newest.slot) + BLOCK),
            range(base, base + geom.slot_bytes)]


def manifest_positions() -> list[int]:
    image, _, geom, _ = reference_file()
    out = []
    for slot in range(geom.slot_count):
        at = geom.record_offset(slot)
        rec = decode_record(image[at:at + BLOCK], geom, slot)
        start = geom.slot_offset(slot) + rec.manifest_offset
        out.extend(range(start, start + rec.manifest_bytes))
    return out


positions = st.one_of(
    st.integers(0, len(reference_file()[0]) - 1),               # anywhere
    st.integers(0, HEADER_BYTES - 1),                            # header
    st.integers(BLOCK, BLOCK * 4 - 1),                           # commit records
    st.sampled_from(manifest_positions()),                       # manifests
    st.sampled_from(newest_ranges()[2]))                         # newest slot


@settings(max_examples=300, deadline=None)
@given(flips=st.lists(st.tuples(positions, st.integers(1, 255)), min_size=1, max_size=8))
def test_flipped_bytes_never_yield_wrong_data(flips):
    image, _, _, newest = reference_file()
    damaged = bytearray(image)
    for pos, xor in flips:
        damaged[pos] ^= xor
    r = check_recovery(bytes(damaged))
    touched = {p for p, _ in flips}
    header, record, slot = newest_ranges()
    header_copy_intact = (not any(p < HEADER_BYTES for p in touched)
                          or not any(BLOCK // 2 <= p < BLOCK // 2 + HEADER_BYTES for p in touched))
    if header_copy_intact and not any(p in record or p in slot for p in touched):
        assert r is not None and r.commit.counter == newest.counter   # no needless fallback


@settings(max_examples=60, deadline=None)
@given(length=st.integers(0, 20_000))
def test_truncated_files_never_yield_wrong_data(length):
    image, _, geom, _ = reference_file()
    r = check_recovery(image[:min(length, len(image) - 1)])
    if length < geom.slots_offset:
        assert r is None


def test_a_truncated_file_is_named_as_such():
    image, _, geom, _ = reference_file()
    with pytest.raises(CheckpointError, match="truncated"):
        recover(SimDisk.from_bytes(image[:geom.slots_offset + 100]))


def _zip_bytes():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("a.txt", "hello")
    return buf.getvalue()


def _npy_bytes():
    buf = io.BytesIO()
    np.save(buf, np.arange(1000))
    return buf.getvalue()


@pytest.mark.parametrize("content", [b"", b"hello world\n" * 100, bytes(8192), _zip_bytes(),
                                     _npy_bytes(), np.random.default_rng(0).bytes(50_000)],
                         ids=["empty", "text", "zeros", "zip", "npy", "random"])
def test_foreign_files_are_refused_with_one_line(tmp_path, content):
    path = tmp_path / "foreign"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        recover(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    with pytest.raises(CheckpointError):
        CheckpointEngine(path)                     # and never overwritten by a writer
    assert path.read_bytes() == content


def test_a_missing_file_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        recover(tmp_path / "nothing")


def test_a_commit_record_copied_from_another_file_is_ignored():
    image, _, geom, newest = reference_file()
    other = SimDisk(block_size=BLOCK)
    with CheckpointEngine(other, keep=2, max_in_flight=1, block_size=BLOCK,
                          chunk_bytes=1024) as eng:             # same geometry, other data
        for i in range(3):
            eng.save(50 + i, random_state(50 + i, {"w": 200 + 10 * i, "b": 64})).wait()
    spliced = bytearray(image)
    donor = other.current_bytes()
    rec = geom.record_offset(newest.slot)
    spliced[rec:rec + BLOCK] = donor[rec:rec + BLOCK]
    slot = slice(geom.slot_offset(newest.slot), geom.slot_offset(newest.slot) + geom.slot_bytes)
    spliced[slot] = donor[slot]
    r = check_recovery(bytes(spliced))
    assert r is not None and r.step == 11                       # fell back, never the donor's


@pytest.mark.parametrize("old, new", [(b'"i":2', b'"i":7'), (b'"offset":0', b'"offset":8')])
def test_a_manifest_edited_into_other_valid_json_is_caught_by_its_checksum(old, new):
    image, _, geom, newest = reference_file()
    at = geom.record_offset(newest.slot)
    rec = decode_record(image[at:at + BLOCK], geom, newest.slot)
    start = geom.slot_offset(newest.slot) + rec.manifest_offset
    manifest = image[start:start + rec.manifest_bytes]
    assert old in manifest
    edited = image[:start] + manifest.replace(old, new, 1) + image[start + len(manifest):]
    r = check_recovery(edited)
    assert r is not None and r.step == 11
