"""faultlab.keras.Protector: detection, rollback and deterministic replay for the custom Keras 3
training loop a user keeps, under a tf.distribute strategy or none (docs/tensorflow.md,
"Protecting your Keras loop").

    @tf.function
    def train_step(x, y):                      # the user's step, unchanged
        def replica_fn(x, y):
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=True)) / strategy.num_replicas_in_sync
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss
        return strategy.run(replica_fn, args=(x, y))

    prot = fk.Protector(model, optimizer, lambda b: train_step(*b), batches=batch_fn,
                        every=10, strategy=strategy)
    prot.run(steps)                            # or: for s, b in ...: prot.step(s, b)
    print(prot.report)

As :mod:`faultlab.backends.torch.protector`, nothing here is a second implementation of
detection or recovery: the user's loop is put behind the trainer contract
(:class:`faultlab.backends.base.TrainerBase`) and driven by :class:`faultlab.replay.Protector`
(periodic checkpoints through the CheckpointEngine, the state captured by
:class:`TFCheckpointAdapter`: every model and optimizer variable of every replica, the data
position, extra state, NumPy / Python / the global TF generator and named ones; the built-in
detectors; rollback; replay; transient or not; the policies). The report is the framework-free
:class:`faultlab.replay.own_loop.ProtectionReport`.

What this module adds is the step and its signals. The gradient norm is the norm of the
all-reduced gradients the optimizer applies: while the Protector lives, the optimizer's
``_all_reduce_sum_gradients`` (where Keras 3 all-reduces, in the replica context) also writes
that norm into a per-replica variable, so the user's tf.function must be traced after the
Protector is built (its first step says so if it was not). After each step one traced function
reads, on every replica, that norm, the optimizer's first moments (max |m| per Dense / Conv
kernel, the norm of the others, or the norm of whatever state another optimizer keeps), the
parameter norm when a detector asks, and an exact checksum of the replica's parameters, packs
them with the step's loss into one float64 vector, and one ``.numpy()`` brings it to the host.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import Any

import numpy as np

from faultlab.backends.tf.runtime import tf  # noqa: I001  (before keras: see runtime.py)
import keras  # noqa: E402

from faultlab.backends.base import StepMetrics
from faultlab.backends.tf.adapter import TFCheckpointAdapter
from faultlab.backends.tf.variables import checksum, components
from faultlab.detectors import DetectorSuite, Signals
from faultlab.errors import SpecError
from faultlab.faults import FaultSpec
from faultlab.replay.own_loop import OwnLoopProtector, OwnLoopTrainer, ProtectionReport
from faultlab.replay.rollback import Policy

__all__ = ["Protector", "ProtectionReport"]

_UNSET = -1.0                         # the gradient-norm variable before any step wrote it


class _LoopTrainer(OwnLoopTrainer):
    """The user's Keras loop behind the trainer contract the recovery Protector drives."""

    def __init__(self, p: "Protector"):
        super().__init__(p)
        self._fns: dict = {}
        self._checked_trace = False
        opt, strategy = p.optimizer, p.strategy
        with strategy.scope():
            self._gnorm = tf.Variable(_UNSET, dtype=tf.float32, trainable=False,
                                      name="faultlab_protector_gnorm",
                                      synchronization=tf.VariableSynchronization.ON_READ,
                                      aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        gvar = self._gnorm
        orig = opt._all_reduce_sum_gradients

        def reduce(grads_and_vars):            # traced into the user's step
            out = orig(grads_and_vars)
            grads = [g for g, _ in out if g is not None]
            if grads:
                gvar.assign(tf.cast(tf.linalg.global_norm(
                    [tf.convert_to_tensor(g) for g in grads]), tf.float32))
            return out
        opt._all_reduce_sum_gradients = reduce
        self._moment_groups()

    def close(self) -> None:
        if "_all_reduce_sum_gradients" in vars(self.p.optimizer):
            del self.p.optimizer._all_reduce_sum_gradients

    def _moment_groups(self) -> None:
        """(kernel names, their first moments) and the other optimizer state tensors: an
        Adam-family first moment of a Dense / Conv kernel goes to the history bound under the
        layer's name; every other slot (second moments, momentum...) to the non-finite check."""
        from faultlab.backends.tf.injector import layer_map
        opt, model = self.p.optimizer, self.p.model
        kernels = {id(info.weight): name for name, info in layer_map(model).items()
                   if isinstance(info.layer, (keras.layers.Dense, keras.layers.Conv1D,
                                              keras.layers.Conv2D, keras.layers.Conv3D))}
        slots = getattr(opt, "_momentums", None) or []
        names, named, seen = [], [], set()
        for v in model.trainable_variables:
            if id(v) not in kernels or not slots:
                continue
            try:
                m = slots[opt._get_variable_index(v)]
            except (KeyError, ValueError, AttributeError, IndexError):
                continue
            names.append(kernels[id(v)])
            named.append(m)
            seen.add(id(m))
        skip = {id(opt.iterations)} | ({id(opt._learning_rate)}
                                       if isinstance(opt._learning_rate, keras.Variable) else set())
        other = [v for v in opt.variables if id(v) not in seen and id(v) not in skip
                 and len(v.shape) > 0 and v.dtype in ("float16", "bfloat16", "float32",
                                                      "float64")]
        self.kernel_names, self._named, self._other = names, named, other

    # --- the step ----------------------------------------------------------------------------

    def train_step(self, step: int, faults=()) -> StepMetrics:
        p = self.p
        batch = self._batch(step)
        inj = p.injector
        if inj is not None:
            inj.arm(list(faults), step)
        lr = p.optimizer._learning_rate
        saved = None
        if self.lr_scale != 1.0:
            saved = lr.numpy()
            lr.assign(saved * self.lr_scale)
        try:
            loss = p.step_fn(batch)
        finally:
            if saved is not None:
                lr.assign(saved)
        self.next_step = step + 1
        if loss is None:
            raise SpecError("Protector: step_fn(batch) must return the step's loss (a tensor, "
                            "strategy.run's per-replica losses or a number), it returned None")
        sig = self._signals(step, loss)
        return StepMetrics(sig.loss, 0.0, sig)

    def _losses(self, loss) -> list:
        if isinstance(loss, tf.distribute.DistributedValues):
            parts = list(self.p.strategy.experimental_local_results(loss))
        else:
            parts = [loss]
        out = []
        for t in parts:
            t = tf.convert_to_tensor(t)
            if t.shape.num_elements() != 1:
                raise SpecError(f"Protector: step_fn(batch) must return the step's loss, one "
                                f"number per replica; it returned a tensor of shape "
                                f"{tuple(t.shape)}")
            out.append(t)
        return out

    def _fn(self, key: tuple):
        """The traced signal reader for `key` = (history, grads, params)."""
        fn = self._fns.get(key)
        if fn is not None:
            return fn
        history, grads, params = key
        strategy, tvars = self.p.strategy, self.p.model.trainable_variables
        named, other, gvar = self._named, self._other, self._gnorm

        def replica_row():
            row = []
            if grads:
                row.append(gvar.read_value())
            if history:
                row += [tf.reduce_max(tf.abs(tf.convert_to_tensor(m))) for m in named]
                row.append(tf.linalg.global_norm([tf.convert_to_tensor(m) for m in other])
                           if other else tf.constant(0.0))
            if params:
                row.append(tf.add_n([tf.norm(tf.cast(tf.convert_to_tensor(v), tf.float64))
                                     for v in tvars]))
            row = [tf.cast(t, tf.float64) for t in row]
            row.append(checksum(tvars))
            return tf.stack(row)

        @tf.function(autograph=False)
        def fn(losses):
            rows = strategy.run(replica_row)
            head = tf.stack([tf.cast(tf.reshape(t, []), tf.float64) for t in losses])
            return tf.concat([head] + [tf.reshape(r, [-1]) for r in
                                       strategy.experimental_local_results(rows)], 0)
        self._fns[key] = fn
        return fn

    def _signals(self, step: int, loss) -> Signals:
        """The step's signals: one traced read on every replica, one host transfer."""
        spec = self.signal_spec
        losses = self._losses(loss)
        key = (bool(spec.history), bool(spec.grads or spec.history), bool(spec.params))
        packed = self._fn(key)(losses).numpy()          # the one host transfer of the step
        n = len(losses)
        head, rows = packed[:n], packed[n:].reshape(self.p.replicas, -1)
        history, grads, params = key
        if grads and not self._checked_trace:
            if float(rows[0, 0]) == _UNSET:
                raise SpecError("Protector: the optimizer applied no gradients in step_fn, or "
                                "its tf.function was traced before the Protector was built: "
                                "build the Protector before the first step")
            self._checked_trace = True
        worst = [float(np.max(c)) if not np.isnan(c).any() else float("nan") for c in rows.T]
        i = 0
        grad_norm = worst[i] if grads else 0.0
        i += grads
        m_max, m_other = {}, 0.0
        if history:
            m_max = dict(zip(self.kernel_names, worst[i:i + len(self.kernel_names)]))
            i += len(self.kernel_names)
            m_other = worst[i]
            i += 1
        param_norm = worst[i] if params else None
        checksums = [float(c) for c in rows[:, -1]]
        self._note_checksum(step, tuple(checksums))
        total = float(np.sum(head))
        return Signals(step=step, loss=total, replica_loss=[float(x) for x in head],
                       grad_norm=grad_norm, m_max=m_max, m_other=m_other,
                       param_norm=param_norm,
                       replica_checksums=checksums if spec.replicas else None)

    # --- state --------------------------------------------------------------------------------

    def _capture(self, step: int) -> tuple[dict, dict]:
        """Snapshots of the variables, never changed by later updates (TF variables are
        copy-on-write)."""
        p = self.p
        return p.adapter.capture(step, data_position=p.get_position(), extra=_plain(p.extra))

    def _restore_extra(self, live: MutableMapping, saved: Mapping) -> None:
        _restore_into(live, saved)


class Protector(OwnLoopProtector):
    """Detection every step, rollback and deterministic replay for your own Keras 3 loop.

    model, optimizer: yours (a built Keras model; a Keras optimizer, which the Protector
    builds over the model's trainable variables if it is not built yet, as its first step
    would). step_fn(batch) -> loss: runs one training step on one batch (usually your
    tf.function running ``strategy.run`` and ``optimizer.apply_gradients``) and returns its
    loss: a scalar tensor, a number, or strategy.run's per-replica losses (summed, as
    ``strategy.reduce(SUM)`` would: divide by the replica count in the replica function, as
    the usual loop does). Build the Protector before the step's first call: the gradient
    norm is traced into it.

    batches: where the batch of each step comes from for run() and for replays:
    ``batch_fn(step)``, or a re-iterable (a list, a tf.data.Dataset, a distributed dataset)
    iterated afresh after a rollback, from the restored data position when `data` is given,
    else fast-forwarded from the start of the iteration that covers the step (so it must
    yield the same batches again). Leave it out to hand batches in with
    ``prot.step(step, batch)``; the protector then keeps the batches since the second newest
    checkpoint for replays.

    every: steps between checkpoints. strategy: the tf.distribute strategy the model was
    built under (default: the current one). data: your data position (an object with
    state_dict() / load_state_dict(), a dict of your own restored in place, or a (get, set)
    pair). extra: a dict of further state (numbers, arrays, tensors, variables), restored in
    place (a variable is assigned).
    directory: where the checkpoint files go (default: a temporary directory removed by
    close()). policy: "stop" (default), "skip" or "lower_lr" (the optimizer's learning rate
    must then be a variable, not a schedule). detectors: names of built-in detectors
    (default nonfinite, history, spike) or a DetectorSuite; thresholds: bound=, z=, window=,
    warmup=, tol=. injector, faults: a faultlab.keras.Injector built for this model and the
    faults (FaultSpec) it delivers at their steps; transient ones fire only the first time a
    step runs, permanent and intermittent ones on replays too. generators: extra named
    generators to restore (tf.random.Generator, keras.random.SeedGenerator, NumPy ones);
    model variables (dropout seed generators included), optimizer variables, NumPy's,
    Python's and the global TF generator are always restored, so replays are bit-identical.

    close() (or ``with``) gives the optimizer its own all-reduce back and removes the
    temporary checkpoints.
    """

    _ITERABLE_HINT = "the dataset or list itself"
    _ITERABLE_EXAMPLE = "a tf.data.Dataset"
    _DATA_HINT = "a dict of your own or a (get, set) pair"

    def __init__(self, model, optimizer, step_fn: Callable[[Any], Any], *, batches=None,
                 every: int = 10, strategy=None, data=None, extra: MutableMapping | None = None,
                 directory: str | os.PathLike | None = None, policy: str = "stop",
                 detectors: Iterable[str] | DetectorSuite | None = None, injector=None,
                 faults: Iterable[FaultSpec] = (), generators: Mapping[str, Any] | None = None,
                 **thresholds):
        if not isinstance(model, keras.Model):
            raise SpecError(f"Protector needs the keras.Model you train, got "
                            f"{type(model).__name__}")
        if not model.built or not model.trainable_variables:
            raise SpecError("Protector: the model is not built (call it once, or build it, "
                            "before protecting it)")
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise SpecError(f"Protector needs your keras.optimizers.Optimizer, got "
                            f"{type(optimizer).__name__}")
        if not callable(getattr(optimizer, "_all_reduce_sum_gradients", None)):
            raise SpecError(f"Protector: {type(optimizer).__name__} is not a Keras 3 "
                            f"TensorFlow optimizer (no _all_reduce_sum_gradients)")
        if getattr(optimizer, "built", False):
            try:
                optimizer._get_variable_index(model.trainable_variables[0])
            except (KeyError, ValueError):
                raise SpecError("Protector: the optimizer was built for other variables than "
                                "the model's (pass the optimizer built for this model)") from None
        if not callable(step_fn):
            raise SpecError(f"Protector: step_fn must be a function of one batch that runs "
                            f"the step and returns the loss, got {type(step_fn).__name__}")
        if callable(getattr(step_fn, "experimental_get_tracing_count", None)) and \
                step_fn.experimental_get_tracing_count():
            raise SpecError("Protector: step_fn was traced before the Protector was built; "
                            "build the Protector before the step's first call")
        if strategy is None:
            strategy = tf.distribute.get_strategy()
        elif not isinstance(strategy, tf.distribute.Strategy):
            raise SpecError(f"Protector(strategy=...): a tf.distribute.Strategy, got "
                            f"{type(strategy).__name__}")
        first = model.trainable_variables[0]
        owner = getattr(getattr(first, "value", first), "distribute_strategy", None)
        if owner is not None and owner is not strategy and \
                isinstance(getattr(first, "value", first), tf.distribute.DistributedValues):
            raise SpecError("Protector(strategy=...): the model was built under another "
                            "strategy; pass the one whose scope built it")
        if owner is None or not isinstance(getattr(first, "value", first),
                                           tf.distribute.DistributedValues):
            if strategy.num_replicas_in_sync > 1:
                raise SpecError(f"Protector(strategy=...): the model was not built under this "
                                f"strategy's scope ({strategy.num_replicas_in_sync} replicas)")
        self.model, self.optimizer, self.step_fn, self.strategy = model, optimizer, step_fn, \
            strategy
        if not getattr(optimizer, "built", True):
            with strategy.scope():              # as its first apply would (zeros, no RNG)
                optimizer.build(model.trainable_variables)
        self.replicas = int(strategy.num_replicas_in_sync)
        self._check_batches(batches)
        every = self._check_every(every)
        data_obj = self._check_data(data)
        self._check_extra(extra)
        policy = self._check_policy(policy)
        if policy is Policy.LOWER_LR and not isinstance(optimizer._learning_rate,
                                                        keras.Variable):
            raise SpecError("Protector(policy='lower_lr'): the optimizer's learning rate is a "
                            "schedule; lower_lr needs a plain learning rate")
        faults = list(faults)
        _check_injector(injector, model, faults)
        suite = self._check_suite(detectors, thresholds)
        self._check_directory(directory)
        self.every, self.policy, self.injector, self.faults = every, policy, injector, faults
        self.extra = extra
        self.adapter = TFCheckpointAdapter(model, optimizer, data=data_obj,
                                           generators=generators)
        self._start(_LoopTrainer(self), suite, directory)

    def _armed(self) -> list:
        return self.faults

    def _after_run(self) -> None:
        self._disarm()

    def _release(self) -> None:
        """Give the optimizer its own all-reduce back; disarm the injector."""
        self.trainer.close()
        self._disarm()

    def _disarm(self) -> None:
        if self.injector is not None:
            self.injector.disarm()


def _check_injector(injector, model, faults: list) -> None:
    if injector is not None:
        from faultlab.backends.tf.injector import TFInjector
        if not isinstance(injector, TFInjector) or injector.model is not model:
            raise SpecError("Protector(injector=...): pass the faultlab.keras.Injector "
                            "built for this model")
    if faults:
        if injector is None:
            raise SpecError("Protector(faults=...): faults need injector= (the "
                            "faultlab.keras.Injector that delivers them)")
        bad = [f for f in faults if not isinstance(f, FaultSpec)]
        if bad:
            raise SpecError(f"Protector(faults=...): FaultSpec values (faultlab.fault), "
                            f"got {type(bad[0]).__name__}")
        injector.validate(faults)




def _plain(value):
    """Extra state the checkpoint codec takes: variables (replica 0's copy) and tensors as
    NumPy arrays, inside dicts, lists and tuples too."""
    if isinstance(value, tf.Variable):
        return np.array(components(value)[0].numpy())
    if isinstance(value, (tf.Tensor, keras.Variable)):
        return np.array(value.numpy() if hasattr(value, "numpy") else value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def _restore_into(live: MutableMapping, saved: Mapping) -> None:
    """A restored extra dict into the user's own, in place: a tf.Variable is assigned, a
    tensor becomes a tensor again, anything else is replaced."""
    for k, v in saved.items():
        old = live.get(k)
        if isinstance(old, (tf.Variable, keras.Variable)):
            for c in components(old):
                c.assign(np.asarray(v))
        elif isinstance(old, tf.Tensor):
            live[k] = tf.constant(np.asarray(v), dtype=old.dtype)
        else:
            live[k] = v
