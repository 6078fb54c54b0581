"""The TensorFlow injectors: each site corrupts what it names and nothing else, on the
replica it names only, armed through variables (one trace for every fault). What every
backend shares is in tests/backends/test_backend_injectors.py."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from faultlab.errors import SpecError
from faultlab.faults import FaultSpec, PositionSpec, Site, ValueSpec
from _injector_checks import assert_replica_untouched, fault, same
from _tf_backend import InjectorHarness

from faultlab.backends.tf.injector import dilate

R, B = InjectorHarness.R, InjectorHarness.B


@pytest.fixture(scope="module")
def h():
    return InjectorHarness(batchnorm=True)   # with BatchNorm: its statistics are per replica


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
