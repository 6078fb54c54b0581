"""Crafted checkpoint files whose checksums are all valid: headers and manifests that break the
format's structural rules. Recovery returns the exact state saved under the commit it names,
or a one-line CheckpointError, nothing else; a crafted newest commit falls back to the older
intact one. Random damage (flips, zeroed, misdirected and stale blocks, truncation) holds to
the same oracle.

The quick variants run in the default suite; the slow ones draw FAULTLAB_CORRUPTION_CASES
cases in all (default 10,000) and print what happened to each.
"""

from __future__ import annotations

import functools
import json
import os
import struct
from collections import Counter

import numpy as np
import pytest
from ckpt_helpers import assert_same_state
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from faultlab.checkpointing import CheckpointEngine, SimDisk, recover
from faultlab.checkpointing.format import (HEADER_BYTES, Record, decode_header, decode_record,
                                           digest, encode_record)
from faultlab.errors import CheckpointError

BLOCK = 512
LONG = int(os.environ.get("FAULTLAB_CORRUPTION_CASES", "10000"))
OUTCOMES: dict[str, Counter] = {}


def state_of(i: int) -> dict[str, np.ndarray]:
    """Arrays of many kinds: structured, big-endian, 0-d, empty, datetime, unicode, bool."""
    rng = np.random.default_rng(i)
    rec = np.zeros(7, dtype=[("a", "<i4"), ("b", ">f8", (2,))])
    rec["a"] = rng.integers(-99, 99, 7)
    rec["b"] = rng.standard_normal((7, 2))
    return {"w": rng.standard_normal(150 + 13 * i).astype(np.float32),
            "big": rng.integers(-2**40, 2**40, 33).astype(">i8"),
            "rec": rec,
            "scalar": np.array(i, dtype=np.int16),
            "empty": np.zeros((3, 0), dtype=np.float64),
            "when": np.array([i, 2 * i], dtype="datetime64[ns]"),
            "text": np.array(["x" * (i % 4), "yz"], dtype="<U5"),
            "flags": rng.random(10) < 0.5}


@functools.cache
def reference():
    """Three commits (keep=2, three slots), slots with room for crafted manifests."""
    disk = SimDisk(block_size=BLOCK)
    slot = CheckpointEngine.slot_bytes_for(state_of(2), meta={"i": 2}) + 16 * 1024
    expected = {}
    with CheckpointEngine(disk, keep=2, max_in_flight=1, block_size=BLOCK, chunk_bytes=1024,
                          slot_bytes=slot) as eng:
        for i in range(3):
            info = eng.save(10 + i, state_of(i), {"i": i}).wait()
            expected[info.counter] = (10 + i, state_of(i), {"i": i})
        geom, newest = eng.geometry, eng.committed()[-1]
    return disk.current_bytes(), expected, geom, newest


def outcome(image: bytes, kind: str, *, fallback_ok: bool = True):
    """Recover `image`; assert the oracle; count and return 'newest' / 'older' / 'error'."""
    _, expected, _, newest = reference()
    try:
        r = recover(SimDisk.from_bytes(image, block_size=BLOCK))
    except CheckpointError as e:
        assert "\n" not in str(e)
        got = "error"
    else:
        step, state, meta = expected[r.commit.counter]
        assert (r.step, r.meta) == (step, meta)
        assert_same_state(r.state, state)
        got = "newest" if r.commit.counter == newest.counter else "older"
    OUTCOMES.setdefault(kind, Counter())[got] += 1
    return got


# -- headers ------------------------------------------------------------------------------

_HEADER = struct.Struct("<8sHHIIIQQQQ16s")
FIELDS = ["magic", "version", "hash", "block_size", "slot_count", "reserved", "slot_bytes",
          "records_offset", "slots_offset", "file_bytes", "file_id"]
INTERESTING = [0, 1, 2, 511, 512, 513, 1024, 4096, 1 << 16, 1 << 17, 1 << 20, 1 << 31,
               (1 << 32) - 1, 1 << 40, 1 << 62, (1 << 64) - 1]


def header_values() -> list:
    image, _, _, _ = reference()
    return list(_HEADER.unpack(image[:_HEADER.size]))


def crafted_header(image: bytes, values: list, both: bool) -> bytes:
    body = _HEADER.pack(*values)
    one = body + struct.pack("<Q", digest(body))
    out = bytearray(image)
    out[:HEADER_BYTES] = one
    if both:
        out[BLOCK // 2:BLOCK // 2 + HEADER_BYTES] = one
    return bytes(out)


SIZES = {"version": 0xFFFF, "hash": 0xFFFF, "block_size": 0xFFFFFFFF,
         "slot_count": 0xFFFFFFFF, "reserved": 0xFFFFFFFF}


@st.composite
def header_edits(draw):
    base = header_values()
    edits = draw(st.lists(st.sampled_from(FIELDS[1:10]), min_size=1, max_size=4, unique=True))
    values = list(base)
    for field in edits:
        i, top = FIELDS.index(field), SIZES.get(FIELDS[FIELDS.index(field)], (1 << 64) - 1)
        choice = draw(st.one_of(st.sampled_from([v for v in INTERESTING if v <= top]),
                                st.integers(0, top),
                                st.integers(-3, 3).map(lambda d, b=base[i]: b + d)
                                .filter(lambda v, t=top: 0 <= v <= t)))
        values[i] = choice
    return values, draw(st.booleans())


def check_header(values, both):
    image, _, _, _ = reference()
    got = outcome(crafted_header(image, values, both), "header")
    if values == header_values():
        assert got == "newest"
    if not both:
        # the second copy is intact; the first is used only if it decodes to a valid header
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(header_edits())
def test_crafted_headers_give_a_saved_state_or_one_line(edit):
    check_header(*edit)


@pytest.mark.parametrize("field, value", [("slot_count", 1 << 31), ("block_size", 1 << 31),
                                          ("slot_bytes", 1 << 62), ("file_bytes", 1 << 63),
                                          ("slot_count", 0), ("block_size", 1000)])
def test_header_fields_a_machine_cannot_hold_are_named(field, value):
    image, _, _, _ = reference()
    values = header_values()
    values[FIELDS.index(field)] = value
    with pytest.raises(CheckpointError) as info:
        recover(SimDisk.from_bytes(crafted_header(image, values, both=True), block_size=BLOCK))
    assert field in str(info.value) and "\n" not in str(info.value)


# -- manifests ----------------------------------------------------------------------------

def newest_manifest() -> tuple[dict, Record, int]:
    image, _, geom, newest = reference()
    at = geom.record_offset(newest.slot)
    rec = decode_record(image[at:at + BLOCK], geom, newest.slot)
    start = geom.slot_offset(newest.slot) + rec.manifest_offset
    return json.loads(image[start:start + rec.manifest_bytes]), rec, start


def with_manifest(raw: bytes) -> bytes:
    """The reference file with the newest commit's manifest replaced (checksums valid)."""
    image, _, geom, newest = reference()
    _, rec, start = newest_manifest()
    assert rec.manifest_offset + len(raw) <= geom.slot_bytes
    out = bytearray(image)
    out[start:start + max(len(raw), rec.manifest_bytes)] = raw.ljust(rec.manifest_bytes, b"\0")
    new = Record(rec.slot, rec.counter, rec.step, rec.manifest_offset, len(raw), digest(raw),
                 rec.data_bytes, rec.file_id)
    at = geom.record_offset(newest.slot)
    out[at:at + BLOCK] = encode_record(new, BLOCK)
    return bytes(out)


def dumps(doc) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _nonempty(doc) -> list[int]:
    return [i for i, t in enumerate(doc["tensors"]) if t["nbytes"] > 0]


def _deep(depth: int):
    return json.loads("[" * depth + "]" * depth)


# Each breaks a structural rule; recovery must fall back to the older commit.
BREAKS = {
    "duplicate name": lambda d, k, v: d["tensors"][1].__setitem__("name", d["tensors"][0]["name"]),
    "overlapping offsets": lambda d, k, v: d["tensors"][_nonempty(d)[1]].__setitem__(
        "offset", d["tensors"][_nonempty(d)[0]]["offset"]),
    "unaligned offset": lambda d, k, v: d["tensors"][_nonempty(d)[k % 3]].__setitem__(
        "offset", d["tensors"][_nonempty(d)[k % 3]]["offset"] + 1 + v % 63),
    "huge shape": lambda d, k, v: d["tensors"][k % len(d["tensors"])].update(
        shape=[2**62, 0, 2**62], nbytes=0),
    "shape beyond int64": lambda d, k, v: d["tensors"][k % len(d["tensors"])].update(
        shape=[2**64 + v]),
    "too many dims": lambda d, k, v: d["tensors"][0].update(shape=[1] * (65 + v % 100),
                                                            nbytes=d["tensors"][0]["nbytes"]),
    "nbytes mismatch": lambda d, k, v: d["tensors"][_nonempty(d)[k % 3]].__setitem__(
        "nbytes", d["tensors"][_nonempty(d)[k % 3]]["nbytes"] + 1 + v % 100),
    "beyond data": lambda d, k, v: d["tensors"][_nonempty(d)[0]].__setitem__(
        "offset", -(-d["data_bytes"] // 64) * 64),
    "negative": lambda d, k, v: d["tensors"][k % len(d["tensors"])].__setitem__(
        ["offset", "nbytes"][v % 2], -64),
    "bool for int": lambda d, k, v: d["tensors"][_nonempty(d)[0]].__setitem__("offset", False),
    "float for int": lambda d, k, v: d["tensors"][_nonempty(d)[0]].__setitem__(
        "offset", float(d["tensors"][_nonempty(d)[0]]["offset"])),
    "deep nesting": lambda d, k, v: d.__setitem__("meta", {"x": _deep(63 + v % 900)}),
    "deep dtype": lambda d, k, v: d["tensors"][0].__setitem__("dtype", _deep(1 + v % 900)),
    "object dtype": lambda d, k, v: d["tensors"][k % len(d["tensors"])].__setitem__(
        "dtype", ["|O", [["a", "|O"]], "O8"][v % 3]),
    "not a dtype": lambda d, k, v: d["tensors"][0].__setitem__(
        "dtype", ["<f3", "xyz", 42, [["a"]], [[1, "<f4"]], "", None][v % 7]),
    "unknown key": lambda d, k, v: (d if v % 2 else d["tensors"][0]).__setitem__("extra", 1),
    "missing key": lambda d, k, v: (d if v % 2 else d["tensors"][0]).pop(
        (sorted(d) if v % 2 else sorted(d["tensors"][0]))[k % 5]),
    "bad chunk hash": lambda d, k, v: d["chunks"].__setitem__(
        k % len(d["chunks"]), ["0x" + "0" * 14, d["chunks"][0].upper() + "",
                               " " + d["chunks"][0][1:], 12, "g" * 16][v % 5]),
    "chunk count": lambda d, k, v: d["chunks"].append(d["chunks"][0]) if v % 2
    else d["chunks"].pop(),
    "format true": lambda d, k, v: d.__setitem__("format", True),
    "counter mismatch": lambda d, k, v: d.__setitem__("counter", d["counter"] + 1 + v),
    "data_bytes mismatch": lambda d, k, v: d.__setitem__("data_bytes", d["data_bytes"] + 1),
    "chunk_bytes zero": lambda d, k, v: d.__setitem__("chunk_bytes", 0),
    "meta not object": lambda d, k, v: d.__setitem__("meta", [1, 2]),
    "tensors not list": lambda d, k, v: d.__setitem__("tensors", {"a": 1}),
    "name not string": lambda d, k, v: d["tensors"][0].__setitem__("name", 7),
}

# Raw-text breaks the JSON decoder must refuse.
RAW_BREAKS = {
    "duplicate key": lambda raw, v: raw[:-1] + b',"meta":{"i":99}}',
    "NaN literal": lambda raw, v: raw.replace(b'"meta":{', b'"meta":{"x":NaN,', 1),
    "not utf-8": lambda raw, v: raw.replace(b'"meta":{', b'"meta":{"\xff\xfe":1,', 1),
    "trailing junk": lambda raw, v: raw + b"x",
    "nested brackets": lambda raw, v: b"[" * (1000 + v % 5000),
    "empty": lambda raw, v: b" ",
}


@st.composite
def manifest_breaks(draw):
    kind = draw(st.sampled_from(sorted(BREAKS) + sorted(RAW_BREAKS)))
    return kind, draw(st.integers(0, 1000)), draw(st.integers(0, 10**6))


def check_break(kind, k, v):
    doc, _, _ = newest_manifest()
    if kind in RAW_BREAKS:
        raw = RAW_BREAKS[kind](dumps(doc), v)
    else:
        BREAKS[kind](doc, k, v)
        raw = dumps(doc)
    assert outcome(with_manifest(raw), "manifest") == "older", kind


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(manifest_breaks())
def test_crafted_manifests_fall_back_to_the_older_commit(case):
    check_break(*case)


@pytest.mark.parametrize("kind", sorted(BREAKS) + sorted(RAW_BREAKS))
def test_each_structural_break_is_refused(kind):
    check_break(kind, 1, 7)


@settings(max_examples=50, deadline=None)
@given(st.randoms(use_true_random=False), st.booleans())
def test_re_encoded_identical_manifests_still_load_the_newest(rnd, spaced):
    doc, _, _ = newest_manifest()
    shuffled = dict(sorted(doc.items(), key=lambda _: rnd.random()))
    raw = json.dumps(shuffled, indent=1 if spaced else None).encode()
    assert outcome(with_manifest(raw), "manifest-same") == "newest"


def test_a_named_field_explains_the_fallback():
    doc, _, _ = newest_manifest()
    doc["tensors"][1]["name"] = doc["tensors"][0]["name"]
    image = with_manifest(dumps(doc))
    # the older commit loads; asking for the newest step alone names the field
    from faultlab.checkpointing.recovery import load_step
    with pytest.raises(CheckpointError, match=r"tensors\[1\]\.name"):
        load_step(SimDisk.from_bytes(image, block_size=BLOCK), 12)


# -- random damage ------------------------------------------------------------------------

@st.composite
def damages(draw):
    image, _, geom, _ = reference()
    n = len(image) // BLOCK
    kind = draw(st.sampled_from(["flip", "zero", "misdirect", "stale", "truncate"]))
    block = draw(st.integers(0, n - 1))
    return kind, block, draw(st.integers(0, n - 1)), draw(st.integers(0, BLOCK * 8 - 1)), \
        draw(st.integers(1, 255))


@functools.cache
def stale_image() -> bytes:
    """The same file one commit earlier (blocks from it are stale)."""
    disk = SimDisk(block_size=BLOCK)
    slot = CheckpointEngine.slot_bytes_for(state_of(2), meta={"i": 2}) + 16 * 1024
    with CheckpointEngine(disk, keep=2, max_in_flight=1, block_size=BLOCK, chunk_bytes=1024,
                          slot_bytes=slot) as eng:
        for i in range(2):
            eng.save(10 + i, state_of(i), {"i": i}).wait()
    return disk.current_bytes()


def check_damage(kind, block, other, bit, xor):
    image, _, _, _ = reference()
    out = bytearray(image)
    b = slice(block * BLOCK, (block + 1) * BLOCK)
    if kind == "flip":
        out[block * BLOCK + bit // 8] ^= xor
    elif kind == "zero":
        out[b] = bytes(BLOCK)
    elif kind == "misdirect":                    # a block written to the wrong place
        out[b] = image[other * BLOCK:(other + 1) * BLOCK]
    elif kind == "stale":                        # a write the drive lost: an older block
        old = stale_image()
        out[b] = old[b] if len(old) == len(image) else bytes(BLOCK)
    else:
        del out[block * BLOCK + bit % BLOCK:]
    outcome(bytes(out), "damage")


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(damages())
def test_random_block_damage_never_yields_wrong_data(d):
    check_damage(*d)


# -- the long run -------------------------------------------------------------------------

def _long(share: float) -> int:
    return max(1, int(LONG * share))


@pytest.mark.slow
def test_ten_thousand_corruption_cases(request):
    OUTCOMES.clear()

    @settings(max_examples=_long(0.25), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(header_edits())
    def headers(edit):
        check_header(*edit)

    @settings(max_examples=_long(0.35), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(manifest_breaks())
    def manifests(case):
        check_break(*case)

    @settings(max_examples=_long(0.40), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(damages())
    def damage(d):
        check_damage(*d)

    headers()
    manifests()
    damage()
    total = sum(sum(c.values()) for c in OUTCOMES.values())
    summary = {k: dict(v) for k, v in OUTCOMES.items()} | {"total": total}
    print("corruption cases:", json.dumps(summary))
    if os.environ.get("FAULTLAB_CORRUPTION_REPORT"):
        with open(os.environ["FAULTLAB_CORRUPTION_REPORT"], "w") as f:
            json.dump(summary, f)
    assert total >= LONG * 0.9        # hypothesis may stop early once it has tried everything
