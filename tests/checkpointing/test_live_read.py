"""recover() beside a live writer: it returns the newest commit that was durable when it
started, or a newer one, bit for bit, and never fails while a valid commit exists.

The writer runs in another process (tests/helpers/live_writer.py), so the slot pinning is
exercised across processes with real file locks. Two set-ups: a reader held back chunk by
chunk while the writer saves in lockstep (deterministic: it proves that a slow reader is not
overtaken), and readers racing a writer that saves at full speed (quick here, 5,000 reads in
the slow variant; FAULTLAB_LIVE_READS sets the count).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from live_writer import live_state

from faultlab.checkpointing import CheckpointEngine, recover
from faultlab.checkpointing.format import decode_header
from faultlab.checkpointing.storage import OSStorage

WRITER = Path(__file__).resolve().parents[1] / "helpers" / "live_writer.py"


def start_writer(path: Path, mode: str, elems: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, str(WRITER), str(path), mode, str(elems)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def stop_writer(proc: subprocess.Popen) -> str:
    proc.stdin.close()
    out = proc.stdout.read()
    proc.wait(timeout=120)
    assert proc.returncode == 0
    return out


def assert_exact(got, elems: int) -> None:
    want = live_state(got.step, elems)
    assert got.meta == {"step": got.step}
    assert set(got.state) == set(want)
    for k, v in want.items():
        assert got.state[k].dtype == v.dtype and got.state[k].shape == v.shape
        assert got.state[k].tobytes() == v.tobytes(), k


def durable_step(path: Path) -> int:
    lines = Path(str(path) + ".log").read_bytes().split()
    return int(lines[-1]) if lines else 0


class HeldBackReader(OSStorage):
    """Reads the file, calling `between()` after each read of a slot's data."""

    def __init__(self, path, between):
        super().__init__(path)
        self.between = between
        with OSStorage(path) as st:
            st.open(write=False)
            self.slots_offset = decode_header(st.pread(0, 1 << 16)).slots_offset

    def reader(self):
        return HeldBackReader(self.path, self.between)

    def readinto(self, offset, buf):
        n = super().readinto(offset, buf)
        if offset >= self.slots_offset and len(memoryview(buf)) > 4096:
            self.between()
        return n


def test_a_reader_held_back_by_the_writer_saving_in_lockstep_still_gets_its_commit(tmp_path):
    path, elems = tmp_path / "ckpt", 300_000
    writer = start_writer(path, "step", elems)
    replies = []

    def one_more_save():
        writer.stdin.write("go\n")
        writer.stdin.flush()
        replies.append(writer.stdout.readline().strip())

    try:
        first = durable_step(path)
        got = recover(HeldBackReader(path, one_more_save))
    finally:
        out = stop_writer(writer)
    # The writer went on saving while the commit was read (keep=2, 3 slots): two saves went
    # through, and every later one was refused rather than overwrite the slot being read.
    assert got.step == first
    assert_exact(got, elems)
    assert replies[:2] == [f"ok {first + 1}", f"ok {first + 2}"]
    assert replies[2:] and set(replies[2:]) == {"refused"}
    assert out.strip() == f"saved {first + 2}"
    assert recover(path).step == first + 2


def test_a_writer_in_this_process_takes_another_slot_while_one_is_read(tmp_path):
    path, elems = tmp_path / "ckpt", 50_000
    slot = CheckpointEngine.slot_bytes_for(live_state(0, elems), meta={"step": 2**62})
    with CheckpointEngine(path, keep=1, max_in_flight=2, chunk_bytes=65536,
                          slot_bytes=slot) as eng:
        eng.save(1, live_state(1, elems), {"step": 1}).wait()
        taken = []

        def save_three():                 # the reader's slot falls out of `keep` at once
            if not taken:
                for s in (2, 3, 4):
                    taken.append(eng.save(s, live_state(s, elems), {"step": s}).wait().slot)

        got = recover(HeldBackReader(path, save_three))
        assert got.step == 1 and got.commit.slot not in taken
        assert_exact(got, elems)
        assert eng.load_latest().step == 4


def run_live_reads(tmp_path: Path, reads: int, elems: int) -> dict:
    path = tmp_path / "ckpt"
    writer = start_writer(path, "free", elems)
    counts = {"reads": 0, "failures": 0, "older_than_start": 0, "distinct_steps": 0}
    steps = set()
    try:
        for _ in range(reads):
            floor = durable_step(path)
            try:
                got = recover(path)
            except Exception as e:            # counted, then reported by the assertion
                counts["failures"] += 1
                counts.setdefault("first_failure", f"{type(e).__name__}: {e}")
                continue
            assert_exact(got, elems)
            counts["older_than_start"] += got.step < floor
            counts["reads"] += 1
            steps.add(got.step)
    finally:
        out = stop_writer(writer)
    counts["distinct_steps"] = len(steps)
    counts["writer_saves"] = int(out.split()[-1])
    print("live reads:", json.dumps(counts))
    if os.environ.get("FAULTLAB_LIVE_REPORT"):
        Path(os.environ["FAULTLAB_LIVE_REPORT"]).write_text(json.dumps(counts))
    return counts


def test_readers_racing_a_full_speed_writer_never_fail(tmp_path):
    counts = run_live_reads(tmp_path, 150, 200_000)
    assert counts["failures"] == 0 and counts["older_than_start"] == 0, counts
    assert counts["distinct_steps"] > 1          # the writer really moved under the readers


@pytest.mark.slow
def test_five_thousand_live_reads(tmp_path):
    reads = int(os.environ.get("FAULTLAB_LIVE_READS", "5000"))
    counts = run_live_reads(tmp_path, reads, 1_000_000)
    assert counts["failures"] == 0 and counts["older_than_start"] == 0, counts
    assert counts["reads"] == reads
