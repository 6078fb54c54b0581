"""TensorFlow injectors: Keras layer instrumentation, custom-gradient identity points and
gradient / state corruption, armed through variables and keyed on the replica.

(Over 600 lines on purpose: one job, the graph-side instrumentation, whose parts -- the points,
the operand table, ABFT, arming -- share the arming variables' layout and split badly.)

How it fits together:

* :func:`instrument` replaces the ``call`` of every injectable layer of a Keras model (a layer
  with a kernel, embeddings or gamma) by a thin wrapper. Outside an injector's replica scope
  the wrapper calls the original ``call`` and nothing else, so evaluation, shape inference and
  plain use of the model are untouched.
* Inside :meth:`TFInjector.replica` (entered at the top of the replica function given to
  ``strategy.run``) every instrumented call places three *points* in the graph: on the input
  (forward input; in its gradient: the gradient w.r.t. the layer input, and the choice of the
  recomputed backward-operand gradient), on the weight (forward weight, this call only: the
  variable is untouched and its gradient passes straight through) and on the output (forward
  output; in its gradient: grad_out, and for conv / dense layers the artifact's recomputation
  of the input gradient from the stride-dilated incoming gradient and the kernel, one of them
  corrupted). Backward points are ``tf.custom_gradient`` identities: no backward pass is
  written by hand except that recomputation, which uses ``tf.nn.conv2d_backprop_input``.
* Each point reads one int32 from the arming variable ``armed[replica, layer, site]`` (a
  bitmask of slots) with the replica taken from ``replica_id_in_sync_group``; only when it is
  non-zero does the graph run the corruption kernel (faultlab.backends.tf.kernels), with the
  slot's arrays read from two more variables. Arming a new fault is a variable assignment:
  the step function is traced once and never again.
* ``replica(points=False)`` places the same points as bare identities (no Switch, no kernel,
  no arming read): the plain step that the trainer runs whenever no fault is armed in the
  graph (:attr:`TFInjector.armed_in_graph`). Its gradient graph has the points' shape, so the
  tape groups every gradient sum as in the step with the points; under faultlab's Grappler
  options (runtime.ArithmeticOff) the two compute the same bits while nothing fires.
* Weight-gradient faults are applied by :meth:`TFInjector.corrupt_gradients` to the replica's
  gradients before the all-reduce. Stored parameters and optimizer state are mirrored
  variables with one copy per replica; :meth:`TFInjector.arm` corrupts the copy of the
  targeted replica only (eagerly, before the step), so the replicas diverge as real
  data-parallel hardware would.

On CPU and GPU the points use TF's low-level Switch / Merge (an untaken point costs two ops and
the kernel is a separate, never-inlined function); on TPU (XLA) they use ``tf.cond`` and the
kernel runs on fixed-size slot arrays.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import numpy as np
from faultlab.backends.tf.runtime import tf
from faultlab.backends.tf.variables import components
import keras

from faultlab.errors import SpecError
from faultlab.faults import FaultSpec, Site, check_layer, check_operand, check_replica
from faultlab.backends.tf import kernels as K
SITE_CODES = {Site.FWD_INPUT: 0, Site.FWD_WEIGHT: 1, Site.FWD_OUTPUT: 2, Site.GRAD_OUT: 3,
              Site.GRAD_IN: 4, Site.BWD_INPUT: 5, Site.BWD_WEIGHT: 6, Site.GRAD_WT: 7}
GRAD_WT_BIAS = 8
N_SITES = 9
_WEIGHT_ATTRS = ("_kernel", "kernel", "_embeddings", "embeddings", "gamma")
_BIAS_ATTRS = ("bias", "beta")

_LOCAL = threading.local()


# --- graph helpers -------------------------------------------------------------------------------

def _branch(pred, x, fn, static: bool):
    """fn(x) when pred, else x. Switch / Merge: the untaken side is a dead tensor (no work).
    pred None (a context without points): x."""
    if pred is None:
        return x
    if static:
        return tf.cond(pred, lambda: fn(x), lambda: tf.identity(x))
    f, t = tf.raw_ops.Switch(data=x, pred=pred)
    return tf.raw_ops.Merge(inputs=[f, fn(t)])[0]


def _gated(pred, x, fn, static: bool, like):
    """fn(x) when pred; otherwise a dead tensor (static mode: zeros shaped like `like`; pred
    None: zeros, which nothing reads)."""
    if pred is None:
        return tf.zeros_like(like)
    if static:
        return tf.cond(pred, lambda: fn(x), lambda: tf.zeros_like(like))
    _, t = tf.raw_ops.Switch(data=x, pred=pred)
    return fn(t)


def _select(pred, a, b, static: bool):
    """b when pred else a, where b came from _gated(pred, ...)."""
    if pred is None:
        return a
    if static:
        return tf.cond(pred, lambda: tf.identity(b), lambda: tf.identity(a))
    f, _ = tf.raw_ops.Switch(data=a, pred=pred)
    return tf.raw_ops.Merge(inputs=[f, b])[0]


def _is_float_tensor(x) -> bool:
    return isinstance(x, (tf.Tensor, tf.Variable)) and x.dtype.is_floating


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def dilate(g, strides: tuple[int, int], hw: tuple[int, int]):
    """The artifact's INPUT operand of a backward conv: the incoming gradient (N, Ho, Wo, C)
    with stride-1 zeros between its elements, on the input's spatial grid (N, H, W, C). Pure
    data movement (pad / reshape), so the values are exact."""
    sh, sw = strides
    h, w = hw
    if (sh, sw) == (1, 1) and tuple(g.shape[1:3]) == (h, w):
        return g
    ho, wo = int(g.shape[1]), int(g.shape[2])
    d = tf.pad(g[:, :, None, :, None, :], [[0, 0], [0, 0], [0, sh - 1], [0, 0], [0, sw - 1], [0, 0]])
    d = tf.reshape(d, [-1, ho * sh, wo * sw, g.shape[-1]])
    d = d[:, :h, :w, :]
    ph, pw = max(h - ho * sh, 0), max(w - wo * sw, 0)
    if ph or pw:
        d = tf.pad(d, [[0, 0], [0, ph], [0, pw], [0, 0]])
    return d


# --- layers --------------------------------------------------------------------------------------

@dataclass
class LayerInfo:
    """An injectable layer: its name, the attributes of its weight and bias, and whether its
    backward operands can be corrupted (a linear conv2d or dense layer)."""

    name: str
    layer: keras.layers.Layer
    weight_attr: str
    bias_attr: str | None
    kind: str | None            # "conv", "dense" or None

    @property
    def weight(self):
        return self.layer.__dict__[self.weight_attr]

    @property
    def bias(self):
        return self.layer.__dict__.get(self.bias_attr) if self.bias_attr else None


def _is_variable(v) -> bool:
    return isinstance(v, (keras.Variable, tf.Variable))


def describe(name: str, layer) -> LayerInfo | None:
    d = layer.__dict__
    w = next((a for a in _WEIGHT_ATTRS if _is_variable(d.get(a))), None)
    if w is None:
        return None
    b = next((a for a in _BIAS_ATTRS if _is_variable(d.get(a))), None)
    kind = None
    linear = getattr(layer, "activation", None) in (None, keras.activations.linear)
    if isinstance(layer, keras.layers.Conv2D) and linear:
        if (getattr(layer, "groups", 1) == 1 and tuple(layer.dilation_rate) == (1, 1)
                and layer.data_format == "channels_last"
                and layer.padding in ("same", "valid")):
            kind = "conv"
    elif isinstance(layer, keras.layers.Dense) and linear:
        kind = "dense"
    return LayerInfo(name, layer, w, b, kind)


def layer_map(model) -> dict[str, LayerInfo]:
    """Injectable layers of a Keras model by name: every (nested) layer that has a kernel,
    embeddings or gamma variable."""
    out: dict[str, LayerInfo] = {}
    for layer in model._flatten_layers(include_self=False, recursive=True):
        info = describe(layer.name, layer)
        if info is None:
            continue
        if info.name in out and out[info.name].layer is not layer:
            raise SpecError(f"two injectable layers are named {info.name!r}; give the layers "
                            f"of the model unique names")
        out[info.name] = info
    return out


def instrument(model) -> dict[str, LayerInfo]:
    """Wrap the call of every injectable layer of `model` (once; idempotent)."""
    layers = layer_map(model)
    for info in layers.values():
        layer = info.layer
        if layer.__dict__.get("_faultlab_info") is not None:
            object.__setattr__(layer, "_faultlab_info", info)
            continue
        orig = layer.call

        @tf.autograph.experimental.do_not_convert
        def call(*args, __info=info, __orig=orig, **kwargs):
            rec = getattr(_LOCAL, "record", None)
            if rec is not None:
                return _record(rec, __info, __orig, args, kwargs)
            ctx = getattr(_LOCAL, "ctx", None)
            if ctx is None or not args or __info.name not in ctx.injector.index:
                return __orig(*args, **kwargs)
            return ctx.injector._call(ctx, __info, __orig, args, kwargs)
        object.__setattr__(layer, "call", call)
        object.__setattr__(layer, "_faultlab_info", info)
    return layers


def _shape(t) -> tuple[int, ...]:
    return tuple(int(d) if d is not None else -1 for d in t.shape)


def _record(rec: dict, info: LayerInfo, orig, args, kwargs):
    x = args[0] if args else None
    y = orig(*args, **kwargs)
    entry = rec.setdefault(info.name, {})
    w = info.weight
    wd = (w.shape, tf.as_dtype(w.dtype).name)
    wshape = tuple(int(d) for d in w.shape)
    for site in (Site.FWD_WEIGHT, Site.GRAD_WT, Site.PARAM, Site.OPT_STATE):
        entry[site] = (wshape, wd[1])
    if info.kind is not None:
        entry[Site.BWD_WEIGHT] = (wshape, wd[1])
    b = info.bias
    if b is not None:
        entry["bias"] = (tuple(int(d) for d in b.shape), tf.as_dtype(b.dtype).name)
    if isinstance(y, tf.Tensor):
        entry[Site.FWD_OUTPUT] = entry[Site.GRAD_OUT] = (_shape(y), y.dtype.name)
    if isinstance(x, tf.Tensor):
        entry[Site.FWD_INPUT] = entry[Site.GRAD_IN] = (_shape(x), x.dtype.name)
        if info.kind == "conv" and isinstance(y, tf.Tensor):
            n, h, w_, _ = _shape(x)
            entry[Site.BWD_INPUT] = ((n, h, w_, _shape(y)[-1]), y.dtype.name)
        elif info.kind == "dense" and isinstance(y, tf.Tensor):
            entry[Site.BWD_INPUT] = (_shape(y), y.dtype.name)
    return y


def operand_table(model, input_spec: tf.TensorSpec, layers: dict | None = None):
    """{layer: {Site | 'bias': (shape, dtype)}}: every operand's shape in the canonical
    (= Keras) layout for an input of `input_spec` (batch = one replica's), from a graph trace
    of the forward pass (nothing is computed)."""
    if layers is None:
        instrument(model)
    prev = getattr(_LOCAL, "record", None)
    _LOCAL.record = rec = {}
    try:
        tf.function(lambda x: model(x, training=False), autograph=False).get_concrete_function(
            input_spec)
    finally:
        _LOCAL.record = prev
    return rec


def abft_residual(info: LayerInfo, x, w, out):
    """Algorithm-based fault tolerance for a linear conv / dense call: the output's channel sum
    against the input times the stored kernel `w` summed over output channels (plus the bias
    sum), as max |difference| / (max |channel sum| + 1e-6); NaN reads as +Inf. `x` and `out`
    are what the layer received and delivered, so a corrupted output or kernel operand shows
    and a corrupted input does not (the layer computed correctly on it)."""
    x, out = tf.stop_gradient(tf.cast(x, tf.float32)), tf.stop_gradient(tf.cast(out, tf.float32))
    wsum = tf.reduce_sum(tf.cast(tf.stop_gradient(w), tf.float32), -1, keepdims=True)
    layer = info.layer
    if info.kind == "conv":
        ref = tf.nn.conv2d(x, wsum, [int(s) for s in layer.strides], layer.padding.upper())[..., 0]
    else:
        ref = tf.tensordot(x, wsum[:, 0], [[-1], [0]])
    if info.bias is not None:
        ref += tf.reduce_sum(tf.cast(tf.stop_gradient(tf.convert_to_tensor(info.bias)), tf.float32))
    got = tf.reduce_sum(out, -1)
    r = tf.reduce_max(tf.abs(got - ref)) / (tf.reduce_max(tf.abs(got)) + 1e-6)
    return tf.where(tf.math.is_nan(r), tf.constant(float("inf")), r)


# --- the injector ---------------------------------------------------------------------------------

class _WeightScope(keras.StatelessScope):
    """A StatelessScope mapping a layer's weight to its (possibly corrupted) operand, which
    remembers the variable updates and losses made inside it so they can be applied after."""

    def __init__(self, mapping):
        super().__init__(mapping, collect_losses=True, initialize_variables=False)
        self.updates: list = []

    def add_update(self, update):
        super().add_update(update)
        self.updates.append(update)

#: derived columns of the per-replica mask table (after the N_SITES site columns)
BACK_IN, BACK_OUT, ZERO_OUT, BWD = N_SITES, N_SITES + 1, N_SITES + 2, N_SITES + 3
N_COLS = N_SITES + 4

#: the site columns each column of the mask table is made of: a step specialised to an armed
#: set (see TFInjector.replica) places a point only where one of them is armed in its layer
_SITE, _FIN, _FO = SITE_CODES, SITE_CODES[Site.FWD_INPUT], SITE_CODES[Site.FWD_OUTPUT]
DEPENDS = {c: frozenset({c}) for c in range(N_SITES)}
DEPENDS.update({BACK_IN: frozenset({_SITE[Site.GRAD_IN], _FIN}),
                BACK_OUT: frozenset({_SITE[Site.GRAD_OUT], _FO}),
                ZERO_OUT: frozenset({_FO}),
                BWD: frozenset({_SITE[Site.BWD_INPUT], _SITE[Site.BWD_WEIGHT]})})


@dataclass
class _ReplicaCtx:
    """One replica's view of the arming table, computed once at the top of the replica
    function: every kernel mask and every point's predicate is an output of one Unpack op,
    so an idle point costs only its Switch and Merge."""

    injector: "TFInjector"
    masks: list           # int32 scalars, [layer * N_COLS + column]
    preds: list           # bool scalars, mask != 0
    ints: tf.Tensor       # int64 [slots, 5, capacity]
    meta: tf.Tensor       # int64 [slots, 4]
    abft: list | None = None   # ABFT residuals of this replica's conv / dense calls, if asked
    points: bool = True   # False: every point an identity (see TFInjector.replica)
    only: frozenset | None = None   # {(layer, site column)}: points only where these can fire

    def _placed(self, li: int, code: int) -> bool:
        if not self.points:
            return False
        return self.only is None or any((li, c) in self.only for c in DEPENDS[code])

    def mask(self, li: int, code: int):
        return self.masks[li * N_COLS + code] if self._placed(li, code) else None

    def on(self, li: int, code: int):
        return self.preds[li * N_COLS + code] if self._placed(li, code) else None


_components = components   # the per-replica copies of a variable (faultlab.backends.tf.variables)


class TFInjector:
    """Delivers faults into a Keras model trained under a tf.distribute strategy.

    model: a built Keras model (its injectable layers are instrumented); strategy: the
    strategy the model's variables were created under (default: the current one);
    optimizer: a built Keras optimizer (for opt_state faults); input_spec: one replica's
    input (tf.TensorSpec), for the operand shapes that faults are resolved against;
    slots: faults that can fire in one step; capacity: elements one fault can hit."""

    def __init__(self, model, strategy=None, optimizer=None, input_spec=None,
                 slots: int = 4, capacity: int = 4096):
        if not 1 <= slots <= 15:   # two masks of `slots` bits share a non-negative int32
            raise ValueError("slots must be 1..15")
        self.model = model
        self.strategy = strategy or tf.distribute.get_strategy()
        self.optimizer = optimizer
        self.replicas = int(self.strategy.num_replicas_in_sync)
        self.layers = instrument(model)
        self.names = list(self.layers)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.slots, self.capacity = int(slots), int(capacity)
        self.static = _is_tpu(self.strategy)
        self._var_sites: dict[int, tuple[int, int]] = {}
        for i, info in enumerate(self.layers.values()):
            for v, code in ((info.weight, SITE_CODES[Site.GRAD_WT]), (info.bias, GRAD_WT_BIAS)):
                if v is None:
                    continue
                self._var_sites[id(v)] = (i, code)
                if isinstance(v, keras.Variable):  # the tf.Variable behind it, too
                    self._var_sites[id(v.value)] = (i, code)
        shape = (self.replicas, max(len(self.names), 1), N_SITES)
        with self.strategy.scope():
            kw = dict(trainable=False, aggregation=tf.VariableAggregation.NONE)
            self._armed = tf.Variable(tf.zeros(shape, tf.int32), name="faultlab_armed", **kw)
            self._ints = tf.Variable(tf.zeros((self.slots, K.N_INTS, self.capacity), tf.int64),
                                     name="faultlab_slots", **kw)
            self._meta = tf.Variable(tf.zeros((self.slots, K.N_META), tf.int64),
                                     name="faultlab_meta", **kw)
        self._armed_np = np.zeros(shape, np.int32)
        self._slots_np: tuple | None = None   # the (ints, meta) last written to the variables
        self._writer = None                  # _write_all's traced function
        self.table = operand_table(model, input_spec, self.layers) if input_spec is not None else None
        self.fired: list[dict] = []       # what the last arm() armed / applied (for reports)
        self._ops: dict | None = None     # what each layer offers a fault (see _operands)
        self._checked: dict = {}          # id(fault) -> (fault, plan): faults checked once

    # --- graph side (inside the replica function) -----------------------------------------------

    @contextlib.contextmanager
    @tf.autograph.experimental.do_not_convert
    def replica(self, abft: bool = False, points: bool | frozenset = True):
        """Enter at the top of the replica function (inside strategy.run): the instrumented
        layers and corrupt_gradients act for this replica while the block runs. abft: every
        conv / dense call also appends its checksum residual (see abft_residual) to the
        yielded context's `abft` list. points=False: every point is a bare identity (no
        Switch, no kernel, no read of the arming variables; nothing can fire), for the step
        that runs while no fault is armed in the graph. Its gradient graph has the same
        shape, so the tape sums every gradient in the same grouping and order as with the
        points: the two steps compute the same bits (tests/tf/test_idle_step.py).
        points={(layer index, site column), ...} (an :attr:`armed_pattern`): the points of
        those sites of those layers only, every other point a bare identity: a step
        specialised to what is armed, which costs what the plain step costs plus the
        kernels (a Switch / Merge on an activation costs TensorFlow's executor far more
        than the two ops: the step with every point is 1.2x the plain one at width 16)."""
        if points is not True and not isinstance(points, bool):
            only, points = frozenset(points), True
        else:
            only = None
        if not points:
            with self._entered(_ReplicaCtx(self, [], [], None, None, [] if abft else None,
                                           points=False)) as ctx:
                yield ctx
            return
        rc = tf.distribute.get_replica_context()
        rid = rc.replica_id_in_sync_group if rc is not None else 0
        rows = tf.gather(tf.convert_to_tensor(self._armed), rid)      # [layers, N_SITES]
        col = lambda site: rows[:, SITE_CODES[site]]                     # noqa: E731
        shift = lambda m: tf.bitwise.left_shift(m, self.slots)           # noqa: E731
        derived = [tf.bitwise.bitwise_or(col(Site.GRAD_IN), shift(col(Site.FWD_INPUT))),
                   tf.bitwise.bitwise_or(col(Site.GRAD_OUT), shift(col(Site.FWD_OUTPUT))),
                   shift(col(Site.FWD_OUTPUT)),
                   tf.bitwise.bitwise_or(col(Site.BWD_INPUT), col(Site.BWD_WEIGHT))]
        table = tf.reshape(tf.concat([rows, tf.stack(derived, 1)], 1), [-1])
        n = len(self.names) * N_COLS
        masks = tf.unstack(table, num=n)
        preds = tf.unstack(tf.not_equal(table, 0), num=n)
        ints = tf.convert_to_tensor(self._ints)
        if not self.static:
            # the barrier (see _xla_barrier) on a side that never runs: masks are never
            # negative, and Grappler cannot fold a variable's value
            never = tf.equal(rows[0, 0], -1)
            f, t = tf.raw_ops.Switch(data=ints, pred=never)
            ints = tf.raw_ops.Merge(inputs=[f, _xla_barrier()(t)])[0]
        ctx = _ReplicaCtx(self, masks, preds, ints, tf.convert_to_tensor(self._meta),
                          [] if abft else None, only=only)
        with self._entered(ctx):
            yield ctx

    @staticmethod
    @contextlib.contextmanager
    def _entered(ctx: _ReplicaCtx):
        prev = getattr(_LOCAL, "ctx", None)
        _LOCAL.ctx = ctx
        try:
            yield ctx
        finally:
            _LOCAL.ctx = prev

    @property
    def armed_in_graph(self) -> bool:
        """Whether the last arm() armed a fault that the traced step delivers (a graph site:
        every site but param / opt_state, which arm() applies to the variables itself). A
        step without one computes exactly what the plain step computes."""
        return bool(self._armed_np.any())

    @property
    def armed_pattern(self) -> frozenset:
        """{(layer index, site column)} armed in the graph by the last arm(), on any replica:
        the key of a step specialised to it (see replica)."""
        layers, codes = np.nonzero(self._armed_np.any(axis=0))
        return frozenset(zip(layers.tolist(), codes.tolist()))

    def _ctx(self) -> _ReplicaCtx:
        ctx = getattr(_LOCAL, "ctx", None)
        if ctx is None or ctx.injector is not self:
            raise RuntimeError("call this inside `with injector.replica():` in the replica "
                               "function")
        return ctx

    def _kernel(self, ctx, dtype, mask):
        fn = K.kernel_fn(K.dtype_name(dtype), self.static)
        return lambda t: fn(t, mask, ctx.ints, ctx.meta)

    @tf.autograph.experimental.do_not_convert
    def corrupt_gradients(self, grads, variables):
        """The replica's gradients with weight-gradient faults applied (before the all-reduce:
        call this on the tape's gradients, then hand them to the optimizer)."""
        ctx = self._ctx()
        out = []
        for g, v in zip(grads, variables):
            where = self._var_sites.get(id(v))
            if g is None or where is None:
                out.append(g)
                continue
            if isinstance(g, tf.IndexedSlices):
                g = tf.convert_to_tensor(g)
            if not g.dtype.is_floating:
                out.append(g)
                continue
            out.append(_branch(ctx.on(*where), g, self._kernel(ctx, g.dtype, ctx.mask(*where)),
                               self.static))
        return out

    def _call(self, ctx, info: LayerInfo, orig, args, kwargs):
        """An instrumented layer call (see the module docstring)."""
        li = self.index[info.name]
        static = self.static
        x, rest = args[0], args[1:]
        m = lambda code: ctx.mask(li, code)                     # noqa: E731
        on = lambda code: ctx.on(li, code)                       # noqa: E731
        kern = lambda t, code: self._kernel(ctx, t.dtype, m(code))  # noqa: E731
        is_float = _is_float_tensor(x)
        linkable = info.kind is not None and is_float
        FIN, FW = SITE_CODES[Site.FWD_INPUT], SITE_CODES[Site.FWD_WEIGHT]
        FO, GO = SITE_CODES[Site.FWD_OUTPUT], SITE_CODES[Site.GRAD_OUT]

        # --- input and weight points. Forward: fwd_input on the input; fwd_weight on the
        # kernel operand, this call only (the layer sees it through a thread-local Keras
        # StatelessScope: the variable, and other replicas' calls of the same layer object,
        # are untouched). Backward: the weight gradient passes straight through; the input
        # gradient is the recomputed one when a backward-operand fault is armed, then grad_in
        # is applied and the fwd_input positions are zeroed (they were constants).
        w_var = info.weight
        w = tf.convert_to_tensor(w_var)
        if is_float:
            @tf.custom_gradient
            def in_point(t, wt):
                y = _branch(on(FIN), t, kern(t, FIN), static)
                wc = _branch(on(FW), wt, kern(wt, FW), static)

                def grad(*gs):
                    if linkable:
                        g_core, g_link, g_w = gs
                        dx = _select(on(BWD), g_core, g_link, static)
                    else:
                        g_core, g_w = gs
                        dx = g_core
                    return _branch(on(BACK_IN), dx, kern(dx, BACK_IN), static), g_w
                return ((y, y, wc) if linkable else (y, wc)), grad
            outs = in_point(x, w)
            x_core, x_link, wc = outs if linkable else (outs[0], None, outs[1])
        else:
            @tf.custom_gradient
            def w_point(wt):
                return _branch(on(FW), wt, kern(wt, FW), static), lambda g: g
            x_core, x_link, wc = x, None, w_point(w)

        scope = _WeightScope([(w_var, wc)])
        with scope:
            y = orig(x_core, *rest, **kwargs)
        for var, value in scope.updates:   # e.g. BatchNorm's moving statistics
            var.assign(value)
        for loss in scope.losses:
            info.layer.add_loss(loss)
        if not _is_float_tensor(y):
            return y

        # --- output point. Forward: fwd_output. Backward: grad_out, then the fwd_output
        # positions are zeroed; conv / dense layers also recompute their input gradient from
        # the gradient seen at the output (after grad_out) when a backward-operand fault is on.
        if x_link is None:
            @tf.custom_gradient
            def out_point(t):
                return (_branch(on(FO), t, kern(t, FO), static),
                        lambda g: _branch(on(BACK_OUT), g, kern(g, BACK_OUT), static))
            return out_point(y)

        recompute = self._recompute(ctx, info, li, x, w)

        @tf.custom_gradient
        def out_link(t, _link):
            def grad(g):
                g_seen = _branch(on(GO), g, kern(g, GO), static)
                g_core = _branch(on(FO), g_seen, kern(g_seen, ZERO_OUT), static)
                return g_core, _gated(on(BWD), g_seen, recompute, static, x)
            return _branch(on(FO), t, kern(t, FO), static), grad
        out = out_link(y, x_link)
        if ctx.abft is not None:
            ctx.abft.append(abft_residual(info, x_core, w, out))
        return out

    def _recompute(self, ctx, info: LayerInfo, li: int, x, w):
        """g (at the layer output) -> gradient w.r.t. the layer input, recomputed with the
        bwd_input operand (the dilated gradient) or the bwd_weight operand corrupted."""
        BI, BW = SITE_CODES[Site.BWD_INPUT], SITE_CODES[Site.BWD_WEIGHT]
        static = self.static
        k_bi = self._kernel(ctx, w.dtype, ctx.mask(li, BI))
        k_bw = self._kernel(ctx, w.dtype, ctx.mask(li, BW))
        layer = info.layer
        xshape = x.shape

        def fn(g):
            wc = _branch(ctx.on(li, BW), w, k_bw, static)
            if info.kind == "dense":
                gc = _branch(ctx.on(li, BI), g, k_bi, static)
                return tf.tensordot(gc, wc, axes=[[-1], [1]])
            kh, kw_ = (int(k) for k in layer.kernel_size)
            sh, sw = (int(s) for s in layer.strides)
            h, wd = int(xshape[1]), int(xshape[2])
            if layer.padding == "same":
                pt, pl = _same_pads(h, kh, sh)[0], _same_pads(wd, kw_, sw)[0]
            else:
                pt = pl = 0
            d = dilate(g, (sh, sw), (h, wd))
            d = _branch(ctx.on(li, BI), d, k_bi, static)
            return tf.compat.v1.nn.conv2d_backprop_input(
                tf.shape(x), wc, d, strides=[1, 1, 1, 1],
                padding=[[0, 0], [pt, kh - 1 - pt], [pl, kw_ - 1 - pl], [0, 0]])
        return fn

    # --- host side ---------------------------------------------------------------------------------

    def _operands(self) -> dict:
        """{layer: {Site | "bias": (shape, dtype)}}: what each layer offers a fault (graph
        sites from the operand table when there is one; stored parameters and optimizer
        state from the variables), built once."""
        if self._ops is None:
            ops = {}
            for name, info in self.layers.items():
                entry = dict(self.table.get(name, {})) if self.table is not None else {}
                w = info.weight
                wd = (tuple(int(d) for d in w.shape), tf.as_dtype(w.dtype).name)
                entry[Site.PARAM] = entry[Site.OPT_STATE] = wd
                b = info.bias
                if b is not None:
                    entry["bias"] = (tuple(int(d) for d in b.shape), tf.as_dtype(b.dtype).name)
                ops[name] = entry
            self._ops = ops
        return self._ops

    def _check(self, f: FaultSpec):
        """Range-check a fault (replica, layer, site, positions: see validate) and return what
        arming it needs: (layer index, site column, shape, dtype) for a graph site, None for a
        state fault. A fault object is checked once (arm_active hands over every fault at
        every step)."""
        hit = self._checked.get(id(f))
        if hit is not None and hit[0] is f:
            return hit[1]
        check_replica(f, self.replicas, "this strategy")
        check_layer(f, self.names)
        if not f.site.is_state and self.table is None:
            raise SpecError("the injector has no operand shapes: give input_spec")
        operand = check_operand(f, self._operands()[f.layer])
        if f.site.is_state:
            self._state_var(f)    # the optimizer and its slot exist
            plan = None
        else:
            shape, dtype = operand
            if dtype not in K.TF_DTYPES:
                raise SpecError(f"cannot corrupt the {f.site.value} operand of {f.layer}: "
                                f"dtype {dtype}", "site")
            code = (GRAD_WT_BIAS if f.site is Site.GRAD_WT and f.tensor == "bias" else
                    SITE_CODES[f.site])
            plan = (self.index[f.layer], code, shape, dtype)
        if len(self._checked) >= 4096:
            self._checked.clear()
        self._checked[id(f)] = (f, plan)
        return plan

    def validate(self, faults) -> None:
        """Raise a one-line SpecError (field "replica", "layer", "site" or "positions"; the
        message lists the valid choices) for the first fault this injector cannot deliver:
        a replica outside the strategy's, a layer the model does not have, a site the layer
        does not have, a position outside the operand (canonical = Keras layout, one
        replica's batch). arm() and arm_active() call it before anything is armed."""
        for f in faults:
            self._check(f)

    def _state_var(self, f: FaultSpec):
        info = self.layers.get(f.layer)
        if info is None:
            check_layer(f, self.names)
        if f.site is Site.PARAM:
            v = info.bias if f.tensor == "bias" else info.weight
            if v is None:
                check_operand(f, self._operands()[f.layer])
            return v
        if f.site is Site.OPT_STATE:
            opt = self.optimizer
            if opt is None:
                raise SpecError("optimizer-state faults need the optimizer (TFInjector(..., "
                                "optimizer=...))", "site")
            slot_list = (getattr(opt, "_velocities", None) if f.tensor == "v" else
                         getattr(opt, "_momentums", None) or getattr(opt, "momentums", None))
            if not slot_list:
                raise SpecError(f"optimizer {type(opt).__name__} has no "
                                f"'{'v' if f.tensor == 'v' else 'm'}' state", "site")
            try:
                i = opt._get_variable_index(info.weight)
            except (KeyError, ValueError, AttributeError):
                raise SpecError(f"the optimizer does not train {f.layer}", "layer") from None
            return slot_list[i]
        raise SpecError(f"site {f.site.value} is not supported by the TensorFlow injector (no "
                        f"offloaded host state in this workload)", "site")

    def apply_state_fault(self, f: FaultSpec, step: int) -> None:
        """Corrupt the stored parameter / optimizer slot of f's replica, now (eagerly)."""
        self._check(f)
        comps = _components(self._state_var(f))
        comp = comps[f.replica if len(comps) > 1 else 0]
        dtype = comp.dtype.name
        c = f.resolve(tuple(int(d) for d in comp.shape), dtype, step)
        p = K.prepare(c, dtype)
        comp.assign(K.apply(comp.read_value(), p, self.static))

    def arm(self, faults, step: int) -> None:
        """Arm `faults` (those firing at `step`) for the next step and apply their state
        faults; every fault not given is disarmed. Every fault is checked first (validate):
        a SpecError leaves the armed faults and the variables as they were."""
        faults = list(faults)
        plans = [self._check(f) for f in faults]
        if sum(p is not None for p in plans) > self.slots:
            raise SpecError(f"more than {self.slots} faults fire at step {step}; build the "
                            f"injector with more slots")
        prepared = []
        for f, plan in zip(faults, plans):
            if plan is None:
                prepared.append(None)
                continue
            shape, dtype = plan[2], plan[3]
            p = K.prepare(f.resolve(shape, dtype, step), dtype)
            p.check(int(np.prod(shape)) if shape else 1)
            if p.n > self.capacity:
                raise SpecError(f"a fault hitting {p.n} elements exceeds the injector's "
                                f"capacity of {self.capacity}; build it with more")
            prepared.append(p)
        armed = np.zeros_like(self._armed_np)
        ints = np.zeros((self.slots, K.N_INTS, self.capacity), np.int64)
        meta = np.zeros((self.slots, K.N_META), np.int64)
        slot = 0
        self.fired = []
        for f, plan, p in zip(faults, plans, prepared):
            if plan is None:
                self.apply_state_fault(f, step)
                self.fired.append({"site": f.site.value, "layer": f.layer, "replica": f.replica})
                continue
            ints[slot], meta[slot] = p.slot(self.capacity)
            armed[f.replica, plan[0], plan[1]] |= np.int32(1 << slot)
            self.fired.append({"site": f.site.value, "layer": f.layer, "replica": f.replica,
                               "slot": slot, "elements": p.n})
            slot += 1
        # a fault re-armed with the same arrays (a permanent one, say) writes nothing, and
        # new ones are written in one traced call: an eager assign of a mirrored variable
        # costs about a millisecond on the step's critical path
        new_slots = slot and not (self._slots_np is not None
                                  and np.array_equal(ints[:slot], self._slots_np[0][:slot])
                                  and np.array_equal(meta[:slot], self._slots_np[1][:slot]))
        new_armed = not np.array_equal(armed, self._armed_np)
        if new_slots:
            self._write_all(armed, ints, meta)
            self._slots_np = (ints, meta)
        elif new_armed:
            self._armed.assign(armed)
        self._armed_np = armed

    def _write_all(self, armed, ints, meta) -> None:
        """Assign the arming table and the slot arrays (every replica's copy) in one call of a
        function traced once."""
        if self._writer is None:
            variables = (self._armed, self._ints, self._meta)

            @tf.function(autograph=False, input_signature=[
                tf.TensorSpec(v.shape, v.dtype) for v in variables])
            def write(*values):
                for v, value in zip(variables, values):
                    v.assign(value)
            self._writer = write
        self._writer(armed, ints, meta)

    def disarm(self) -> None:
        self.arm((), 0)


_BARRIER = []


def _xla_barrier():
    """An identity on the slot arrays, as 12 nested never-inlined functions.

    Why: TensorFlow's EncapsulateSubgraphsPass (an XLA pass that runs on every function
    graph, XLA or not) looks for reference variables behind every function call node,
    instantiating the callee again for each call site. With one kernel call per injection
    point that costs minutes for a ResNet. It stops looking at a node fed by a node it already
    flagged, and it flags a call nested deeper than its limit (10) without instantiating
    anything. Every kernel call reads the slot arrays through this barrier, so the pass flags
    the barrier once and every injection point after it for free. The flag only matters to
    XLA auto-clustering, which faultlab does not use. At run time the barrier sits on the
    untaken side of a Switch, so it costs nothing."""
    if not _BARRIER:
        spec = [tf.TensorSpec([None, K.N_INTS, None], tf.int64)]
        attrs = {"_noinline": True}
        fn = tf.function(tf.identity, input_signature=spec, autograph=False,
                         experimental_attributes=attrs).get_concrete_function()
        for _ in range(11):
            fn = tf.function(lambda t, inner=fn: inner(t), input_signature=spec,
                             autograph=False, experimental_attributes=attrs
                             ).get_concrete_function()
        _BARRIER.append(fn)
    return _BARRIER[0]


def _is_tpu(strategy) -> bool:
    return type(strategy).__name__.startswith("TPUStrategy")
