"""faultlab.keras.Protector on a custom Keras 3 training loop the user keeps, under
MirroredStrategy with 2 CPU replicas (issue 12, item 4: "The same for Keras").

A small Dense model with dropout and Adam, trained by the usual tf.function + strategy.run
loop: a transient NaN injected into one replica's weight gradient (faultlab.keras.Injector,
``corrupt_gradients``) is detected in the step it strikes, rolled back, replayed, and training
ends bit-identical to the fault-free run; a protected clean run (both forms: run(steps) and
step(step, batch)) is bit-identical to the unprotected loop; a permanent fault is not
transient and the policy stops; misuse is a one-line SpecError when the protector is built.
(tests/tf/conftest.py gives TensorFlow 8 logical CPU devices before it starts.)"""

from __future__ import annotations

import math

import numpy as np
import pytest

import faultlab
import faultlab.keras as fk
from faultlab.errors import SpecError

tf = pytest.importorskip("tensorflow")
import keras  # noqa: E402

from faultlab.backends.tf.variables import components  # noqa: E402

pytestmark = pytest.mark.framework("tf")

R, B, N_STEPS, EVERY = 2, 8, 12, 4
X = np.random.default_rng(0).standard_normal((96, 8)).astype(np.float32)
Y = (np.abs(X[:, 0] * 3).astype(np.int64) % 3)


def build(injector: bool = False):
    """The user's code: model, optimizer and step under MirroredStrategy(2 CPUs)."""
    strategy = tf.distribute.MirroredStrategy(fk.cpu_devices(R))
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, "relu", name="hidden"),
                                  keras.layers.Dropout(0.25, seed=3),
                                  keras.layers.Dense(3, name="out")])
        optimizer = keras.optimizers.Adam(1e-2)
        optimizer.build(model.trainable_variables)
    inj = fk.Injector(model, strategy, optimizer, input_spec=tf.TensorSpec((B, 8))) \
        if injector else None
    tvars = model.trainable_variables

    @tf.function
    def train_step(x, y):
        def replica_fn(x, y):
            with tf.GradientTape() as tape:
                logits = model(x, training=True)
                loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                    labels=y, logits=logits)) / strategy.num_replicas_in_sync
            grads = tape.gradient(loss, tvars)
            if inj is not None:
                grads = inj.corrupt_gradients(grads, tvars)
            optimizer.apply_gradients(zip(grads, tvars))
            return loss

        def injected(x, y):
            with inj.replica():
                return replica_fn(x, y)
        return strategy.run(injected if inj is not None else replica_fn, args=(x, y))

    def batch_fn(step):
        i = (step * R * B) % len(X)
        x, y = X[i:i + R * B], Y[i:i + R * B]
        return tuple(strategy.experimental_distribute_values_from_function(
            lambda ctx, a=a: tf.constant(a[ctx.replica_id_in_sync_group * B:
                                           (ctx.replica_id_in_sync_group + 1) * B]))
            for a in (x, y))

    def step_fn(batch):
        return train_step(*batch)
    return model, optimizer, strategy, inj, step_fn, batch_fn


def state(model, optimizer) -> list[bytes]:
    """Every replica's copy of every model and optimizer variable, as bytes."""
    return [np.asarray(c.read_value()).tobytes()
            for v in (*model.variables, *optimizer.variables) for c in components(v)]


def nan_grad(step=7, replica=1, **kw):
    return fk.fault("grad_wt", "hidden", replica=replica, step=step, value="nan",
                    positions=[(2, 3)], **kw)


def protected(faults=(), **kw):
    model, optimizer, strategy, inj, step_fn, batch_fn = build(injector=True)
    with fk.Protector(model, optimizer, step_fn, batches=batch_fn, every=EVERY,
                      strategy=strategy, injector=inj, faults=faults, **kw) as prot:
        report = prot.run(N_STEPS)
    return state(model, optimizer), report


def test_transient_nan_gradient_is_detected_rolled_back_and_bit_identical():
    clean, clean_report = protected()
    assert not clean_report.detections and clean_report.steps == N_STEPS
    hit, report = protected([nan_grad(step=7)])
    assert len(report.detections) == 1, str(report)
    d = report.detections[0]
    assert (d.step, d.detector, d.rollback_to, d.transient, d.action) == \
        (7, "nonfinite", 4, True, "recovered"), str(report)
    assert d.steps_replayed == 4 and report.recovered and report.steps == N_STEPS
    assert report.losses == clean_report.losses
    assert all(math.isfinite(x) for x in report.losses)
    assert hit == clean                    # bit-identical, every replica's copy


def test_permanent_fault_is_not_transient_and_stops():
    _, report = protected([nan_grad(step=6, duration="permanent")])
    d = report.detections[0]
    assert (d.step, d.transient, d.action) == (6, False, "stopped")
    assert report.stopped_at == 6 and report.steps == 6 and d.attempts == 2, str(report)


def test_clean_protected_run_is_bit_identical_to_the_unprotected_loop():
    model, optimizer, _, _, step_fn, batch_fn = build()
    losses = []
    for s in range(N_STEPS):                           # the user's loop, unprotected
        per = step_fn(batch_fn(s))
        losses.append(sum(float(t) for t in per.values))
    plain = state(model, optimizer)

    model, optimizer, strategy, _, step_fn, batch_fn = build()
    prot = fk.Protector(model, optimizer, step_fn, every=EVERY, strategy=strategy)
    for s in range(N_STEPS):                           # the same loop, protected (step form)
        assert prot.step(s, batch_fn(s))
    prot.close()
    assert state(model, optimizer) == plain
    assert prot.report.losses == losses and not prot.report.detections
    assert prot.report.replay_differs == []
    # the optimizer has its own all-reduce back
    assert "_all_reduce_sum_gradients" not in vars(optimizer)


def test_misuse_is_a_one_line_error_at_construction():
    model, optimizer, strategy, inj, step_fn, batch_fn = build(injector=True)
    om, oopt, ostrat = build()[:3]

    def err(*args, **kw):
        kw.setdefault("strategy", strategy)
        with pytest.raises(SpecError) as e:
            fk.Protector(*args, **kw)
        msg = str(e.value)
        assert "\n" not in msg and msg
        return msg

    assert "keras.Model" in err(object(), optimizer, step_fn)
    assert "Optimizer" in err(model, "adam", step_fn)
    assert "step_fn" in err(model, optimizer, 3)
    assert "every" in err(model, optimizer, step_fn, every=0)
    assert "policies" in err(model, optimizer, step_fn, policy="pray")
    assert "thresholds" in err(model, optimizer, step_fn, zz=3)
    assert "one-shot" in err(model, optimizer, step_fn, batches=iter([1, 2]))
    assert "injector" in err(model, optimizer, step_fn, faults=[nan_grad()])
    assert "hidden" in err(model, optimizer, step_fn, injector=inj,
                           faults=[faultlab.fault("grad_wt", "hiden", step=1)])
    assert "replica" in err(model, optimizer, step_fn, injector=inj,
                            faults=[nan_grad(replica=5)])
    assert "strategy" in err(model, optimizer, step_fn,
                             strategy=tf.distribute.get_strategy())
    assert "strategy" in err(model, optimizer, step_fn, strategy="mirrored")
    assert "this model" in err(om, oopt, step_fn, injector=inj, strategy=ostrat)
    assert "optimizer" in err(om, optimizer, step_fn, strategy=ostrat)
    step_fn(batch_fn(0))         # the user's tf.function, traced before the Protector: its
    prot = fk.Protector(model, optimizer, step_fn, batches=batch_fn, strategy=strategy)
    with pytest.raises(SpecError, match="traced before the Protector was built"):
        prot.run(1)              # first step says so (the gradient norm is not in its graph)
    prot.close()
    traced = tf.function(lambda batch: tf.constant(0.0))
    traced(1.0)                                          # traced before the Protector
    assert "traced" in err(model, optimizer, traced)


def test_step_form_without_a_strategy_restores_extra_state_and_recovers():
    """No strategy (the default one), the user's own `for` loop calling prot.step, carried
    state in `extra` (a number, an array, a tensor, a variable): a transient NaN gradient is
    rolled back from the kept batches and everything ends bit-identical."""
    def run(faults):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, "relu", name="h"),
                                  keras.layers.Dense(3, name="out")])
        optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
        inj = fk.Injector(model, None, optimizer, input_spec=tf.TensorSpec((B, 8)))
        extra = {"count": 0, "ema": np.zeros(3), "t": tf.zeros(2), "v": tf.Variable(0.0)}

        @tf.function
        def train_step(x, y):
            with inj.replica():
                with tf.GradientTape() as tape:
                    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                        labels=y, logits=model(x, training=True)))
                grads = inj.corrupt_gradients(tape.gradient(loss, model.trainable_variables),
                                              model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        def step_fn(batch):
            loss = train_step(*batch)
            extra["count"] += 1
            extra["ema"] = extra["ema"] * 0.9 + float(loss)
            extra["t"] = extra["t"] + loss
            extra["v"].assign_add(loss)
            return loss
        with fk.Protector(model, optimizer, step_fn, every=3, injector=inj, faults=faults,
                          extra=extra) as prot:
            for s in range(10):
                i = (s * B) % len(X)
                assert prot.step(s, (tf.constant(X[i:i + B]), tf.constant(Y[i:i + B])))
        return state(model, optimizer), extra, prot.report

    clean, e0, _ = run([])
    hit, e1, report = run([fk.fault("grad_wt", "out", step=7, value="nan",
                                    positions=[(1, 1)])])
    d, = report.detections
    assert (d.step, d.rollback_to, d.transient, d.steps_replayed) == (7, 6, True, 2)
    assert hit == clean and e1["count"] == e0["count"] == 10
    assert np.array_equal(e1["ema"], e0["ema"]) and np.array_equal(e1["t"], e0["t"])
    assert e1["v"].numpy() == e0["v"].numpy() and isinstance(e1["t"], tf.Tensor)
