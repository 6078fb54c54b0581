"""The torch adapter captures a whole training session and restores it exactly; golden runs
keep their checkpoints in the engine's file.

Exact resume is the property: train k steps, checkpoint through the engine, go on to n; a
fresh session (other seeds, other RNG states) restored from the checkpoint and trained from
k to n ends with the same bits in every parameter, optimizer moment, RNG state and data
position.
"""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from faultlab.checkpointing import CheckpointEngine, recover
from faultlab.backends import load_backend
from faultlab.backends.torch.adapter import Resume, TorchCheckpointAdapter, TrainerAdapter
from faultlab.backends.torch.staging import array_to_tensor, tensor_to_array
from faultlab.checkpointing.codec import Encoder, decode
from faultlab.errors import CheckpointError, FaultlabError

torch.set_num_threads(1)

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True,
                                              weight_decay=1e-4),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw-amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-2, amsgrad=True),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5, centered=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
}


class Sampler:
    """A stateful sampler over a small dataset, reshuffled from NumPy's global generator."""

    def __init__(self, n=40, batch=8):
        self.n, self.batch = n, batch
        self.perm, self.pos = np.random.permutation(n), 0

    def next(self):
        if self.pos + self.batch > self.n:
            self.perm, self.pos = np.random.permutation(self.n), 0
        idx = self.perm[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return idx

    def state_dict(self):
        return {"perm": self.perm, "pos": self.pos}

    def load_state_dict(self, sd):
        self.perm, self.pos = np.array(sd["perm"]), int(sd["pos"])


class Session:
    """A training session that consumes every kind of random state the adapter covers."""

    def __init__(self, opt="adam", dtype=torch.float32, seed=0, scaler=True):
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        self.x = torch.from_numpy(np.random.default_rng(99).standard_normal((40, 6))
                                  .astype(np.float32))
        self.y = (self.x[:, 0] > 0).long()
        self.model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.BatchNorm1d(12),
                                         torch.nn.ReLU(), torch.nn.Dropout(0.25),
                                         torch.nn.Linear(12, 2)).to(dtype)
        self.dtype = dtype
        self.opt = OPTIMIZERS[opt](self.model.parameters())
        self.sched = torch.optim.lr_scheduler.ExponentialLR(self.opt, gamma=0.97)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 5, growth_interval=2) \
            if scaler else None
        self.sampler = Sampler()
        self.tgen = torch.Generator().manual_seed(seed + 1)
        self.ngen = np.random.default_rng(seed + 2)
        self.rs = np.random.RandomState(seed + 3)
        self.pyr = random.Random(seed + 4)
        self.adapter = TorchCheckpointAdapter(
            self.model, self.opt, self.scaler, scheduler=self.sched, data=self.sampler,
            generators={"t": self.tgen, "n": self.ngen, "rs": self.rs, "py": self.pyr})

    def step(self):
        idx = self.sampler.next()
        x = self.x[idx].to(self.dtype)
        x = x + 0.01 * torch.randn(x.shape, generator=self.tgen).to(self.dtype) \
            + 0.01 * torch.randn_like(x)
        x = x * (1 + 0.01 * (random.random() + self.pyr.random() + self.ngen.random()
                             + self.rs.rand()))
        loss = torch.nn.functional.cross_entropy(self.model(x).float(), self.y[idx])
        self.opt.zero_grad()
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        self.sched.step()

    def fingerprint(self):
        """Everything that decides the future, as bytes."""
        state, meta = self.adapter.capture(0, copy=True)
        return {k: (v.dtype.str, v.shape, v.tobytes()) for k, v in state.items()}, \
            json.dumps(meta, sort_keys=True)


def assert_same_session(a: Session, b: Session):
    sa, ma = a.fingerprint()
    sb, mb = b.fingerprint()
    assert sa.keys() == sb.keys()
    assert [k for k in sa if sa[k] != sb[k]] == []
    assert ma == mb


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(opt=st.sampled_from(sorted(OPTIMIZERS)),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
       k=st.integers(0, 6), extra=st.integers(1, 6), scaler=st.booleans())
def test_a_restored_session_continues_bit_identical(tmp_path_factory, opt, dtype, k, extra,
                                                    scaler):
    path = tmp_path_factory.mktemp("adapt") / "run.ckpt"
    ref = Session(opt, dtype, scaler=scaler)
    for _ in range(k):
        ref.step()
    with CheckpointEngine(path, chunk_bytes=4096) as eng:
        ref.adapter.save(eng, k, data_position={"epoch": 0, "k": k}).wait()
    for _ in range(extra):
        ref.step()
    ref_draws = (torch.randn(3), np.random.random(), random.random())

    fresh = Session(opt, dtype, seed=123, scaler=scaler)        # other init, other RNG states
    resume = fresh.adapter.resume(lambda: recover(path))
    assert resume == Resume(k, {"epoch": 0, "k": k}, {})
    for _ in range(extra):
        fresh.step()
    assert_same_session(ref, fresh)
    draws = (torch.randn(3), np.random.random(), random.random())
    assert torch.equal(draws[0], ref_draws[0]) and draws[1:] == ref_draws[1:]


def test_a_run_killed_and_resumed_many_times_ends_identical(tmp_path):
    """Checkpoint every step, 'restart' (a fresh session restored from the file) every third."""
    path = tmp_path / "run.ckpt"
    ref = Session("adamw-amsgrad")
    for _ in range(15):
        ref.step()
    live = Session("adamw-amsgrad")
    eng = CheckpointEngine(path, chunk_bytes=4096)
    for step in range(15):
        if step and step % 3 == 0:
            eng.close()
            live = Session("adamw-amsgrad", seed=step)
            assert live.adapter.resume(lambda: recover(path)).step == step
            eng = CheckpointEngine(path, chunk_bytes=4096)
        live.step()
        live.adapter.save(eng, step + 1)
    eng.close()
    assert_same_session(ref, live)


def test_capture_holds_every_part_of_the_session():
    s = Session("adam")
    s.step()
    state, meta = s.adapter.capture(1, data_position=5, extra={"note": "x", "t": torch.ones(2)})
    names = set(state)
    assert {"model/0.weight", "model/1.running_mean", "model/1.num_batches_tracked",
            "optimizer/state/0/exp_avg", "optimizer/state/0/step", "rng/torch",
            "rng/python", "rng/numpy/keys", "generator/t", "generator/rs", "generator/py",
            "data/perm", "extra/t"} <= names
    assert meta["step"] == 1 and meta["data_position"] == 5
    assert meta["generators"]["n"]["kind"] == "numpy"
    assert set(meta["scaler"]) >= {"scale", "growth_factor", "_growth_tracker"}
    assert meta["schedulers"]["scheduler"]["last_epoch"] == 1
    json.dumps(meta, allow_nan=False)                 # the engine's meta is strict JSON
    assert all(isinstance(v, np.ndarray) for v in state.values())


def test_cpu_arrays_are_views_of_the_live_tensors_unless_copied():
    s = Session("sgd", scaler=False)
    view, _ = s.adapter.capture(0)
    copy, _ = s.adapter.capture(0, copy=True)
    w = s.model[0].weight
    with torch.no_grad():
        w.add_(1.0)
    assert np.array_equal(view["model/0.weight"], w.detach().numpy())
    assert not np.array_equal(copy["model/0.weight"], w.detach().numpy())


def test_overlapped_save_stages_behind_the_next_step_and_saves_the_right_state(tmp_path):
    """save(overlap=True) returns before staging; the optimizer's next step waits for it, so
    the checkpoint holds the state of its step even though training went on."""
    path = tmp_path / "run.ckpt"
    s = Session("adam")
    for _ in range(3):
        s.step()
    expected, _ = s.adapter.capture(3, copy=True)
    with CheckpointEngine(path, chunk_bytes=4096) as eng:
        h = s.adapter.save(eng, 3, overlap=True)
        s.step()                                   # optimizer pre-hook waits for staging
        assert h.staged()
        h.wait()
        s.adapter.save(eng, 4, overlap=True).wait()
    got = recover(path)
    assert got.step == 4
    with CheckpointEngine(path) as eng:
        pass
    from faultlab.checkpointing.recovery import list_commits
    assert [c.step for c in list_commits(path)] == [3, 4]
    fresh = Session("adam", seed=5)
    fresh.adapter.restore(got.state, got.meta)
    assert_same_session(s, fresh)
    # the step-3 checkpoint holds the step-3 state, not what training did after save()
    from faultlab.checkpointing.storage import OSStorage
    from faultlab.checkpointing.recovery import load_commit, read_geometry, scan_records
    st_ = OSStorage(path)
    st_.open(write=False)
    geom = read_geometry(st_)
    rec = next(r for r in scan_records(st_, geom)[0] if r.step == 3)
    old = load_commit(st_, geom, rec).state
    st_.close()
    for name in expected:
        if not name.startswith(("rng/", "generator/")):
            assert old[name].tobytes() == expected[name].tobytes(), name
    s.adapter.close()


def test_overlap_and_cow_captures_copy_buffers_but_not_parameters():
    """Parameters and optimizer state stay views for the staging thread (overlap) or frozen
    (cow); BatchNorm statistics, which the next forward pass changes, are copied."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    ad = TorchCheckpointAdapter(model, opt, rng=False, cow_min_bytes=1)
    for freeze in (None, []):
        arrays, _ = ad._capture(1, None, None, copy=False, overlap=True, freeze=freeze)
        w = model[0].weight
        assert np.shares_memory(arrays["model/0.weight"], w.detach().numpy())
        assert np.shares_memory(arrays["optimizer/state/0/exp_avg"],
                                opt.state[w]["exp_avg"].numpy())
        assert not np.shares_memory(arrays["model/1.running_mean"],
                                    model[1].running_mean.numpy())
        if freeze is not None:
            assert any(t is w for t in freeze)


def test_a_failed_overlapped_save_surfaces_at_the_next_optimizer_step(tmp_path):
    class Failing:
        def save(self, step, state, meta):
            raise CheckpointError("disk full")

    s = Session("sgd", scaler=False)
    h = s.adapter.save(Failing(), 0, overlap=True)
    with pytest.raises(CheckpointError, match="disk full"):
        s.step()
    assert isinstance(h.error, CheckpointError)


def test_bfloat16_and_float16_tensors_round_trip_exactly():
    for dtype in (torch.bfloat16, torch.float16, torch.float64, torch.complex64, torch.bool,
                  torch.int8, torch.uint8):
        t = (torch.randn(5, 3) * 100).to(dtype)
        arr, ref = tensor_to_array(t, "x")
        back = array_to_tensor(arr, ref)
        assert back.dtype == dtype and torch.equal(back, t)


def test_non_contiguous_and_conjugate_views_are_captured_by_value():
    t = torch.arange(12.0).reshape(3, 4).t()
    arr, ref = tensor_to_array(t, "x")
    assert np.array_equal(arr, t.numpy())
    c = torch.tensor([1 + 2j]).conj()
    arr, ref = tensor_to_array(c, "c")
    assert arr[0] == 1 - 2j


# -- the JSON + arrays encoding --------------------------------------------------------------

leaves = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.text(max_size=5),
                   st.floats(allow_nan=True, allow_infinity=True), st.binary(max_size=4),
                   hnp.arrays(st.sampled_from([np.float32, np.int16, np.uint8]),
                              hnp.array_shapes(min_dims=0, max_dims=2, max_side=3)))
values = st.recursive(leaves, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.tuples(inner, inner),
    st.dictionaries(st.one_of(st.text(max_size=4), st.integers(0, 9)), inner, max_size=3)),
    max_leaves=12)


def same_value(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape \
            and a.tobytes() == b.tobytes()
    if isinstance(a, float):
        return isinstance(b, float) and (a == b or (math.isnan(a) and math.isnan(b)))
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same_value, a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same_value(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@settings(max_examples=200, deadline=None)
@given(value=values)
def test_nested_values_round_trip_through_json_and_arrays(value):
    enc = Encoder(lambda path, v: (v, {"__ndarray__": path}))
    tree = enc.encode({"v": value}, "x")
    text = json.dumps(tree, allow_nan=False)
    back = decode(json.loads(text), enc.arrays, lambda arr, ref: arr)
    assert same_value(back["v"], value)


def test_values_that_cannot_be_checkpointed_are_one_line_errors():
    enc = Encoder(lambda path, v: (v, {"__ndarray__": path}))
    with pytest.raises(CheckpointError, match="a set is not"):
        enc.encode({"a": {1, 2}}, "opt")


# -- mismatches and foreign checkpoints -------------------------------------------------------

def test_restoring_into_a_different_model_is_a_one_line_error():
    a = Session("adam")
    state, meta = a.adapter.capture(0, copy=True)
    other = torch.nn.Linear(3, 3)
    b = TorchCheckpointAdapter(other, torch.optim.Adam(other.parameters()))
    with pytest.raises(CheckpointError) as e:
        b.restore(state, meta)
    assert "\n" not in str(e.value) and "does not fit" in str(e.value)


def test_restoring_a_state_not_written_by_an_adapter_is_refused():
    s = Session("sgd", scaler=False)
    with pytest.raises(CheckpointError, match="not written by a faultlab adapter"):
        s.adapter.restore({"w": np.zeros(3)}, {"step": 3})
    state, meta = s.adapter.capture(0, copy=True)
    before = s.model[0].weight.detach().clone()
    broken = {k: (v + 1 if k == "model/0.weight" else v) for k, v in state.items()
              if k != "optimizer/state/0/momentum_buffer" and k != "rng/torch"}
    with pytest.raises(CheckpointError, match="lacks"):
        s.adapter.restore(broken, meta)
    assert torch.equal(s.model[0].weight, before)      # checked before anything is changed
    with pytest.raises(CheckpointError, match="holds a tf adapter state"):
        s.adapter.restore(state, dict(meta, framework="tf"))


def test_resume_without_a_checkpoint_starts_fresh(tmp_path):
    s = Session("sgd", scaler=False)
    assert s.adapter.resume(lambda: recover(tmp_path / "none.ckpt")) is None


def test_adapters_are_found_by_framework_and_unknown_ones_are_one_line_errors():
    assert load_backend("torch").checkpoint_adapter() is TorchCheckpointAdapter  # "tf": tests/tf
    with pytest.raises(FaultlabError, match="unknown framework 'jax'"):
        load_backend("jax").checkpoint_adapter()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_go_through_reused_pinned_buffers(tmp_path):
    model = torch.nn.Linear(64, 64).cuda()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(8, 64, device="cuda")).sum().backward()
    opt.step()
    ad = TorchCheckpointAdapter(model, opt)
    state, meta = ad.capture(1)
    assert np.array_equal(state["model/weight"], model.weight.detach().cpu().numpy())
    first = ad.staging_bytes
    assert first >= model.weight.numel() * 4
    ad.capture(2)
    assert ad.staging_bytes == first                   # buffers reused, not reallocated
    with CheckpointEngine(tmp_path / "c.ckpt") as eng:
        ad.save(eng, 1, overlap=True).wait()
    got = recover(tmp_path / "c.ckpt")
    m2 = torch.nn.Linear(64, 64).cuda()
    o2 = torch.optim.Adam(m2.parameters())
    TorchCheckpointAdapter(m2, o2).restore(got.state, got.meta)
    assert torch.equal(m2.weight, model.weight)
    assert o2.state[m2.weight]["exp_avg"].is_cuda


def test_the_trainer_adapter_resumes_a_faultlab_trainer_exactly(tmp_path):
    from faultlab.workloads.base import default_config
    from faultlab.backends.torch.trainer import TorchTrainer
    cfg = default_config("mlp", replicas=2, per_replica_batch=8, width=8, steps_per_epoch=4,
                         epochs=2)
    ref = TorchTrainer(cfg)
    for k in range(3):
        ref.train_step(k)
    state, meta = TrainerAdapter(ref).capture(3)
    state = {k: v.copy() for k, v in state.items()}
    for k in range(3, 6):
        ref.train_step(k)
    fresh = TorchTrainer(cfg)
    assert TrainerAdapter(fresh).restore(state, meta).step == 3
    for k in range(3, 6):
        fresh.train_step(k)
    a, b = ref.get_state(), fresh.get_state()
    assert all(a[n].tobytes() == b[n].tobytes() for n in a)


# -- golden runs keep their checkpoints in the engine's file ----------------------------------

@pytest.fixture(scope="module")
def golden_run(tmp_path_factory):
    from faultlab.runner import golden as golden
    from faultlab.workloads.base import default_config
    from faultlab.backends.torch.trainer import TorchTrainer
    cfg = default_config("mlp", replicas=1, per_replica_batch=8, width=8, steps_per_epoch=3,
                         epochs=3, checkpoint_every=2)
    directory = tmp_path_factory.mktemp("golden") / "g"
    run = golden.record(TorchTrainer(cfg), cfg, directory)
    return cfg, directory, run


def test_golden_checkpoints_are_one_engine_file_holding_every_checkpoint(golden_run):
    from faultlab.runner import golden as golden
    from faultlab.checkpointing.recovery import list_commits
    from faultlab.backends.torch.trainer import TorchTrainer
    cfg, directory, run = golden_run
    assert run.checkpoints == [0, 2, 4, 6, 8]
    assert sorted(p.name for p in directory.iterdir()) == ["golden.ckpt", "golden.json"]
    assert [c.step for c in list_commits(directory / "golden.ckpt")] == [0, 2, 4, 6, 8]
    loaded = golden.load(cfg, directory)
    trainer = TorchTrainer(cfg)
    for step in range(cfg.total_steps):
        if step in loaded.checkpoints:
            got, want = loaded.state(step), trainer.get_state()
            assert list(got) == list(want)
            assert all(got[n].tobytes() == want[n].tobytes() and got[n].dtype == want[n].dtype
                       for n in want)
        trainer.train_step(step)
    assert loaded.checkpoint_before(5) == 4


def test_a_damaged_golden_checkpoint_is_a_one_line_error(golden_run, tmp_path):
    import shutil

    from faultlab.runner import golden as golden
    cfg, directory, _ = golden_run
    copy = tmp_path / "g"
    shutil.copytree(directory, copy)
    run = golden.load(cfg, copy)
    ckpt = copy / "golden.ckpt"
    from faultlab.checkpointing.recovery import list_commits, read_geometry
    from faultlab.checkpointing.storage import OSStorage
    st_ = OSStorage(ckpt)
    st_.open(write=False)
    geom = read_geometry(st_)
    st_.close()
    slot = next(c.slot for c in list_commits(ckpt) if c.step == 4)
    with open(ckpt, "r+b") as f:
        f.seek(geom.slot_offset(slot) + 10)
        b = f.read(1)
        f.seek(geom.slot_offset(slot) + 10)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(CheckpointError) as e:
        run.state(4)
    assert "\n" not in str(e.value) and "step 4" in str(e.value) and "damaged" in str(e.value)
    assert run.state(2)                                # the others are intact
    with pytest.raises(CheckpointError, match="no golden checkpoint of step 3"):
        run.state(3)
    ckpt.write_bytes(b"PK\x03\x04 a zip, say" * 1000)
    with pytest.raises(CheckpointError, match="not a faultlab checkpoint"):
        run.state(2)
