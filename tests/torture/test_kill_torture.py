"""Kill torture with an oracle independent of faultlab's crash tooling (kill_harness.py's
docstring says how it works): SIGKILL a writer process at random moments, recover through
the public API, and check that nothing durable was lost and nothing torn, mixed, mislabelled
or never saved came back. Quick variants run by default; the long one is marked slow
(FAULTLAB_TORTURE_KILLS, default 2000; FAULTLAB_TORTURE_SEED; FAULTLAB_TORTURE_REPORT
collects the JSON summaries). Kills are timed on the writer's progress lines, never sleeps."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kill_harness  # noqa: E402
from torture_states import KINDS, Tally, make_state, report, state_diff  # noqa: E402

MiB = 1024 * 1024


def _bad(out: dict) -> dict:
    return {k: out[k] for k in Tally.BAD if out[k]}


def test_states_are_a_pure_function_of_the_step():
    kinds = set()
    for step in range(200):
        a, am = make_state(7, step, 256 * 1024)
        b, bm = make_state(7, step, 256 * 1024)
        assert state_diff(a, am, b, bm) is None
        kinds.update(name.rsplit(":", 1)[1] for name in a)
    assert kinds == set(KINDS)
    a, am = make_state(7, 1, 256 * 1024)
    b, bm = make_state(7, 2, 256 * 1024)
    assert state_diff(a, am, b, bm) is not None


def test_kill_torture_quick(tmp_path, record_property):
    out = kill_harness.run_kills(30, seed=11, directory=tmp_path, trigger="progress",
                                 max_bytes=1 * MiB)
    report("kill_quick", out)
    record_property("kill_torture", out["summary"])
    assert out["kills"] == 30
    assert not _bad(out), "\n".join(out["failures"])
    assert out["recovered"] >= 15          # most kills land after something was committed


@pytest.mark.slow
def test_kill_torture_long(tmp_path, record_property):
    kills = int(os.environ.get("FAULTLAB_TORTURE_KILLS", "2000"))
    seed = int(os.environ.get("FAULTLAB_TORTURE_SEED", "1"))
    out = kill_harness.run_kills(kills, seed=seed, directory=tmp_path, trigger="progress",
                                 progress=max(100, kills // 10))
    report("kill_long", out)
    record_property("kill_torture", out["summary"])
    assert out["kills"] == kills
    assert not _bad(out), "\n".join(out["failures"])


#: what the oracle must call each deliberately broken writer
CAUGHT_AS = {
    "lie": ("lost",),                              # logs "durable" before wait()
    "mutate": ("torn", "mixed", "wrong"),          # changes borrowed arrays while written
    "drop": ("lost", "retention", "torn"),         # a disk that loses one write in eight
}


@pytest.mark.parametrize("broken", sorted(CAUGHT_AS))
def test_the_oracle_catches_a_broken_writer(tmp_path, broken):
    # timing decides which kill exposes the breakage: batches of kills until one does
    caught, total = 0, {}
    for batch in range(8):
        out = kill_harness.run_kills(6, seed=100 + batch, directory=tmp_path / str(batch),
                                     trigger="progress", broken=broken, max_bytes=512 * 1024,
                                     keep_failures=False)
        for k in Tally.BAD:
            total[k] = total.get(k, 0) + out[k]
        caught = sum(total[k] for k in CAUGHT_AS[broken])
        if caught:
            break
    print(f"broken={broken}: kills={6 * (batch + 1)} " + " ".join(f"{k}={v}" for k, v in
                                                                   total.items()))
    assert caught > 0, f"the oracle did not notice the {broken!r} writer: {total}"
