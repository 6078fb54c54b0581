"""The `module:function` workload protocol (issue 12, item 6): a user workload is never called
on the meta device (operand shapes come from a dry run of one batch on the CPU, and a failing
dry run is one line), and a recurrent language model that carries its hidden state across
batches trains as written, with the state in checkpoints so that trials replay bit for bit."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from _clihelpers import env_for, finish, start
from faultlab.backends.torch.trainer import TorchTrainer, TorchWorkload, operand_shapes
from faultlab.errors import SpecError
from faultlab.faults import FaultSpec, PositionSpec, Site, ValueSpec
from faultlab.outcomes import MASKED
from faultlab.runner import Session
from faultlab.trials import Trial
from faultlab.workloads.base import default_config

REPO = Path(__file__).resolve().parents[2]

#: a factory that reads tensor values while it builds (data made with torch, then NumPy):
#: on the meta device that was `TypeError: can't convert meta device type tensor to numpy`
USER_MODULE = textwrap.dedent("""
    import torch
    import torch.nn as nn
    from faultlab.torch import TorchWorkload
    from faultlab.workloads.data import Dataset

    class Net(nn.Module):
        def __init__(self, width, broken=False):
            super().__init__()
            self.dense_1 = nn.Linear(8, width)
            self.dense_2 = nn.Linear(width, 3)
            self.broken = broken

        def forward(self, x):
            if self.broken:
                raise ValueError("this model cannot run")
            return self.dense_2(torch.relu(self.dense_1(x)))

    def _data():
        x = torch.rand(300, 8).numpy()
        y = (x.sum(1) * 3 / 8).astype("int64").clip(0, 2)
        return Dataset(x[:250], y[:250], x[250:], y[250:], classes=3)

    def make(config):
        return TorchWorkload(Net(config.width), _data(), (8,))

    def broken(config):
        return TorchWorkload(Net(config.width, broken=True), _data(), (8,))
""")

HEADER = ("trial,workload,replicas,per_replica_batch,width,steps_per_epoch,epochs,site,layer,"
          "replica,epoch,step,value,bit,positions")


@pytest.fixture
def project(tmp_path):
    (tmp_path / ".git").mkdir()
    (tmp_path / "usermod.py").write_text(USER_MODULE)
    (tmp_path / "ok.csv").write_text(
        f"{HEADER}\nf,usermod:make,2,4,16,5,2,fwd_output,dense_1,1,0,3,bitflip,30,3/15\n")
    (tmp_path / "broken.csv").write_text(f"{HEADER}\nc,usermod:broken,2,4,16,5,2,,,,,,,,\n")
    (tmp_path / "outside.csv").write_text(
        f"{HEADER}\nf,usermod:make,2,4,16,5,2,fwd_output,dense_1,1,0,3,bitflip,30,4/0\n")
    return tmp_path


def _validate(tmp: Path, name: str):
    return finish(start(["validate", name, "--allow-workload", "usermod"], tmp,
                        env_for(tmp / "cache")))


def test_validate_of_a_workload_that_cannot_run_on_meta_passes(project):
    p = _validate(project, "ok.csv")
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr and "valid columnar campaign, 1 trial(s)" in p.stdout
    # the shapes are real: a position outside the operand (batch 4 per replica) is refused
    p = _validate(project, "outside.csv")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_a_failing_dry_run_is_one_line(project):
    p = _validate(project, "broken.csv")
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0] == ("faultlab: error: broken.csv:2: workload 'usermod:broken': the dry run "
                        "that finds the operand shapes (one batch of 4 on the CPU, no "
                        "gradients) raised ValueError: this model cannot run")


def test_the_dry_run_leaves_the_callers_rng_alone(project, monkeypatch):
    monkeypatch.syspath_prepend(str(project))
    cfg = default_config("usermod:make", replicas=2, per_replica_batch=4, width=16)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    table = operand_shapes(cfg)
    assert torch.equal(torch.get_rng_state(), before)
    assert table["dense_1"][Site.FWD_OUTPUT] == ((4, 16), "float32")


# --- a recurrent language model carrying its hidden state (examples/my_workload.py) -----------

def lm_config(**kw):
    return default_config("examples.my_workload:lstm_lm", replicas=2, per_replica_batch=4,
                          width=16, input_size=8, steps_per_epoch=5, epochs=2, lr=0.01, **kw)


@pytest.fixture
def lm(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.setenv("FAULTLAB_CACHE", str(tmp_path))
    return lm_config()


def test_the_recurrent_lm_trains_with_its_state_carried(lm):
    t = TorchTrainer(lm)
    losses = [t.train_step(s).loss for s in range(lm.total_steps)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.3
    state = t.get_state()
    # one hidden and one cell state per emulated replica, each (layers, batch, width)
    assert sorted(k for k in state if k.startswith("carry/")) == [
        "carry/0/0", "carry/0/1", "carry/1/0", "carry/1/1"]
    assert state["carry/1/0"].shape == (1, 4, 16)
    assert t.evaluate().acc > 0.3


def test_checkpoints_hold_the_carried_state(lm):
    """A fresh trainer restored at step 5 goes on bit-identical; the same restore with the
    hidden state zeroed (what a checkpoint without it would give) does not."""
    a = TorchTrainer(lm)
    for s in range(5):
        a.train_step(s)
    mid = a.get_state()
    ref = [a.train_step(s).loss for s in range(5, 10)]
    b = TorchTrainer(lm)
    b.set_state(mid)
    assert [b.train_step(s).loss for s in range(5, 10)] == ref
    zeroed = {k: (np.zeros_like(v) if k.startswith("carry/") else v) for k, v in mid.items()}
    c = TorchTrainer(lm)
    c.set_state(zeroed)
    assert [c.train_step(s).loss for s in range(5, 10)] != ref


def test_fault_free_trials_of_the_recurrent_lm_reproduce_the_golden_run(lm):
    gold = Session(threads=1).golden(lm)
    assert gold.checkpoints == [0, 5]
    control = Session(threads=1).run_trial(Trial("control", lm, (), horizon=None))
    assert control.outcome == MASKED and control.bit_exact
    assert control.metrics["loss"] == gold.loss
    # a trial injecting at step 7, in a fresh session: it restores the step-5 checkpoint,
    # hidden state included, and replays steps 5 and 6 bit for bit before the fault
    nan = FaultSpec(site=Site.FWD_OUTPUT, layer="head", value=ValueSpec("nan"),
                    positions=PositionSpec("explicit", indices=((0, 0, 0),)), replica=1, step=7)
    hit = Session(threads=1).run_trial(Trial("nan", lm, (nan,), horizon=None))
    assert not hit.bit_exact and hit.first_nonfinite_step == 7
    assert hit.metrics["loss"][:2] == gold.loss[5:7]


def test_stateful_workload_misuse_is_one_line():
    model = nn.Linear(2, 2)
    with pytest.raises(SpecError, match=r"forward\(model, x, state\) needs init_state"):
        TorchWorkload(model, None, (2,), forward=lambda m, x, s: (m(x), s))
    wl = TorchWorkload(model, None, (2,), init_state=lambda b: [b])
    with pytest.raises(SpecError, match="init_state.4. must return a tensor or a tuple"):
        wl.new_state(4)
    wl = TorchWorkload(model, None, (2,), init_state=lambda b: torch.zeros(b, 2),
                       forward=lambda m, x, s: m(x))
    with pytest.raises(SpecError, match=r"must return \(outputs, state\)"):
        wl.run(model, torch.zeros(4, 2), wl.new_state(4))
