"""SimDisk loses exactly what a power cut may lose: unsynced block writes, whole or torn."""

from __future__ import annotations

import errno
import random

import pytest

from faultlab.checkpointing import CrashChoice, SimDisk
from faultlab.errors import CheckpointError


def fresh(size=4096, block=1024, sector=256) -> SimDisk:
    disk = SimDisk(block_size=block, sector_size=sector)
    disk.create(size, b"H" * 16)
    return disk


def test_reads_see_unsynced_writes_but_a_crash_may_drop_them():
    disk = fresh()
    disk.pwrite(100, b"abc")
    assert disk.pread(100, 3) == b"abc"
    assert disk.crash_image(choice=CrashChoice((0,))).pread(100, 3) == bytes(3)
    assert disk.crash_image(choice=CrashChoice((1,))).pread(100, 3) == b"abc"


def test_synced_writes_survive_every_crash():
    disk = fresh()
    disk.pwrite(0, b"x" * 2000)
    disk.sync_data()
    disk.pwrite(3000, b"y")
    for _, image in disk.enumerate_images(limit=50):
        assert image.pread(0, 2000) == b"x" * 2000


def test_writes_are_tracked_per_block_and_torn_per_sector():
    disk = fresh(block=1024, sector=256)
    disk.pwrite(512, b"z" * 1024)                 # spans blocks 0 and 1
    pending = disk.pending()
    assert [(w.offset, len(w.data)) for w in pending] == [(512, 512), (1024, 512)]
    # keep only the second sector of the first piece, and all of the second piece
    image = disk.crash_image(choice=CrashChoice((0b10, 0b11)))
    assert image.pread(512, 1024) == bytes(256) + b"z" * 768


def test_survivors_may_land_in_any_order():
    disk = fresh()
    disk.pwrite(0, b"old!")
    disk.pwrite(0, b"new!")
    assert disk.crash_image(choice=CrashChoice((1, 1), order=(1, 0))).pread(0, 4) == b"old!"
    assert disk.crash_image(choice=CrashChoice((1, 1))).pread(0, 4) == b"new!"


def test_enumerate_images_is_distinct_bounded_and_starts_with_nothing_then_in_order():
    disk = fresh(size=8192)
    for i in range(5):
        disk.pwrite(i * 1024, bytes([i + 1]) * 1024)
    images = list(disk.enumerate_images(limit=40))
    assert 1 < len(images) <= 40
    contents = [img.durable_bytes() for _, img in images]
    assert len(set(contents)) == len(contents)
    assert contents[0] == disk.crash_image(choice=CrashChoice((0,) * 5)).durable_bytes()
    assert disk.current_bytes() in contents               # everything kept


def test_random_crash_images_are_reproducible_from_a_seed():
    disk = fresh()
    for i in range(4):
        disk.pwrite(i * 1000, b"q" * 900)
    a = disk.crash_image(random.Random(3)).durable_bytes()
    assert a == disk.crash_image(random.Random(3)).durable_bytes()


def test_crash_states_replay_the_log_at_every_instant():
    disk = fresh()
    disk.pwrite(0, b"a")
    disk.sync_data()
    disk.pwrite(1, b"b")
    states = list(disk.crash_states())
    assert [k for k, _ in states] == [0, 1, 2, 3, 4]
    assert not states[0][1].exists()
    assert states[3][1].durable_bytes()[:2] == b"aH"
    assert states[4][1].current_bytes()[:2] == b"ab"
    assert len(states[4][1].pending()) == 1


@pytest.mark.parametrize("kind", ["write", "sync"])
@pytest.mark.parametrize("err, words", [(errno.ENOSPC, "no space"), (errno.EIO, "I/O error")])
def test_the_nth_operation_can_be_made_to_fail(kind, err, words):
    disk = fresh()
    disk.inject_fault(kind, nth=2, err=err)
    op = (lambda: disk.pwrite(0, b"k")) if kind == "write" else disk.sync_data
    op()
    with pytest.raises(CheckpointError, match=words):
        op()
    op()                                                   # one-shot


def test_failed_write_changes_nothing_and_failed_sync_keeps_writes_pending():
    disk = fresh()
    disk.inject_fault("write", err=errno.ENOSPC)
    with pytest.raises(CheckpointError):
        disk.pwrite(0, b"zz")
    assert disk.pread(0, 2) == b"HH"
    disk.pwrite(0, b"yy")
    disk.inject_fault("sync")
    with pytest.raises(CheckpointError):
        disk.sync_data()
    assert len(disk.pending()) == 1


def test_a_second_writer_is_refused_until_the_first_closes():
    disk = fresh()
    with pytest.raises(CheckpointError, match="already open for writing"):
        disk.open(write=True)
    disk.reader().open(write=False)                        # readers are fine
    disk.close()
    disk.open(write=True)
