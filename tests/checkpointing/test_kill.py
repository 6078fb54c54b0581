"""kill -9 at a point the test picks never costs a reported commit, nor yields a torn one;
and a second process cannot write to a checkpoint file that has a writer."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from ckpt_helpers import assert_same_state
from ckpt_kill_child import state_for

from faultlab.checkpointing import CheckpointEngine, recover
from faultlab.errors import CheckpointError

HERE = Path(__file__).parent
ROOT = HERE.parents[1]   # the repository


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def kill_after(path: Path, k: int) -> tuple[int, list[tuple[int, int]]]:
    """Run a child, SIGKILL it after its k-th commit message; return (resumed-from, commits)."""
    child = subprocess.Popen([sys.executable, str(HERE.parent / "helpers" / "ckpt_kill_child.py"), str(path)],
                             stdout=subprocess.PIPE, env=child_env())
    try:
        ready = child.stdout.readline().split()
        assert ready[:1] == [b"ready"], ready
        commits = []
        while len(commits) < k:
            line = child.stdout.readline()
            assert line, "child exited early"
            _, counter, step = line.split()
            commits.append((int(counter), int(step)))
        child.send_signal(signal.SIGKILL)
        for line in child.stdout.read().splitlines():      # sent before it died
            _, counter, step = line.split()
            commits.append((int(counter), int(step)))
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    return int(ready[1]), commits


def check_after_kill(path: Path, reported: list[tuple[int, int]]) -> int:
    """Recovery returns a whole checkpoint no older than any commit ever reported."""
    try:
        r = recover(path)
    except CheckpointError:
        assert not reported, "a reported commit was lost"
        return -1
    if reported:
        last_counter, last_step = max(reported)
        assert r.commit.counter >= last_counter and r.step >= last_step
    assert r.meta == {"step": r.step}
    assert_same_state(r.state, state_for(r.step))
    return r.step


def run_kills(path: Path, kills: int, seed: int) -> None:
    """Kill a saving child `kills` times, each after 0-4 commit messages, resuming each time."""
    rng = random.Random(seed)
    recovered, reported = -1, []
    for _ in range(kills):
        resumed_from, commits = kill_after(path, rng.randint(0, 4))
        assert resumed_from == recovered              # the child resumed where recovery is
        reported += commits
        recovered = check_after_kill(path, reported)


def test_kill_9_at_chosen_points_recovers_the_last_reported_commit(tmp_path):
    run_kills(tmp_path / "run.ckpt", kills=4, seed=1)


@pytest.mark.slow
def test_kill_9_one_hundred_times_in_a_row(tmp_path):
    run_kills(tmp_path / "run.ckpt", kills=100, seed=2)


def test_a_second_writer_process_is_refused(tmp_path):
    path = tmp_path / "run.ckpt"
    with CheckpointEngine(path, chunk_bytes=4096) as eng:
        eng.save(0, state_for(0)).wait()
        script = textwrap.dedent(f"""
            from faultlab.checkpointing import CheckpointEngine, recover
            from faultlab.errors import CheckpointError
            assert recover({str(path)!r}).step == 0        # reading is allowed
            try:
                CheckpointEngine({str(path)!r})
            except CheckpointError as e:
                print(e)
                raise SystemExit(3)
        """)
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             env=child_env())
        assert out.returncode == 3, out.stderr
        assert "already open for writing" in out.stdout
        eng.save(1, state_for(1)).wait()                 # the first writer is unharmed
    assert recover(path).step == 1


def test_a_second_writer_in_the_same_process_is_refused_until_the_first_closes(tmp_path):
    path = tmp_path / "run.ckpt"
    first = CheckpointEngine(path, chunk_bytes=4096)
    first.save(0, state_for(0)).wait()
    with pytest.raises(CheckpointError, match="already open for writing"):
        CheckpointEngine(path)
    first.close()
    with CheckpointEngine(path) as second:
        assert [c.step for c in second.committed()] == [0]
