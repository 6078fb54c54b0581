"""At least `keep` committed checkpoints stay intact, through saves in flight and reopening."""

from __future__ import annotations

import threading

import pytest
from ckpt_helpers import HookedDisk, assert_same_state, random_state

from faultlab.checkpointing import CheckpointEngine, CrashChoice, SimDisk, list_commits, recover
from faultlab.errors import CheckpointError


def durable_only(disk: SimDisk) -> SimDisk:
    return disk.crash_image(choice=CrashChoice((0,) * len(disk.pending())))


@pytest.mark.parametrize("keep, max_in_flight", [(2, 1), (2, 2), (3, 1)])
def test_the_newest_keep_commits_survive_while_saves_are_in_flight(keep, max_in_flight):
    gate = threading.Event()
    gate.set()
    disk = HookedDisk(block_size=512, before_sync=gate.wait)
    eng = CheckpointEngine(disk, keep=keep, max_in_flight=max_in_flight, block_size=512,
                           chunk_bytes=512, pool_bytes=64 * 1024)
    done = [eng.save(i, random_state(i)).wait() for i in range(2 * keep + 1)]
    gate.clear()                                     # hold the next commits mid-flight
    pending = [eng.save(100 + i, random_state(100 + i)) for i in range(max_in_flight)]
    image = durable_only(disk)
    kept = [c.counter for c in list_commits(image)]
    assert [c.counter for c in done[-keep:]] == kept[-keep:]
    for info in done[-keep:]:
        assert info in eng.committed()
    gate.set()
    for h in pending:
        h.wait()
    eng.close()
    assert len(list_commits(disk)) >= keep


def test_fall_back_to_the_previous_commit_when_the_newest_is_damaged():
    disk = SimDisk(block_size=512)
    with CheckpointEngine(disk, block_size=512, chunk_bytes=512) as eng:
        for i in range(3):
            eng.save(i, random_state(i)).wait()
        newest = eng.committed()[-1]
        geom = eng.geometry
    image = bytearray(disk.current_bytes())
    image[geom.slot_offset(newest.slot) + 10] ^= 0x40          # bit rot in its data
    r = recover(SimDisk.from_bytes(bytes(image)))
    assert r.step == 1
    assert_same_state(r.state, random_state(1))


def test_reopening_continues_counters_and_keeps_the_newest_verified_commits():
    disk = SimDisk(block_size=512)
    with CheckpointEngine(disk, block_size=512) as eng:
        for i in range(3):
            eng.save(i, random_state(i)).wait()
    with CheckpointEngine(disk, block_size=512) as eng:
        assert [c.step for c in eng.committed()] == [1, 2]       # the newest keep=2, verified
        assert eng.save(3, random_state(3)).wait().counter == 3
        assert [c.step for c in eng.committed()][-2:] == [2, 3]
    assert recover(disk).step == 3


def test_reopening_treats_a_damaged_commit_as_free_space_not_as_a_keeper():
    disk = SimDisk(block_size=512)
    with CheckpointEngine(disk, block_size=512, keep=2, max_in_flight=1) as eng:
        for i in range(3):
            eng.save(i, random_state(i)).wait()
        newest, geom = eng.committed()[-1], eng.geometry
    image = bytearray(disk.current_bytes())
    image[geom.slot_offset(newest.slot) + 3] ^= 1
    disk = SimDisk.from_bytes(bytes(image), block_size=512)
    with CheckpointEngine(disk, keep=2, max_in_flight=1) as eng:
        assert [c.step for c in eng.committed()] == [0, 1]
        assert eng.save(3, random_state(3)).wait().counter == 3   # after the damaged one
        assert [c.step for c in eng.committed()] == [0, 1, 3]
    assert [c.step for c in list_commits(disk)] == [0, 1, 3]


def test_a_file_without_room_for_keep_plus_one_slots_cannot_be_written():
    disk = SimDisk()
    with CheckpointEngine(disk, keep=1, max_in_flight=1) as eng:
        eng.save(0, random_state(0)).wait()
    with pytest.raises(CheckpointError, match="keep=2 leaves none"):
        CheckpointEngine(disk, keep=2)
