"""In-memory snapshot blobs and the per-node store: round trips, strict decoding of every
damaged or forged blob, kills of a real writer process, the prune / keep rules."""

from __future__ import annotations

import json
import os
import runpy
import signal
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from faultlab.distributed import (HEADER_BYTES, MAGIC, SnapshotError, SnapshotStore,
                                  decode_snapshot, default_root, encode_into, encode_snapshot,
                                  peek_header, snapshot_size)
from faultlab.errors import FaultlabError

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CHILD = HERE / "_snap_writer_child.py"

DTYPES = [np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64, np.uint8,
          np.uint16, np.uint32, np.uint64, np.bool_, np.complex64, np.dtype(">i4"),
          np.dtype(">f8")]

arrays_st = st.sampled_from(DTYPES).flatmap(
    lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0,
                                               max_side=6)))
json_leaf = (st.none() | st.booleans() | st.integers(-2**62, 2**62)
             | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6))
meta_st = st.dictionaries(st.text(max_size=6), st.recursive(
    json_leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c,
                                                                  max_size=3),
    max_leaves=8), max_size=4)
state_st = st.dictionaries(st.text(max_size=8), arrays_st, max_size=4)
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def same_arrays(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        x, y = np.asarray(a[k]), b[k]
        assert (x.dtype, x.shape) == (y.dtype, y.shape), k
        assert x.tobytes() == y.tobytes(), k


def small_state(step: int = 0) -> tuple[dict, dict]:
    return ({"w": np.arange(100, dtype=np.float32) * step, "i": np.array(step, np.int64),
             "b": np.array([True, False, step % 2 == 1])}, {"step": step, "lr": 0.1})


# -- round trips --------------------------------------------------------------------------

@SETTINGS
@given(state_st, meta_st, st.integers(0, 2**32 - 1), st.integers(0, 2**63 - 1),
       st.integers(0, 2**63 - 1), st.integers(0, 200))
def test_round_trip_and_encode_into_equals_encode(arrays, meta, owner, step, gen, slack):
    blob = encode_snapshot(owner, step, arrays, meta, generation=gen)
    assert len(blob) == snapshot_size(arrays, meta)
    assert peek_header(blob) == (owner, step, gen, len(blob))
    for copy in (False, True):
        snap = decode_snapshot(blob, copy=copy)
        assert (snap.owner, snap.step, snap.generation, snap.meta) == (owner, step, gen, meta)
        same_arrays(arrays, snap.arrays)
    buf = bytearray(b"\xab" * (len(blob) + slack))      # dirty buffer: padding must be zeroed
    assert encode_into(memoryview(buf), owner, step, arrays, meta, generation=gen) == len(blob)
    assert bytes(buf[:len(blob)]) == blob
    assert buf[len(blob):] == b"\xab" * slack


def test_layout_is_aligned_and_views_are_zero_copy():
    arrays = {"a": np.arange(3, dtype=np.int8), "b": np.ones((5, 7), np.float64),
              "c": np.zeros(0, np.float32), "d": np.array(7, np.uint16)}
    blob = bytearray(encode_snapshot(0, 1, arrays, {}))
    assert blob[:8] == MAGIC and len(blob) % 64 == 0
    snap = decode_snapshot(blob)
    base = np.frombuffer(blob, np.uint8).ctypes.data
    for name in ("a", "b", "d"):
        assert (snap.arrays[name].ctypes.data - base) % 64 == 0
        assert np.shares_memory(snap.arrays[name], np.frombuffer(blob, np.uint8))
    ro = decode_snapshot(bytes(blob))
    assert not ro.arrays["b"].flags.writeable
    assert decode_snapshot(bytes(blob), copy=True).arrays["b"].flags.writeable


def test_non_contiguous_arrays_are_stored_in_c_order():
    x = np.arange(24, dtype=np.int32).reshape(4, 6)[:, ::2].T
    snap = decode_snapshot(encode_snapshot(0, 0, {"x": x}, {}))
    np.testing.assert_array_equal(snap.arrays["x"], x)


@pytest.mark.parametrize("arrays, meta, owner, step, gen, field", [
    ({"x": np.array([object()])}, {}, 0, 0, 0, "dtype"),
    ({"x": np.zeros(2, [("a", "<i4")])}, {}, 0, 0, 0, "dtype"),
    ({"x": np.array(["s"])}, {}, 0, 0, 0, "dtype"),
    ({1: np.zeros(2)}, {}, 0, 0, 0, "name"),
    ({}, {"x": float("nan")}, 0, 0, 0, "meta"),
    ({}, {"x": object()}, 0, 0, 0, "meta"),
    ({}, [], 0, 0, 0, "meta"),
    ({}, {}, -1, 0, 0, "owner"),
    ({}, {}, 2**32, 0, 0, "owner"),
    ({}, {}, 0, -1, 0, "step"),
    ({}, {}, 0, 0, -1, "generation"),
    ({}, {}, 0, True, 0, "step"),
])
def test_encode_rejects_what_it_cannot_store(arrays, meta, owner, step, gen, field):
    with pytest.raises(SnapshotError, match=field) as e:
        encode_snapshot(owner, step, arrays, meta, generation=gen)
    assert "\n" not in str(e.value) and isinstance(e.value, FaultlabError)


def test_encode_into_a_small_or_read_only_buffer_fails():
    arrays, meta = small_state(1)
    size = snapshot_size(arrays, meta)
    with pytest.raises(SnapshotError, match="smaller"):
        encode_into(bytearray(size - 1), 0, 1, arrays, meta)
    with pytest.raises(SnapshotError, match="read-only"):
        encode_into(bytes(size), 0, 1, arrays, meta)


# -- damage: every bit flip, truncation and extension is refused ----------------------------

BLOB = encode_snapshot(2, 9, {"w": np.linspace(0, 1, 37, dtype=np.float32),
                              "z": np.zeros((0, 2), np.int16), "s": np.array(5, np.uint8)},
                       {"epoch": 1, "name": "mlp"}, generation=3)


def rejects(blob) -> SnapshotError:
    with pytest.raises(SnapshotError) as e:
        decode_snapshot(blob)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("snapshot: ")
    return e.value


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(BLOB) * 8 - 1))
def test_every_single_bit_flip_is_rejected(bit):
    raw = bytearray(BLOB)
    raw[bit // 8] ^= 1 << (bit % 8)
    rejects(bytes(raw))


def test_every_bit_of_the_header_and_manifest_is_checked():
    for bit in range((HEADER_BYTES + 160) * 8):
        raw = bytearray(BLOB)
        raw[bit // 8] ^= 1 << (bit % 8)
        rejects(bytes(raw))


@settings(max_examples=100, deadline=None)
@given(st.integers(0, len(BLOB) - 1), st.binary(min_size=1, max_size=80))
def test_truncations_and_extensions_are_rejected(cut, tail):
    rejects(BLOB[:cut])
    rejects(BLOB + tail)


def test_peek_header_checks_the_header_only():
    assert peek_header(BLOB[:HEADER_BYTES]) == (2, 9, 3, len(BLOB))
    raw = bytearray(BLOB)
    raw[20] ^= 1
    with pytest.raises(SnapshotError, match="header_hash"):
        peek_header(bytes(raw))
    with pytest.raises(SnapshotError, match="shorter"):
        peek_header(BLOB[:10])
    with pytest.raises(SnapshotError, match="magic"):
        peek_header(b"x" * 64)
    with pytest.raises(SnapshotError, match="bytes-like"):
        peek_header(12)


# -- forged blobs: checksums right, content malicious ----------------------------------------

def forge(doc, payload: bytes = b"", *, payload_len: int | None = None, version: int = 1,
          algo: int = 1, step: int = 0, gen: int = 0, raw_manifest: bytes | None = None) -> bytes:
    manifest = raw_manifest if raw_manifest is not None else json.dumps(doc).encode()
    p_off = -(-(HEADER_BYTES + len(manifest)) // 64) * 64
    payload_len = len(payload) if payload_len is None else payload_len
    body = manifest + bytes(p_off - HEADER_BYTES - len(manifest)) + payload
    head = struct.pack("<8sHHIqqQQQ", MAGIC, version, algo, 0, step, gen, len(manifest),
                       payload_len, xxhash.xxh3_64_intdigest(body))
    return head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head)) + body


def tensor(**kw):
    t = {"name": "x", "dtype": "<f4", "shape": [2], "offset": 0}
    t.update(kw)
    return t


def test_forge_makes_blobs_the_decoder_accepts():
    blob = forge({"tensors": [tensor()], "meta": {"a": 1}}, bytes(64))
    snap = decode_snapshot(blob)
    assert snap.meta == {"a": 1} and snap.arrays["x"].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("doc, payload, field", [
    ({"tensors": [tensor(dtype="O")]}, bytes(64), r"tensors\[0\]\.dtype"),
    ({"tensors": [tensor(dtype="|O")]}, bytes(64), r"tensors\[0\]\.dtype"),
    ({"tensors": [tensor(dtype="|O8")]}, bytes(64), r"tensors\[0\]\.dtype"),
    ({"tensors": [tensor(dtype=[["a", "<i4"]])]}, bytes(64), r"tensors\[0\]\.dtype"),
    ({"tensors": [tensor(dtype="[('a','<i4')]")]}, bytes(64), r"tensors\[0\]\.dtype"),
    ({"tensors": [tensor(dtype="<M8")]}, bytes(64), r"tensors\[0\]\.dtype"),
    ({"tensors": [tensor(dtype="<V8")]}, bytes(64), r"tensors\[0\]\.dtype"),
    ({"tensors": [tensor(dtype="<b1")]}, bytes(64), r"tensors\[0\]\.dtype"),   # not canonical
    ({"tensors": [tensor(dtype="<f3")]}, bytes(64), r"tensors\[0\]\.dtype"),
    ({"tensors": [tensor(shape=[2**40, 2**40])]}, bytes(64), r"tensors\[0\]\.shape"),
    ({"tensors": [tensor(shape=[0, 2**62])]}, b"", r"tensors\[0\]\.shape"),
    ({"tensors": [tensor(shape=[1000])]}, bytes(64), r"tensors\[0\]\.shape"),
    ({"tensors": [tensor(shape=[-1])]}, bytes(64), r"tensors\[0\]\.shape\[0\]"),
    ({"tensors": [tensor(shape=[True])]}, bytes(64), r"tensors\[0\]\.shape\[0\]"),
    ({"tensors": [tensor(shape=[2.0])]}, bytes(64), r"tensors\[0\]\.shape\[0\]"),
    ({"tensors": [tensor(shape=[1] * 65)]}, bytes(64), r"tensors\[0\]\.shape"),
    ({"tensors": [tensor(shape=2)]}, bytes(64), r"tensors\[0\]\.shape"),
    ({"tensors": [tensor(offset=64)]}, bytes(128), r"tensors\[0\]\.offset"),
    ({"tensors": [tensor(offset=-64)]}, bytes(64), r"tensors\[0\]\.offset"),
    ({"tensors": [tensor(), tensor(offset=0)]}, bytes(128), r"tensors\[1\]\.name"),
    ({"tensors": [tensor(), tensor(name="y", offset=0)]}, bytes(128), r"tensors\[1\]\.offset"),
    ({"tensors": [tensor(name=3)]}, bytes(64), r"tensors\[0\]\.name"),
    ({"tensors": [tensor(extra=1)]}, bytes(64), r"tensors\[0\] has unknown key"),
    ({"tensors": [{"name": "x", "dtype": "<f4", "shape": [2]}]}, bytes(64),
     r"tensors\[0\] lacks key"),
    ({"tensors": [tensor()]}, bytes(128), "payload_len"),
    ({"tensors": []}, bytes(64), "payload_len"),
    ({"tensors": {}}, b"", "tensors"),
    ({"tensors": [], "meta": []}, b"", "meta"),
    ({"tensors": [], "meta": {}, "more": 1}, b"", "unknown key"),
    ({"meta": {}}, b"", "lacks key"),
    ([], b"", "manifest is not an object"),
])
def test_forged_manifests_are_rejected_naming_the_field(doc, payload, field):
    if isinstance(doc, dict) and "meta" not in doc and "tensors" in doc:
        doc = {**doc, "meta": {}}
    err = rejects(forge(doc, payload))
    assert __import__("re").search(field, str(err)), str(err)


@pytest.mark.parametrize("raw, field", [
    (b'{"tensors":[],"meta":{"a":NaN}}', "NaN"),
    (b'{"tensors":[],"meta":{"a":1,"a":2}}', "appears twice"),
    (b'{"tensors":[],"meta":' + b'[' * 100 + b']' * 100 + b'}', "nested"),
    (b'{"tensors":[],"meta":' + b'[' * 100000 + b']' * 100000 + b'}', "nested"),
    (b'{"tensors":[],"meta":{"a":"\xff"}}', "not valid JSON"),
    (b'{"tensors":[],"meta":{}', "not valid JSON"),
])
def test_forged_json_is_rejected(raw, field):
    with pytest.raises(SnapshotError, match=field):
        decode_snapshot(forge(None, raw_manifest=raw))


@pytest.mark.parametrize("kw, field", [
    (dict(version=2), "header.version"), (dict(algo=2), "header.hash_algo"),
    (dict(step=-1), "header.step"), (dict(gen=-5), "header.generation"),
    (dict(payload_len=3), "header.payload_len"), (dict(payload_len=1 << 60), "payload_len"),
])
def test_forged_headers_are_rejected_naming_the_field(kw, field):
    with pytest.raises(SnapshotError, match=field):
        decode_snapshot(forge({"tensors": [], "meta": {}}, **kw))


def test_a_huge_claimed_length_allocates_nothing():
    blob = forge({"tensors": [], "meta": {}}, payload_len=1 << 50)
    with pytest.raises(SnapshotError, match="truncated"):
        decode_snapshot(blob)
    assert peek_header(blob)[3] > 1 << 50


# -- the store ------------------------------------------------------------------------------

def test_store_write_read_inventory(tmp_path):
    store = SnapshotStore(tmp_path, 1, keep=2)
    for s in range(4):
        arrays, meta = small_state(s)
        path = store.write(5, s, arrays, meta, generation=1)
        assert path == tmp_path / "node1" / f"owner5-step{s}.snap"
    assert store.inventory() == {5: [2, 3]} and store.last_rejected == []
    for copy in (True, False):
        snap = store.read(5, 3, copy=copy)
        same_arrays(small_state(3)[0], snap.arrays)
        assert (snap.meta, snap.generation) == (small_state(3)[1], 1)
        assert snap.arrays["w"].flags.writeable == copy
        assert all(a.ctypes.data % 64 == 0 for a in snap.arrays.values() if a.size)
    blob = store.read_blob(5, 2)
    assert decode_snapshot(blob).step == 2
    with pytest.raises(SnapshotError, match="no copy"):
        store.read(5, 0)
    with pytest.raises(SnapshotError, match="no copy"):
        store.read_blob(4, 3)
    store.wipe()
    assert not (tmp_path / "node1").exists() and store.inventory() == {}


def test_durable_write_and_open_write(tmp_path):
    store = SnapshotStore(tmp_path, 0)
    arrays, meta = small_state(7)
    store.write(0, 7, arrays, meta, durable=True)
    with store.open_write(1, 7, snapshot_size(arrays, meta)) as pending:
        encode_into(pending.buffer, 1, 7, arrays, meta)
        pending.commit()
    with store.open_write(2, 7, snapshot_size(arrays, meta)) as pending:
        pass                                                # aborted: nothing published
    with pytest.raises(SnapshotError, match="not owner 3"):
        with store.open_write(3, 7, snapshot_size(arrays, meta)) as pending:
            encode_into(pending.buffer, 1, 7, arrays, meta)
            pending.commit()
    assert store.inventory() == {0: [7], 1: [7]}
    assert sorted(os.listdir(store.directory)) == ["owner0-step7.snap", "owner1-step7.snap"]


def test_put_blob_verifies_before_writing(tmp_path):
    store = SnapshotStore(tmp_path, 2)
    assert store.put_blob(memoryview(BLOB)) == (2, 9)
    assert store.read_blob(2, 9) == BLOB
    bad = bytearray(BLOB)
    bad[-1] ^= 4
    other = SnapshotStore(tmp_path, 3)
    with pytest.raises(SnapshotError, match="body_hash"):
        other.put_blob(bytes(bad))
    assert not other.directory.exists() or os.listdir(other.directory) == []


@settings(max_examples=30, deadline=None)
@given(st.integers(0, len(BLOB) * 8 - 1), st.sampled_from(["flip", "cut", "grow", "rename"]))
def test_inventory_skips_damaged_files(bit, how):
    with tempfile.TemporaryDirectory() as d:
        store = SnapshotStore(d, 0, keep=5)
        store.put_blob(BLOB)
        store.write(1, 4, *small_state(4))
        path = store.path(2, 9)
        raw = bytearray(path.read_bytes())
        if how == "flip":
            raw[bit // 8] ^= 1 << (bit % 8)
        elif how == "cut":
            raw = raw[:bit // 8]
        elif how == "grow":
            raw += b"\0"
        if how == "rename":
            os.replace(path, store.path(2, 10))
            path = store.path(2, 10)
        else:
            path.write_bytes(raw)
        assert store.inventory() == {1: [4]}
        assert [p for p, _ in store.last_rejected] == [path]
        assert all("\n" not in why for _, why in store.last_rejected)
        with pytest.raises(SnapshotError):
            store.read(2, 10 if how == "rename" else 9)


def test_temp_files_of_dead_writers_are_swept_live_ones_kept(tmp_path):
    store = SnapshotStore(tmp_path, 0)
    store.write(0, 1, *small_state(1))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    dead_tmp = store.directory / f".owner0-step2.{dead.pid}-1.tmp"
    live_tmp = store.directory / f".owner0-step2.{os.getpid()}-99.tmp"
    dead_tmp.write_bytes(BLOB[:100])
    live_tmp.write_bytes(BLOB[:100])
    (store.directory / "notes.txt").write_text("ignored")
    assert store.inventory() == {0: [1]} and store.last_rejected == []
    assert not dead_tmp.exists() and live_tmp.exists()


def test_a_newer_generation_drops_the_abandoned_timeline(tmp_path):
    store = SnapshotStore(tmp_path, 0, keep=3)
    for s in (4, 5, 6):
        store.write(0, s, *small_state(s), generation=0)
        store.write(1, s, *small_state(s), generation=0)
    store.write(0, 5, *small_state(5), generation=1)      # restarted from step 4
    assert store.inventory() == {0: [4, 5], 1: [4, 5, 6]}
    assert store.read(0, 5).generation == 1
    store.write(1, 3, *small_state(3), generation=0)      # same generation: older step pruned
    assert store.inventory()[1] == [4, 5, 6]
    assert store.truncate_after(4) == [(0, 5), (1, 5), (1, 6)]
    assert store.inventory() == {0: [4], 1: [4]}


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.lists(st.tuples(st.integers(0, 2), st.integers(0, 8),
                                             st.integers(0, 2)), max_size=14))
def test_prune_and_keep_follow_the_model(keep, ops):
    arrays = {"x": np.zeros(3, np.int8)}
    model: dict[int, dict[int, int]] = {}
    with tempfile.TemporaryDirectory() as d:
        store = SnapshotStore(d, 0, keep=keep)
        for owner, step, gen in ops:
            store.write(owner, step, arrays, {}, generation=gen)
            files = model.setdefault(owner, {})
            files[step] = gen
            for s in [s for s in files if s > step and files[s] < gen]:
                del files[s]
            for s in sorted(files)[:-keep]:
                del files[s]
            assert store.inventory() == {o: sorted(f) for o, f in sorted(model.items()) if f}
        for owner, files in model.items():
            for s, g in files.items():
                assert store.read(owner, s).generation == g


# -- kills of a real writer ------------------------------------------------------------------

@pytest.mark.parametrize("keep", [1, 2])
def test_a_writer_killed_at_any_instant_leaves_only_complete_snapshots(tmp_path, keep):
    """The child writes MB-sized snapshots back to back; it is killed after its k-th report,
    so the kill lands wherever the next write happens to be (mid-copy, mid-hash, between
    rename and prune: about one round in four leaves a temp file)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    state = runpy.run_path(str(CHILD))["state"]
    for round_, kill_after in enumerate([1, 2, 3, 5, 8, 13]):
        root = tmp_path / f"r{round_}"
        reader = SnapshotStore(root, 0, keep=keep)
        child = subprocess.Popen([sys.executable, str(CHILD), str(root), str(keep)],
                                 stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        try:
            printed = -1
            for _ in range(kill_after):
                line = child.stdout.readline()
                assert line, "the writer died on its own"
                printed = int(line)
                # concurrent reads: never a torn or corrupt file, whatever the writer does
                inv = reader.inventory()
                assert reader.last_rejected == []
                assert set(inv) <= {3}
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
            child.stdout.close()
        inv = reader.inventory()
        assert reader.last_rejected == []
        assert not any(n.endswith(".tmp") for n in os.listdir(reader.directory))
        steps = inv[3]
        assert printed in steps or max(steps) > printed
        # at most one step beyond keep (killed between the rename and the prune)
        assert steps == list(range(steps[0], steps[-1] + 1)) and len(steps) <= keep + 1
        for s in steps:
            snap = reader.read(3, s)
            arrays, meta = state(s)
            same_arrays(arrays, snap.arrays)
            assert (snap.meta, snap.generation) == (meta, 1)


# -- default root -----------------------------------------------------------------------------

def test_default_root(monkeypatch, tmp_path):
    monkeypatch.delenv("FAULTLAB_SHM_ROOT", raising=False)
    root = default_root("job1")
    assert root.name == "job1" and root.parent.name == f"faultlab-{os.getuid()}"
    if os.access("/dev/shm", os.W_OK):
        assert root.parent.parent == Path("/dev/shm")
    monkeypatch.setenv("FAULTLAB_SHM_ROOT", str(tmp_path))
    assert default_root("j") == tmp_path / "j"
    for bad in ("", ".", "..", "a/b", "a\0b"):
        with pytest.raises(SnapshotError, match="job id"):
            default_root(bad)


def test_decoding_allocates_no_more_than_the_blob():
    import tracemalloc
    blob = encode_snapshot(0, 0, {"a": np.ones(200_000), "b": np.zeros((0, 10**9), np.int8)},
                           {"k": list(range(10))})
    tracemalloc.start()
    try:
        for copy in (False, True):
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            snap = decode_snapshot(blob, copy=copy)
            peak = tracemalloc.get_traced_memory()[1] - before
            # the arrays' bytes (copy=True) plus the parsed manifest's few objects
            assert peak <= (len(blob) if copy else 0) + 64 * 1024, (copy, peak)
            del snap
    finally:
        tracemalloc.stop()


def test_meta_nesting_limit_matches_on_both_sides():
    deep = {}
    node = deep
    for _ in range(62):
        node["x"] = {}
        node = node["x"]
    assert decode_snapshot(encode_snapshot(0, 0, {}, deep)).meta == deep   # 63 levels: ok
    node["x"] = [1]
    with pytest.raises(SnapshotError, match="meta is nested"):
        encode_snapshot(0, 0, {}, deep)


def test_pruned_files_are_reused_and_never_listed(tmp_path):
    import faultlab.distributed.snapshots as snapmod
    store = SnapshotStore(tmp_path, 0, keep=2)
    arrays = {"w": np.arange(1000, dtype=np.float32)}
    for step in range(8):
        store.write(0, step, {"w": arrays["w"] + step}, {"s": step})
        names = os.listdir(store.directory)
        spares = [n for n in names if n.startswith(".spare.")]
        assert len(spares) <= snapmod.SPARES
        assert store.inventory() == {0: [max(0, step - 1), step] if step else [0]}
    assert store.read(0, 7).arrays["w"][0] == 7.0
    # a spare left by a process that died is swept by the next writer
    dead = store.directory / ".spare.999999999-0.tmp"
    dead.write_bytes(b"x" * 64)
    store.write(0, 8, arrays, {})
    assert not dead.exists()


def test_a_reused_file_never_shrinks_under_a_reader(tmp_path):
    # a reader that mapped a published copy may still read all of it after the copy was
    # pruned and its file recycled (a shorter file would be SIGBUS in the reader)
    import mmap
    store = SnapshotStore(tmp_path, 0, keep=1)
    big, small = {"w": np.ones(100_000, np.float32)}, {"w": np.ones(10, np.float32)}
    store.write(0, 0, big, {})
    with open(store.path(0, 0), "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    size = mm.size()
    for step in range(1, 7):
        store.write(0, step, small if step % 2 else big, {})
    assert len(mm[:]) == size
    mm.close()
    assert store.inventory() == {0: [6]}
