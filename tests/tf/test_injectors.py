"""The TensorFlow injectors: each site corrupts what it names and nothing else, on the
replica it names only, armed through variables (one trace for every fault). What every
backend shares is in tests/backends/test_backend_injectors.py."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import keras

from faultlab.errors import SpecError
from faultlab.faults import Duration, FaultSpec, PositionSpec, Site, ValueSpec
from faultlab.backends.tf.injector import TFInjector, dilate
from faultlab.keras import cpu_devices
from faultlab.backends.tf.models import OnePassBatchNorm

R, B = 2, 3


def _model():
    inp = keras.Input((8, 8, 2))
    c1 = keras.layers.Conv2D(4, 3, 2, padding="same", use_bias=False, name="conv")(inp)
    a1 = keras.layers.ReLU()(OnePassBatchNorm(name="bn")(c1))
    c2 = keras.layers.Conv2D(4, 3, 1, padding="same", name="conv2")(a1)
    logits = keras.layers.Dense(5, name="dense")(keras.layers.Flatten()(c2))
    return keras.Model(inp, [c1, a1, c2, logits])


class Harness:
    """A 2-replica MirroredStrategy step that returns each replica's activations, gradients
    (after weight-gradient faults) and input gradient."""

    def __init__(self):
        self.strategy = tf.distribute.MirroredStrategy(cpu_devices(R))
        keras.utils.set_random_seed(3)
        with self.strategy.scope():
            self.model = _model()
        self.inj = TFInjector(self.model, self.strategy, None,
                              tf.TensorSpec((B, 8, 8, 2), tf.float32))
        self.tvars = self.model.trainable_variables
        rng = np.random.default_rng(0)
        self.x = rng.normal(size=(R * B, 8, 8, 2)).astype(np.float32)
        self.y = rng.integers(0, 5, size=R * B)
        model, inj, tvars = self.model, self.inj, self.tvars

        def replica_fn(x, y):
            with inj.replica():
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    c1, a1, c2, logits = model(x, training=True)
                    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                        labels=y, logits=logits))
                grads = tape.gradient(loss, list(tvars) + [x])
                gv = inj.corrupt_gradients(grads[:-1], tvars)
            return c1, a1, c2, logits, gv, grads[-1]

        @tf.function(autograph=False)
        def step(x, y):
            return self.strategy.run(replica_fn, args=(x, y))
        self.step = step

    def _dist(self, a):
        return self.strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(a[ctx.replica_id_in_sync_group * B:
                                      (ctx.replica_id_in_sync_group + 1) * B]))

    def run(self, faults=(), step=0):
        self.inj.arm(faults, step)
        out = self.step(self._dist(self.x), self._dist(self.y))
        self.inj.disarm()
        local = [self.strategy.experimental_local_results(o) for o in out[:4]]
        grads = [self.strategy.experimental_local_results(g) for g in out[4]]
        dx = self.strategy.experimental_local_results(out[5])
        names = [v.path for v in self.tvars]
        res = []
        for r in range(R):
            res.append({"c1": local[0][r].numpy(), "a1": local[1][r].numpy(),
                        "c2": local[2][r].numpy(), "logits": local[3][r].numpy(),
                        "g": {n: g[r].numpy() for n, g in zip(names, grads)},
                        "dx": dx[r].numpy()})
        return res


@pytest.fixture(scope="module")
def h():
    return Harness()


def fault(site, layer, pos, value=1e3, replica=1, tensor=None, model="set", **kw):
    vs = ValueSpec(model, values=(value,), **kw) if model == "set" else ValueSpec(model, **kw)
    return FaultSpec(site=site, layer=layer, value=vs,
                     positions=PositionSpec("explicit", indices=(pos,)), replica=replica,
                     tensor=tensor, step=0)


def same(a, b) -> bool:
    return np.asarray(a).tobytes() == np.asarray(b).tobytes()


def assert_replica_untouched(clean, hit, r):
    for k in ("c1", "a1", "c2", "logits", "dx"):
        assert same(clean[r][k], hit[r][k]), f"replica {r}: {k} changed"
    for n in clean[r]["g"]:
        assert same(clean[r]["g"][n], hit[r]["g"][n]), f"replica {r}: gradient {n} changed"


def test_idle_points_change_nothing_and_runs_repeat_bit_for_bit(h):
    a, b = h.run(), h.run()
    for r in range(R):
        assert_replica_untouched(a, b, r)


def test_forward_output_fault_sets_the_element_on_its_replica_only(h):
    clean = h.run()
    hit = h.run([fault(Site.FWD_OUTPUT, "conv", (2, 1, 3, 2), 7.5)])
    want = clean[1]["c1"].copy()
    want[2, 1, 3, 2] = 7.5
    assert same(hit[1]["c1"], want)
    assert not same(hit[1]["logits"], clean[1]["logits"])
    assert_replica_untouched(clean, hit, 0)


def test_forward_input_fault_corrupts_the_operand_of_this_call_only(h):
    clean = h.run()
    hit = h.run([fault(Site.FWD_INPUT, "conv2", (1, 2, 2, 3), -4.0)])
    assert same(hit[1]["a1"], clean[1]["a1"])     # the stored activation is untouched
    operand = clean[1]["a1"].copy()
    operand[1, 2, 2, 3] = -4.0
    layer = h.model.get_layer("conv2")
    want = (tf.nn.conv2d(operand, layer.kernel.numpy(), 1, "SAME") + layer.bias.numpy()).numpy()
    np.testing.assert_allclose(hit[1]["c2"], want, rtol=1e-5, atol=1e-6)
    assert_replica_untouched(clean, hit, 0)


def test_forward_weight_fault_is_this_call_only_and_keeps_the_variable(h):
    layer = h.model.get_layer("conv2")
    before = layer.kernel.numpy()
    clean = h.run()
    hit = h.run([fault(Site.FWD_WEIGHT, "conv2", (1, 1, 2, 0), 3.0)])
    assert same(layer.kernel.numpy(), before)
    w = before.copy()
    w[1, 1, 2, 0] = 3.0
    want = (tf.nn.conv2d(clean[1]["a1"], w, 1, "SAME") + layer.bias.numpy()).numpy()
    np.testing.assert_allclose(hit[1]["c2"], want, rtol=1e-5, atol=1e-6)
    assert_replica_untouched(clean, hit, 0)
    again = h.run()
    assert same(again[1]["c2"], clean[1]["c2"])


def test_grad_out_fault_reaches_the_weight_and_input_gradients(h):
    clean = h.run()
    hit = h.run([fault(Site.GRAD_OUT, "conv2", (0, 1, 1, 1), 1e4)])
    assert not same(hit[1]["g"]["conv2/kernel"], clean[1]["g"]["conv2/kernel"])
    assert not same(hit[1]["g"]["conv/kernel"], clean[1]["g"]["conv/kernel"])
    assert same(hit[1]["g"]["dense/kernel"], clean[1]["g"]["dense/kernel"])
    assert_replica_untouched(clean, hit, 0)


def test_backward_recomputation_equals_autodiff_when_the_operand_is_intact(h):
    """bwd_input armed with a factor-1 scale: the artifact's recomputation (dilated gradient,
    full convolution) runs and must give autodiff's input gradient."""
    clean = h.run()
    for layer, pos in (("conv", (0, 3, 3, 0)), ("conv2", (1, 2, 2, 1)), ("dense", (1, 2))):
        hit = h.run([fault(Site.BWD_INPUT, layer, pos, model="scale", factor=1.0)])
        if layer == "conv":
            np.testing.assert_allclose(hit[1]["dx"], clean[1]["dx"], rtol=1e-5, atol=1e-7)
        for n in clean[1]["g"]:
            np.testing.assert_allclose(hit[1]["g"][n], clean[1]["g"][n], rtol=1e-4, atol=1e-7)
        assert_replica_untouched(clean, hit, 0)


def test_bwd_weight_fault_recomputes_grad_in_with_the_corrupted_kernel(h):
    clean = h.run()
    hit = h.run([fault(Site.BWD_WEIGHT, "dense", (5, 2), 100.0)])
    assert same(hit[1]["g"]["dense/kernel"], clean[1]["g"]["dense/kernel"])
    assert not same(hit[1]["g"]["conv2/kernel"], clean[1]["g"]["conv2/kernel"])
    assert_replica_untouched(clean, hit, 0)


def test_two_faults_in_one_step_and_a_fault_on_replica_zero(h):
    clean = h.run()
    hit = h.run([fault(Site.FWD_OUTPUT, "conv", (0, 0, 0, 0), 1.0, replica=0),
                 fault(Site.FWD_OUTPUT, "conv", (0, 0, 0, 1), 2.0, replica=0),
                 fault(Site.GRAD_WT, "conv2", (0, 0, 0, 0), 3.0, replica=0)])
    assert hit[0]["c1"][0, 0, 0, 0] == 1.0 and hit[0]["c1"][0, 0, 0, 1] == 2.0
    assert hit[0]["g"]["conv2/kernel"][0, 0, 0, 0] == 3.0
    assert_replica_untouched(clean, hit, 1)


def test_arming_faults_never_retraces(h):
    h.run([fault(Site.FWD_OUTPUT, "dense", (0, 1), model="bitflip", bit=3)])
    h.run([fault(Site.FWD_INPUT, "bn", (0, 0, 0, 0), model="random")])
    assert h.step.experimental_get_tracing_count() == 1


def test_bad_faults_are_spec_errors(h):
    with pytest.raises(SpecError):
        h.inj.arm([fault(Site.FWD_OUTPUT, "nope", (0, 0))], 0)
    with pytest.raises(SpecError):
        h.inj.arm([fault(Site.BWD_INPUT, "bn", (0, 0, 0, 0))], 0)
    with pytest.raises(SpecError):  # no optimizer given to this injector
        h.inj.arm([FaultSpec(site=Site.OPT_STATE, layer="dense", value=ValueSpec("zero"),
                             positions=PositionSpec(), tensor="m")], 0)
    with pytest.raises(SpecError):
        h.inj.arm([fault(Site.FWD_OUTPUT, "conv", (9, 0, 0, 0))], 0)
    h.inj.disarm()


def test_dilation_is_exact_data_movement():
    g = tf.constant(np.arange(2 * 3 * 3 * 1, dtype=np.float32).reshape(2, 3, 3, 1) + 1e-40)
    d = dilate(g, (2, 2), (6, 6)).numpy()
    assert d.shape == (2, 6, 6, 1)
    assert same(d[:, ::2, ::2], g.numpy()) and not d[:, 1::2].any() and not d[:, :, 1::2].any()
