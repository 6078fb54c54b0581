"""Shared helpers for the checkpoint engine tests: states, comparisons, hookable disks."""

from __future__ import annotations

import numpy as np

from faultlab.checkpointing import SimDisk
from faultlab.checkpointing.format import FormatError, decode_header, decode_record


def random_state(seed: int, sizes: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """A deterministic state of a few arrays of different dtypes."""
    rng = np.random.default_rng(seed)
    sizes = sizes or {"w": 300, "b": 40, "m": 120}
    out = {}
    for i, (name, n) in enumerate(sizes.items()):
        dtype = (np.float32, np.int8, np.float64, np.uint16)[i % 4]
        out[name] = np.frombuffer(rng.bytes(n * np.dtype(dtype).itemsize), dtype=dtype).copy()
    return out


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-exact equality: same dtype, same shape, same bytes (NaN payloads included)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def assert_same_state(got: dict, expected: dict) -> None:
    assert list(got) == list(expected)
    for name in expected:
        assert same_bits(got[name], expected[name]), name


class HookedDisk(SimDisk):
    """A SimDisk that calls hooks before each write / sync (to hold operations in tests)."""

    def __init__(self, *args, before_write=None, before_sync=None, **kw):
        super().__init__(*args, **kw)
        self.before_write, self.before_sync = before_write, before_sync

    def pwrite(self, offset, data):
        if self.before_write is not None:
            self.before_write(offset, data)
        super().pwrite(offset, data)

    def sync_data(self):
        if self.before_sync is not None:
            self.before_sync()
        super().sync_data()

    sync_all = sync_data


def commit_timeline(log) -> list[tuple[int, int, int]]:
    """From a SimDisk op log: (counter, index of its record write, index of the sync after it).

    Found independently of recovery: a write into the record area that decodes as a record.
    The sync index is None when no sync followed before the log ended.
    """
    geom, out, unsynced = None, [], []
    for i, op in enumerate(log):
        if op[0] == "create":
            geom = decode_header(op[2])
        elif op[0] == "write" and geom is not None:
            offset, data = op[1], op[2]
            if geom.records_offset <= offset < geom.slots_offset:
                slot = (offset - geom.records_offset) // geom.block_size
                try:
                    rec = decode_record(data, geom, slot)
                except FormatError:
                    continue
                unsynced.append((rec.counter, i))
        elif op[0] == "sync":
            out.extend((c, w, i) for c, w in unsynced)
            unsynced = []
    out.extend((c, w, None) for c, w in unsynced)
    return out


def assert_data_durable_before_records(log) -> int:
    """Check the commit protocol on an op log: no record is written while its slot has
    unsynced writes. Returns the number of records checked."""
    geom, dirty, records = None, set(), 0
    for i, op in enumerate(log):
        if op[0] == "create":
            geom = decode_header(op[2])
        elif op[0] == "sync":
            dirty.clear()
        elif op[0] == "write" and geom is not None:
            offset, data = op[1], op[2]
            if offset >= geom.slots_offset:
                dirty.add((offset - geom.slots_offset) // geom.slot_bytes)
            elif offset >= geom.records_offset:
                slot = (offset - geom.records_offset) // geom.block_size
                try:
                    decode_record(data, geom, slot)
                except FormatError:
                    continue                              # a tombstone
                assert slot not in dirty, f"op {i}: record written before its data was synced"
                records += 1
    return records
