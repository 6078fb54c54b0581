"""crash_lab on script-style loops: a plain function ``train(resume, checkpoint, steps)`` that
trains from a resume point, calls ``checkpoint(k, state)`` after step k and returns its final
state. faultlab drives it as a TrainingLoop (faultlab.crash.loops.ScriptLoop) on the same
zygote, kill points and verdicts as any other loop."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from faultlab.checkpointing.api import Phase
from faultlab.crash import CrashVerdict, KillPoint, ResumePoint, ScriptLoop
from faultlab.crash.loops import _NumpyCodec
from faultlab.errors import FaultlabError
from faultlab.testing import strategies as fst
from faultlab.testing.plugin import crash_lab  # noqa: F401  (the plugin's fixture)

try:
    import torch
except ImportError:                   # the NumPy scripts below still run
    torch = None

torch_only = pytest.mark.framework("torch")


# -- scripts ----------------------------------------------------------------------------------

def numpy_train(resume, checkpoint, steps):
    """SGD with momentum in NumPy, mini-batches from a NumPy generator."""
    data = np.random.default_rng(7)
    x = data.standard_normal((64, 8))
    y = x @ data.standard_normal(8)
    rng = np.random.default_rng(0)
    w, m, start = np.zeros(8), np.zeros(8), 0
    if resume is not None:
        w, m = resume.state["w"], resume.state["m"]
        rng.bit_generator.state = resume.state["rng"]
        start = resume.step
    for k in range(start, steps):
        idx = rng.integers(0, 64, 16)
        m = 0.9 * m + x[idx].T @ (x[idx] @ w - y[idx]) / 16
        w = w - 0.05 * m
        checkpoint(k + 1, {"w": w, "m": m, "rng": rng.bit_generator.state})
    return {"w": w, "m": m, "rng": rng.bit_generator.state}


def numpy_train_every_3(resume, checkpoint, steps):
    """The same, checkpointing after every third step only."""
    data = np.random.default_rng(7)
    x = data.standard_normal((64, 8))
    y = x @ data.standard_normal(8)
    rng = np.random.default_rng(0)
    w, m, start = np.zeros(8), np.zeros(8), 0
    if resume is not None:
        w, m, start = resume.state["w"], resume.state["m"], resume.step
        rng.bit_generator.state = resume.state["rng"]
    for k in range(start, steps):
        idx = rng.integers(0, 64, 16)
        m = 0.9 * m + x[idx].T @ (x[idx] @ w - y[idx]) / 16
        w = w - 0.05 * m
        if (k + 1) % 3 == 0:
            checkpoint(k + 1, {"w": w, "m": m, "rng": rng.bit_generator.state})
    return {"w": w, "m": m, "rng": rng.bit_generator.state}


def torch_train(resume, checkpoint, steps, *, forget_momentum=False):
    """A torch MLP with dropout, SGD with Nesterov momentum, a step LR schedule and a shuffle
    generator; its state is what the script passes to checkpoint()."""
    torch.manual_seed(0)
    data = np.random.default_rng(7)
    x = torch.from_numpy(data.standard_normal((48, 10)).astype(np.float32))
    y = (x[:, 0] * x[:, 1] > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(),
                                torch.nn.Dropout(0.1), torch.nn.Linear(32, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.7)
    shuffle = torch.Generator().manual_seed(1234)
    start = 0
    if resume is not None:
        model.load_state_dict(resume.state["model"])
        if "optimizer" in resume.state:
            opt.load_state_dict(resume.state["optimizer"])
        sched.load_state_dict(resume.state["scheduler"])
        shuffle.set_state(resume.state["shuffle"])
        torch.set_rng_state(resume.state["dropout"])
        start = resume.step

    def state():
        s = {"model": model.state_dict(), "optimizer": opt.state_dict(),
             "scheduler": sched.state_dict(), "shuffle": shuffle.get_state(),
             "dropout": torch.get_rng_state()}
        if forget_momentum:
            del s["optimizer"]
        return s

    for k in range(start, steps):
        idx = torch.randint(0, len(y), (16,), generator=shuffle)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        checkpoint(k + 1, state())
    return state()


def torch_train_forgetting_momentum(resume, checkpoint, steps):
    return torch_train(resume, checkpoint, steps, forget_momentum=True)


def two_arguments(resume, checkpoint):
    return {}


# -- with crash_lab ---------------------------------------------------------------------------

def test_a_numpy_script_survives_a_kill_in_every_phase(crash_lab):
    plan = [KillPoint(phase, 2) for phase in Phase] + [KillPoint(Phase.COMMITTING, 3,
                                                                 hold=False)]
    result = crash_lab.run(numpy_train, kills=plan, steps=12)
    result.assert_ok()
    assert len(result.kills) == len(plan) and result.verdict is CrashVerdict.EXACT


def test_a_script_that_checkpoints_every_third_step(crash_lab):
    plan = [KillPoint(Phase.IDLE, 4), KillPoint(Phase.COMMITTING, 2)]
    crash_lab.run(numpy_train_every_3, kills=plan, steps=12, every=3).assert_ok()
    with pytest.raises(Exception, match=r"saves after step 1 but it called checkpoint\(3, "
                                        r"\.\.\.\) last.*every="):
        crash_lab.run(numpy_train_every_3, kills=[], steps=12)      # every=1: a save at step 1


@torch_only
def test_a_torch_script_survives_a_kill_in_every_phase(crash_lab):
    plan = [KillPoint(phase, 2) for phase in Phase] + [KillPoint(Phase.WRITING, 5,
                                                                 hold=False)]
    result = crash_lab.run(torch_train, kills=plan, steps=12)
    result.assert_ok()
    assert result.restarts == len(plan) + 1


@torch_only
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=fst.kill_plans(max_kills=3), engine_settings=fst.engine_settings("faultlab"))
def test_a_torch_script_survives_any_kill_plan(crash_lab, plan, engine_settings):
    crash_lab.run(torch_train, kills=plan, settings=engine_settings, steps=10).assert_ok()


@torch_only
def test_a_torch_script_that_forgets_its_optimizer_is_incomplete_not_torn(crash_lab):
    result = crash_lab.run(torch_train_forgetting_momentum,
                           kills=[KillPoint(Phase.IDLE, 4), KillPoint(Phase.IDLE, 4)], steps=10)
    assert [k.verdict for k in result.kills] == [CrashVerdict.EXACT.value,
                                                 CrashVerdict.INCOMPLETE.value]
    assert result.verdict is CrashVerdict.INCOMPLETE
    assert "after resuming at step 3" in result.incomplete_state
    assert "model/0.weight" in result.incomplete_state
    with pytest.raises(AssertionError, match="incomplete-state"):
        result.assert_ok()


def test_a_function_with_other_arguments_is_a_one_line_error(crash_lab):
    with pytest.raises(FaultlabError, match=r"^loop two_arguments takes 2 argument\(s\): a "
                                            r"loop factory takes none, a script-style loop "
                                            r"takes \(resume, checkpoint, steps\)$"):
        crash_lab.run(two_arguments, kills=[])


# -- the driver itself, in this process -------------------------------------------------------

@pytest.mark.parametrize("numpy_only", [False, True])
def test_the_script_loop_drives_the_function_step_by_step(numpy_only):
    """(numpy_only: the codec used when the process has imported no framework.)"""
    def new_loop():
        loop = ScriptLoop(numpy_train, 6)
        if numpy_only:
            loop._codec = _NumpyCodec()
        return loop

    loop = new_loop()
    states = []
    for k in range(6):
        loop.step(k)
        states.append(loop.capture(k + 1))
    final, meta = loop.finish()
    assert meta["step"] == 6 and sorted(final) == sorted(states[-1][0]) == ["m", "w"]
    for name in final:
        np.testing.assert_array_equal(final[name], states[-1][0][name])
    # resumed from step 3, it ends where the uninterrupted run did
    again = new_loop()
    again.restore(*states[2])
    assert again._resume.step == 3 and isinstance(again._resume, ResumePoint)
    for k in range(3, 6):
        again.step(k)
    resumed, _ = again.finish()
    for name in final:
        np.testing.assert_array_equal(resumed[name], final[name])


def test_script_errors_reach_the_campaign():
    def bad_step(resume, checkpoint, steps):
        checkpoint(2, {})
        checkpoint(2, {})

    loop = ScriptLoop(bad_step, 4)
    loop.step(0)
    with pytest.raises(FaultlabError, match=r"checkpoint\(2, \.\.\.\) after step 2: steps must "
                                            "increase"):
        loop.step(2)

    def returns_nothing(resume, checkpoint, steps):
        return None

    with pytest.raises(FaultlabError, match="returned NoneType, not its final state"):
        ScriptLoop(returns_nothing, 1).finish()
