"""Torch injectors: every site corrupts what it names and nothing else; hooks leave no trace.
What every backend shares (one replica only) is in tests/backends/test_backend_injectors.py."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from faultlab.errors import SpecError
from faultlab.faults import FaultSpec, PositionSpec, Site, ValueSpec
from faultlab.backends.torch.injector import (TorchInjector, act_perm, canonical_shape,
                                            conv_grad_input, dilated_grad, remap, weight_perm)
from faultlab.backends.torch.models import Conv2dSame, layer_map

torch.use_deterministic_algorithms(True)


def fault(site, layer="conv", pos=(0, 0, 0, 0), value=7.0, **kw):
    return FaultSpec(site=site, layer=layer, value=ValueSpec("set", values=(value,)),
                     positions=PositionSpec("explicit", indices=(pos,)), **kw)


class Net(nn.Module):
    def __init__(self, stride=2):
        super().__init__()
        self.pre = nn.Conv2d(2, 3, 3, padding=1)
        self.conv = Conv2dSame(3, 4, 3, stride)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(F.relu(self.conv(self.pre(x))).mean(dim=(2, 3)))


def run(net, x, faults, step=0, opt=None):
    inj = TorchInjector(layer_map(net), opt)
    inj.begin_step(faults, step)
    try:
        out = net(x)
        out.sum().backward()
        if opt is not None:
            opt.step()
    finally:
        inj.end_step()
    return out


def grads(net):
    return {n: p.grad.clone() for n, p in net.named_parameters()}


@pytest.fixture
def net_and_x():
    torch.manual_seed(0)
    return Net(), torch.randn(2, 2, 8, 8)


def test_canonical_positions_map_to_torch_layout():
    shape_t = (2, 3, 4, 5)                        # NCHW
    canon = canonical_shape(shape_t, act_perm(4))  # NHWC
    assert canon == (2, 4, 5, 3)
    flat = np.ravel_multi_index((1, 2, 3, 1), canon)
    assert np.unravel_index(remap(np.array([flat]), canon, act_perm(4))[0], shape_t) == (1, 1, 2, 3)
    w = (6, 3, 3, 2)                              # OIHW
    cw = canonical_shape(w, weight_perm(4))        # HWIO
    assert cw == (3, 2, 3, 6)
    flat = np.ravel_multi_index((2, 1, 0, 5), cw)
    assert np.unravel_index(remap(np.array([flat]), cw, weight_perm(4))[0], w) == (5, 0, 2, 1)


def test_forward_output_fault_sets_the_named_element(net_and_x):
    net, x = net_and_x
    ref = net.conv(net.pre(x)).detach()
    inj = TorchInjector(layer_map(net))
    inj.begin_step([fault(Site.FWD_OUTPUT, pos=(1, 2, 3, 1), value=123.0)], 0)
    seen = {}  # registered after the injector's hook, so it sees the corrupted output
    h = net.conv.register_forward_hook(lambda m, a, o: seen.setdefault("out", o.detach().clone()))
    net(x)
    h.remove()
    inj.end_step()
    out = seen["out"]
    assert out[1, 1, 2, 3].item() == 123.0        # NHWC (1,2,3,1) -> NCHW (1,1,2,3)
    assert (out != ref).nonzero().tolist() == [[1, 1, 2, 3]]


def test_forward_output_fault_reaches_the_next_layer(net_and_x):
    net, x = net_and_x
    clean = net(x).detach()
    hit = {}
    h = net.fc.register_forward_pre_hook(lambda m, a: hit.setdefault("x", a[0].detach().clone()))
    out = run(net, x, [fault(Site.FWD_OUTPUT, pos=(1, 2, 3, 1), value=1e6)])
    h.remove()
    assert not torch.equal(out.detach(), clean)
    assert torch.equal(out.detach()[0], clean[0])    # sample 0 untouched


def test_forward_input_fault_corrupts_only_the_operand(net_and_x):
    net, x = net_and_x
    captured = {}
    inj = TorchInjector(layer_map(net))
    inj.begin_step([fault(Site.FWD_INPUT, pos=(0, 1, 2, 0), value=-5.0)], 0)
    h = net.conv.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0].detach().clone()))
    net(x)
    h.remove()
    inj.end_step()
    xin = captured["x"]
    assert xin[0, 0, 1, 2].item() == -5.0         # NHWC (0,1,2,0) -> NCHW (0,0,1,2)
    ref = net.pre(x).detach()
    diff = (xin != ref).nonzero().tolist()
    assert diff == [[0, 0, 1, 2]]


def test_forward_weight_fault_is_this_call_only(net_and_x):
    net, x = net_and_x
    before = net.conv.weight.detach().clone()
    clean = net(x).detach()
    out = run(net, x, [fault(Site.FWD_WEIGHT, pos=(1, 2, 0, 3), value=50.0)])
    assert not torch.equal(out.detach(), clean)
    assert torch.equal(net.conv.weight.detach(), before)     # stored parameter untouched
    assert "weight" not in net.conv.__dict__                  # no shadow left behind
    assert torch.equal(net(x).detach(), clean)                # next call is clean
    # the corrupted kernel gave exactly the output of a conv with that kernel
    w = before.clone()
    w[3, 0, 1, 2] = 50.0                                      # HWIO (1,2,0,3) -> OIHW (3,0,1,2)
    net2 = Net()
    net2.load_state_dict(net.state_dict())
    with torch.no_grad():
        net2.conv.weight.copy_(w)
    assert torch.equal(net2(x).detach(), out.detach())


def test_grad_out_fault_changes_weight_and_input_gradients(net_and_x):
    net, x = net_and_x
    net(x).sum().backward()
    clean = grads(net)
    net.zero_grad()
    run(net, x, [fault(Site.GRAD_OUT, pos=(0, 1, 1, 2), value=3.0)])
    g = grads(net)
    assert not torch.equal(g["conv.weight"], clean["conv.weight"])
    assert not torch.equal(g["pre.weight"], clean["pre.weight"])
    assert torch.equal(g["fc.weight"], clean["fc.weight"])


def _true_grad_in(conv, x, g):
    x = x.clone().requires_grad_(True)
    y = conv(x)
    (gi,) = torch.autograd.grad(y, x, g)
    return gi


@settings(max_examples=40, deadline=None)
@given(k=st.sampled_from([1, 3, 7]), stride=st.sampled_from([1, 2]), h=st.integers(2, 9),
       same=st.booleans(), seed=st.integers(0, 2**16))
def test_backward_operand_recomputation_matches_autograd(k, stride, h, same, seed):
    """The artifact's grad_in (dilated gradient convolved with the rotated kernel) equals
    autograd's when nothing is corrupted, for TF 'same' and torch-style padding."""
    torch.manual_seed(seed)
    conv = Conv2dSame(3, 4, k, stride) if same else nn.Conv2d(3, 4, k, stride, padding=k // 2, bias=False)
    x = torch.randn(2, 3, h, h + 1, dtype=torch.float64)
    conv = conv.double()
    y = conv(x)
    g = torch.randn_like(y)
    try:
        d = dilated_grad(conv, g, tuple(x.shape[-2:]))
    except SpecError:
        assume_ok = (y.shape[-2] - 1) * stride + 1 > h or (y.shape[-1] - 1) * stride + 1 > h + 1
        assert assume_ok
        return
    ours = conv_grad_input(conv, d, conv.weight.detach())
    assert torch.allclose(ours, _true_grad_in(conv, x, g), rtol=1e-10, atol=1e-10)


def test_bwd_weight_fault_on_linear_recomputes_grad_in(net_and_x):
    net, x = net_and_x
    net(x).sum().backward()
    clean = grads(net)
    net.zero_grad()
    run(net, x, [fault(Site.BWD_WEIGHT, layer="fc", pos=(2, 1), value=1e4)])
    g = grads(net)
    assert torch.equal(g["fc.weight"], clean["fc.weight"])
    assert not torch.equal(g["conv.weight"], clean["conv.weight"])


def test_param_fault_persists_and_optimizer_state_fault_hits_the_slot(net_and_x):
    net, x = net_and_x
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    run(net, x, [], opt=opt)
    run(net, x, [fault(Site.PARAM, layer="fc", pos=(1, 2), value=4.0)], step=1)
    assert net.fc.weight[2, 1].item() != 0  # persisted (then updated by the step)
    with torch.no_grad():
        before = opt.state[net.fc.weight]["exp_avg"].clone()
    seen = {}
    h = opt.register_step_post_hook(lambda o, a, k: seen.setdefault("m", o.state[net.fc.weight]["exp_avg"].clone()))
    run(net, x, [fault(Site.OPT_STATE, layer="fc", tensor="m", pos=(0, 0), value=1e6)], step=2, opt=opt)
    h.remove()
    # the corrupted moment entered the update: m = 0.9 * 1e6 + 0.1 * g
    assert seen["m"][0, 0].item() > 8e5
    assert abs(seen["m"][1, 1].item()) < 1e3


def test_hooks_are_removed_after_the_step(net_and_x):
    net, x = net_and_x
    clean = net(x).detach()
    sites = [Site.FWD_INPUT, Site.FWD_WEIGHT, Site.FWD_OUTPUT, Site.GRAD_OUT, Site.GRAD_IN,
             Site.BWD_INPUT, Site.BWD_WEIGHT, Site.GRAD_WT]
    positions = {Site.FWD_WEIGHT: (0, 0, 0, 0), Site.GRAD_WT: (0, 0, 0, 0),
                 Site.BWD_WEIGHT: (0, 0, 0, 0)}
    run(net, x, [fault(s, pos=positions.get(s, (0, 0, 0, 0)), value=1e3) for s in sites])
    for m in net.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
        assert not m._backward_hooks and not m._backward_pre_hooks
    for p in net.parameters():
        assert not getattr(p, "_backward_hooks", None)
    assert torch.equal(net(x).detach(), clean)


def test_fault_on_another_replica_does_nothing(net_and_x):
    net, x = net_and_x
    clean = net(x).detach()
    inj = TorchInjector(layer_map(net), replicas=2)
    inj.replica = 0
    inj.begin_step([fault(Site.FWD_OUTPUT, replica=1, value=1e6)], 0)
    out = net(x).detach()
    inj.end_step()
    assert torch.equal(out, clean)


def test_unknown_layer_is_a_spec_error(net_and_x):
    net, x = net_and_x
    inj = TorchInjector(layer_map(net))
    with pytest.raises(SpecError, match="unknown layer"):
        inj.begin_step([fault(Site.FWD_OUTPUT, layer="nope")], 0)
