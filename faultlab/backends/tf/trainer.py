"""The TensorFlow backend: builds the Keras workloads, trains them under a tf.distribute
strategy with faults delivered into one replica, and reports operand shapes.

Importing this module configures TensorFlow's runtime (``runtime.configure_runtime``), once
per process and before TF initialises, unless the backend's ``configure(threads)`` already did:
logical CPU devices, op determinism, thread counts.

Strategies (``$FAULTLAB_TF_STRATEGY``: auto | mirrored | one_device | tpu):

* auto: TPUStrategy when a TPU is configured (``$TPU_NAME`` or ``$COLAB_TPU_ADDR``), else
  OneDeviceStrategy for 1 replica, else MirroredStrategy over the first R GPUs when there are
  at least R, else over R logical CPU devices;
* mirrored / one_device / tpu force one.

Training semantics (the torch backend's, see backends/torch/trainer.py): each global batch is split
into R shards, replica r runs forward and backward on its shard (BatchNorm statistics of its
own shard), its mean loss is scaled by 1/R and the gradients are summed by the all-reduce,
then one Adam step follows on every replica's copy. BatchNorm moving statistics are the mean
of the replicas'. Dropout masks are a function of (seed, step, replica, layer), the learning
rate a function of the step, and batches a function of (seed, step) (workloads/data.py, shared
with torch), so a restored run replays the golden run bit for bit.

Traced steps (see TFTrainer._step_fn): the plain one, run whenever no fault is armed in the
graph; the shared one with every injection point, run at the steps a fault fires; and, for a
fault that keeps firing, a step with only the points of what it arms (SpecialisePolicy). All
run under faultlab's Grappler options (runtime.ArithmeticOff), so that they compute the same
bits while nothing fires, and the shared and specialised steps the same bits when it does.

Adam: Keras' Adam, with epsilon 1e-8 (torch's default, not Keras' 1e-7) and its update done by
TF's fused ResourceApplyAdam kernel (what TF2 Keras optimizers and the ISCA artifact used).
Keras/TF Adam adds epsilon to sqrt(v) before the bias correction of the step size ("epsilon
hat"), torch after it; with 1e-8 both are negligible next to sqrt(v) after the first steps.

Detector signals (``signal_spec``, docs/detection.md): computed inside the traced step, each
replica on its own copies after the optimizer update, packed into one float64 vector (one host
transfer); one step function per distinct set of signals, and none of it without a spec.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np  # noqa: E402

from faultlab.backends.tf.runtime import ArithmeticOff, configure_runtime, tf  # noqa: E402

from faultlab.errors import FaultlabError, SpecError  # noqa: E402


configure_runtime()   # before TF initialises; once per process (see runtime.py)

import keras  # noqa: E402

from faultlab.backends.base import EvalMetrics, StepMetrics, TrainerBase  # noqa: E402
from faultlab.faults import FaultSpec  # noqa: E402
from faultlab.backends.tf.injector import TFInjector, operand_table  # noqa: E402
from faultlab.workloads import data as datamod  # noqa: E402
from faultlab.backends.tf import models as tf_models  # noqa: E402
from faultlab.backends.tf.optimizer import FaultlabAdam  # noqa: E402
from faultlab.backends.tf.strategy import select_strategy  # noqa: E402
from faultlab.backends.tf.variables import checksum  # noqa: E402
from faultlab.workloads.base import WorkloadConfig, is_user_workload, load_user_workload, lr_schedule  # noqa: E402

__all__ = ["TFWorkload", "TFTrainer", "build_workload", "operand_shapes", "select_strategy",
           "FaultlabAdam"]


# --- workloads -----------------------------------------------------------------------------------

@dataclass
class TFWorkload:
    """What a TF workload function returns (the TF twin of faultlab.torch.TorchWorkload).

    build: makes the Keras model (called under the strategy's scope, after seeding Keras with
    the configuration's seed); data: the dataset (NumPy arrays; images NHWC in [0, 1]);
    sample_shape: one sample's shape; input_dtype: 'float32' or 'int64' (token ids);
    augment: apply the artifact's flip / pad / crop; make_optimizer: (lr) -> Keras optimizer."""

    build: Callable[[], keras.Model]
    data: datamod.Dataset | None
    sample_shape: tuple[int, ...]
    input_dtype: str = "float32"
    augment: bool = False
    make_optimizer: Callable = None  # type: ignore[assignment]

    def optimizer(self, lr: float):
        if self.make_optimizer is not None:
            return self.make_optimizer(lr)
        return FaultlabAdam(learning_rate=lr, epsilon=1e-8)


def build_workload(config: WorkloadConfig, with_data: bool = True) -> TFWorkload:
    name = config.workload
    if is_user_workload(name):
        return load_user_workload(config, TFWorkload)
    channels = 1 if name == "mlp" else 3
    data = datamod.load(config, channels) if with_data or name == "transformer" else None
    s = config.input_size
    if name == "resnet18":
        dropout = float(config.option("dropout", "0.1"))
        return TFWorkload(lambda: tf_models.resnet18(config.width, 10, s, 3, dropout), data,
                          (s, s, 3), augment=config.option("augment", "1") == "1")
    if name == "mlp":
        return TFWorkload(lambda: tf_models.mlp(s, config.width, 10, 1),
                          data if with_data else None, (s, s, 1))
    if name == "transformer":
        vocab = data.classes
        return TFWorkload(lambda: tf_models.transformer(
            vocab, config.width, s, int(config.option("blocks", "2")),
            int(config.option("heads", "4"))), data if with_data else None, (s,), "int64")
    raise SpecError(f"workload {name!r} has no TensorFlow implementation")


def _seed_keras(seed: int) -> None:
    keras.utils.set_random_seed(int(seed) % (2 ** 32))


# --- which step fires a fault ----------------------------------------------------------------------

class SpecialisePolicy:
    """Which traced step runs a step in which a fault fires: the shared step with every
    injection point (traced once per trainer: arming never traces anything), or a step with
    only the points of the armed (layer, site) pattern (traced once per pattern).

    The shared step costs a fixed 8-14 ms over the plain step at the reference width (every
    Switch / Merge on an activation), the specialised one about nothing, but a trace costs
    seconds. mode "auto" rents before it buys (the ski-rental rule, within twice the better
    of the two choices made in hindsight): a pattern runs the shared step until what it has
    paid over the plain step on it adds up to what tracing a step cost this trainer, then its
    own step is traced and runs from there on. A fault firing once (a transient one, every
    step a trial of a random campaign fires) never pays for a trace; a permanent or
    intermittent one firing over hundreds of steps, in a long run, does. "shared" and
    "specialised" force one. Only timing picks: the two compute the same bits
    (tests/tf/test_idle_step.py), so no result depends on it."""

    MODES = ("auto", "shared", "specialised")

    def __init__(self, mode: str = "auto", keep: int = 8):
        if mode not in self.MODES:
            raise SpecError(f"specialise must be one of {', '.join(self.MODES)}, not {mode!r}")
        self.mode = mode
        self.keep = keep                        # specialised steps kept (least recently used out)
        self.plain: deque = deque(maxlen=16)    # recent plain-step times (s)
        self.trace_s: float | None = None       # the first call of a step: trace + first run
        self.paid: dict[frozenset, float] = {}  # pattern -> what the shared step cost over plain

    def choose(self, pattern: frozenset, have: bool) -> bool:
        """Whether `pattern` runs its own step (`have`: it is traced already)."""
        if self.mode != "auto":
            return self.mode == "specialised"
        return have or (self.trace_s is not None and self.paid.get(pattern, 0.0) >= self.trace_s)

    def ran(self, kind: str, seconds: float, pattern: frozenset | None = None,
            first: bool = False) -> None:
        """Account a step call: kind "plain", "shared" or "specialised"; first: its first call
        (trace included)."""
        if first:
            self.trace_s = seconds if self.trace_s is None else min(self.trace_s, seconds)
            return
        if kind == "plain":
            self.plain.append(seconds)
        elif kind == "shared" and pattern is not None and self.plain:
            extra = seconds - statistics.median(self.plain)
            self.paid[pattern] = self.paid.get(pattern, 0.0) + max(extra, 0.0)


# --- the trainer ---------------------------------------------------------------------------------

class TFTrainer(TrainerBase):
    """A training session of one workload configuration (see the module docstring)."""

    def __init__(self, config: WorkloadConfig, strategy=None, probe: bool = False,
                 instrumented: bool = True, stock_optimizer: bool = False):
        """probe: trace the step so that it also returns each replica's gradients (what
        replica_gradients reads), instead of tracing a second step function on demand.
        instrumented=False: only the plain step, faults cannot be injected (for overhead
        baselines). stock_optimizer: run the steps under TensorFlow's default Grappler
        options instead of faultlab's (arithmetic optimizer off, see runtime.ArithmeticOff):
        the unmodified Keras step, for benchmarks; its arithmetic differs from faultlab's."""
        self.config = config
        self.probe = probe
        self.instrumented = instrumented
        self.stock_optimizer = stock_optimizer
        # False: every step of an instrumented trainer runs the step with the injection
        # points, armed or not (what it did before the plain step was dispatched to; for
        # tests and benchmarks; the results are the same)
        self.dispatch = True
        # the step a fault fires in: shared or specialised to the armed pattern (see
        # SpecialisePolicy; assign a mode to its .mode)
        self.specialise = SpecialisePolicy()
        self._graph_options = contextlib.nullcontext() if stock_optimizer else ArithmeticOff()
        self.signal_spec = None   # a faultlab.detectors.SignalSpec to collect signals
        self.lr_scale = 1.0       # set by a recovery policy that re-runs a step more gently
        self.strategy = strategy or select_strategy(config.replicas)
        if self.strategy.num_replicas_in_sync != config.replicas:
            raise FaultlabError(f"strategy has {self.strategy.num_replicas_in_sync} replicas, "
                                f"the workload {config.replicas}")
        self.wl = build_workload(config)
        _seed_keras(config.seed)
        with self.strategy.scope():
            self.model = self.wl.build()
            self.optimizer = self.wl.optimizer(config.lr)
            self.optimizer.build(self.model.trainable_variables)
        self.pipeline = datamod.Pipeline(config, self.wl.data, augment=self.wl.augment)
        self.input_spec = tf.TensorSpec((config.per_replica_batch,) + tuple(self.wl.sample_shape),
                                        tf.as_dtype(self.wl.input_dtype))
        self.injector = TFInjector(self.model, self.strategy, self.optimizer, self.input_spec)
        self._lr_at = lr_schedule(config)
        self._steps: dict[tuple, Callable] = {}          # (probe, key) -> the plain step
        self._point_steps: dict[tuple, Callable] = {}    # (probe, key) -> the step with points
        # (probe, key, pattern) -> the step with the points of that armed pattern only
        self._armed_steps: OrderedDict[tuple, Callable] = OrderedDict()
        self._probes: dict[tuple, Callable] = {}
        self._moment_vars: tuple | None = None
        self._eval = None
        self._seed_mix = int(np.random.SeedSequence([config.seed, 0x7F]).generate_state(1)[0]
                             & 0x3FFFFFFF)

    # --- training ------------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        """Polynomial (power 1) decay from lr to lr * end_lr_ratio, as in the artifact."""
        return self._lr_at(step)

    def _step_fn(self, probe: bool, key: tuple | None = None,
                 points: bool | frozenset = False):
        """The traced training step (probe: also return each replica's gradients as the
        optimizer receives them, before the all-reduce; key: the detector signals to compute,
        from _signal_key, packed into one float64 vector returned last; points: with the
        injection points, for a step that fires a fault; a frozenset of (layer index, site
        column): the points of that armed pattern only, see TFInjector.replica). One trace per
        (probe, key, points); key None traces the step without a single signal op.

        Both steps do the same arithmetic, bit for bit, as long as nothing fires: each runs
        under faultlab's Grappler options (runtime.ArithmeticOff), and the points are
        identities until armed (tests/tf/test_idle_step.py). So a step with no fault armed in
        the graph runs the plain step and costs what it costs, and arming never retraces:
        it picks one of two functions traced once each."""
        pattern = points if isinstance(points, frozenset) else None
        if pattern is not None:
            fn = self._armed_steps.get((probe, key, pattern))
            if fn is not None:
                self._armed_steps.move_to_end((probe, key, pattern))
                return fn
        else:
            fn = (self._point_steps if points else self._steps).get((probe, key))
            if fn is not None:
                return fn
        strategy, model, opt, inj = self.strategy, self.model, self.optimizer, self.injector
        tvars = model.trainable_variables
        inv_r = 1.0 / self.config.replicas
        seed_mix = self._seed_mix
        abft = key is not None and key[4]
        with_points = points if self.instrumented else False
        # an instrumented trainer's plain step keeps the points as bare identities: without
        # them the tape would group the gradient sums differently (see TFInjector.replica)
        enter = ((lambda: inj.replica(abft=abft, points=with_points)) if self.instrumented
                 else contextlib.nullcontext)

        def replica_fn(x, y, step):
            rid = tf.distribute.get_replica_context().replica_id_in_sync_group
            seed = tf.stack([step * 1_000_003 + seed_mix, tf.cast(rid, tf.int64)])
            with enter() as ctx, tf_models.dropout_seed(seed):
                with tf.GradientTape() as tape:
                    out = model(x, training=True)
                    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                        labels=y, logits=out))
                    scaled = loss * inv_r
                grads = tape.gradient(scaled, tvars)
                if self.instrumented:
                    grads = inj.corrupt_gradients(grads, tvars)
            grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g
                     for g in grads]
            with _reduced_gradients() as reduced:
                opt.apply_gradients(zip(grads, tvars))
            correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(out, -1), y), tf.int64))
            res = (loss, correct, grads) if probe else (loss, correct)
            if key is not None:
                if key[1] and not reduced:   # an optimizer that all-reduces elsewhere
                    reduced = tf.distribute.get_replica_context().all_reduce(
                        tf.distribute.ReduceOp.SUM, [g for g in grads if g is not None])
                res += (self._replica_signals(key, loss, reduced, ctx.abft if abft else None),)
            return res

        @tf.function(autograph=False)
        def step_fn(x, y, step):
            with _capturing(opt, key is not None and key[1]):
                res = strategy.run(replica_fn, args=(x, y, step))
            loss = strategy.reduce(tf.distribute.ReduceOp.SUM, res[0], axis=None)
            correct = strategy.reduce(tf.distribute.ReduceOp.SUM, res[1], axis=None)
            out = (loss, correct, res[0])
            out = out + (res[2],) if probe else out
            if key is not None:
                out += (_pack(strategy, res[-1], loss, correct),)
            return out

        if pattern is not None:
            self._armed_steps[(probe, key, pattern)] = step_fn
            while len(self._armed_steps) > self.specialise.keep:
                self._armed_steps.popitem(last=False)
        else:
            (self._point_steps if points else self._steps)[(probe, key)] = step_fn
        return step_fn

    def _distribute(self, a: np.ndarray):
        b = self.config.per_replica_batch
        if self.config.replicas == 1:
            return tf.constant(a)
        return self.strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(a[ctx.replica_id_in_sync_group * b:
                                      (ctx.replica_id_in_sync_group + 1) * b]))

    def _run(self, step: int, faults: Sequence[FaultSpec], probe: bool):
        if faults and not self.instrumented:
            raise FaultlabError("this trainer was built without injection points")
        self.injector.arm(faults, step)
        self.optimizer.learning_rate.assign(self.lr_at(step) * self.lr_scale)
        x, y = self.pipeline.batch(step)
        key = self._signal_key(self.signal_spec)
        probe = probe or self.probe
        kind, pattern = "plain", None
        if self.instrumented and not self.dispatch:
            kind, points = "shared", True
        elif self.injector.armed_in_graph:
            pattern = self.injector.armed_pattern
            have = (probe, key, pattern) in self._armed_steps
            kind = "specialised" if self.specialise.choose(pattern, have) else "shared"
            points = pattern if kind == "specialised" else True
        else:
            points = False
        fn = self._step_fn(probe, key, points)
        first = fn.experimental_get_tracing_count() == 0
        xs, ys = self._distribute(x), self._distribute(y)
        t0 = time.perf_counter()
        with self._graph_options:
            out = fn(xs, ys, tf.constant(step, tf.int64))
        self.specialise.ran(kind, time.perf_counter() - t0, pattern, first)
        return out, y.size, key

    def train_step(self, step: int, faults: Sequence[FaultSpec] = ()) -> StepMetrics:
        out, count, key = self._run(step, faults, False)
        if key is None:
            loss = float(out[0]) / self.config.replicas
            return StepMetrics(loss, int(out[1]) / max(count, 1))
        packed = out[-1].numpy()              # the one host transfer of the step
        signals = self._signals(step, key, packed)
        return StepMetrics(signals.loss, float(packed[1]) / max(count, 1), signals)

    # --- detector signals: fused into the traced step, one host transfer per step ------------

    def _signal_key(self, spec) -> tuple | None:
        """The signals the traced step computes for a SignalSpec: (history, grads, params,
        replicas, abft). Without Adam moments the gradient norm carries the non-finite check;
        ABFT needs the injection points (an instrumented trainer)."""
        if spec is None:
            return None
        history = bool(spec.history and self._moments()[0] is not None)
        return (history, bool(spec.grads or (spec.history and not history)), bool(spec.params),
                bool(spec.replicas), bool(spec.abft and self.instrumented))

    def _moments(self):
        """(kernel layer names, their Adam first moments, the other parameters' first moments),
        or (None, None, None) for an optimizer without Keras' `_momentums` slots."""
        if self._moment_vars is None:
            opt = self.optimizer
            slots = getattr(opt, "_momentums", None)
            if not slots:
                self._moment_vars = (None, None, None)
                return self._moment_vars
            kernels = {id(info.weight): name for name, info in self.injector.layers.items()
                       if isinstance(info.layer, (keras.layers.Conv2D, keras.layers.Dense))}
            names, named, other = [], [], []
            for v in self.model.trainable_variables:
                m = slots[opt._get_variable_index(v)]
                if id(v) in kernels:
                    names.append(kernels[id(v)])
                    named.append(m)
                else:
                    other.append(m)
            self._moment_vars = (names, named, other)
        return self._moment_vars

    def _replica_signals(self, key, loss, grads, abft):
        """One replica's row of signals, float64, on its device (replica context, after the
        optimizer step): its loss; per `key`: max |m| of each kernel's Adam first moment
        (reduce_max propagates NaN) and the L2 norm of the other parameters' (an upper bound of
        their |m|, for the non-finite check); the norm of the all-reduced gradient; the sum of
        the parameters' L2 norms; the largest ABFT residual of its conv / dense calls; the
        checksum of its own copy of the parameters (a param fault, or an opt_state fault through
        the update it feeds, changes them in the step it fires). Few ops per tensor (one L2Loss
        for a norm): on small models the op count, not the data, is the cost."""
        history, with_grads, params, replicas, with_abft = key
        row = [loss]
        if history:
            _, named, other = self._moments()
            row += [tf.reduce_max(tf.abs(tf.convert_to_tensor(m))) for m in named]
            row.append(tf.linalg.global_norm([tf.convert_to_tensor(m) for m in other])
                       if other else 0.0)
        if with_grads:
            row.append(tf.linalg.global_norm(grads))
        if params:
            sq = tf.stack([tf.nn.l2_loss(v) for v in self.model.trainable_variables])
            row.append(tf.reduce_sum(tf.sqrt(2.0 * sq)))
        if with_abft:
            row.append(tf.reduce_max(tf.stack(abft)) if abft else 0.0)
        row = [tf.cast(t, tf.float64) for t in row]
        if replicas:
            row.append(checksum(self.model.trainable_variables))
        return tf.stack(row)

    def _signals(self, step: int, key: tuple, packed: np.ndarray):
        """Signals from the packed vector [loss sum, correct, replica rows...]: per-replica
        values are reported for the worst replica (largest, NaN if any is NaN)."""
        from faultlab.detectors.signals import Signals
        history, with_grads, params, replicas, with_abft = key
        rows = packed[2:].reshape(self.config.replicas, -1)
        worst = [float(np.max(c)) for c in rows.T]
        names = self._moments()[0] if history else []
        i = 1 + len(names)
        m_max = dict(zip(names, worst[1:i]))
        m_other = worst[i] if history else 0.0
        i += history
        grad_norm = worst[i] if with_grads else 0.0
        i += with_grads
        param_norm = worst[i] if params else None
        i += params
        abft = worst[i] if with_abft else None
        return Signals(step=step, loss=float(packed[0]) / self.config.replicas,
                       replica_loss=[float(x) for x in rows[:, 0]], grad_norm=grad_norm,
                       m_max=m_max, m_other=m_other, param_norm=param_norm,
                       replica_checksums=[float(x) for x in rows[:, -1]] if replicas else None,
                       abft_residual=abft)

    def signal_cost(self, spec, suite=None, repeats: int = 50) -> float:
        """Median seconds that collecting `spec`'s signals (and judging them) adds to a step,
        timed in isolation: a function with the same per-replica reductions on the live
        optimizer state and parameters (standing in for the gradients, same sizes), its host
        transfer and the detectors' verdicts, minus the same function reducing nothing (the
        dispatch of a distributed call, which the fused step does not pay). ABFT's cost (a
        checksum convolution per conv / dense call) shows only in the whole-step comparison."""
        from faultlab.replay.overhead import time_signals
        key = self._signal_key(spec)
        if key is None:
            return 0.0
        key, idle = key[:4] + (False,), self._signal_probe((False,) * 5)
        fn = self._signal_probe(key)
        busy = time_signals(lambda: self._signals(0, key, fn().numpy()), suite, repeats)
        return max(0.0, busy - time_signals(lambda: idle().numpy(), None, repeats))

    def _signal_probe(self, key: tuple):
        """A traced function computing `key`'s signals alone, packed as in the step."""
        fn = self._probes.get(key)
        if fn is None:
            tvars, strategy = self.model.trainable_variables, self.strategy

            @tf.function(autograph=False)
            def fn():
                rows = strategy.run(lambda: self._replica_signals(
                    key, tf.constant(0.0), [tf.convert_to_tensor(v) for v in tvars], None))
                zero = tf.constant(0.0)
                return _pack(strategy, rows, zero, zero)
            self._probes[key] = fn
        return fn

    def replica_gradients(self, step: int, faults: Sequence[FaultSpec] = ()):
        """Run step `step` (a normal step, optimizer included) and return each replica's
        gradients as they entered the all-reduce (after injection): {replica: {path: array}}.
        For the replica-isolation test and replica-divergence checks."""
        out, _, _ = self._run(step, faults, True)
        grads = out[3]
        names = [v.path for v in self.model.trainable_variables]
        out = {}
        for g, name in zip(grads, names):
            for r, t in enumerate(self.strategy.experimental_local_results(g)):
                out.setdefault(r, {})[name] = t.numpy()
        return out

    def evaluate(self) -> EvalMetrics:
        if self._eval is None:
            model = self.model

            @tf.function(reduce_retracing=True, autograph=False)
            def eval_fn(x, y):
                out = model(x, training=False)
                ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=out)
                return (tf.reduce_sum(tf.cast(ce, tf.float64)),
                        tf.reduce_sum(tf.cast(tf.equal(tf.argmax(out, -1), y), tf.int64)))
            self._eval = eval_fn
        total, correct, loss_sum = 0, 0, 0.0
        for x, y in self.pipeline.test_batches(256):
            ls, c = self._eval(tf.constant(x), tf.constant(y))
            loss_sum += float(ls)
            correct += int(c)
            total += y.size
        return EvalMetrics(loss_sum / max(total, 1), correct / max(total, 1))

    # --- state ---------------------------------------------------------------------------------

    def _state_vars(self):
        """(key, variable) of everything a checkpoint holds. Keys are positions (plus the
        variable's own name for the model), not Keras paths: auto-generated layer and
        optimizer names change when a process builds a second model."""
        for i, v in enumerate(self.model.weights):
            yield f"model/{i:04d}/{v.name}", v
        for i, v in enumerate(self.optimizer.variables):
            yield f"optim/{i:04d}", v

    def _variable_set(self):
        from faultlab.backends.tf.variables import cached
        return cached(self, "_bulk_vars", [v for _, v in self._state_vars()])

    def prepare_restore(self) -> None:
        """Trace the bulk assign now, so that the first rollback does not pay for it."""
        self._variable_set().prepare()

    def get_state(self) -> dict[str, np.ndarray]:
        """Model and optimizer variables (replica 0's copy; a replica whose copy differs, after
        a parameter or optimizer-state fault, adds `replica{k}/...` entries). One traced read
        of every copy."""
        keys = [k for k, _ in self._state_vars()]
        out: dict[str, np.ndarray] = {}
        for key, copies in zip(keys, self._variable_set().read()):
            first = out[key] = copies[0]
            for k, a in enumerate(copies[1:], 1):
                if a.tobytes() != first.tobytes():
                    out[f"replica{k}/{key}"] = a
        return out

    def set_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore a state from get_state: every replica's copy of every variable, in one
        traced assign."""
        vs = self._variable_set()
        values = []
        for (key, _), copies in zip(self._state_vars(), vs.copies):
            if key not in state:
                raise FaultlabError(f"state has no {key}")
            values.append([state.get(f"replica{k}/{key}", state[key]) if k else state[key]
                           for k in range(len(copies))])
        vs.assign(values)


# --- signal helpers ------------------------------------------------------------------------------

_CAPTURE = threading.local()




def _pack(strategy, rows, loss, correct):
    """[loss sum, correct, replica 0's row, replica 1's row, ...] as one float64 vector."""
    head = tf.stack([tf.cast(loss, tf.float64), tf.cast(correct, tf.float64)])
    return tf.concat([head] + list(strategy.experimental_local_results(rows)), 0)


@contextlib.contextmanager
def _capturing(optimizer, on: bool):
    """While tracing: make `optimizer` report the all-reduced gradients it applies to the
    replica that applies them (see _reduced_gradients); Keras all-reduces in
    `_all_reduce_sum_gradients`, in the replica context. No-op when off."""
    orig = getattr(optimizer, "_all_reduce_sum_gradients", None)
    if not on or orig is None:
        yield
        return

    def reduce(grads_and_vars):
        out = orig(grads_and_vars)
        sink = getattr(_CAPTURE, "sink", None)
        if sink is not None:
            sink.extend(g for g, _ in out if g is not None)
        return out
    optimizer._all_reduce_sum_gradients = reduce
    try:
        yield
    finally:
        del optimizer._all_reduce_sum_gradients


@contextlib.contextmanager
def _reduced_gradients():
    """The all-reduced gradients applied in this thread (a replica's) while the block runs,
    when the optimizer is _capturing; else an empty list."""
    prev, _CAPTURE.sink = getattr(_CAPTURE, "sink", None), []
    try:
        yield _CAPTURE.sink
    finally:
        _CAPTURE.sink = prev


# --- operand shapes ------------------------------------------------------------------------------

_SHAPES: dict[str, dict] = {}


def operand_shapes(config: WorkloadConfig):
    """Every layer's operand shapes (canonical = Keras layout, per replica) from a graph trace
    of one forward pass: nothing is computed, so the artifact's full size is quick."""
    key = config.key()
    if key not in _SHAPES:
        wl = build_workload(config, with_data=False)
        _seed_keras(config.seed)
        model = wl.build()
        spec = tf.TensorSpec((config.per_replica_batch,) + tuple(wl.sample_shape),
                             tf.as_dtype(wl.input_dtype))
        _SHAPES[key] = operand_table(model, spec)
    return _SHAPES[key]
