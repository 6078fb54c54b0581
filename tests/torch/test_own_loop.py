"""faultlab.torch.Injector in a training loop the user keeps (issue 12, items 1-3).

Two plain user loops, written as a user would (an LSTM word-level language model with
truncated backpropagation through time that carries its hidden state across batches, and a
small CNN): faultlab only adds the lines marked ``# +faultlab``. Faults in an LSTM gate
weight for one forward call and in ``h_n`` change training; with the injector built and
nothing armed, training is bit-identical to the run without faultlab; misuse is a one-line
SpecError when the fault is armed; hooks never outlive a step; torch-layout and canonical
positions name the same element."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import faultlab.torch as ft
from faultlab.errors import SpecError

pytestmark = pytest.mark.framework("torch")

VOCAB, EMB, HID, BPTT, BATCH = 50, 16, 32, 8, 4


# --- the user's code --------------------------------------------------------------------------

class WordLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Embedding(VOCAB, EMB)
        self.rnn = nn.LSTM(EMB, HID)
        self.decoder = nn.Linear(HID, VOCAB)

    def forward(self, x, hidden):
        out, hidden = self.rnn(self.encoder(x), hidden)
        return self.decoder(out), hidden


def corpus(n=BATCH * (BPTT * 8 + 1)):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (n,), generator=g).view(BATCH, -1).t().contiguous()


def train_lm(faults=None, *, steps=8, use_faultlab=True, example=False, **inj_kw):
    """The user's loop; `faults` None: no faultlab at all."""
    torch.manual_seed(0)
    model = WordLM()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    data = corpus()
    if faults is not None:                                        # +faultlab (the if is the test's)
        ex = (data[:BPTT], None) if example else None
        injector = ft.Injector(model, optimizer, example_input=ex, **inj_kw)  # +faultlab
        injector.arm(faults)                                      # +faultlab
    hidden, losses = None, []
    for step in range(steps):
        i = step * BPTT
        x, y = data[i:i + BPTT], data[i + 1:i + 1 + BPTT]
        if hidden is not None:
            hidden = tuple(h.detach() for h in hidden)
        ctx = injector.step(step) if faults is not None else contextlib.nullcontext()
        with ctx:                                                 # +faultlab: with injector.step(step):
            out, hidden = model(x, hidden)
            loss = F.cross_entropy(out.view(-1, VOCAB), y.reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
            optimizer.step()
        losses.append(loss.item())
    return losses, model


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2)
        self.fc = nn.Linear(8 * 3 * 3, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.conv2(x)), 1)
        return self.fc(x.flatten(1))


def images(n=6, b=8):
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(b, 1, 8, 8, generator=g), torch.randint(0, 10, (b,), generator=g))
            for _ in range(n)]


def train_cnn(faults=None, *, steps=6, opt="adam", **inj_kw):
    torch.manual_seed(0)
    model = CNN()
    optimizer = (torch.optim.Adam(model.parameters(), 1e-2) if opt == "adam" else
                 torch.optim.SGD(model.parameters(), 0.1, momentum=0.9))
    if faults is not None:
        injector = ft.Injector(model, optimizer, **inj_kw)
        injector.arm(faults)
    losses = []
    for step, (x, y) in enumerate(images(steps)):
        with injector.step(step) if faults is not None else contextlib.nullcontext():
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        losses.append(loss.item())
    return losses, model


def same_params(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def hooks_left(model: nn.Module, optimizer=None) -> list[str]:
    """Every hook or stand-in anything could have left on the model and optimizer."""
    left = []
    for name, m in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                     "_backward_pre_hooks", "_forward_hooks_with_kwargs",
                     "_forward_pre_hooks_with_kwargs"):
            if getattr(m, attr, None):
                left.append(f"{name or 'model'}.{attr}")
        for pname in m._parameters:
            if pname in m.__dict__:
                left.append(f"{name}.{pname} shadowed")
    for name, p in model.named_parameters():
        if p._backward_hooks:
            left.append(f"{name} tensor hook")
    if optimizer is not None:
        for attr in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks"):
            if getattr(optimizer, attr):
                left.append(f"optimizer.{attr}")
    return left


# --- training changes, the clean run does not ---------------------------------------------------

@pytest.fixture(scope="module")
def clean_lm():
    return train_lm(None)


def test_armed_nothing_is_bit_identical_and_draws_no_random_numbers(clean_lm):
    losses, model = clean_lm
    for example in (False, True):
        l2, m2 = train_lm([], example=example)
        assert l2 == losses and same_params(model, m2)
    torch.manual_seed(5)
    m = WordLM()
    before = torch.get_rng_state()
    ft.Injector(m, torch.optim.SGD(m.parameters(), 1.0), example_input=(corpus()[:BPTT], None))
    assert torch.equal(before, torch.get_rng_state())
    assert hooks_left(m) == []


def test_fault_armed_for_a_later_step_changes_nothing_before_it(clean_lm):
    losses, _ = clean_lm
    l2, _ = train_lm([ft.fault("fwd_weight", "rnn", tensor="weight_hh_l0", step=5, bit=30,
                               positions=[(0, 0)])])
    assert l2[:5] == losses[:5] and l2[5] != losses[5]


@pytest.mark.parametrize("example", [False, True])
def test_bitflip_in_weight_hh_for_one_forward_call_changes_training(clean_lm, example):
    losses, model = clean_lm
    f = ft.fault("fwd_weight", "rnn", tensor="weight_hh_l0", step=2, value="bitflip", bit=30,
                 positions=[(5, 3)])                  # gate row 5 (input gate), unit 3
    l2, m2 = train_lm([f], example=example)
    assert l2[:2] == losses[:2]
    assert l2[2] != losses[2]                          # the corrupted forward call
    assert not same_params(model, m2)


def test_bitflip_in_weight_hh_param_persists(clean_lm):
    losses, _ = clean_lm
    f = ft.fault("param", "rnn", tensor="weight_hh_l0", step=3, bit=29, positions=[(0, 0)])
    l2, _ = train_lm([f])
    assert l2[:3] == losses[:3] and l2[3] != losses[3]


@pytest.mark.parametrize("example", [False, True])
def test_bitflip_in_h_n_changes_training_through_the_carried_state(clean_lm, example):
    losses, model = clean_lm
    f = ft.fault("fwd_output", "rnn", tensor="h_n", step=2, bit=30, positions=[(0, 1, 7)])
    l2, m2 = train_lm([f], example=example)
    assert l2[:3] == losses[:3]                        # h_n feeds the next batch, not this loss
    assert l2[3] != losses[3]
    assert not same_params(model, m2)


def test_cnn_faults_change_training():
    clean, model = train_cnn(None)
    l2, m2 = train_cnn([], example_input=images(1)[0][0])
    assert l2 == clean and same_params(model, m2)
    for f in (ft.fault("fwd_output", "conv1", step=1, bit=30, positions=[(0, 2, 4, 4)]),
              ft.fault("opt_state", "conv2", tensor="exp_avg_sq", step=0, value="set",
                       values=[1e-12], count=20),
              ft.fault("grad_wt", "fc", tensor="bias", step=2, value="nan")):
        l3, _ = train_cnn([f])
        assert l3[:f.step] == clean[:f.step] and l3 != clean, f


# --- every target ------------------------------------------------------------------------------

class Zoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.gru = nn.GRU(8, 8, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm1d(8)
        self.convt = nn.ConvTranspose1d(8, 4, 2)
        self.rms = nn.RMSNorm(4)
        self.block = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))

    def forward(self, x):
        e = self.emb(x)
        a, w = self.attn(e, e, e)                  # every returned tensor is used
        g, h_n = self.gru(a + w.mean(-1, keepdim=True))
        g = g + h_n[-1].unsqueeze(1)
        h = self.norm(g).transpose(1, 2)
        h = self.convt(self.bn(self.conv(h))).transpose(1, 2)
        return self.block(self.rms(h))


ZOO_X = torch.arange(12).view(2, 6) % 10


def zoo_run(faults, *, example=True, steps=2):
    torch.manual_seed(0)
    model = Zoo()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    inj = ft.Injector(model, opt, example_input=ZOO_X if example else None)
    inj.arm(faults)
    outs = []
    for step in range(steps):
        with inj.step(step):
            out = model(ZOO_X)
            out.sum().backward()
            opt.step()
            opt.zero_grad()
        outs.append(out.detach())
        assert hooks_left(model, opt) == []
    return outs, model


ZOO_FAULTS = [
    ("fwd_input", "attn", "key", [(0, 2, 1)]),
    ("fwd_input", "attn", "value", [(1, 0, 0)]),
    ("fwd_output", "attn", "attn_weights", [(0, 1, 2)]),
    ("fwd_output", "attn", "output", [(0, 1, 2)]),
    ("fwd_weight", "attn", "in_proj_weight", [(3, 1)]),
    ("fwd_output", "gru", "h_n", [(0, 1, 2)]),
    ("fwd_output", "gru", None, [(0, 5, 2)]),
    ("fwd_weight", "gru", "weight_ih_l0", [(2, 2)]),
    ("param", "emb", None, [(3, 1)]),             # torch layout of an embedding: (num, dim)
    ("param", "norm", "bias", [(4,)]),
    ("param", "rms", "weight", [(1,)]),
    ("param", "bn", "running_mean", [(2,)]),
    ("fwd_output", "bn", None, [(0, 1, 2)]),
    ("fwd_output", "convt", None, [(1, 3, 6)]),
    ("fwd_weight", "conv", None, [(1, 2, 0)]),
    ("fwd_input", "block.0", None, [(0, 2, 1)]),
    ("fwd_output", "block_2", None, [(0, 0, 2)]),  # faultlab's underscore form
    ("grad_out", "block.0", None, [(0, 1, 1)]),
    ("grad_wt", "conv", "weight", [(0, 0, 0)]),
    ("opt_state", "gru", "weight_hh_l0.exp_avg", [(1, 1)]),
    ("opt_state", "norm", "bias.exp_avg_sq", [(1,)]),
]


@pytest.fixture(scope="module")
def zoo_clean():
    return zoo_run([])


@pytest.mark.parametrize("site,layer,tensor,pos", ZOO_FAULTS,
                         ids=[f"{s}-{l}-{t}" for s, l, t, _ in ZOO_FAULTS])
def test_every_module_kind_is_a_target(zoo_clean, site, layer, tensor, pos):
    clean, model = zoo_clean
    f = ft.fault(site, layer, tensor=tensor, positions=pos, value="set", values=[7.5])
    outs, m2 = zoo_run([f])
    assert not torch.equal(outs[0], clean[0]) or not torch.equal(outs[1], clean[1]) \
        or not same_params(model, m2), (site, layer, tensor)


def test_zoo_without_example_checks_at_the_first_call(zoo_clean):
    clean, _ = zoo_clean
    outs, _ = zoo_run([ft.fault("fwd_output", "gru", tensor="h_n", positions=[(0, 1, 2)],
                                value="set", values=[7.5], step=1)], example=False)
    assert torch.equal(outs[0], clean[0]) and not torch.equal(outs[1], clean[1])


def test_state_dict_name_as_layer_and_buffers():
    torch.manual_seed(0)
    model = Zoo()
    inj = ft.Injector(model)
    inj.arm([ft.fault("param", "bn.running_var", positions=[(3,)], value="set", values=[9.0])])
    with inj.step(0):
        pass
    assert model.bn.running_var[3].item() == 9.0
    with pytest.raises(SpecError, match="cannot corrupt the .* int64"):
        inj.arm([ft.fault("param", "bn", tensor="num_batches_tracked")])


OPTIMIZERS = [
    ("SGD", dict(lr=0.1, momentum=0.9), "momentum_buffer"),
    ("Adagrad", dict(lr=0.1), "sum"),
    ("RMSprop", dict(lr=0.01), "square_avg"),
    ("Adam", dict(lr=0.01), "exp_avg"),
    ("AdamW", dict(lr=0.01), "exp_avg_sq"),
    ("Adadelta", dict(), "acc_delta"),
    ("Adamax", dict(), "exp_inf"),
]


@pytest.mark.parametrize("cls,kw,slot", OPTIMIZERS, ids=[o[0] for o in OPTIMIZERS])
@pytest.mark.parametrize("step", [0, 1])
def test_opt_state_of_every_optimizer(cls, kw, slot, step):
    """State that the fault's step creates (step 0: the state is empty when armed) is hit
    right after that optimizer step; existing state right before it. Only the named element
    differs from the clean run."""
    def run(faults):
        torch.manual_seed(0)
        model = nn.Sequential()
        model.add_module("fc", nn.Linear(3, 2))
        opt = getattr(torch.optim, cls)(model.parameters(), **kw)
        inj = ft.Injector(model, opt)
        inj.arm(faults)
        for k in range(step + 1):
            with inj.step(k):
                model(torch.ones(4, 3)).sum().backward()
                opt.step()
                opt.zero_grad()
        assert hooks_left(model, opt) == []
        return opt.state[model.fc.weight][slot]
    clean = run([])
    hit = run([ft.fault("opt_state", "fc", tensor=slot, step=step, positions=[(1, 2)],
                        value="set", values=[1e3])])
    assert (hit != clean).nonzero().tolist() == [[1, 2]]
    if step == 0 and cls != "Adagrad":        # Adagrad's state exists from construction
        assert hit[1, 2].item() == 1e3


def test_opt_state_is_hit_before_the_update_when_the_state_exists():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.5)
    inj = ft.Injector(model, opt)
    inj.arm([ft.fault("opt_state", "fc", tensor="momentum_buffer", step=1, positions=[(0, 0)],
                      value="set", values=[100.0])])
    for k in range(2):
        with inj.step(k):
            model(torch.ones(1, 3)).sum().backward()
            opt.step()
            opt.zero_grad()
    # buf = 0.5 * 100 + grad (1.0): the corrupted value went through the update
    assert opt.state[model.fc.weight]["momentum_buffer"][0, 0].item() == 51.0


def test_callback_form():
    clean, _ = train_cnn(None, steps=3)
    torch.manual_seed(0)
    model = CNN()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    inj = ft.Injector(model, opt)
    inj.arm([ft.fault("fwd_output", "fc", step=1, value="set", values=[50.0],
                      positions=[(0, 3)])])
    losses = []
    for step, (x, y) in enumerate(images(3)):
        inj.on_step_begin(step)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        inj.on_step_end()
        losses.append(loss.item())
    assert losses[0] == clean[0] and losses[1] != clean[1]
    assert hooks_left(model, opt) == []


# --- misuse: one-line SpecErrors when armed -----------------------------------------------------

def one_line(exc_info, field=None):
    msg = str(exc_info.value)
    assert "\n" not in msg and msg
    if field is not None:
        assert exc_info.value.field == field, msg
    return msg


@pytest.fixture()
def lm():
    torch.manual_seed(0)
    model = WordLM()
    opt = torch.optim.Adam(model.parameters())
    return model, opt, ft.Injector(model, opt, example_input=(corpus()[:BPTT], None))


def test_misuse_is_a_one_line_error_when_armed(lm):
    model, opt, inj = lm
    with pytest.raises(SpecError) as e:
        inj.arm([ft.fault("param", "rnnn", tensor="weight_hh_l0")])
    msg = one_line(e, "layer")
    assert "unknown layer 'rnnn'" in msg and "did you mean rnn" in msg
    with pytest.raises(SpecError) as e:
        inj.arm([ft.fault("bwd_weight", "rnn")])
    assert "does not apply to layer 'rnn'" in one_line(e, "site")
    with pytest.raises(SpecError) as e:
        inj.arm([ft.fault("grad_out", "rnn")])
    assert "valid sites are" in one_line(e, "site")
    with pytest.raises(SpecError) as e:
        inj.arm([ft.fault("fwd_output", "rnn", tensor="h_n", positions=[(0, 4, 0)])])
    msg = one_line(e, "positions")
    assert "outside" in msg and "1/4/32" in msg and "torch layout" in msg
    with pytest.raises(SpecError) as e:
        inj.arm([ft.fault("param", "decoder", positions=[(1, VOCAB)])])  # (out, in) = (50, 32)
    assert "50/32" in one_line(e, "positions")
    with pytest.raises(SpecError) as e:
        inj.arm([ft.fault("param", "rnn", tensor="weight_hh_l0", replica=1)])
    assert "replica 1 is out of range" in one_line(e, "replica")
    with pytest.raises(SpecError) as e:
        inj.arm([ft.fault("fwd_weight", "rnn", tensor="weight_hh_l1")])
    msg = one_line(e, "tensor")
    assert "valid tensors are weight_ih_l0" in msg and "did you mean weight_hh_l0" in msg
    with pytest.raises(SpecError) as e:
        inj.arm([ft.fault("fwd_output", "rnn", tensor="hn")])
    assert "output, h_n, c_n" in one_line(e, "tensor")
    with pytest.raises(SpecError) as e:
        inj.arm([ft.fault("opt_state", "decoder", tensor="momentum_buffer")])
    msg = one_line(e, "tensor")
    assert "Adam" in msg and "exp_avg, exp_avg_sq" in msg
    with pytest.raises(SpecError) as e:
        inj.arm([ft.fault("opt_state", "rnn", tensor="weight_hh_l0.exp_avgsq")])
    assert "did you mean exp_avg_sq" in one_line(e, "tensor")
    with pytest.raises(SpecError) as e:
        inj.arm([ft.fault("param", "rnn")])
    assert "name the parameter or buffer with tensor=" in one_line(e, "tensor")
    assert inj.armed == []                      # a failed arm arms nothing
    assert hooks_left(model, opt) == []


def test_optimizer_without_the_state(lm):
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(2, 2))
    inj = ft.Injector(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(SpecError) as e:
        inj.arm([ft.fault("opt_state", "fc", tensor="momentum_buffer")])
    assert "keeps no state" in one_line(e, "tensor")
    with pytest.raises(SpecError) as e:
        ft.Injector(model).arm([ft.fault("opt_state", "fc")])
    assert "need the optimizer" in one_line(e, "site")


def test_position_outside_shape_without_example_fails_at_first_call_and_leaves_no_hook():
    torch.manual_seed(0)
    model = WordLM()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    inj = ft.Injector(model, opt)
    inj.arm([ft.fault("fwd_output", "rnn", tensor="h_n", positions=[(0, 9, 0)], step=4),
             ft.fault("param", "decoder", step=0, value="set", values=[3.0],
                      positions=[(0, 0)])])
    before = copy.deepcopy(model.state_dict())
    inj.begin(0)                                # explicit form, no end(): the hook cleans up
    with pytest.raises(SpecError) as e:
        model(corpus()[:BPTT], None)
    assert "outside" in one_line(e, "positions")
    assert hooks_left(model, opt) == []
    assert inj.armed == []                      # disarmed: no stale error later
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with inj.step(1):                           # later steps run clean
        model(corpus()[:BPTT], None)


# --- hooks never outlive a step ----------------------------------------------------------------

def test_exception_in_the_step_removes_every_hook():
    torch.manual_seed(0)
    model = CNN()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    inj = ft.Injector(model, opt)
    inj.arm([ft.fault("fwd_output", "conv1"), ft.fault("fwd_input", "fc"),
             ft.fault("fwd_weight", "conv2"), ft.fault("grad_out", "fc"),
             ft.fault("grad_in", "conv2"), ft.fault("grad_wt", "conv1"),
             ft.fault("bwd_input", "fc"), ft.fault("opt_state", "fc", tensor="exp_avg")])
    x, y = images(1)[0]
    for fail_at in ("forward", "backward"):
        with pytest.raises(RuntimeError, match="user"):
            with inj.step(0):
                loss = F.cross_entropy(model(x), y)
                assert hooks_left(model, opt) != []
                if fail_at == "backward":
                    loss.backward()
                raise RuntimeError("user code failed")
        assert hooks_left(model, opt) == []
    with inj.step(0):                           # and the next step works
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert hooks_left(model, opt) == []


# --- layouts -------------------------------------------------------------------------------

LAYOUT_CASES = [
    ("param", "conv2", None, (5, 2, 1, 0)),          # (out, in, kh, kw); canonical HWIO
    ("param", "fc", None, (7, 40)),                  # (out, in); canonical (in, out)
    ("fwd_output", "conv1", None, (3, 2, 5, 1)),     # NCHW; canonical NHWC
    ("fwd_output", "fc", None, (2, 9)),
]


@pytest.mark.parametrize("site,layer,tensor,torch_pos", LAYOUT_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in LAYOUT_CASES])
def test_torch_and_canonical_positions_name_the_same_element(site, layer, tensor, torch_pos):
    from faultlab.faults import torch_to_canonical
    canon = torch_to_canonical(site, torch_pos)
    assert len(torch_pos) == 2 or canon != torch_pos
    x = images(1)[0][0]
    results = []
    for how in ("torch", "canonical-injector", "canonical-fault", "torch-fault"):
        torch.manual_seed(0)
        model = CNN()
        seen = {}
        model.get_submodule(layer).register_forward_hook(
            lambda m, a, out: seen.setdefault("out", out.detach().clone()))
        if how == "torch":
            inj = ft.Injector(model, example_input=x)
            f = ft.fault(site, layer, positions=[torch_pos], bit=30)
        elif how == "canonical-injector":
            inj = ft.Injector(model, example_input=x, positions="canonical")
            f = ft.fault(site, layer, positions=[canon], bit=30)
        elif how == "canonical-fault":
            inj = ft.Injector(model, example_input=x)
            f = ft.fault(site, layer, positions=[canon], bit=30, layout="canonical")
        else:
            inj = ft.Injector(model, example_input=x, positions="canonical")
            f = ft.fault(site, layer, positions=[torch_pos], bit=30, positions_layout="torch")
        inj.arm([f])
        with inj.step(0):
            out = model(x).detach()
        hit = (model.get_submodule(layer).weight.detach().clone() if site == "param"
               else seen["out"])
        results.append((hit, out))
    torch.manual_seed(0)
    clean_model = CNN()
    ref = (clean_model.get_submodule(layer).weight.detach() if site == "param" else None)
    for hit, out in results[1:]:
        assert torch.equal(hit, results[0][0]) and torch.equal(out, results[0][1])
    if ref is not None:                              # exactly the named element differs
        diff = (results[0][0] != ref).nonzero().tolist()
        assert diff == [list(torch_pos)]


def test_campaign_faults_are_armed_in_the_canonical_layout():
    from faultlab.faults import FaultSpec, PositionSpec, ValueSpec
    torch.manual_seed(0)
    model = CNN()
    f = FaultSpec(site="param", layer="conv2", value=ValueSpec("set", values=(4.0,)),
                  positions=PositionSpec("explicit", indices=((1, 0, 2, 5),)))  # HWIO
    inj = ft.Injector(model)
    inj.arm([f], positions="canonical")
    with inj.step(0):
        pass
    assert model.conv2.weight[5, 2, 1, 0].item() == 4.0
    with pytest.raises(SpecError, match="outside"):      # read as torch layout: (8, 4, 3, 3)
        ft.Injector(CNN()).arm([f])


def test_emulated_replicas_hit_one_replica_only():
    torch.manual_seed(0)
    model = CNN()
    x = images(1)[0][0]
    inj = ft.Injector(model, replicas=2, example_input=x[:4])
    inj.arm([ft.fault("fwd_output", "conv2", replica=1, value="set", values=[40.0],
                      positions=[(3, 5, 1, 2)])])
    with torch.no_grad():
        clean = [model(x[:4]), model(x[4:])]
        with inj.step(0):
            got = []
            for r, shard in enumerate((x[:4], x[4:])):
                inj.replica = r
                got.append(model(shard))
    assert torch.equal(got[0], clean[0]) and not torch.equal(got[1], clean[1])
    with pytest.raises(SpecError, match="replica 2 is out of range"):
        inj.arm([ft.fault("param", "fc", replica=2)])
