"""kill -9 the word-level LSTM language model of examples/word_lm.py mid-run, resume it, and
check it ends bit-identical to an uninterrupted run -- with the loop kept as one function.

    python -m pytest -q examples/test_word_lm_crash.py

`word_lm.script_train(resume, checkpoint, steps) -> state` is crash_lab's *script-style loop*
(docs/checkpointing.md, "Script-style loops"): it builds and seeds everything, loads
`resume.state` when it resumes, trains from `resume.step`, calls `checkpoint(k, state)` after
step k and returns its final state. crash_lab runs it in a real process, SIGKILLs it at each
kill point (while the engine stages, writes or commits a checkpoint, or between steps),
restarts it from the checkpoint recovered, and compares the final state bit for bit with an
uninterrupted run. The state holds everything that decides later steps: the model, SGD's
state and learning rate, the ReduceLROnPlateau schedule, the LSTM's hidden state carried to
the next batch, and torch's generator (dropout masks). Leave the hidden state or the
generator out and the verdict is `incomplete-state`, naming the arrays that moved
(test_a_loop_that_forgets_its_hidden_state_is_named below).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import word_lm  # noqa: E402

from faultlab.testing import KillPoint, Phase  # noqa: E402

# the fixture of faultlab's pytest plugin (also active through its entry point when faultlab is
# installed); importing it lets this file run from a source checkout that is not installed
from faultlab.testing.plugin import crash_lab  # noqa: E402,F401

pytestmark = pytest.mark.framework("torch")

STEPS = 12          # 1.5 epochs of 8 steps


def train(resume, checkpoint, steps):
    """The script-style loop handed to crash_lab (module level, so a training process finds
    it): the example's own."""
    return word_lm.script_train(resume, checkpoint, steps)


def forgets_hidden(resume, checkpoint, steps):
    """The same loop with the hidden state left out of what it saves (a negative control)."""
    def without_hidden(k, state):
        state = dict(state)
        state["h"], state["c"] = [word_lm.torch.zeros_like(state["h"])] * 2
        return checkpoint(k, state)
    return word_lm.script_train(resume, without_hidden, steps)


def test_word_lm_survives_a_kill_in_every_phase(crash_lab):
    # a kill in each phase of the engine's save, one between steps right at the end of the
    # first epoch (after step 8: validation and the schedule's step done, the hidden state
    # reset next), one raced while a commit is being synced
    plan = [KillPoint(phase, 3) for phase in Phase] + [KillPoint(Phase.IDLE, 6),
                                                       KillPoint(Phase.COMMITTING, 9, hold=False)]
    result = crash_lab.run(train, kills=plan, steps=STEPS)
    result.assert_ok()
    assert len(result.kills) == len(plan) and result.identical


def test_a_loop_that_forgets_its_hidden_state_is_named(crash_lab):
    result = crash_lab.run(forgets_hidden, kills=[KillPoint("idle", 4)], steps=STEPS)
    with pytest.raises(AssertionError, match="incomplete-state"):
        result.assert_ok()
