"""A crash test tells a torn checkpoint (bytes that match no state the loop saved) from a loop
whose state is incomplete (the checkpoint is exactly what the loop saved, but the resumed run
differs from the uninterrupted one because capture() / restore() leave something out).

The loops are NumPy-only (SGD with momentum on least squares, mini-batches drawn from a NumPy
generator), so these campaigns need no framework: each forgets one piece of its state.
"""

from __future__ import annotations

import numpy as np
import pytest

from faultlab.checkpointing.api import Phase, recover_checkpoint
from faultlab.crash import (CrashVerdict, KillPoint, Reference, classify, fingerprint,
                            read_saved)
from faultlab.crash.verdicts import Saved
from faultlab.testing.plugin import crash_lab  # noqa: F401  (the plugin's fixture)


class MomentumLoop:
    """SGD with momentum; `forget`: "momentum" or "rng" is left out of the checkpoint."""

    def __init__(self, forget: str | None = None):
        self.forget = forget
        data = np.random.default_rng(7)
        self.x = data.standard_normal((64, 8))
        self.y = self.x @ data.standard_normal(8)
        self.rng = np.random.default_rng(0)          # draws each step's mini-batch
        self.w = np.zeros(8)
        self.m = np.zeros(8)

    def step(self, k: int) -> None:
        idx = self.rng.integers(0, 64, 16)
        g = self.x[idx].T @ (self.x[idx] @ self.w - self.y[idx]) / 16
        self.m = 0.9 * self.m + g
        self.w = self.w - 0.05 * self.m

    def capture(self, step: int):
        state = {"w": self.w.copy()}
        meta: dict = {"step": step}
        if self.forget != "momentum":
            state["momentum"] = self.m.copy()
        if self.forget != "rng":
            meta["rng"] = self.rng.bit_generator.state
        return state, meta

    def restore(self, state, meta) -> None:
        self.w = np.array(state["w"])
        if "momentum" in state:
            self.m = np.array(state["momentum"])
        if "rng" in meta:
            self.rng.bit_generator.state = meta["rng"]


def complete_loop():
    return MomentumLoop()


def loop_without_momentum():
    return MomentumLoop(forget="momentum")


def loop_without_rng():
    return MomentumLoop(forget="rng")


#: two kills between steps: the second recovers a checkpoint saved after the first resume
PLAN = [KillPoint(Phase.IDLE, 4), KillPoint(Phase.IDLE, 4)]


def test_a_complete_loop_survives_the_plan(crash_lab):
    result = crash_lab.run(complete_loop, kills=PLAN, steps=10)
    result.assert_ok()
    assert result.verdict is CrashVerdict.EXACT and not result.incomplete_state


@pytest.mark.parametrize("make, what", [(loop_without_momentum, "momentum"),
                                        (loop_without_rng, "rng")])
def test_a_loop_that_forgets_part_of_its_state_is_incomplete_not_torn(crash_lab, make, what):
    result = crash_lab.run(make, kills=PLAN, steps=10)
    verdicts = [k.verdict for k in result.kills]
    assert verdicts == [CrashVerdict.EXACT.value, CrashVerdict.INCOMPLETE.value], result.explain()
    assert CrashVerdict.TORN.value not in verdicts and CrashVerdict.MIXED.value not in verdicts
    assert result.verdict is CrashVerdict.INCOMPLETE and not result.identical
    detail = result.kills[1].detail
    names = "momentum, w" if what == "rng" else "w"     # the generator's draws move both
    assert f"step 6: the checkpoint is exactly what the loop saved, but after resuming at " \
           f"step 3, the loop's state differs from the uninterrupted run's in {names}:" in detail
    assert "the loop's state is incomplete, not the checkpoint" in detail
    assert "\n" not in detail
    # the run's own explanation: the first state saved after the resume that differs
    assert result.incomplete_state.startswith("step 4: every checkpoint recovered is exactly ")
    assert f"in {names}:" in result.incomplete_state
    with pytest.raises(AssertionError, match="incomplete-state") as err:
        result.assert_ok()
    assert "torn" not in str(err.value)


def _corrupt(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


@pytest.mark.parametrize("make, whole", [(complete_loop, CrashVerdict.EXACT),
                                         (loop_without_momentum, CrashVerdict.INCOMPLETE)])
def test_a_corrupted_checkpoint_image_is_still_torn(crash_lab, make, whole):
    """The negative control `naive` keeps no checksum: recovery returns whatever its file
    holds. Its last checkpoint, whole, is exact (or incomplete-state for the loop that forgot
    its momentum); with one byte of an array flipped on disk it is torn, naming the array,
    even though the run's log of saved states is consulted."""
    result = crash_lab.run(make, kills=[KillPoint(Phase.IDLE, 4)], engine="naive", steps=8)
    assert all(k.verdict == CrashVerdict.EXACT.value for k in result.kills)
    ref = crash_lab.campaign(make, steps=8).reference()
    saved = read_saved(result.saved_log)
    assert [(s.step, s.resumed) for s in saved] == [(1, 0), (2, 0), (3, 0), (4, 3), (5, 3),
                                                   (6, 3), (7, 3), (8, 3)]
    got = recover_checkpoint("naive", result.directory)
    assert classify((got.step, got.state, got.meta), ref, None, saved)[0] is whole
    _corrupt(result.directory / "naive.ckpt", (1 << 16) + 3)     # inside the first array
    got = recover_checkpoint("naive", result.directory)
    verdict, detail = classify((got.step, got.state, got.meta), ref, None, saved)
    assert verdict is CrashVerdict.TORN, detail
    assert "match no state the loop saved" in detail
    assert "['momentum']" in detail or "['w']" in detail


# -- the verdict itself -----------------------------------------------------------------------

def test_classify_tells_incomplete_state_from_torn():
    ref_a, ref_b = {"w": np.arange(4.0), "m": np.zeros(4)}, {"w": np.arange(4.0) + 1,
                                                              "m": np.ones(4)}
    ref = Reference({1: fingerprint(ref_a, {"s": 1}), 2: fingerprint(ref_b, {"s": 2})})
    resumed = {"w": np.arange(4.0) + 2, "m": np.ones(4)}       # went elsewhere after a resume
    saved = [Saved(1, 0, fingerprint(ref_a, {"s": 1})), Saved(2, 1, fingerprint(resumed,
                                                                                 {"s": 2}))]
    verdict, detail = classify((2, resumed, {"s": 2}), ref, 1, saved)
    assert verdict is CrashVerdict.INCOMPLETE
    assert "after resuming at step 1" in detail and "differs from the uninterrupted run's in w:" \
        in detail
    # without the run's log it can only be torn (the old behaviour, power-loss campaigns)
    assert classify((2, resumed, {"s": 2}), ref, 1)[0] is CrashVerdict.TORN
    # a bit flipped in what was saved: torn, naming the array
    flipped = dict(resumed, m=resumed["m"].copy())
    flipped["m"].view(np.uint64)[2] ^= 1
    verdict, detail = classify((2, flipped, {"s": 2}), ref, 1, saved)
    assert verdict is CrashVerdict.TORN and "['m']" in detail
    # a whole but older checkpoint than one reported durable is still lost-committed
    assert classify((2, resumed, {"s": 2}), ref, 3, saved)[0] is CrashVerdict.LOST
    assert classify((2, ref_b, {"s": 2}), ref, 1, saved)[0] is CrashVerdict.EXACT
