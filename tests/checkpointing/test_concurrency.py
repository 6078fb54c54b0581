"""Saves overlap training and each other, within bounds, and newer commits always win."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from ckpt_helpers import HookedDisk, assert_same_state, random_state

from faultlab.checkpointing import CheckpointEngine, list_commits, recover


def gated_disk():
    gate = threading.Event()
    return HookedDisk(block_size=512, before_sync=gate.wait), gate


def test_save_returns_once_staged_while_the_commit_is_still_pending():
    disk, gate = gated_disk()
    with CheckpointEngine(disk, block_size=512, chunk_bytes=512, pool_bytes=8192) as eng:
        h = eng.save(1, random_state(1))
        assert not h.done() and h.error is None and h.commit is None
        gate.set()
        info = h.wait()
    assert h.done() and info.step == 1


@pytest.mark.parametrize("n", [1, 2, 3])
def test_up_to_max_in_flight_saves_are_in_flight_and_no_more(n):
    disk, gate = gated_disk()
    eng = CheckpointEngine(disk, max_in_flight=n, block_size=512, chunk_bytes=512,
                           pool_bytes=64 * 1024, writers=2)
    handles = [eng.save(i, random_state(i)) for i in range(n)]
    assert eng.in_flight == n and not any(h.done() for h in handles)
    with pytest.raises(TimeoutError):
        eng.save(n, random_state(n), timeout=0)
    gate.set()
    eng.wait_all()
    assert [h.wait().counter for h in handles] == list(range(n))
    eng.save(n, random_state(n)).wait()
    eng.close()
    assert recover(disk).step == n


def test_state_larger_than_the_pool_is_staged_before_save_returns():
    disk, gate = gated_disk()
    state = random_state(5, {"w": 20_000, "v": 3000})           # ~100 KB through 2 KiB
    with CheckpointEngine(disk, block_size=512, chunk_bytes=1024, pool_bytes=2048) as eng:
        h = eng.save(5, state)
        for a in state.values():
            a[...] = 0                                         # the caller reuses its arrays
        assert not h.done()
        gate.set()
        h.wait()
    assert_same_state(recover(disk).state, random_state(5, {"w": 20_000, "v": 3000}))


def test_an_older_checkpoint_finishing_late_never_replaces_a_newer_commit():
    release, first_blocked = threading.Event(), threading.Event()
    disk = HookedDisk(block_size=512)
    eng = CheckpointEngine(disk, max_in_flight=2, block_size=512, chunk_bytes=4096,
                           pool_bytes=64 * 1024, writers=2, slot_bytes=16384)
    geom = eng.geometry
    slot0 = range(geom.slot_offset(0), geom.slot_offset(1))

    def hold_slot0_data(offset, data):
        if offset in slot0 and not release.is_set():
            first_blocked.set()
            release.wait()

    disk.before_write = hold_slot0_data
    old = eng.save(100, random_state(100), {"who": "old"})      # counter 0, slot 0, 1 chunk
    first_blocked.wait()
    new = eng.save(200, random_state(200), {"who": "new"})      # counter 1, another slot
    assert new.wait().counter == 1
    assert not old.done()
    assert recover(disk).meta == {"who": "new"}
    release.set()
    assert old.wait().counter == 0                              # commits late...
    assert [c.counter for c in eng.committed()] == [0, 1]
    step, state, meta = eng.load_latest()                       # ...but never wins
    assert (step, meta) == (200, {"who": "new"})
    assert_same_state(state, random_state(200))
    eng.close()


def test_done_callbacks_run_after_the_commit_is_durable():
    disk = HookedDisk(block_size=512)
    seen = []
    with CheckpointEngine(disk, block_size=512) as eng:
        h = eng.save(3, random_state(3))
        h.add_done_callback(lambda handle: seen.append(
            (handle.counter, [c.counter for c in list_commits(disk.crash_image(
                choice=_drop_all(disk)))])))
        h.wait()
        h.add_done_callback(lambda handle: seen.append("late"))
    assert seen[0] == (0, [0]) and seen[-1] == "late"


def _drop_all(disk):
    from faultlab.checkpointing import CrashChoice
    return CrashChoice((0,) * len(disk.pending()))


def test_saves_from_several_threads_all_commit_with_distinct_counters():
    disk = HookedDisk(block_size=512)
    with CheckpointEngine(disk, max_in_flight=3, block_size=512, chunk_bytes=512,
                          pool_bytes=2048, writers=3) as eng:
        handles, lock = [], threading.Lock()

        def saver(k):
            for i in range(5):
                h = eng.save(k * 100 + i, random_state(k * 100 + i))
                with lock:
                    handles.append(h)

        threads = [threading.Thread(target=saver, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        eng.wait_all()
    counters = sorted(h.wait().counter for h in handles)
    assert counters == list(range(15))
    newest = max(handles, key=lambda h: h.counter)
    r = recover(disk)
    assert r.step == newest.step
    assert_same_state(r.state, random_state(newest.step))


def test_zero_byte_states_commit_too():
    disk = HookedDisk(block_size=512)
    with CheckpointEngine(disk, block_size=512) as eng:
        eng.save(1, {}).wait()
        eng.save(2, {"empty": np.zeros((0, 4))}, {"k": 1}).wait()
    step, state, meta = recover(disk)
    assert step == 2 and state["empty"].shape == (0, 4) and meta == {"k": 1}
