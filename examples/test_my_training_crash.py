"""A property-based crash-recovery test of *your* training loop, with faultlab's pytest plugin.

Run it:

    pytest examples/test_my_training_crash.py

Hypothesis draws kill plans (where to SIGKILL the training process: while staging a
checkpoint, writing it, committing it, or between steps; which occurrence; held at that exact
instant or raced) and engine settings (checkpoints in flight, retention, chunk size, staging
pool, writer threads). For each, `crash_lab.run` trains `make_loop()` in a real process, kills
it at every point of the plan, restarts it from the recovered checkpoint each time, and checks
that

* every recovery returned a checkpoint that was really saved, whole (not torn, not mixed from
  two saves), and no older than the newest one reported durable before the kill;
* the run, killed and resumed that many times, ends bit-identical to an uninterrupted one.

What makes the second point hold is that the state holds *everything* that decides later
steps: here the model, the optimizer (SGD with Nesterov momentum), the learning-rate schedule,
the shuffling generator and the position in the epoch, the dropout generator (torch's global
one). Leave one out -- delete `generators=` below -- and the test fails, showing where.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings

from faultlab.testing import KillPoint, Phase, TorchCheckpointAdapter
from faultlab.testing import strategies as fst

# `crash_lab` is the fixture of faultlab's pytest plugin, active wherever faultlab is installed
# (entry point pytest11); importing it as well lets this file run from a source checkout that
# is not installed, and is harmless otherwise.
from faultlab.testing.plugin import crash_lab  # noqa: E402,F401

BATCH = 16


class MyTraining:
    """Your training code. A fresh instance must start deterministically (seed everything the
    checkpoint holds), because each restarted process builds one before restoring."""

    def __init__(self):
        torch.manual_seed(0)
        np.random.seed(0)
        random.seed(0)
        data = np.random.default_rng(7)
        self.x = torch.from_numpy(data.standard_normal((48, 10)).astype(np.float32))
        self.y = (self.x[:, 0] * self.x[:, 1] > 0).long()
        self.model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(),
                                         torch.nn.Dropout(0.1), torch.nn.Linear(32, 2))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9,
                                   nesterov=True)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=5, gamma=0.7)
        self.shuffle = torch.Generator().manual_seed(1234)
        self.order = torch.randperm(len(self.y), generator=self.shuffle)
        self.pos = 0
        self.adapter = TorchCheckpointAdapter(self.model, self.opt, scheduler=self.sched,
                                              generators={"shuffle": self.shuffle})

    def step(self, k: int) -> None:
        if self.pos + BATCH > len(self.y):                 # a new epoch: reshuffle
            self.order, self.pos = torch.randperm(len(self.y), generator=self.shuffle), 0
        idx = self.order[self.pos:self.pos + BATCH]
        self.pos += BATCH
        loss = torch.nn.functional.cross_entropy(self.model(self.x[idx]), self.y[idx])
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.sched.step()

    # The two methods the crash campaign calls; the adapter does the work.
    def capture(self, step: int):
        return self.adapter.capture(step, data_position={"pos": self.pos},
                                    extra={"order": self.order})

    def restore(self, state, meta) -> None:
        resume = self.adapter.restore(state, meta)
        self.pos = resume.data_position["pos"]
        self.order = resume.extra["order"]


def make_loop() -> MyTraining:
    """The factory: a module-level function, so the forked training processes can import it."""
    return MyTraining()


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=fst.kill_plans(max_kills=4), engine_settings=fst.engine_settings("faultlab"))
def test_my_training_survives_any_kill_plan(crash_lab, plan, engine_settings):
    result = crash_lab.run(make_loop, kills=plan, settings=engine_settings, steps=12)
    result.assert_ok()


def test_my_training_survives_a_kill_in_every_phase(crash_lab):
    plan = [KillPoint(phase, 2) for phase in Phase] + [KillPoint(Phase.COMMITTING, 3,
                                                                 hold=False)]
    result = crash_lab.run(make_loop, kills=plan, steps=12)
    result.assert_ok()
    assert len(result.kills) == len(plan)
