"""ENOSPC and EIO surface as CheckpointError and never harm what was already committed."""

from __future__ import annotations

import errno
import os

import pytest
from ckpt_helpers import assert_same_state, random_state
from hypothesis import given, settings
from hypothesis import strategies as st

from faultlab.checkpointing import CheckpointEngine, SimDisk, list_commits, recover
from faultlab.errors import CheckpointError


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(["write", "sync"]), nth=st.integers(1, 8),
       err=st.sampled_from([errno.ENOSPC, errno.EIO]), before=st.integers(1, 4),
       keep=st.integers(1, 3), max_in_flight=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_a_failing_write_or_sync_leaves_every_earlier_commit_recoverable(
        kind, nth, err, before, keep, max_in_flight, seed):
    disk = SimDisk(block_size=512, sector_size=128)
    eng = CheckpointEngine(disk, keep=keep, max_in_flight=max_in_flight, block_size=512,
                           chunk_bytes=512, pool_bytes=2048, writers=2)
    ok = [eng.save(i, random_state(i)).wait() for i in range(before)]
    disk.inject_fault(kind, nth=nth, err=err)
    handles, raised = [], None
    try:
        for i in range(before, before + 4):
            handles.append(eng.save(i, random_state(i)))
        eng.wait_all()
    except CheckpointError as e:
        raised = e
    # four saves make at least 8 syncs and 28 writes, so the fault always fires
    assert raised is not None and "\n" not in str(raised)
    for h in handles:
        h._event.wait()
    committed = [h.commit for h in handles if h.commit] + ok
    failed = [h for h in handles if h.error is not None]
    assert failed, "the fault must fail at least one save"
    with pytest.raises(CheckpointError):
        eng.save(99, random_state(99))       # the error also surfaces from the next save
    eng.close()
    # every commit the engine promised to keep is intact, whatever happens next
    newest = sorted(committed, key=lambda c: c.counter)[-keep:]
    for image in (disk, disk.crash_image(seed)):
        intact = {c.counter for c in list_commits(image)}
        assert {c.counter for c in newest} <= intact
        r = recover(image)
        assert r.commit.counter >= newest[-1].counter
        assert_same_state(r.state, random_state(r.step))


@pytest.mark.parametrize("err, words", [(errno.ENOSPC, "no space"), (errno.EIO, "I/O error")])
def test_os_errors_from_a_real_file_become_one_line_checkpoint_errors(tmp_path, monkeypatch,
                                                                      err, words):
    path = tmp_path / "c"
    eng = CheckpointEngine(path, chunk_bytes=4096, pool_bytes=8192)
    eng.save(0, random_state(0)).wait()

    def failing_fdatasync(fd):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "fdatasync", failing_fdatasync)
    h = eng.save(1, random_state(1))
    with pytest.raises(CheckpointError, match=words) as info:
        h.wait()
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="stopped after an earlier error"):
        eng.save(2, random_state(2))
    monkeypatch.undo()
    eng.close()
    assert recover(path).step in (0, 1)


def test_no_space_for_a_new_file_is_reported_and_leaves_nothing_behind(tmp_path, monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with CheckpointEngine(tmp_path / "c") as eng:
        with pytest.raises(CheckpointError, match="no space"):
            eng.save(0, random_state(0))
    assert list(tmp_path.iterdir()) == []


def test_close_reports_a_failure_nobody_has_looked_at():
    disk = SimDisk(block_size=512)
    eng = CheckpointEngine(disk, block_size=512)
    eng.save(0, random_state(0)).wait()
    disk.inject_fault("sync", err=errno.EIO)
    eng.save(1, random_state(1))
    with pytest.raises(CheckpointError, match="I/O error"):
        eng.close()
    eng.close()                                              # idempotent
    assert recover(disk).step in (0, 1)
