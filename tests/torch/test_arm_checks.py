"""faultlab.torch's TorchInjector checks a fault when it is handed over (begin_step): a
replica outside the emulated ones, a layer it was not given, a site the layer does not have or
a position outside its operand is a one-line SpecError (its `field` set, the valid choices
listed) before anything is installed or corrupted, never a fault that silently does not fire
(issue 11, item 5). Valid faults still fire."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import faultlab.torch as ft
from faultlab.errors import SpecError
from faultlab.faults import FaultSpec, PositionSpec, Site, ValueSpec
from faultlab.backends.torch.models import layer_map

pytestmark = pytest.mark.framework("torch")

R, B = 2, 2


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3, padding=1)
        self.conv2 = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(2)
        self.dense = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        h = F.relu(self.bn(self.conv2(self.conv1(x))))
        return self.dense(h.permute(0, 2, 3, 1).flatten(1))


def fault(site, layer, pos=(0, 0, 0, 0), replica=0, step=0, **kw):
    return FaultSpec(site=site, layer=layer, value=ValueSpec("set", values=(1e3,)),
                     positions=PositionSpec("explicit", indices=(pos,)), replica=replica,
                     step=step, **kw)


class Loop:
    """R emulated replicas trained with Adam, one shard each (as TorchTrainer runs them)."""

    def __init__(self, table: bool = False, **inj_kw):
        torch.manual_seed(0)
        self.net = Net()
        self.opt = torch.optim.Adam(self.net.parameters(), 1e-2)
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(R * B, 1, 4, 4, generator=g)
        self.y = torch.randint(0, 3, (R * B,), generator=g)
        self.initial = {k: v.clone() for k, v in self.net.state_dict().items()}
        if table:    # one replica's activation shapes, so their positions are checked too
            inj_kw["operands"] = ft.TorchInjector.operand_table(self.net, self.x[:B])
        self.inj = ft.TorchInjector(layer_map(self.net), self.opt, **inj_kw)
        self.steps_run = 0

    def run(self, faults, steps=2):
        self.net.load_state_dict(self.initial)
        self.opt.state.clear()
        losses = []
        for s in range(steps):
            self.opt.zero_grad(set_to_none=True)
            self.inj.begin_step([f for f in faults if f.active(s)], s)
            try:
                row = []
                for r in range(R):
                    self.inj.replica = r
                    sl = slice(r * B, (r + 1) * B)
                    loss = F.cross_entropy(self.net(self.x[sl]), self.y[sl])
                    (loss / R).backward()
                    row.append(loss.item())
                self.inj.replica = 0
                self.opt.step()
            finally:
                self.inj.end_step()
            self.steps_run += 1
            losses.append(row)
        return torch.tensor(losses, dtype=torch.float64)


@pytest.fixture
def loop():
    torch.use_deterministic_algorithms(True)
    return Loop(table=True, replicas=R)


def refused(loop, faults, field):
    """The SpecError handing `faults` over raises; nothing ran, was installed or changed."""
    ran = loop.steps_run
    loop.net.load_state_dict(loop.initial)
    with pytest.raises(SpecError) as e:
        loop.inj.begin_step(faults, 0)
    assert e.value.field == field, str(e.value)
    assert "\n" not in str(e.value)
    assert loop.steps_run == ran and not loop.inj._handles
    assert all(torch.equal(v, loop.initial[k]) for k, v in loop.net.state_dict().items())
    assert not loop.opt.state
    return str(e.value)


def test_replica_outside_the_emulated_ones_is_refused(loop):
    msg = refused(loop, [fault("fwd_output", "conv1", replica=5)], "replica")
    assert msg == "fault replica 5 is out of range: this injector has 2 replicas (valid: 0-1)"


def test_unknown_layer_lists_the_layers(loop):
    msg = refused(loop, [fault("fwd_output", "conv9")], "layer")
    assert msg == "unknown layer 'conv9': valid layers are conv1, conv2, bn, dense"


def test_a_long_layer_list_is_cut_with_a_count_and_a_guess():
    net = nn.Sequential(*[nn.Linear(2, 2) for _ in range(14)])
    inj = ft.TorchInjector(layer_map(net))
    with pytest.raises(SpecError) as e:
        inj.begin_step([fault("fwd_output", "13x", pos=(0, 0))], 0)
    assert e.value.field == "layer"
    assert str(e.value) == ("unknown layer '13x': valid layers are 0, 1, 2, 3, 4, 5, 6, 7, 8, "
                            "9, ... (14 in all); did you mean 13?")


@pytest.mark.parametrize("f,words", [
    (fault("fwd_output", "conv1", pos=(0, 4, 0, 0)),
     "position 0/4/0/0 is outside the fwd_output operand of layer 'conv1' of shape 2/4/4/2 "
     "(dimension 1: 4 not in 0..3)"),
    (fault("fwd_input", "dense", pos=(2, 0)),                 # one replica's batch is 2
     "position 2/0 is outside the fwd_input operand of layer 'dense' of shape 2/32 "
     "(dimension 0: 2 not in 0..1)"),
    (fault("bwd_input", "conv2", pos=(0, 0, 0, 2)),
     "position 0/0/0/2 is outside the bwd_input operand of layer 'conv2' of shape 2/4/4/2"),
    (fault("param", "conv1", pos=(0, 0, 0, 2)),               # HWIO kernel 3/3/1/2
     "position 0/0/0/2 is outside the param operand of layer 'conv1' of shape 3/3/1/2"),
    (fault("grad_wt", "dense", pos=(3,), tensor="bias"),
     "position 3 is outside the grad_wt operand (bias) of layer 'dense' of shape 3"),
    (fault("fwd_output", "conv1", pos=(0, 0, 0)), "position 0/0/0 has 3 dimensions"),
], ids=["fwd_output", "batch", "bwd_input", "param", "bias", "rank"])
def test_position_outside_the_operand_is_refused(loop, f, words):
    assert refused(loop, [f], "positions").startswith(words)


@pytest.mark.parametrize("f,words", [
    (fault("bwd_input", "bn", pos=(0,)),
     "site bwd_input is not available on layer 'bn': valid sites are fwd_input, fwd_weight, "
     "fwd_output, grad_out, grad_in, grad_wt, param, opt_state"),
    (fault("param", "conv2", tensor="bias", pos=(0,)),
     "site param with tensor 'bias' is not available on layer 'conv2' (the layer has no "
     "bias): valid sites are"),
    (fault("host_state", "dense", pos=(0, 0)),
     "site host_state is not available on layer 'dense': valid sites are"),
], ids=["bwd_input", "bias", "host_state"])
def test_site_the_layer_does_not_have_is_refused(loop, f, words):
    assert refused(loop, [f], "site").startswith(words)


def test_weight_positions_are_checked_without_an_operand_table():
    lp = Loop()                               # no operands (replicas: the default 1)
    with pytest.raises(SpecError) as e:
        lp.inj.begin_step([fault("fwd_weight", "conv2", pos=(3, 0, 0, 0))], 0)
    assert e.value.field == "positions" and "of shape 3/3/2/2" in str(e.value)
    lp.inj.begin_step([fault("fwd_output", "conv2", pos=(1, 3, 3, 1))], 0)   # not checkable
    lp.inj.end_step()


def test_a_plain_injector_has_one_replica():
    """TorchInjector(layers) is a single-process model: replica 0 only."""
    inj = ft.TorchInjector(layer_map(Net()))
    assert inj.replicas == 1
    with pytest.raises(SpecError) as e:
        inj.begin_step([fault("fwd_output", "conv1", replica=1)], 0)
    assert e.value.field == "replica"
    assert str(e.value) == "fault replica 1 is out of range: this injector has 1 replica (valid: 0)"
    assert not inj._handles
    inj.begin_step([fault("fwd_output", "conv1", replica=0)], 0)
    inj.end_step()
    for bad in (0, -1, 1.5, "2", True, None):
        with pytest.raises(ValueError, match="replicas must be an integer of at least 1"):
            ft.TorchInjector(layer_map(Net()), replicas=bad)


def test_the_trainer_checks_its_replica_count():
    """TorchTrainer's injector knows the configuration's replicas: a fault on replica R is
    refused before the step runs, one on replica R - 1 fires."""
    from faultlab.workloads.base import default_config
    cfg = default_config("mlp", replicas=3, per_replica_batch=4, width=8, input_size=8,
                         dataset="digits", steps_per_epoch=2, epochs=1, seed=1)
    tr = ft.TorchTrainer(cfg)
    assert tr.injector.replicas == 3
    with pytest.raises(SpecError) as e:
        tr.train_step(0, [fault("fwd_output", "dense_1", pos=(0, 0), replica=3)])
    assert str(e.value) == ("fault replica 3 is out of range: this injector has 3 replicas "
                            "(valid: 0-2)")
    assert not tr.injector._handles
    tr.train_step(0, [fault("fwd_output", "dense_1", pos=(0, 0), replica=2)])


def test_an_invalid_fault_leaves_the_valid_ones_unapplied(loop):
    """A stored-parameter fault listed first is not applied when a later one is refused."""
    refused(loop, [fault("param", "dense", pos=(0, 0)), fault("fwd_output", "dense",
                                                               pos=(0, 5))], "positions")


def test_valid_faults_fire(loop):
    clean = loop.run([])
    assert torch.equal(clean, loop.run([]))
    hit = loop.run([fault("fwd_output", "conv1", pos=(1, 2, 2, 1), replica=1)])
    assert hit[0, 0] == clean[0, 0] and hit[0, 1] != clean[0, 1]
    assert not torch.equal(hit[1], clean[1])
    hit = loop.run([fault("grad_wt", "dense", pos=(3, 2), replica=1)])
    assert torch.equal(hit[0], clean[0]) and not torch.equal(hit[1], clean[1])


def test_operand_table_leaves_the_model_as_it_was(loop):
    bn = loop.net.bn
    stats = (bn.running_mean.clone(), int(bn.num_batches_tracked))
    table = ft.TorchInjector.operand_table(loop.net, loop.x[:B])
    assert loop.net.training and bn.training
    assert torch.equal(bn.running_mean, stats[0]) and int(bn.num_batches_tracked) == stats[1]
    assert table["conv1"][Site.FWD_OUTPUT] == ((2, 4, 4, 2), "float32")


def test_faults_from_a_campaign_file_are_checked_when_handed_over(loop, tmp_path):
    """A campaign written for 4 replicas passes the parser; handed to an injector of 2
    emulated replicas its replica-3 fault is refused before anything runs."""
    from faultlab import load_campaign
    path = tmp_path / "c.csv"
    path.write_text("trial,workload,replicas,per_replica_batch,width,input_size,dataset,"
                    "steps_per_epoch,epochs,site,layer,replica,epoch,step,value,values,"
                    "positions\n"
                    "t0,mlp,4,2,16,8,digits,5,2,fwd_output,conv1,3,0,0,set,1000,0/1/1/0\n")
    faults = list(load_campaign(str(path)).trials[0].faults)
    assert faults[0].replica == 3
    msg = refused(loop, faults, "replica")
    assert msg == "fault replica 3 is out of range: this injector has 2 replicas (valid: 0-1)"
