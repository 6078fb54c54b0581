"""faultlab for your own Keras 3 model and custom training loop under a tf.distribute strategy.

Users import it as ``faultlab.keras`` (a re-export of this module). The built-in TensorFlow
backend (faultlab.backends.tf.trainer) is built on exactly this API; use it directly when you
keep your own training loop::

    import faultlab.keras as fk
    fk.configure_cpu_devices(4)                 # optional, before TF initialises: 4 CPU replicas

    import tensorflow as tf, keras
    strategy = tf.distribute.MirroredStrategy(fk.cpu_devices(4))
    with strategy.scope():
        model = make_model()
        optimizer = keras.optimizers.Adam(1e-3)
        optimizer.build(model.trainable_variables)
    injector = fk.Injector(model, strategy, optimizer,
                           input_spec=tf.TensorSpec((per_replica_batch, 32, 32, 3)))

    @tf.function
    def train_step(x, y):
        def replica_fn(x, y):
            with injector.replica():            # faults act on this replica from here on
                with tf.GradientTape() as tape:
                    loss = loss_fn(y, model(x, training=True)) / strategy.num_replicas_in_sync
                grads = tape.gradient(loss, model.trainable_variables)
                grads = injector.corrupt_gradients(grads, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss
        return strategy.run(replica_fn, args=(x, y))

    faults = [fk.fault("fwd_output", "conv2d_1", replica=1, step=5, value="bitflip", bit=30,
                       positions=[(0, 3, 3, 7)])]
    for step in range(steps):
        injector.arm_active(faults, step)       # arms what fires at `step`; no retracing
        train_step(x_dist, y_dist)

Faults are :class:`faultlab.faults.FaultSpec` values (the same fault model as the campaign
files; :func:`faults_from_campaign` reads them from one), positions in Keras' own layout.
``arm`` / ``arm_active`` check every fault they are handed before arming anything: a replica,
layer, site or position the strategy and model do not have is a one-line SpecError listing
the valid choices (``injector.validate(faults)`` checks without arming).
Everything about sites, replicas and costs is in docs/tensorflow.md.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from faultlab.errors import SpecError
from faultlab.faults import FaultSpec
from faultlab.faults import fault as _fault

__all__ = ["Injector", "fault", "faults_from_campaign", "configure_cpu_devices", "cpu_devices",
           "operand_table", "layer_names"]


def configure_cpu_devices(n: int = 8) -> int:
    """Split the host CPU into `n` logical devices so that MirroredStrategy can run n
    replicas on one machine. Must run before TensorFlow initialises (before the first op or
    device query); returns the number of logical CPU devices TensorFlow will have."""
    from faultlab.backends.tf.runtime import configure_cpu_devices as configure
    return configure(n)


def cpu_devices(n: int) -> list[str]:
    """The names of the first n logical CPU devices (for MirroredStrategy(devices))."""
    import tensorflow as tf
    names = [d.name for d in tf.config.list_logical_devices("CPU")]
    if len(names) < n:
        raise SpecError(f"{n} replicas need {n} logical CPU devices, TensorFlow has "
                        f"{len(names)}: call configure_cpu_devices({n}) before using TensorFlow")
    return names[:n]


def fault(site: str, layer: str, *, step: int = 0, replica: int = 0, value: str = "bitflip",
          positions: Sequence[Sequence[int]] | None = None, count: int = 1,
          duration: str = "transient", duration_steps: int = 1, probability: float = 1.0,
          tensor: str | None = None, seed: int = 0, **value_kw) -> FaultSpec:
    """A FaultSpec from plain arguments: `positions` (explicit indices, Keras layout, which is
    the canonical one) or `count` random elements; `value_kw` are ValueSpec's (bit, bits,
    stuck, factor, values, ramp, layout). The framework-free :func:`faultlab.fault`."""
    return _fault(site, layer, step=step, replica=replica, value=value, positions=positions,
                  count=count, duration=duration, duration_steps=duration_steps,
                  probability=probability, tensor=tensor, seed=seed, **value_kw)


def faults_from_campaign(path: str, trial: str | None = None) -> list[FaultSpec]:
    """The faults of one trial of a campaign file (either format; the first trial by
    default). Steps are global steps of the campaign's workload configuration."""
    from faultlab.campaigns import load_campaign
    camp = load_campaign(path)
    for t in camp.trials:
        if trial is None or t.trial_id == trial:
            return list(t.faults)
    raise SpecError(f"{path}: no trial {trial!r}")


def operand_table(model, input_spec):
    """{layer: {site: (shape, dtype)}}: the injectable operands of a Keras model for one
    replica's input `input_spec` (a tf.TensorSpec with the per-replica batch)."""
    from faultlab.backends.tf.injector import operand_table as table
    return table(model, input_spec)


def layer_names(model) -> list[str]:
    """Names of the injectable layers of a Keras model (layers with a kernel, embeddings or
    gamma)."""
    from faultlab.backends.tf.injector import layer_map
    return list(layer_map(model))


def _injector_class():
    from faultlab.backends.tf.injector import TFInjector

    class Injector(TFInjector):
        """faultlab.backends.tf.injector.TFInjector with a convenience for step loops."""

        def arm_active(self, faults: Iterable[FaultSpec], step: int) -> list[FaultSpec]:
            """Arm the faults of `faults` that fire at `step` (their duration decides),
            disarm the rest; returns the armed ones. Every fault is checked, firing now or
            not (validate: replica, layer, site, positions), so a fault that could never
            fire is a SpecError at the first call, before any step runs."""
            faults = list(faults)
            self.validate(faults)
            firing = [f for f in faults if f.active(step)]
            self.arm(firing, step)
            return firing
    return Injector


def __getattr__(name):
    if name == "Injector":  # imported lazily: importing faultlab.keras must not start TF
        cls = _injector_class()
        globals()["Injector"] = cls
        return cls
    raise AttributeError(name)
