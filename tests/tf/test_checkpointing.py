"""TensorFlow checkpointing: the TF adapter captures a Keras session exactly and restores it
into a fresh one (every replica's copy under MirroredStrategy), a run resumed from a
checkpoint ends bit-identical to an uninterrupted one, the tf-sync / tf-async checkpointers
round-trip, fall back past damaged checkpoints and fail in one line, and TF training
processes survive real SIGKILLs."""

from __future__ import annotations

import errno
import json
import os
import random

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from faultlab import cli
from faultlab.checkpointing import CheckpointEngine, recover
from faultlab.backends import load_backend
from faultlab.backends.tf.loops import keras_loop
from faultlab.checkpointing.api import Phase, open_checkpointer, recover_checkpoint, target_path
from faultlab.crash.points import KillPoint
from faultlab.crash.verdicts import same_state
from faultlab.backends.tf.adapter import TFCheckpointAdapter, _global_generator
from faultlab.errors import CheckpointError
from faultlab.backends.tf.variables import components as _components
from faultlab.testing.plugin import crash_lab  # noqa: F401  (the plugin's fixture)
from faultlab.backends.tf.trainer import select_strategy

TF_ENGINES = ["tf-sync", "tf-async"]


# -- a small Keras session -----------------------------------------------------------------------

class Session:
    """A Keras MLP with BatchNorm and dropout trained by Adam under `strategy` (R replicas),
    with input noise from a tf.random.Generator and batches from NumPy's global generator."""

    def __init__(self, strategy=None, width: int = 8):
        self.strategy = strategy or tf.distribute.get_strategy()
        self.replicas = self.strategy.num_replicas_in_sync
        keras.utils.set_random_seed(0)
        np.random.seed(1)
        random.seed(2)
        with self.strategy.scope():
            self.model = keras.Sequential([
                keras.Input((6,)), keras.layers.Dense(width), keras.layers.BatchNormalization(),
                keras.layers.Dropout(0.25), keras.layers.Dense(3)])
            self.opt = keras.optimizers.Adam(1e-2)        # built by the first step or restore
            self.noise = tf.random.Generator.from_seed(3)
        self.data = np.random.RandomState(4).standard_normal((64, 6)).astype(np.float32)
        self.adapter = TFCheckpointAdapter(self.model, self.opt, generators={"noise": self.noise})
        self._step = None

    def _train(self, x, y):
        def replica(x, y):
            x = x + 0.1 * self.noise.normal(tf.shape(x))
            tvars = self.model.trainable_variables
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                    labels=y, logits=self.model(x, training=True))) / self.replicas
            self.opt.apply_gradients(zip(tape.gradient(loss, tvars), tvars))
        self.strategy.run(replica, args=(x, y))

    def step(self) -> None:
        if self._step is None:
            self._step = tf.function(self._train)
        idx = np.random.randint(0, len(self.data), 8 * self.replicas)
        x, y = self.data[idx], (idx % 3).astype(np.int64)
        per = 8

        def shard(a):
            return self.strategy.experimental_distribute_values_from_function(
                lambda ctx: tf.constant(a[ctx.replica_id_in_sync_group * per:
                                          (ctx.replica_id_in_sync_group + 1) * per]))
        self._step(shard(x), shard(y))


def every_copy(model) -> list[bytes]:
    """The bits of every replica's copy of every variable."""
    return [c.numpy().tobytes() for v in model.variables for c in _components(v)]


# -- the adapter ---------------------------------------------------------------------------------

def test_adapter_for_tf_is_the_tensorflow_adapter():
    assert load_backend("tf").checkpoint_adapter() is TFCheckpointAdapter


@pytest.fixture(scope="module")
def mirrored():
    return select_strategy(2, "mirrored")


def test_a_resumed_keras_run_under_mirrored_strategy_ends_bit_identical(mirrored, tmp_path):
    """Train 6 steps on 2 replicas, checkpoint after 3 through the faultlab engine; a fresh
    session (new model, unbuilt optimizer, other Keras names) restores it and trains on: every
    variable, slot and generator state ends bit-identical to the uninterrupted run's."""
    straight = Session(mirrored)
    with CheckpointEngine(tmp_path / "run.ckpt", max_in_flight=2, keep=2) as engine:
        for k in range(6):
            straight.step()
            if k == 2:
                straight.adapter.save(engine, 3, data_position={"epoch": 0, "batch": 3})
    final, final_meta = straight.adapter.capture(6)
    assert any(k.endswith("moving_mean") for k in final) and "generator/noise" in final
    assert int(final["optimizer/0000"]) == 6                      # Adam's iteration count

    resumed = Session(mirrored)
    for v in resumed.model.weights:                               # replica 1 diverged
        _components(v)[1].assign(tf.fill(v.shape, 7.0))
    assert not resumed.opt.built
    got = resumed.adapter.resume(lambda: recover(tmp_path / "run.ckpt"))
    assert got == (3, {"epoch": 0, "batch": 3}, {})
    assert not any(np.all(c.numpy() == 7.0) for v in resumed.model.weights
                   for c in _components(v))                     # every copy was restored
    for _ in range(3):
        resumed.step()
    state, meta = resumed.adapter.capture(6)
    assert same_state(state, final) == [] and meta == final_meta
    # BatchNorm's moving statistics differ between the replicas (each updates them from its
    # own shard): the diverged copies were saved and restored too
    assert any(k.startswith("replica1/") and k.endswith("moving_mean") for k in final)
    assert every_copy(resumed.model) == every_copy(straight.model)


def test_without_the_noise_generator_the_resumed_run_differs(mirrored):
    """The check above can fail: leave one generator out of the adapter and the bits differ."""
    a = Session(mirrored)
    a.step()
    state, meta = a.adapter.capture(1)
    a.step()
    b = Session(mirrored)
    b.adapter = TFCheckpointAdapter(b.model, b.opt)
    b.adapter.restore({k: v for k, v in state.items() if k != "generator/noise"},
                      dict(meta, generators={}))
    b.step()
    diff = same_state(b.adapter.capture(2)[0], TFCheckpointAdapter(a.model, a.opt).capture(2)[0])
    assert any(k.startswith("model/") for k in diff)


def test_a_capture_is_a_snapshot_that_training_does_not_change():
    s = Session()
    s.step()
    state, _ = s.adapter.capture(1)
    before = {k: v.copy() for k, v in state.items()}
    s.step()
    assert same_state(state, before) == []


DTYPES = ["float32", "float16", "bfloat16", "float64", "int32", "int64", "uint8", "bool"]


class Holder:
    """Anything with `.variables` is a model to the adapter."""

    def __init__(self, specs, fill=None):
        self.variables = [tf.Variable(fill(d, shape) if fill else tf.zeros(shape, d),
                                      name=f"v{i}") for i, (d, shape) in enumerate(specs)]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(st.tuples(st.sampled_from(DTYPES),
                                st.lists(st.integers(0, 3), max_size=3).map(tuple)),
                      min_size=1, max_size=5),
       seed=st.integers(0, 2**32 - 1), extra=st.dictionaries(st.text(max_size=3),
                                                             st.integers() | st.text(max_size=3),
                                                             max_size=2))
def test_any_variables_round_trip_bit_exact(specs, seed, extra):
    rng = np.random.default_rng(seed)

    def fill(dtype, shape):          # random bit patterns: NaN payloads, subnormals, -0
        width = tf.as_dtype(dtype).size
        bits = rng.integers(0, 256, size=(*shape, width), dtype=np.uint8)
        if dtype == "bool":
            return tf.constant(bits[..., 0] & 1, tf.uint8) > 0
        return tf.bitcast(tf.constant(bits), tf.as_dtype(dtype)) if width > 1 \
            else tf.bitcast(tf.constant(bits[..., 0]), tf.as_dtype(dtype))

    src = Holder(specs, fill)
    state, meta = TFCheckpointAdapter(src, rng=False).capture(9, extra=extra)
    dst = Holder(specs)
    assert TFCheckpointAdapter(dst, rng=False).restore(state, meta) == (9, None, extra)
    for a, b in zip(src.variables, dst.variables):
        width = a.dtype.size
        bits = {1: tf.uint8, 2: tf.uint16, 4: tf.uint32, 8: tf.uint64}[width]
        if a.dtype == tf.bool:
            assert np.array_equal(a.numpy(), b.numpy())
        else:
            assert np.array_equal(tf.bitcast(a, bits).numpy(), tf.bitcast(b, bits).numpy())


def test_generators_python_numpy_and_the_global_tf_generator_are_restored():
    prev = _global_generator()
    tf.random.set_global_generator(tf.random.Generator.from_seed(11))
    try:
        gens = {"tf": tf.random.Generator.from_seed(1), "keras": keras.random.SeedGenerator(2),
                "np": np.random.default_rng(3), "rs": np.random.RandomState(4),
                "py": random.Random(5)}
        adapter = TFCheckpointAdapter(generators=gens)
        state, meta = adapter.capture(0, data_position=[1, 2])

        def draw():
            return (gens["tf"].normal([3]).numpy().tolist(),
                    keras.random.normal([2], seed=gens["keras"]).numpy().tolist(),
                    gens["np"].random(), gens["rs"].rand(), gens["py"].random(),
                    tf.random.get_global_generator().uniform([2]).numpy().tolist(),
                    random.random(), np.random.rand())

        first = draw()
        assert adapter.restore(state, meta).data_position == [1, 2]
        assert draw() == first
    finally:                                     # leave the process as it was
        from tensorflow.python.ops import stateful_random_ops
        stateful_random_ops.global_generator = prev


def test_a_checkpoint_of_another_model_is_refused_in_one_line_before_anything_changes():
    s = Session(width=8)
    s.step()
    state, meta = s.adapter.capture(1)
    other = Session(width=5)
    other.step()
    before, _ = other.adapter.capture(1)
    with pytest.raises(CheckpointError) as e:
        other.adapter.restore(state, meta)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("checkpoint does not fit model")
    assert "model/0000/kernel: checkpoint float32[6, 8], model float32[6, 5]" in msg
    assert same_state(other.adapter.capture(1)[0], before) == []

    missing = {k: v for k, v in state.items() if k != "model/0004/moving_mean"}
    with pytest.raises(CheckpointError, match="model/0004/moving_mean is not in the checkpoint"):
        Session().adapter.restore(missing, meta)
    with pytest.raises(CheckpointError, match="holds a torch adapter state"):
        s.adapter.restore(state, dict(meta, framework="torch"))
    with pytest.raises(CheckpointError, match="no state of generator 'noise'"):
        s.adapter.restore(state, dict(meta, generators={}))
    with pytest.raises(CheckpointError, match="not written by a faultlab adapter"):
        s.adapter.restore(state, {"step": 1})


# -- tf-sync and tf-async ----------------------------------------------------------------------

SPECS = {"w": ("<f4", (20, 7)), "opt/m": ("<f8", (33,)), "big_endian": (">f8", (4,)),
         "words": ("<U3", (2,)), "empty": ("<i2", (0, 3)), "u64": ("<u8", (6,))}


def state_for(step: int) -> dict[str, np.ndarray]:
    """Arrays of every kind the TF baselines must carry: native, big-endian, strings, empty."""
    rng = np.random.default_rng(step)
    out = {name: np.frombuffer(rng.bytes(int(np.prod(shape)) * np.dtype(dt).itemsize), dt)
           .reshape(shape) for name, (dt, shape) in SPECS.items() if dt != "<U3"}
    out["words"] = np.array([f"s{step}", "abc"])
    out["flags"] = rng.random(5) > 0.5
    return out


def assert_same(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].tobytes() == want[k].tobytes(), k


@pytest.mark.parametrize("name", TF_ENGINES)
def test_tf_checkpointers_round_trip_keep_two_and_report_phases(tmp_path, name):
    events = []
    ckpt = open_checkpointer(name, tmp_path, keep=2,
                             phase_hook=lambda phase, point, step: events.append((phase, point)))
    handles = [ckpt.save(step, state_for(step), {"step": step}) for step in range(1, 5)]
    ckpt.wait_all()
    assert all(h.done() and h.error is None for h in handles) and ckpt.in_flight == 0
    ckpt.close()
    step, state, meta = recover_checkpoint(name, tmp_path)
    assert (step, meta) == (4, {"step": 4})
    assert_same(state, state_for(4))
    index = sorted(p.name for p in target_path(name, tmp_path).glob("ckpt-*.index"))
    assert index == ["ckpt-3.index", "ckpt-4.index"]
    assert {("staging", "assign"), ("writing", "serialize"), ("committing", "fsync"),
            ("committing", "dir-fsync")} <= set(events)


@settings(max_examples=12, deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(TF_ENGINES),
       shapes=st.lists(st.lists(st.integers(0, 4), max_size=3), min_size=1, max_size=4),
       dtype=st.sampled_from(["<f4", ">i4", "<c8", "|u1", "?", "<U3", "<u2"]))
def test_any_state_round_trips_through_tf_bit_exact(tmp_path_factory, name, shapes, dtype):
    rng = np.random.default_rng(len(shapes))
    arrays = {f"a{i}": np.frombuffer(rng.bytes(int(np.prod(s, dtype=int)) * np.dtype(dtype)
                                               .itemsize), dtype=dtype).reshape(s)
              for i, s in enumerate(shapes)}
    directory = tmp_path_factory.mktemp(name)
    with open_checkpointer(name, directory) as ckpt:
        ckpt.save(5, arrays, {"k": [1, 2]}).wait()
    step, state, meta = recover_checkpoint(name, directory)
    assert step == 5 and meta == {"k": [1, 2]}
    assert_same(state, arrays)


@pytest.mark.parametrize("name", TF_ENGINES)
def test_a_damaged_tf_checkpoint_falls_back_to_the_one_before(tmp_path, name):
    with open_checkpointer(name, tmp_path, keep=2) as ckpt:
        for step in (1, 2):
            ckpt.save(step, state_for(step)).wait()
    d = target_path(name, tmp_path)
    data = d / "ckpt-2.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x40                       # one bit: TF's per-tensor CRC32C catches it
    data.write_bytes(bytes(raw))
    step, state, _ = recover_checkpoint(name, tmp_path)
    assert step == 1
    assert_same(state, state_for(1))
    (d / "ckpt-1.index").write_bytes((d / "ckpt-1.index").read_bytes()[:40])     # torn index
    with pytest.raises(CheckpointError) as e:
        recover_checkpoint(name, tmp_path)
    assert "\n" not in str(e.value) and "no valid checkpoint" in str(e.value)
    with pytest.raises(CheckpointError, match="no committed checkpoint"):
        recover_checkpoint(name, tmp_path / "elsewhere")


@pytest.mark.parametrize("name", TF_ENGINES)
def test_an_fsync_failure_is_one_line_and_keeps_earlier_checkpoints(tmp_path, name,
                                                                     monkeypatch):
    ckpt = open_checkpointer(name, tmp_path)
    ckpt.save(1, state_for(1)).wait()

    def failing(fd):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(CheckpointError) as e:
        ckpt.save(2, state_for(2)).wait()
        ckpt.wait_all()
    assert "I/O error" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.undo()
    if name == "tf-async":                 # like checkfreq: a failed background write stops it
        with pytest.raises(CheckpointError, match="stopped after an earlier error"):
            ckpt.save(3, state_for(3))
    assert recover_checkpoint(name, tmp_path).step in (1, 2)


# -- real SIGKILLs of TF training processes ------------------------------------------------------

def test_a_keras_loop_killed_mid_write_of_tf_async_resumes_bit_identical(crash_lab):
    """One kill, held inside TF's async writing thread, then a run to the end (each training
    process imports TF after the fork: seconds, not milliseconds)."""
    result = crash_lab.run(keras_loop, kills=[KillPoint(Phase.WRITING, 3)], engine="tf-async",
                           steps=6)
    assert [k.where for k in result.kills] == ["writing/serialize"]
    result.assert_ok()


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["tf-sync", "tf-async", "faultlab"])
def test_kill_campaigns_of_a_keras_loop_lose_nothing(crash_lab, engine):
    report = crash_lab.campaign(keras_loop, steps=10).campaign(engine, 8, seed=4)
    assert report.kills >= 8 and report.ok, report.problems[:5]


def test_crash_defaults_to_the_keras_loop_for_tf_engines(capsys, tmp_path):
    rc = cli.main(["crash", "--engine", "tf-sync", "--power-loss", "--json", "--no-results"])
    out = capsys.readouterr().out
    doc = json.loads(out)
    assert rc == 0 and doc["workload"] == "keras-mlp"
    assert doc["engines"][0]["note"].startswith("not modeled")


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**16), diverged=st.lists(st.booleans(), min_size=3, max_size=3))
def test_bulk_variable_io_reads_and_assigns_every_replicas_copy(mirrored, seed, diverged):
    """VariableSet: one traced read and one traced assign of every replica's copy of
    variables of several dtypes and shapes, each replica's own values where given."""
    from faultlab.backends.tf.variables import VariableSet
    rng = np.random.default_rng(seed)
    with mirrored.scope():
        variables = [tf.Variable(np.zeros((3, 5), np.float32)), tf.Variable(np.int64(0)),
                     tf.Variable(np.zeros(7, np.float64))]
    vs = VariableSet(variables)
    assert [len(c) for c in vs.copies] == [2, 2, 2]
    values = []
    for v, d in zip(variables, diverged):
        base = rng.normal(size=v.shape).astype(v.dtype.as_numpy_dtype)
        other = (base + 1).astype(base.dtype) if d else base
        values.append([base, other])
    vs.assign(values)
    got = vs.read()
    for v, want, have, copies in zip(variables, values, got, vs.copies):
        for r in range(2):
            assert have[r].tobytes() == np.asarray(want[r]).tobytes()
            assert copies[r].numpy().tobytes() == np.asarray(want[r]).tobytes()


def test_a_borrowed_save_keeps_its_step_while_training_updates_the_variables(mirrored):
    """The TF adapter hands the engine its snapshots uncopied (a borrowed save); with the
    engine's writers held at a gate, two more training steps update every variable: the
    checkpoint still holds the step it was taken at, bit for bit."""
    import threading

    from ckpt_helpers import HookedDisk, assert_same_state
    gate = threading.Event()

    def before_write(offset, data):
        if threading.current_thread().name.startswith("ckpt-writer"):
            gate.wait()
    s = Session(mirrored)
    s.step()
    s.step()
    expected = {k: np.array(v) for k, v in s.adapter.capture(2)[0].items()}
    with CheckpointEngine(HookedDisk(block_size=512, before_write=before_write),
                          chunk_bytes=1024) as engine:
        handle = s.adapter.save(engine, 2)
        s.step()
        s.step()
        moved = s.adapter.capture(4)[0]
        assert any(moved[k].tobytes() != expected[k].tobytes() for k in expected)
        gate.set()
        handle.wait()
        assert_same_state(engine.load_latest().state, expected)
