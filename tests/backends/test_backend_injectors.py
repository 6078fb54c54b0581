"""Every backend's injector hits what a fault site names, on the replica it names only.

The network is the same in each backend (conv 3x3 stride 2 'same' without bias -> ReLU ->
conv2 3x3 'same' -> dense), run as two replicas of three samples each; the harness returns
each replica's activations, gradients and input gradient in the canonical layout, so one
fault position means the same element everywhere. Framework-only injector tests (torch's
layout mapping and hook removal, TF's one trace for every fault) stay beside their
frameworks."""

from __future__ import annotations

import numpy as np
import pytest

from _injector_checks import assert_replica_untouched, fault, same

from faultlab.faults import Site


@pytest.fixture(scope="session")
def h(backend):
    return backend.InjectorHarness()


def test_grad_wt_fault_changes_only_that_gradient_entry(h):
    clean = h.run()
    for layer, pos, value in (("dense", (17, 3), 5.0), ("conv", (0, 1, 1, 3), 9.0)):
        hit = h.run([fault(Site.GRAD_WT, layer, pos, value)])
        name = f"{layer}/kernel"
        g0, g1 = clean[1]["g"][name], hit[1]["g"][name]
        assert np.argwhere(g0 != g1).tolist() == [list(pos)] and g1[pos] == value
        for n in clean[1]["g"]:
            if n != name:
                assert same(hit[1]["g"][n], clean[1]["g"][n]), f"gradient {n} changed"
        assert_replica_untouched(clean, hit, 0)
    bias = h.run([fault(Site.GRAD_WT, "dense", (4,), 6.0, tensor="bias")])
    assert bias[1]["g"]["dense/bias"][4] == 6.0
    assert same(bias[1]["g"]["dense/kernel"], clean[1]["g"]["dense/kernel"])
    assert_replica_untouched(clean, bias, 0)


def test_grad_in_fault_spares_the_layers_own_weight_gradient(h):
    clean = h.run()
    live = tuple(int(i) for i in np.argwhere(clean[1]["a1"] > 0)[0])  # ReLU passes it on
    hit = h.run([fault(Site.GRAD_IN, "conv2", live, 1e4)])
    assert same(hit[1]["g"]["conv2/kernel"], clean[1]["g"]["conv2/kernel"])
    assert not same(hit[1]["g"]["conv/kernel"], clean[1]["g"]["conv/kernel"])
    assert_replica_untouched(clean, hit, 0)
    # on the first layer, grad_in is the gradient of the network's input
    first = h.run([fault(Site.GRAD_IN, "conv", (2, 7, 7, 1), -2.0)])
    want = clean[1]["dx"].copy()
    want[2, 7, 7, 1] = -2.0
    assert same(first[1]["dx"], want)
    assert_replica_untouched(clean, first, 0)


def test_bwd_input_fault_at_a_dilation_zero_fans_out_into_grad_in_only(h):
    """ISCA's inj_slow_degrade: conv has stride 2, so odd positions of its 8x8 backward INPUT
    operand (the dilated output gradient) are the zeros of the dilation. A value there still
    reaches the input gradient through the kernel, while the layer's own weight gradient is
    computed from clean operands."""
    clean = h.run()
    hit = h.run([fault(Site.BWD_INPUT, "conv", (1, 3, 5, 2), 10.0)])
    assert same(hit[1]["g"]["conv/kernel"], clean[1]["g"]["conv/kernel"])
    assert_replica_untouched(clean, hit, 0)
    delta = hit[1]["dx"] - clean[1]["dx"]
    changed = np.argwhere(np.abs(delta) > 1e-3)
    assert set(changed[:, 0]) == {1}
    rows, cols = set(changed[:, 1]), set(changed[:, 2])
    # 'same' padding of a stride-2 3x3 conv on 8x8 pads 0 before, 1 after: grad_in[i] =
    # sum_a D[i - a] W[a], so D[3, 5] reaches rows 3..5 and columns 5..7
    assert rows <= {3, 4, 5} and cols <= {5, 6, 7} and len(rows) > 1
    w = h.kernel("conv")                                  # HWIO (3, 3, 2, 4)
    want = np.zeros((8, 8, 2), np.float32)
    want[3:6, 5:8, :] = 10.0 * w[:, :, :, 2]
    np.testing.assert_allclose(delta[1], want, rtol=1e-4, atol=1e-5)
