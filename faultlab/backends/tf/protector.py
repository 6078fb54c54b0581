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

import json
import operator
import os
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import numpy as np

from faultlab.backends.tf.runtime import tf  # noqa: I001  (before keras: see runtime.py)
import keras  # noqa: E402

from faultlab.backends.base import EvalMetrics, StepMetrics, TrainerBase
from faultlab.backends.tf.adapter import TFCheckpointAdapter
from faultlab.backends.tf.variables import components
from faultlab.detectors import DetectorSuite, Signals, default_suite
from faultlab.errors import SpecError, printable
from faultlab.faults import FaultSpec
from faultlab.replay.own_loop import ProtectionReport, stateful, whole
from faultlab.replay.rollback import Policy, ProtectedRun
from faultlab.replay.rollback import Protector as _Recovery

__all__ = ["Protector", "ProtectionReport"]

_META = "__protector_meta__"          # the adapter's JSON meta, carried as a uint8 array
_UNSET = -1.0                         # the gradient-norm variable before any step wrote it


class _LoopTrainer(TrainerBase):
    """The user's Keras loop behind the trainer contract the recovery Protector drives."""

    config = None

    def __init__(self, p: "Protector"):
        self.p = p
        self.signal_spec = None
        self.lr_scale = 1.0
        self.next_step = 0
        self.recorded: dict[int, Any] | None = None   # step form: batches kept for replays
        self._it = None
        self._it_step = 0
        self._epochs: list[int] = []       # steps at which an iteration of `batches` began
        self.first_checksum: dict[int, tuple] = {}
        self.differs: set[int] = set()
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

    # --- batches ----------------------------------------------------------------------------

    def _batch(self, step: int):
        p = self.p
        if self.recorded is not None:
            try:
                return self.recorded[step]
            except KeyError:
                raise SpecError(f"Protector: the batch of step {step} is no longer held (the "
                                f"step form keeps the batches since the second newest "
                                f"checkpoint)") from None
        if p.batch_fn is not None:
            return p.batch_fn(step)
        if self._it is None:
            self._reiterate()
        while True:
            try:
                batch = next(self._it)
            except StopIteration:       # an epoch ended: the next one, as `for` would
                self._new_iter(self._it_step)
                try:
                    batch = next(self._it)
                except StopIteration:
                    raise SpecError(f"Protector: batches yielded nothing for step "
                                    f"{self._it_step}") from None
            self._it_step += 1
            if self._it_step > step:    # earlier ones: steps a policy skipped
                return batch

    def _new_iter(self, step: int) -> None:
        if step not in self._epochs:
            self._epochs.append(step)
        self._it, self._it_step = iter(self.p.batches), step

    def _reiterate(self) -> None:
        """The iterator after a restore (state before step `next_step`): with a data
        position, a fresh iteration resumes where the restored position is; without one, the
        iteration that covers the step is made again and fast-forwarded (it must yield the
        same batches: a list, a tf.data pipeline with a fixed seed...)."""
        step = self.next_step
        starts = [s for s in self._epochs if s <= step]
        if not starts or max(starts) == step:
            self._new_iter(step)
            return
        self._it, self._it_step = iter(self.p.batches), step
        if self.p.has_position:
            return
        for s in range(max(starts), step):
            try:
                next(self._it)
            except StopIteration:
                raise SpecError(f"Protector: batches ran out at step {s} while replaying "
                                f"(they yielded more the first time); give data= your data "
                                f"position") from None

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
            row.append(_checksum(tvars))
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

    def _note_checksum(self, step: int, checksum: tuple) -> None:
        first = self.first_checksum.get(step)
        if first is None:
            self.first_checksum[step] = checksum
        elif first != checksum:
            self.differs.add(step)

    # --- state --------------------------------------------------------------------------------

    def get_state(self) -> dict[str, np.ndarray]:
        """The adapter's capture (snapshots of the variables, never changed by later updates:
        TF variables are copy-on-write) and its meta."""
        p = self.p
        step = p._run.start + len(p._run.losses)    # the recovery checkpoints before `step`
        at = self._it_step if self._it is not None else self.next_step
        if p.batches is not None and at < step:
            self._batch(step - 1)        # a skipped step's batch is consumed before saving
        self.next_step = step
        arrays, meta = p.adapter.capture(step, data_position=p.get_position(), extra=_plain(p.extra))
        arrays[_META] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8).copy()
        p.prune(step)
        return arrays

    def set_state(self, state: Mapping[str, np.ndarray]) -> None:
        p = self.p
        meta = json.loads(np.asarray(state[_META]).tobytes().decode())
        arrays = {k: v for k, v in state.items() if k != _META}
        resume = p.adapter.restore(arrays, meta)
        if self.recorded is None:
            p.set_position(resume.data_position)
        if p.extra is not None:
            _restore_into(p.extra, resume.extra)
        self.next_step = resume.step
        self._it = None

    def evaluate(self) -> EvalMetrics:
        raise SpecError("Protector does not evaluate: your loop keeps its own validation")


class Protector:
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
        self.batch_fn = self.batches = None
        if batches is not None:
            if hasattr(batches, "__iter__"):
                if hasattr(batches, "__next__") and iter(batches) is batches:
                    raise SpecError(f"Protector: batches is a one-shot iterator "
                                    f"({type(batches).__name__}) that cannot be re-iterated "
                                    f"after a rollback; pass the dataset or list itself, or "
                                    f"batch_fn(step)")
                self.batches = batches
            elif callable(batches):
                self.batch_fn = batches
            else:
                raise SpecError(f"Protector: batches must be batch_fn(step) or a re-iterable "
                                f"such as a tf.data.Dataset, got {type(batches).__name__}")
        n = whole(every)
        if n is None or n < 1:
            raise SpecError(f"Protector(every={every!r}): every must be a whole number of "
                            f"steps, at least 1")
        every = n
        self._get = self._set = None
        self.has_position = data is not None
        data_obj = None
        if isinstance(data, tuple) and len(data) == 2 and all(map(callable, data)):
            self._get, self._set = data
        elif isinstance(data, MutableMapping):
            self._get = lambda d=data: dict(d)
            self._set = lambda v, d=data: (d.clear(), d.update(v or {}))
        elif data is not None:
            if not stateful(data):
                raise SpecError(f"Protector(data=...): a {type(data).__name__} has no "
                                f"state_dict() / load_state_dict(); pass a dict of your own "
                                f"or a (get, set) pair")
            data_obj = data
        if extra is not None and not isinstance(extra, MutableMapping):
            raise SpecError(f"Protector(extra=...): pass a dict (restored in place), not a "
                            f"{type(extra).__name__}")
        try:
            policy = Policy(policy)
        except ValueError:
            raise SpecError(f"Protector(policy={policy!r}): valid policies are "
                            f"{', '.join(p.value for p in Policy)}") from None
        if policy is Policy.LOWER_LR and not isinstance(optimizer._learning_rate,
                                                        keras.Variable):
            raise SpecError("Protector(policy='lower_lr'): the optimizer's learning rate is a "
                            "schedule; lower_lr needs a plain learning rate")
        faults = list(faults)
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
        if isinstance(detectors, DetectorSuite):
            suite = detectors
        else:
            known = ("bound", "z", "window", "warmup", "tol")
            bad = [k for k in thresholds if k not in known]
            if bad:
                raise SpecError(f"Protector: unknown argument {bad[0]!r} (thresholds are "
                                f"{', '.join(known)})")
            suite = default_suite(detectors, **thresholds)
        if directory is not None:
            d = Path(directory)
            if d.exists() and not d.is_dir():
                raise SpecError(f"Protector(directory={printable(d)}): not a directory")
        self.every, self.policy, self.injector, self.faults = every, policy, injector, faults
        self.extra = extra
        self.adapter = TFCheckpointAdapter(model, optimizer, data=data_obj,
                                           generators=generators)
        self.trainer = _LoopTrainer(self)
        try:
            self._recovery = _Recovery(self.trainer, suite, every, policy, directory=directory)
        except BaseException:
            self.trainer.close()
            raise
        self.suite = suite
        self._report: ProtectionReport | None = None
        self._run = None
        self._gen = None
        self._closed = False

    # --- data position --------------------------------------------------------------------

    def get_position(self):
        return self._get() if self._get is not None else None

    def set_position(self, value) -> None:
        if self._set is not None:
            self._set(value)

    def prune(self, step: int) -> None:
        """Forget what only steps before the second newest checkpoint needed."""
        keep = step - self.every
        t = self.trainer
        for held in (t.recorded, t.first_checksum):
            for s in [s for s in held or () if s < keep]:
                del held[s]

    # --- running ----------------------------------------------------------------------------

    def run(self, steps: int, start: int | None = None) -> ProtectionReport:
        """Train steps start..start+steps-1 under protection (start: where the last run
        ended, 0 at first); returns the report of this run."""
        self._check_open()
        if self.batches is None and self.batch_fn is None:
            raise SpecError("Protector.run needs batches= (batch_fn(step) or a re-iterable); "
                            "without it, hand each batch in with prot.step(step, batch)")
        if self._gen is not None:
            raise SpecError("Protector: run() after step(): use one form per protector")
        n = whole(steps)
        if n is None or n < 0:
            raise SpecError(f"Protector.run(steps={steps!r}): a whole number of steps")
        t = self.trainer
        start = t.next_step if start is None else operator.index(start)
        t.next_step = start
        self._run = ProtectedRun(start)
        try:
            for _ in self._recovery.steps(start, start + n, self.faults, self._run):
                pass
        finally:
            self._absorb(self._run)
            if self.injector is not None:
                self.injector.disarm()
        return self._report

    def step(self, step: int, batch) -> bool:
        """Run step `step` on `batch` under protection (steps in order, from any first one).
        Returns False when the policy stopped training: end your loop then."""
        self._check_open()
        if self.batches is not None or self.batch_fn is not None:
            raise SpecError("Protector.step(step, batch) is for protectors built without "
                            "batches=; this one draws its own batches: call run(steps)")
        step = operator.index(step)
        t = self.trainer
        if self._gen is None:
            t.recorded = {}
            t.next_step = step
            self._run = ProtectedRun(step)
            self._gen = self._recovery.steps(step, 2**62, self.faults, self._run)
            self._expect = step
        if self._run.stopped_at is not None:
            return False
        if step != self._expect:
            raise SpecError(f"Protector.step: expected step {self._expect}, got {step} (steps "
                            f"are handed in order)")
        t.recorded[step] = batch
        try:
            next(self._gen)
        except BaseException:
            self._run.stopped_at = step
            raise
        self._expect = step + 1
        self._absorb(self._run)
        return self._run.stopped_at is None

    def _absorb(self, run) -> None:
        det_steps = {d.step for d in run.detections}
        self._report = ProtectionReport(run.start, run.losses, run.detections, run.stopped_at,
                                        sorted(self.trainer.differs - det_steps))

    @property
    def report(self) -> ProtectionReport:
        """What protection did so far (ProtectionReport)."""
        if self._report is None:
            return ProtectionReport(self.trainer.next_step)
        return self._report

    def _check_open(self) -> None:
        if self._closed:
            raise SpecError("Protector is closed")

    def close(self) -> None:
        """Wait for checkpoints in flight, give the optimizer its all-reduce back, remove the
        temporary checkpoints."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._recovery.engine is not None:
                self._recovery.engine.wait_all()
        finally:
            self._recovery.close()
            self.trainer.close()
            if self.injector is not None:
                self.injector.disarm()
            self._gen = None

    def __enter__(self) -> "Protector":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_UNSIGNED = {2: tf.uint16, 4: tf.uint32, 8: tf.uint64}


def _checksum(variables):
    """An exact, order-independent checksum of a replica's copy of `variables` (as the
    built-in trainer's): the sum of every element's bit pattern as an unsigned integer of its
    width, wrapping, kept to 52 bits so that float64 carries it exactly."""
    groups: dict = {}
    for v in variables:
        t = tf.convert_to_tensor(v)
        t = tf.bitcast(t, _UNSIGNED[t.dtype.size]) if t.dtype.size > 1 else tf.cast(t, tf.uint8)
        groups.setdefault(t.dtype, []).append(tf.reshape(t, [-1]))
    sums = [tf.cast(tf.reduce_sum(tf.concat(ts, 0)), tf.uint64) for ts in groups.values()]
    return tf.cast(tf.bitwise.bitwise_and(tf.add_n(sums), tf.constant((1 << 52) - 1, tf.uint64)),
                   tf.float64)


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
