"""faultlab.keras checks a fault when it is armed: a replica outside the strategy's, a layer
the model does not have, a site the layer does not have or a position outside its operand is
a one-line SpecError (its `field` set, the valid choices listed) before any step runs, never a
fault that silently does not fire (issue 11, item 5). Valid faults still fire."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import keras

import faultlab.keras as fk
from faultlab.backends.tf.variables import components
from faultlab.errors import SpecError

pytestmark = pytest.mark.framework("tf")

R, B = 2, 2


class Loop:
    """A tiny custom training loop under a 2-replica MirroredStrategy, as docs/tensorflow.md
    shows it: conv1 (3x3, relu) -> conv2 (3x3, no bias) -> dense."""

    def __init__(self):
        self.strategy = tf.distribute.MirroredStrategy(fk.cpu_devices(R))
        keras.utils.set_random_seed(5)
        with self.strategy.scope():
            inp = keras.Input((4, 4, 1))
            h = keras.layers.Conv2D(2, 3, padding="same", activation="relu", name="conv1")(inp)
            h = keras.layers.Conv2D(2, 3, padding="same", use_bias=False, name="conv2")(h)
            out = keras.layers.Dense(3, name="dense")(keras.layers.Flatten()(h))
            self.model = keras.Model(inp, out)
            self.opt = keras.optimizers.Adam(1e-2)
            self.opt.build(self.model.trainable_variables)
        self.inj = fk.Injector(self.model, self.strategy, self.opt,
                               input_spec=tf.TensorSpec((B, 4, 4, 1), tf.float32))
        rng = np.random.default_rng(0)
        self.x = rng.normal(size=(R * B, 4, 4, 1)).astype(np.float32)
        self.y = rng.integers(0, 3, size=R * B)
        self.steps_run = 0
        model, opt, inj, strategy = self.model, self.opt, self.inj, self.strategy

        def replica_fn(x, y):
            with inj.replica():
                with tf.GradientTape() as tape:
                    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                        labels=y, logits=model(x, training=True)))
                grads = tape.gradient(loss, model.trainable_variables)
                grads = inj.corrupt_gradients(grads, model.trainable_variables)
            opt.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        @tf.function
        def step(x, y):
            return strategy.run(replica_fn, args=(x, y))
        self._step = step
        self.initial = self.weights()
        self.initial_opt = [v.numpy().copy() for v in self.opt.variables]

    def weights(self):
        return [v.numpy().copy() for v in self.model.weights]

    def reset(self):
        self.model.set_weights(self.initial)
        for v, a in zip(self.opt.variables, self.initial_opt):
            v.assign(a)

    def _dist(self, a):
        return self.strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(a[ctx.replica_id_in_sync_group * B:
                                      (ctx.replica_id_in_sync_group + 1) * B]))

    def run(self, faults, steps=2):
        """`steps` steps from the initial weights, faults armed by arm_active; every
        replica's loss of every step."""
        self.reset()
        losses = []
        for s in range(steps):
            self.inj.arm_active(faults, s)
            out = self._step(self._dist(self.x), self._dist(self.y))
            self.steps_run += 1
            losses.append([float(v) for v in self.strategy.experimental_local_results(out)])
        self.inj.disarm()
        return np.array(losses)


@pytest.fixture(scope="module")
def loop():
    return Loop()


def refused(loop, faults, field):
    """The SpecError arming `faults` raises; nothing ran, nothing was armed or changed."""
    before, ran = loop.weights(), loop.steps_run
    with pytest.raises(SpecError) as e:
        loop.run(faults)
    assert e.value.field == field, str(e.value)
    assert "\n" not in str(e.value)
    assert loop.steps_run == ran
    assert all(np.array_equal(a, b) for a, b in zip(before, loop.weights()))
    assert not np.any(loop.inj._armed.numpy())
    return str(e.value)


def test_replica_outside_the_strategy_is_refused(loop):
    msg = refused(loop, [fk.fault("fwd_output", "conv1", replica=5, positions=[(0, 1, 1, 0)],
                                  value="set", values=[1e3])], "replica")
    assert msg == "fault replica 5 is out of range: this strategy has 2 replicas (valid: 0-1)"


def test_a_fault_is_checked_before_it_fires(loop):
    """A fault of a later step is refused at the first arm_active, not when it fires."""
    late = fk.fault("fwd_output", "conv1", replica=2, step=1, positions=[(0, 1, 1, 0)],
                    value="zero")
    msg = refused(loop, [late], "replica")
    assert "valid: 0-1" in msg


def test_unknown_layer_lists_the_layers(loop):
    msg = refused(loop, [fk.fault("fwd_output", "conv9", value="zero")], "layer")
    assert msg == "unknown layer 'conv9': valid layers are conv1, conv2, dense"


@pytest.mark.parametrize("pos,dim", [((0, 4, 0, 0), "dimension 1: 4 not in 0..3"),
                                     ((2, 0, 0, 0), "dimension 0: 2 not in 0..1"),
                                     ((0, 0, 0), "has 3 dimensions")])
def test_position_outside_the_operand_is_refused(loop, pos, dim):
    msg = refused(loop, [fk.fault("fwd_output", "conv1", positions=[pos], value="zero")],
                  "positions")
    assert "fwd_output operand of layer 'conv1'" in msg and "2/4/4/2" in msg and dim in msg


def test_state_fault_position_outside_the_variable_is_refused(loop):
    msg = refused(loop, [fk.fault("param", "dense", positions=[(32, 0)], value="zero")],
                  "positions")
    assert "32/3" in msg and "dimension 0: 32 not in 0..31" in msg


def test_too_many_random_positions_are_refused(loop):
    msg = refused(loop, [fk.fault("fwd_output", "dense", count=7, value="zero")], "positions")
    assert "7 random positions exceed the 6 elements" in msg


@pytest.mark.parametrize("fault,words", [
    (dict(site="bwd_input", layer="conv1"),          # conv1 has an activation: not linear
     "site bwd_input is not available on layer 'conv1': valid sites are fwd_input, "
     "fwd_weight, fwd_output, grad_out, grad_in, grad_wt, param, opt_state"),
    (dict(site="param", layer="conv2", tensor="bias"),
     "site param with tensor 'bias' is not available on layer 'conv2' (the layer has no "
     "bias): valid sites are"),
    (dict(site="host_state", layer="dense"), "site host_state is not available on layer "
                                             "'dense': valid sites are"),
], ids=["bwd_input", "bias", "host_state"])
def test_site_the_layer_does_not_have_is_refused(loop, fault, words):
    msg = refused(loop, [fk.fault(fault.pop("site"), fault.pop("layer"), value="zero",
                                  **fault)], "site")
    assert msg.startswith(words), msg


def test_an_invalid_fault_leaves_the_valid_ones_unapplied(loop):
    """arm checks every fault before it applies any: a stored-parameter fault listed first
    does not corrupt the weights when a later fault is refused."""
    good = fk.fault("param", "dense", positions=[(0, 0)], value="set", values=[1e3])
    bad = fk.fault("fwd_output", "dense", positions=[(0, 5)], value="zero")
    refused(loop, [good, bad], "positions")


def test_valid_faults_fire(loop):
    clean = loop.run([])
    assert np.array_equal(clean, loop.run([]))          # the loop is deterministic
    hit = loop.run([fk.fault("fwd_output", "conv1", replica=1, positions=[(1, 2, 2, 1)],
                             value="set", values=[1e3])])
    assert np.array_equal(hit[0, 0], clean[0, 0])        # replica 0, step 0: untouched
    assert hit[0, 1] != clean[0, 1]                      # replica 1 hit at step 0
    assert not np.array_equal(hit[1], clean[1])          # and the run diverged after it
    # a stored-parameter fault hits the named replica's copy only
    loop.reset()
    loop.inj.arm([fk.fault("param", "dense", replica=1, positions=[(3, 2)], value="set",
                           values=[1e3])], 0)
    loop.inj.disarm()
    kernel = loop.model.get_layer("dense").kernel
    copies = [c.numpy() for c in components(kernel)]
    assert copies[1][3, 2] == 1e3 and copies[0][3, 2] != 1e3
    loop.reset()


def test_faults_from_a_campaign_file_are_checked_when_armed(loop, tmp_path):
    """A campaign written for 4 replicas passes the parser (its workload has 4); handed to a
    2-replica strategy its replica-3 fault is refused at arm time."""
    path = tmp_path / "c.csv"
    path.write_text("trial,framework,workload,replicas,per_replica_batch,width,input_size,"
                    "dataset,steps_per_epoch,epochs,site,layer,replica,epoch,step,value,"
                    "values,positions\n"
                    "t0,tf,mlp,4,2,16,8,digits,5,2,fwd_output,conv1,3,0,0,set,1000,0/1/1/0\n")
    faults = fk.faults_from_campaign(str(path))
    assert faults[0].replica == 3
    msg = refused(loop, faults, "replica")
    assert msg == "fault replica 3 is out of range: this strategy has 2 replicas (valid: 0-1)"
