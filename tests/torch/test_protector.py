"""faultlab.torch.Protector on a training loop the user keeps (issue 12, item 4).

Plain user loops (an MLP with dropout, Adam, a step learning-rate schedule and a resumable
sampler behind a DataLoader; a word-level LSTM language model carrying its hidden state
across batches, SGD with gradient clipping): a transient NaN injected into a gradient is
detected in the step it strikes, rolled back, replayed, and training ends bit-identical to
the fault-free run; a protected clean run is bit-identical to an unprotected one; a permanent
fault is not transient and the policy acts; misuse is a one-line SpecError when the
protector is built."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import faultlab
import faultlab.torch as ft
from faultlab.backends.torch.protector import Protector
from faultlab.detectors import DetectorSuite, SignalSpec, Verdict
from faultlab.errors import SpecError

pytestmark = pytest.mark.framework("torch")

N_STEPS, EVERY = 20, 5


# --- the user's code ------------------------------------------------------------------------------

class ResumableSampler(torch.utils.data.Sampler):
    """A shuffling sampler whose position can be saved and restored (the user's own)."""

    def __init__(self, n, seed=0):
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0

    def __iter__(self):
        if self.pos >= self.n:
            self.epoch, self.pos = self.epoch + 1, 0
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        while self.pos < self.n:
            i = order[self.pos]
            self.pos += 1
            yield i

    def __len__(self):
        return self.n

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, s):
        self.epoch, self.pos = s["epoch"], s["pos"]


def build_mlp():
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 5, 0.5)
    sampler = ResumableSampler(64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8,
                                         sampler=sampler)

    def step_fn(batch):
        x, y = batch
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        return loss
    return model, optimizer, scheduler, sampler, loader, step_fn


def plain_mlp(steps=N_STEPS):
    """The user's loop without faultlab: epochs over the loader until `steps` steps."""
    model, _, _, _, loader, step_fn = build_mlp()
    losses = []
    while len(losses) < steps:
        for batch in loader:
            losses.append(step_fn(batch).item())
            if len(losses) == steps:
                break
    return model, losses


def protected_mlp(faults=(), steps=N_STEPS, **kw):
    model, optimizer, scheduler, sampler, loader, step_fn = build_mlp()
    injector = None
    if faults:
        injector = ft.Injector(model, optimizer)
        injector.arm(list(faults))
    with Protector(model, optimizer, step_fn, batches=loader, data=sampler, every=EVERY,
                   scheduler=scheduler, injector=injector, **kw) as prot:
        report = prot.run(steps)
    return model, report, optimizer


def same_params(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def nan_grad(step=7, **kw):
    return faultlab.fault("grad_wt", "0", step=step, value="nan", positions=[(2, 3)], **kw)


# --- clean runs ---------------------------------------------------------------------------------

def test_clean_protected_run_is_bit_identical_and_draws_nothing():
    ref, ref_losses = plain_mlp()
    model, report, optimizer = protected_mlp()
    assert same_params(model, ref)
    assert report.losses == ref_losses
    assert report.detections == [] and report.rollbacks == 0 and report.steps == N_STEPS
    # the run left the global generator where the plain loop leaves it
    plain_mlp()
    after_plain = torch.get_rng_state()
    protected_mlp()
    assert torch.equal(torch.get_rng_state(), after_plain)
    for attr in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks"):
        assert not getattr(optimizer, attr), "close() leaves no optimizer hook"


def test_two_runs_continue_where_the_first_ended():
    ref, _ = plain_mlp()
    model, optimizer, scheduler, sampler, loader, step_fn = build_mlp()
    with Protector(model, optimizer, step_fn, batches=loader, data=sampler, every=EVERY,
                   scheduler=scheduler) as prot:
        first = prot.run(12)
        second = prot.run(N_STEPS - 12)
    assert (first.start, second.start, second.steps) == (0, 12, N_STEPS - 12)
    assert same_params(model, ref)


def test_signals_one_host_transfer_and_exact_checksum():
    """One tolist() per step (the loop itself transfers nothing here), the checksum is the
    parameters' bytes summed as 64-bit words mod 2^64 (the odd-sized bias as int32 elements),
    the gradient norm the optimizer's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(4, 4, generator=g), torch.randint(0, 3, (4,), generator=g))
            for _ in range(6)]
    seen = {}

    def step_fn(batch):
        x, y = batch
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        seen["grad"] = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
        optimizer.step()
        return loss

    prot = Protector(model, optimizer, step_fn, batches=lambda s: data[s],
                     detectors=["nonfinite", "history", "spike", "divergence"])
    calls = []
    real = torch.Tensor.tolist

    def counting(self):
        calls.append(1)
        return real(self)
    torch.Tensor.tolist = counting
    try:
        sig = []
        orig = prot.trainer._signals
        prot.trainer._signals = lambda step, loss: sig.append(orig(step, loss)) or sig[-1]
        prot.run(6)
    finally:
        torch.Tensor.tolist = real
        prot.close()
    assert len(calls) == 6
    s = sig[-1]
    total = 0
    for p in model.parameters():
        raw = p.detach().numpy().tobytes()
        words = np.frombuffer(raw, dtype="<u8" if len(raw) % 8 == 0 else "<u4")
        total += int(words.astype(np.uint64).sum(dtype=np.uint64)) if len(raw) % 8 == 0 \
            else int(np.frombuffer(raw, dtype="<i4").astype(np.int64).sum())
    assert s.replica_checksums == [total % (1 << 64)]
    assert len(model[2].bias.detach().numpy().tobytes()) % 8 != 0   # both kinds were summed
    assert math.isclose(s.grad_norm, float(seen["grad"]), rel_tol=1e-5)
    assert set(s.m_max) == {"0", "2"} and math.isfinite(s.m_other)


# --- a transient fault ----------------------------------------------------------------------

def test_transient_nan_gradient_is_detected_rolled_back_and_bit_identical():
    ref, ref_losses = plain_mlp()
    model, report, _ = protected_mlp([nan_grad(step=7)])
    [d] = report.detections
    assert (d.step, d.detector) == (7, "nonfinite") and "gradient norm" in d.reason
    assert d.rollback_to == 5 and d.transient is True and d.action == "recovered"
    assert d.steps_replayed == 3 and report.rollbacks == 1
    assert report.replay_differs == []           # steps 5, 6 replayed bit for bit
    assert report.stopped_at is None and report.recovered
    assert same_params(model, ref)
    assert report.losses == ref_losses


def test_transient_fault_right_after_a_checkpoint_and_the_step_form():
    """The step form (the user's own loader loop hands each batch in): the protector keeps
    the batches it may replay and never rewinds the user's iterator."""
    ref, ref_losses = plain_mlp()
    model, optimizer, scheduler, sampler, loader, step_fn = build_mlp()
    injector = ft.Injector(model, optimizer)
    injector.arm([nan_grad(step=10)])
    prot = Protector(model, optimizer, step_fn, every=EVERY, scheduler=scheduler,
                     injector=injector)
    step = 0
    while step < N_STEPS:
        for batch in loader:
            assert prot.step(step, batch)
            step += 1
            if step == N_STEPS:
                break
    prot.close()
    [d] = prot.report.detections
    assert (d.step, d.rollback_to, d.transient, d.steps_replayed) == (10, 10, True, 1)
    assert len(prot.trainer.recorded) <= 2 * EVERY
    assert same_params(model, ref) and prot.report.losses == ref_losses


class WordLM(nn.Module):
    def __init__(self, vocab=50):
        super().__init__()
        self.encoder = nn.Embedding(vocab, 16)
        self.rnn = nn.LSTM(16, 32)
        self.decoder = nn.Linear(32, vocab)

    def forward(self, x, hidden):
        out, hidden = self.rnn(self.encoder(x), hidden)
        return self.decoder(out), hidden


def lm(protect=False, faults=()):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 50, (4 * 81,), generator=g).view(4, -1).t().contiguous()
    model = WordLM()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    state = {"hidden": (torch.zeros(1, 4, 32), torch.zeros(1, 4, 32))}

    def batch_fn(step):
        i = step * 8
        return data[i:i + 8], data[i + 1:i + 9]

    def step_fn(batch):
        x, y = batch
        out, hidden = model(x, state["hidden"])
        state["hidden"] = tuple(h.detach() for h in hidden)
        loss = F.cross_entropy(out.view(-1, 50), y.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        optimizer.step()
        return loss
    if not protect:
        for s in range(10):
            step_fn(batch_fn(s))
        return model, state, None
    injector = ft.Injector(model, optimizer)
    injector.arm(list(faults))
    with Protector(model, optimizer, step_fn, batches=batch_fn, extra=state, every=4,
                   injector=injector) as prot:
        prot.run(10)
    return model, state, prot.report


def test_lstm_hidden_state_is_restored_with_the_model():
    ref, ref_state, _ = lm()
    fault = faultlab.fault("grad_wt", "rnn", tensor="weight_hh_l0", step=6, value="nan",
                           positions=[(5, 3)])
    model, state, report = lm(True, [fault])
    [d] = report.detections
    assert (d.step, d.rollback_to, d.transient, d.action) == (6, 4, True, "recovered")
    assert same_params(model, ref)
    assert all(torch.equal(a, b) for a, b in zip(state["hidden"], ref_state["hidden"]))


def shuffled(protect, fault_step=None):
    """A plain DataLoader(shuffle=True) with no data position: its iterator draws its seeds
    from the global generator; the protector re-makes the epoch's iteration and
    fast-forwards it."""
    model, optimizer, scheduler, _, _, step_fn = build_mlp()
    g = torch.Generator().manual_seed(5)
    data = torch.utils.data.TensorDataset(torch.randn(64, 8, generator=g),
                                          torch.randint(0, 3, (64,), generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True)
    if not protect:
        done = 0
        while done < N_STEPS:
            for batch in loader:
                step_fn(batch)
                done += 1
                if done == N_STEPS:
                    break
        return model, None
    injector = ft.Injector(model, optimizer)
    injector.arm([nan_grad(step=fault_step)])
    with Protector(model, optimizer, step_fn, batches=loader, every=4, scheduler=scheduler,
                   injector=injector) as prot:
        prot.run(N_STEPS)
    return model, prot.report


@pytest.mark.parametrize("fault_step", [2, 13, 16])
def test_shuffling_loader_without_data_position(fault_step):
    ref, _ = shuffled(False)
    model, report = shuffled(True, fault_step)
    [d] = report.detections
    assert (d.step, d.rollback_to, d.transient) == (fault_step, fault_step // 4 * 4, True)
    assert report.replay_differs == []
    assert same_params(model, ref)


def test_own_dict_as_data_position():
    """The data position is the user's own dict, read by their own re-iterable."""
    def run(protect):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(3)
        data = [(torch.randn(4, 4, generator=g), torch.randint(0, 2, (4,), generator=g))
                for _ in range(12)]
        pos = {"i": 0}

        class Batches:
            def __iter__(self):
                while pos["i"] < len(data):
                    pos["i"] += 1
                    yield data[pos["i"] - 1]

        def step_fn(batch):
            loss = F.cross_entropy(model(batch[0]), batch[1])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            return loss
        if not protect:
            for b in Batches():
                step_fn(b)
            return model, None
        injector = ft.Injector(model, optimizer)
        injector.arm([faultlab.fault("grad_wt", "2", step=9, value="inf", positions=[(1, 5)])])
        with Protector(model, optimizer, step_fn, batches=Batches(), data=pos, every=4,
                       injector=injector) as prot:
            prot.run(12)
        assert pos == {"i": 12}
        return model, prot.report
    ref, _ = run(False)
    model, report = run(True)
    [d] = report.detections
    assert (d.step, d.rollback_to, d.transient) == (9, 8, True)
    assert same_params(model, ref)


# --- a permanent fault: not transient, the policy acts ------------------------------------

def test_permanent_fault_is_not_transient_and_stops():
    model, report, _ = protected_mlp([nan_grad(step=7, duration="permanent")])
    [d] = report.detections
    assert d.transient is False and d.action == "stopped" and d.attempts == 2
    assert d.rollback_to == 5                     # then the checkpoint before it, step 0
    assert report.stopped_at == 7 and not report.recovered


def test_step_form_stops_on_a_permanent_fault():
    model, optimizer, scheduler, sampler, loader, step_fn = build_mlp()
    injector = ft.Injector(model, optimizer)
    injector.arm([nan_grad(step=3, duration="permanent")])
    ran = []
    with Protector(model, optimizer, step_fn, every=EVERY, injector=injector) as prot:
        for step, batch in enumerate(loader):
            ran.append(prot.step(step, batch))
    assert ran == [True] * 3 + [False] * 5
    [d] = prot.report.detections
    assert (d.step, d.transient, d.action, d.attempts) == (3, False, "stopped", 1)
    assert prot.report.stopped_at == 3 and prot.report.steps == 3


def test_permanent_fault_with_policy_skip():
    _, report, _ = protected_mlp([nan_grad(step=7, duration="permanent")], policy="skip")
    assert [d.action for d in report.detections] == ["skipped"] * 3 + ["stopped"]
    assert [d.step for d in report.detections] == [7, 8, 9, 10]
    assert all(d.transient is False for d in report.detections)
    assert report.stopped_at == 10


def test_bad_batch_is_not_transient_and_skip_drops_it():
    """A batch with a NaN sample (poisoned data, not the hardware) makes the same anomaly
    however often the step is re-run: not transient; policy skip drops that step's update
    and training goes on with the next batch, as a loop that drops the batch would."""
    order = torch.randperm(64, generator=torch.Generator().manual_seed(1)).tolist()
    bad = order[8]                    # a sample of step 9's batch (epoch 1's second batch)

    def poisoned(build):
        model, optimizer, scheduler, sampler, loader, step_fn = build()
        loader.dataset.tensors[0][bad] = float("nan")
        return model, optimizer, scheduler, sampler, loader, step_fn

    ref, optimizer, scheduler, sampler, loader, step_fn = poisoned(build_mlp)
    step, dropped = 0, []
    while step < N_STEPS:                           # the user's loop that drops the batch
        for x, y in loader:
            if torch.isnan(x).any():
                dropped.append(step)
            else:
                step_fn((x, y))
            step += 1
            if step == N_STEPS:
                break
    model, optimizer, scheduler, sampler, loader, step_fn = poisoned(build_mlp)
    with Protector(model, optimizer, step_fn, batches=loader, data=sampler, every=EVERY,
                   scheduler=scheduler, policy="skip") as prot:
        report = prot.run(N_STEPS)
    assert 9 in dropped and len(dropped) == 3       # the bad sample is in every epoch
    assert [d.step for d in report.detections] == dropped
    for d in report.detections:
        assert (d.detector, d.transient, d.action) == ("nonfinite", False, "skipped")
        assert "loss is nan" in d.reason
    assert report.steps == N_STEPS and report.stopped_at is None and report.recovered
    assert same_params(model, ref)


class Jump:
    """A detector of the user's own: the parameters' norm moved more than `limit` in a step."""

    name, PARAMS = "jump", ()
    needs = SignalSpec(history=False, params=True)

    def __init__(self, limit):
        self.limit, self.prev = limit, None

    def observe(self, s):
        if self.prev is not None and abs(s.param_norm - self.prev) > self.limit:
            return Verdict(self.name, s.step, f"parameters moved {s.param_norm - self.prev:.3g}")
        self.prev = s.param_norm
        return None


def test_policy_lower_lr_reruns_the_step_with_a_tenth_of_the_lr():
    """A permanent fault that scales one gradient element: the step re-run with lr x0.1 is
    judged normal (lowered_lr), replays honour it; the scheduler (chainable ExponentialLR)
    never sees the lowered lr; the fault fires again at the next step and, the lr lowered
    once already, stop."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.9)
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(4, 4, generator=g), torch.randint(0, 2, (4,), generator=g))
            for _ in range(12)]

    def step_fn(batch):
        loss = F.cross_entropy(model(batch[0]), batch[1])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        return loss
    injector = ft.Injector(model, optimizer)
    injector.arm([faultlab.fault("grad_wt", "2", step=6, value="scale", factor=2000.0,
                                 positions=[(1, 5)], duration="permanent")])
    with Protector(model, optimizer, step_fn, batches=lambda s: data[s], every=4,
                   injector=injector, policy="lower_lr",
                   detectors=DetectorSuite([Jump(0.3)])) as prot:
        prot.run(12)
    report = prot.report
    assert [(d.step, d.action) for d in report.detections] == [(6, "lowered_lr"),
                                                               (7, "stopped")]
    assert all(d.transient is False for d in report.detections)
    lr = 0.1
    for _ in range(8):                  # steps 0..7 stepped the scheduler
        lr *= 0.9
    assert optimizer.param_groups[0]["lr"] == lr


# --- misuse: one line when built ------------------------------------------------------------

def test_misuse_is_one_line_at_construction(tmp_path):
    model, optimizer, scheduler, sampler, loader, step_fn = build_mlp()
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    cases = [
        (dict(model=optimizer), "torch.nn.Module"),
        (dict(optimizer=model), "torch.optim.Optimizer"),
        (dict(optimizer=other), "optimizes none of the model's parameters"),
        (dict(step_fn=3), "step_fn must be a function"),
        (dict(batches=iter(loader)), "one-shot iterator"),
        (dict(batches=3), "batch_fn(step) or a re-iterable"),
        (dict(every=0), "every must be a whole number"),
        (dict(every=2.5), "every must be a whole number"),
        (dict(data=object()), "no state_dict() / load_state_dict()"),
        (dict(scheduler=object()), "no state_dict() / load_state_dict()"),
        (dict(extra=[1]), "pass a dict"),
        (dict(policy="retry"), "valid policies are stop, skip, lower_lr"),
        (dict(detectors=["nonfinit"]), "unknown detector 'nonfinit'"),
        (dict(treshold=3), "unknown argument 'treshold'"),
        (dict(injector=ft.Injector(nn.Linear(2, 2))), "Injector built for this model"),
        (dict(directory=tmp_path / "f"), "not a directory"),
    ]
    (tmp_path / "f").write_text("x")
    for kw, words in cases:
        args = dict(model=model, optimizer=optimizer, step_fn=step_fn, batches=loader)
        args.update(kw)
        with pytest.raises(SpecError) as e:
            Protector(args.pop("model"), args.pop("optimizer"), args.pop("step_fn"), **args)
        assert words in str(e.value) and "\n" not in str(e.value), (kw, str(e.value))
    with Protector(model, optimizer, step_fn) as prot:
        with pytest.raises(SpecError, match="needs batches="):
            prot.run(3)
    with Protector(model, optimizer, lambda b: None, batches=lambda s: s) as prot:
        with pytest.raises(SpecError, match="must return the step's loss"):
            prot.run(1)
