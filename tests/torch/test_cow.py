"""Copy-on-write saves: the engine writes borrowed tensors, optimizer steps update out of place.

Writers are held at a gate (an event, no sleeps) so that optimizer steps really run while a
save still reads the tensors they update."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckpt_helpers import HookedDisk, assert_same_state, random_state
from faultlab.checkpointing import CheckpointEngine
from faultlab.backends.torch.adapter import TorchCheckpointAdapter
from faultlab.backends.torch.cow import CowGuard
from faultlab.errors import CheckpointError

OPTIMIZERS = {
    "adam": lambda ps, lr: torch.optim.Adam(ps, lr=lr),
    "adamw": lambda ps, lr: torch.optim.AdamW(ps, lr=lr, weight_decay=0.1),
    "adam-amsgrad": lambda ps, lr: torch.optim.Adam(ps, lr=lr, amsgrad=True),
    "adam-foreach": lambda ps, lr: torch.optim.Adam(ps, lr=lr, foreach=True),
    "adam-fused": lambda ps, lr: torch.optim.Adam(ps, lr=lr, fused=True),
    "sgd-momentum": lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9, nesterov=True),
    "rmsprop": lambda ps, lr: torch.optim.RMSprop(ps, lr=lr, momentum=0.5),
}


def gated_engine(**kw):
    """An engine on a simulated disk whose writer threads wait for `gate` before writing."""
    gate = threading.Event()

    def before_write(offset, data):
        if threading.current_thread().name.startswith("ckpt-writer"):
            gate.wait()
    disk = HookedDisk(block_size=512, before_write=before_write)
    kw.setdefault("chunk_bytes", 16 << 10)
    return CheckpointEngine(disk, max_in_flight=2, keep=2, **kw), gate


def make_run(opt_name: str, width: int, lr: float, seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.BatchNorm1d(width),
                                torch.nn.Tanh(), torch.nn.Linear(width, 3))
    opt = OPTIMIZERS[opt_name](model.parameters(), lr)

    def step(i: int):
        g = torch.Generator().manual_seed(1000 + i)
        x = torch.randn(8, width, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt, step


def cow_run(opt_name: str, width: int, lr: float, seed: int, policy: str = "redirect"):
    """make_run's training, a cow adapter freezing every tensor, and a gated engine."""
    model, opt, step = make_run(opt_name, width, lr, seed)
    adapter = TorchCheckpointAdapter(model, opt, rng=False, cow_min_bytes=1, cow_policy=policy)
    engine, gate = gated_engine()
    return model, opt, step, adapter, engine, gate


def final_state(model, opt) -> dict:
    return TorchCheckpointAdapter(model, opt, rng=False).capture(0, copy=True)[0]


@settings(max_examples=16, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(opt_name=st.sampled_from(sorted(OPTIMIZERS)), width=st.sampled_from([8, 24, 40]),
       lr=st.sampled_from([1e-3, 0.05]), seed=st.integers(0, 2**16),
       rounds=st.integers(1, 3), during=st.integers(1, 3),
       policy=st.sampled_from(["redirect", "redirect", "copy", "auto"]))
def test_cow_saves_hold_their_step_and_training_stays_bit_identical(
        opt_name, width, lr, seed, rounds, during, policy):
    plain_model, plain_opt, plain_step = make_run(opt_name, width, lr, seed)
    model, opt, step, adapter, engine, gate = cow_run(opt_name, width, lr, seed, policy)
    i = 0
    for _ in range(rounds):
        step(i)
        plain_step(i)
        i += 1
        expected = adapter.capture(i, copy=True)[0]
        gate.clear()
        handle = adapter.save(engine, i, cow=True)
        for _ in range(during):               # optimizer steps while the save is unwritten
            step(i)
            plain_step(i)
            i += 1
        gate.set()
        handle.wait()
        restored = engine.load_latest()
        assert restored.step == i - during
        assert_same_state(restored.state, expected)
    stats = adapter.cow_stats
    assert stats["optimizer_steps"]["cow"] == rounds * during
    assert stats["redirected"] + stats["copied_bytes"] > 0
    # copy-on-write changed where the updates went, not what they computed
    assert_same_state(final_state(model, opt), final_state(plain_model, plain_opt))
    engine.close()


def test_updates_after_the_first_reuse_the_buffers_a_finished_save_gave_back():
    model, opt, step, adapter, engine, gate = cow_run("adam", 64, 1e-2, 0)
    step(0)
    for i in range(1, 4):
        gate.clear()
        h = adapter.save(engine, i, cow=True)
        step(i)
        gate.set()
        h.wait()
    stats = adapter.cow_stats
    assert stats["redirected"] > 0 and stats["recycled"] > 0 and stats["copied_bytes"] == 0
    engine.close()


def test_memory_someone_else_still_views_is_never_recycled():
    model, opt, step, adapter, engine, gate = cow_run("adam", 64, 1e-2, 0)
    step(0)
    kept = model[0].weight.detach()          # a view the user holds of the weight's memory
    before = kept.clone()
    for i in range(1, 4):
        gate.clear()
        h = adapter.save(engine, i, cow=True)
        step(i)                              # the weight moves to new memory; `kept` stays
        gate.set()
        h.wait()
    assert torch.equal(kept, before)         # its old memory was not reused for an update
    assert not torch.equal(model[0].weight.detach(), before)
    engine.close()


def test_fused_optimizer_falls_back_to_copying_and_stays_exact():
    # _fused_adam_ writes several lists at once: each frozen tensor is copied off first
    model, opt, step, adapter, engine, gate = cow_run("adam-fused", 32, 1e-2, 3)
    step(0)
    expected = adapter.capture(1, copy=True)[0]
    h = adapter.save(engine, 1, cow=True)
    step(1)
    gate.set()
    h.wait()
    assert adapter.cow_stats["copied_bytes"] > 0
    assert_same_state(engine.load_latest().state, expected)
    engine.close()


def test_auto_copies_a_small_frozen_state_and_redirects_a_large_one():
    guard = CowGuard(min_bytes=1)
    small, large = torch.zeros(1000), torch.zeros(4 << 20)
    snap = guard.freeze([small])
    assert guard.cheaper_to_copy(n_params=10)          # 4 KB: a copy is cheaper
    guard.copy_off_all()
    assert _moved(small, snap) and guard.copied_bytes == small.numel() * 4
    snap.release()
    snap = guard.freeze([large])
    assert not guard.cheaper_to_copy(n_params=10)      # 16 MiB in 10 tensors: redirect
    snap.release()


def _moved(t, snap) -> bool:
    return all(t.untyped_storage().data_ptr() != e.ptr for e in snap.entries if e.owner is t)


def test_a_change_outside_optimizer_step_refuses_that_checkpoint_only():
    model, opt, step, adapter, engine, gate = cow_run("adam", 16, 1e-2, 1, "auto")
    step(0)
    gate.set()
    adapter.save(engine, 1, cow=True).wait()              # a good checkpoint first
    gate.clear()
    h = adapter.save(engine, 2, cow=True)
    with torch.no_grad():
        model[0].weight.mul_(2.0)                          # not copy-on-write: caught at commit
    gate.set()
    with pytest.raises(CheckpointError, match="not committed: .*changed in place outside "
                                              "optimizer.step"):
        h.wait()
    assert engine.load_latest().step == 1                   # the earlier checkpoint stands
    step(2)
    adapter.save(engine, 3, cow=True).wait()                # and the engine goes on
    assert engine.load_latest().step == 3
    engine.close()


def test_a_write_through_an_alias_waits_for_the_save():
    guard = CowGuard(min_bytes=1)
    owner = torch.arange(1000, dtype=torch.float32)
    snap = guard.freeze([owner])
    view = owner.numpy()                                   # what the engine reads
    done = threading.Event()

    def write_through_alias():
        with guard.updating():
            owner.data.add_(1.0)                           # .data: another tensor, same memory
        done.set()
    t = threading.Thread(target=write_through_alias)
    t.start()
    with guard._released:                                  # until the write is waiting
        while guard.waits == 0:
            guard._released.wait()
    assert not done.is_set()
    assert np.array_equal(view, np.arange(1000, dtype=np.float32))   # the save's bytes intact
    snap.release()
    t.join()
    assert torch.equal(owner, torch.arange(1000, dtype=torch.float32) + 1)


def test_cow_needs_a_checkpointer_that_borrows(tmp_path):
    from faultlab.checkpointing.api import open_checkpointer
    model, opt, step = make_run("adam", 8, 1e-2, 0)
    step(0)
    adapter = TorchCheckpointAdapter(model, opt)
    ckpt = open_checkpointer("sync", tmp_path / "sync")
    with pytest.raises(CheckpointError, match="needs a checkpointer that writes borrowed"):
        adapter.save(ckpt, 1, cow=True)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), chunk=st.sampled_from([512, 1024, 4096]),
       sizes=st.dictionaries(st.sampled_from("abcdefgh"), st.integers(0, 3000), min_size=1,
                             max_size=6))
def test_borrowed_save_writes_the_same_checkpoint_as_a_staged_one(seed, chunk, sizes):
    state = random_state(seed, sizes)
    a, _ = gated_engine(chunk_bytes=chunk)
    b, _ = gated_engine(chunk_bytes=chunk)
    for e in (a, b):
        e._storage.before_write = None
    a.save(1, state, {"k": 1}).wait()
    b.save(1, state, {"k": 1}, borrowed=True).wait()
    ra, rb = a.load_latest(), b.load_latest()
    assert_same_state(ra.state, state)
    assert_same_state(rb.state, state)
    a.close()
    b.close()
