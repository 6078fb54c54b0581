"""faultlab.torch.Offload: offloaded training in a loop the user keeps (docs/offload.md,
"Your own loop"): bit-identical to the same loop without offload, a real window, host_state
faults through faultlab.torch.Injector, and mistakes refused in one line when built."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import faultlab.torch as ft
from faultlab.errors import SpecError

STEPS, REPLICAS = 5, 2


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 10))


def _data():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(STEPS, 8, 1, 8, 8, generator=g),
            torch.randint(0, 10, (STEPS, 8), generator=g))


def _adam(params):
    return torch.optim.Adam(params, lr=1e-2)


def _loop(offload: bool, faults=(), replicas=REPLICAS, window=2, evaluate=True, lr_steps=2):
    """A user's loop: R emulated replicas (gradients of the shards summed), gradient clipping,
    a learning-rate schedule, an evaluation pass every other step; the same code with and
    without offload."""
    model = _model()
    X, Y = _data()
    if offload:
        off = ft.Offload(model, _adam, window=window)
        opt, params = off.optimizer, off.parameters()
        inj = ft.Injector(model, offload=off, replicas=replicas)
    else:
        off, opt = None, _adam(model.parameters())
        params = list(model.parameters())
        inj = ft.Injector(model, opt, replicas=replicas)
    inj.arm(list(faults))
    schedule = torch.optim.lr_scheduler.StepLR(opt, lr_steps, gamma=0.5)
    losses = []
    for step in range(STEPS):
        model.train()
        with inj.step(step):
            opt.zero_grad()
            for r in range(replicas):
                inj.replica = r
                x, y = X[step].chunk(replicas)[r], Y[step].chunk(replicas)[r]
                loss = F.cross_entropy(model(x), y) / replicas
                loss.backward()
                losses.append(loss.item())
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        schedule.step()
        if evaluate and step % 2:
            model.eval()
            with torch.no_grad():
                losses.append(F.cross_entropy(model(X[0]), Y[0]).item())
    state = off.state_dict() if offload else {k: v.detach().clone()
                                               for k, v in model.state_dict().items()}
    return losses, state, opt.state_dict()["state"], off


def _same(a, b) -> list[str]:
    """Names of the entries (model state, optimizer state) whose bits differ."""
    _, sa, oa, _ = a
    _, sb, ob, _ = b
    assert sa.keys() == sb.keys() and oa.keys() == ob.keys()
    diff = [k for k in sa if sa[k].dtype != sb[k].dtype
            or sa[k].numpy().tobytes() != sb[k].numpy().tobytes()]
    for i in oa:
        for n, v in oa[i].items():
            if v.numpy().tobytes() != ob[i][n].numpy().tobytes():
                diff.append(f"optim/{i}/{n}")
    return diff


# --- bit-identical to the loop without offload -----------------------------------------------

@pytest.mark.parametrize("window,replicas", [(1, 1), (2, 2), (4, 2)])
def test_a_user_loop_with_offload_is_bit_identical_to_the_loop_without(window, replicas):
    plain, off = _loop(False, replicas=replicas), _loop(True, replicas=replicas, window=window)
    assert plain[0] == off[0]                       # every loss, train and eval, exactly
    assert _same(plain, off) == []                  # parameters, BN buffers, Adam state
    assert any("running_mean" in k for k in off[1])


def test_the_window_is_real_in_a_user_loop():
    _, _, _, off = _loop(True, window=2)
    model = off.model
    # between steps no device-side parameter holds bytes (the last pass was an evaluation,
    # which leaves at most the window); every value is in the host copies
    assert sum(p.untyped_storage().nbytes() > 0 for p in model.parameters()) <= 4
    assert all(h.untyped_storage().nbytes() == h.numel() * 4 for h in off.parameters())
    s = off.stats
    assert s["fetches"] > 0 and s["sync_fetches"] == 0 and off.window._thread.is_alive()
    sizes = sorted((u.nbytes for u in off.units), reverse=True)
    assert 0 < s["peak_bytes"] <= sum(sizes[:2]) < s["all_bytes"]
    assert {id(p) for g in off.optimizer.param_groups for p in g["params"]} == \
        {id(h) for h in off.parameters()}


def test_an_optimizer_instance_is_rebuilt_over_the_host_copies_like_a_factory():
    a, b = _model(), _model()
    fa = ft.Offload(a, _adam, window=2)
    fb = ft.Offload(b, torch.optim.Adam(b.parameters(), lr=1e-2), window=2)
    assert fb.optimizer.param_groups[0]["lr"] == 1e-2
    X, Y = _data()
    for off, m in ((fa, a), (fb, b)):
        for step in range(2):
            off.optimizer.zero_grad()
            F.cross_entropy(m(X[step]), Y[step]).backward()
            off.optimizer.step()
    assert all(torch.equal(x, y) for x, y in zip(fa.parameters(), fb.parameters()))


def test_close_gives_the_model_its_values_back_and_it_trains_on_as_before():
    plain = _loop(False, replicas=1, evaluate=False, lr_steps=STEPS)   # a constant rate
    model = _model()
    X, Y = _data()
    off = ft.Offload(model, _adam, window=2)
    opt = off.optimizer
    for step in range(2):
        opt.zero_grad()
        F.cross_entropy(model(X[step]), Y[step]).backward()
        torch.nn.utils.clip_grad_norm_(off.parameters(), 1.0)
        opt.step()
    off.close()
    assert getattr(model, "_faultlab_offload") is None
    assert all(p.untyped_storage().nbytes() > 0 for p in model.parameters())
    # the host optimizer's state now belongs to the model's parameters: go on without offload
    fresh = _adam(model.parameters())
    fresh.load_state_dict(opt.state_dict())
    for step in range(2, STEPS):
        fresh.zero_grad()
        F.cross_entropy(model(X[step]), Y[step]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        fresh.step()
    assert all(torch.equal(v, plain[1][k]) for k, v in model.state_dict().items())


def test_model_zero_grad_clears_the_host_gradients():
    # a loop that zeroes through the model (not the optimizer) trains as without offload
    X, Y = _data()
    runs = []
    for offload in (False, True):
        model = _model()
        if offload:
            off = ft.Offload(model, _adam, window=2)
            opt = off.optimizer
        else:
            opt = _adam(model.parameters())
        for step in range(3):
            model.zero_grad()
            F.cross_entropy(model(X[step]), Y[step]).backward()
            opt.step()
        runs.append(off.state_dict() if offload else model.state_dict())
    assert all(torch.equal(v, runs[1][k]) for k, v in runs[0].items())
    off.close()
    assert "zero_grad" not in vars(model)


def test_an_offload_nobody_holds_but_its_model_lives_with_the_model():
    model = _model()
    ref = weakref.ref(ft.Offload(model, _adam, window=2))
    gc.collect()
    assert ref() is not None                        # the model keeps it (its hooks need it)
    window = weakref.ref(ref().window)
    del model
    gc.collect()
    assert ref() is None and window() is None       # and both go with the model


# --- host_state faults in a user loop ----------------------------------------------------------

def _host(tensor, layer="3", **kw):
    kw = {"step": 2, "value": "bitflip", "bit": 30, "positions": [(1, 2, 0, 1)], **kw}
    return ft.fault("host_state", layer, tensor=tensor, **kw)


def test_a_layer_in_transit_does_what_a_forward_weight_fault_does_on_the_first_layer():
    # the first conv's weight is read by its forward only (its input needs no gradient), so a
    # copy corrupted on its way to the device is the forward-weight fault, bit for bit
    pos = dict(step=2, replica=1, bit=30, positions=[(2, 0, 1, 1)])
    dev = _loop(False, [ft.fault("fwd_weight", "0", **pos)])
    off = _loop(True, [ft.fault("host_state", "0", tensor="transit", **pos)])
    assert dev[0] == off[0] and _same(dev, off) == []
    assert dev[0] != _loop(False)[0]                # and the fault did something


@pytest.mark.parametrize("host,device", [
    (_host("weight"), ft.fault("param", "3", step=2, bit=30, positions=[(1, 2, 0, 1)])),
    (_host("bias", layer="7", positions=[(5,)]),
     ft.fault("param", "7", tensor="bias", step=2, bit=30, positions=[(5,)])),
    (_host("m", layer="7", bit=31, positions=[(3, 40)]),
     ft.fault("opt_state", "7", tensor="m", step=2, bit=31, positions=[(3, 40)])),
    (_host("v", layer="9", value="inf", bit=None, positions=[(4, 2)]),
     ft.fault("opt_state", "9", tensor="v", step=2, value="inf", positions=[(4, 2)])),
    (_host("grad", layer="3", value="nan", bit=None, positions=[(0, 0, 0, 0)]),
     ft.fault("grad_wt", "3", step=2, value="nan", positions=[(0, 0, 0, 0)])),
])
def test_a_host_copy_fault_in_one_replica_loop_matches_its_device_twin(host, device):
    # one replica: the host master is the device parameter, the host moments the optimizer's
    dev = _loop(False, [device], replicas=1)
    off = _loop(True, [host], replicas=1)
    assert _same(dev, off) == []
    assert dev[0] == off[0] or (str(dev[0]) == str(off[0]))     # NaN losses compare as text
    assert _same(dev, _loop(False, replicas=1)) != []           # the fault changed training


def test_a_gradient_on_its_way_back_hits_only_the_replica_it_names():
    f = _host("grad", replica=1, value="zero", bit=None, positions=[(0, 0, 0, 0)])
    losses, state, _, off = _loop(True, [f])
    clean = _loop(True)
    assert losses[:4] == clean[0][:4]               # steps 0 and 1 (and step 2's losses)
    assert not torch.equal(state["3.weight"], clean[1]["3.weight"])
    assert off._armed == [] and not off._tainted    # nothing outlives its step


# --- refused in one line, when built ------------------------------------------------------------

def _msg(e) -> str:
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("f,field,text", [
    (_host("moments"), "tensor", "unknown tensor 'moments' for site host_state"),
    (_host("m", replica=1), "replica", "one host copy every replica shares"),
    (_host("weight", layer="2"), "site", "owns no offloaded 'weight' parameter"),
    (_host("weight", layer="nope"), "layer", "unknown layer 'nope'"),
    (_host("weight", positions=[(6, 0, 0, 0)]), "positions", "outside"),
    (ft.fault("param", "3", step=1), "site", "use site host_state"),
    (ft.fault("opt_state", "3", tensor="m", step=1), "site", "use site host_state"),
])
def test_host_state_faults_are_refused_when_armed(f, field, text):
    model = _model()
    inj = ft.Injector(model, offload=ft.Offload(model, _adam, window=2), replicas=2)
    with pytest.raises(SpecError) as e:
        inj.arm([f])
    assert e.value.field == field and text in _msg(e)
    assert inj.armed == []


def test_host_state_without_offload_says_what_it_needs():
    model = _model()
    with pytest.raises(SpecError) as e:
        ft.Injector(model, _adam(model.parameters())).arm([_host("weight")])
    assert e.value.field == "site"
    assert _msg(e).startswith("site host_state needs an offloaded model: wrap it in "
                              "faultlab.torch.Offload(model, optimizer, window=N)")


def test_moments_an_optimizer_does_not_keep_are_refused_when_armed():
    model = _model()
    off = ft.Offload(model, lambda p: torch.optim.SGD(p, lr=0.1), window=2)
    with pytest.raises(SpecError, match="does not keep") as e:
        ft.Injector(model, offload=off).arm([_host("m")])
    assert e.value.field == "tensor"


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 10)
        self.out.weight = self.emb.weight
        self.mid = nn.Linear(4, 4)


@pytest.mark.parametrize("build,field,text", [
    (lambda: ft.Offload(_model(), _adam, window=0), "offload", "window must be an int >= 1"),
    (lambda: ft.Offload(_model(), _adam, window=6), "offload",
     "keeps all 6 layers of the model on the device"),
    (lambda: ft.Offload("model", _adam, window=1), "layer", "needs the torch.nn.Module"),
    (lambda: ft.Offload(_model(), 3, window=1), "offload", "a factory params -> optimizer"),
    (lambda: ft.Offload(_model(), lambda p: torch.optim.Adam(_model().parameters()), window=1),
     "offload", "must optimize the parameters it is given"),
    (lambda: ft.Offload(nn.Sequential(nn.LSTM(4, 4), nn.Linear(4, 4)), _adam, window=1),
     "layer", "returns nested tuples"),
    (lambda: ft.Offload(_Tied(), _adam, window=1), "layer", "tied weights"),
])
def test_offload_mistakes_are_refused_when_it_is_built(build, field, text):
    with pytest.raises(SpecError) as e:
        build()
    assert e.value.field == field and text in _msg(e)


def test_an_optimizer_that_stepped_or_an_offload_twice_is_refused():
    model = _model()
    opt = _adam(model.parameters())
    F.cross_entropy(model(_data()[0][0]), _data()[1][0]).backward()
    opt.step()
    with pytest.raises(SpecError, match="has stepped already"):
        ft.Offload(model, opt, window=2)
    off = ft.Offload(model, _adam, window=2)
    with pytest.raises(SpecError, match="already offloaded"):
        ft.Offload(model, _adam, window=2)
    with pytest.raises(SpecError, match="leave optimizer out"):
        ft.Injector(model, opt, offload=off)
    off.close()
    ft.Offload(model, _adam, window=2).close()      # closed: it can be offloaded again


# --- checkpoints of an offloaded loop ------------------------------------------------------------

def _ckpt_run(path, stop=None, other_weights=False):
    """The loop with faultlab.torch.Checkpointer (every 2 steps) on an offloaded model; `stop`:
    end the process after that many steps (as a kill would, saves persisted)."""
    model = _model()
    if other_weights:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)               # other initial weights: only a resume can fix them
    off = ft.Offload(model, _adam, window=2)
    X, Y = _data()
    with ft.Checkpointer(path, every=2, model=model, optimizer=off.optimizer) as ckpt:
        start = ckpt.resume()
        for step in range(start, STEPS if stop is None else stop):
            off.optimizer.zero_grad()
            F.cross_entropy(model(X[step]), Y[step]).backward()
            off.optimizer.step()
            ckpt.step(step + 1)
    return start, off.state_dict(), off.optimizer.state_dict()["state"]


def test_a_checkpointer_saves_and_resumes_the_host_copies(tmp_path):
    _, whole, whole_opt = _ckpt_run(tmp_path / "a.ckpt")
    _ckpt_run(tmp_path / "b.ckpt", stop=4)
    start, resumed, resumed_opt = _ckpt_run(tmp_path / "b.ckpt", other_weights=True)
    assert start == 4
    assert all(torch.equal(v, resumed[k]) for k, v in whole.items())
    assert all(torch.equal(v, resumed_opt[i][n]) for i in whole_opt
               for n, v in whole_opt[i].items())
    model = _model()                    # and the run is the one without offload, bit for bit
    opt = _adam(model.parameters())
    X, Y = _data()
    for step in range(STEPS):
        opt.zero_grad()
        F.cross_entropy(model(X[step]), Y[step]).backward()
        opt.step()
    assert all(torch.equal(v, whole[k]) for k, v in model.state_dict().items())


def test_a_protector_refuses_an_offloaded_model_in_one_line():
    model = _model()
    off = ft.Offload(model, _adam, window=2)
    with pytest.raises(SpecError) as e:
        ft.Protector(model, off.optimizer, lambda batch: None, batches=[], every=1)
    assert _msg(e).startswith("Protector does not take an offloaded model")
