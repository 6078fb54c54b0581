"""Torch injectors: faults delivered through module, tensor and optimizer hooks.

Hooks are installed at the start of a step for the faults that fire in that step and removed at
its end, so a trial costs nothing between its injections and a model is left exactly as it was.
Every hook checks the emulated replica, so a fault hits one replica's shard only.

Positions arrive in the canonical layout (NHWC / HWIO / (in, out)) and are remapped here onto
torch's NCHW / OIHW / (out, in) memory layout.
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from faultlab.errors import SpecError
from faultlab.faults import (FaultSpec, Site, check_layer, check_operand, check_replica,
                             choices)
from faultlab.backends.torch.kernels import prepare

# A full backward hook on the first layer (whose input needs no gradient) makes torch warn at
# every backward; the hooks handle the missing input gradient, so the warning is only noise.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are "
                        "computed with respect to module outputs", category=UserWarning)


# --- canonical <-> torch layouts -----------------------------------------------------------------

def act_perm(ndim: int) -> tuple[int, ...]:
    """torch axis i of an activation holds canonical axis perm[i] (NCHW <- NHWC for 4-D)."""
    return (0, 3, 1, 2) if ndim == 4 else tuple(range(ndim))


def weight_perm(ndim: int) -> tuple[int, ...]:
    """OIHW <- HWIO for conv kernels, (out, in) <- (in, out) for dense kernels."""
    return (3, 2, 0, 1) if ndim == 4 else (1, 0) if ndim == 2 else tuple(range(ndim))


def canonical_shape(torch_shape, perm) -> tuple[int, ...]:
    out = [0] * len(perm)
    for i, p in enumerate(perm):
        out[p] = int(torch_shape[i])
    return tuple(out)


def remap(flat: np.ndarray, canon_shape: tuple[int, ...], perm: tuple[int, ...]) -> np.ndarray:
    """Flat canonical indices -> flat indices of the permuted (torch) layout."""
    if perm == tuple(range(len(perm))):
        return flat
    multi = np.unravel_index(flat, canon_shape)
    return np.ravel_multi_index(tuple(multi[p] for p in perm),
                                tuple(canon_shape[p] for p in perm)).astype(np.int64)


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _unshadow(mod: nn.Module, name: str) -> None:
    """Remove a fwd_weight fault's corrupted stand-in for parameter `name` of `mod`."""
    if mod.__dict__.pop(name, None) is not None and isinstance(mod, nn.RNNBase):
        mod._init_flat_weights()


class _Substitute(torch.autograd.Function):
    """Forward: the corrupted tensor, exactly. Backward: the gradient passes to the original."""

    @staticmethod
    def forward(ctx, original, corrupted):
        return corrupted.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


# --- what a module takes and returns, by name ----------------------------------------------------

def input_names(mod: nn.Module) -> tuple[str, ...]:
    """The names of a module's positional tensor inputs a fwd_input fault can name (the
    first is the default): MultiheadAttention's query, key, value; "input" otherwise."""
    if isinstance(mod, nn.MultiheadAttention):
        return ("query", "key", "value")
    return ("input",)


def output_paths(mod: nn.Module, out) -> dict[str, tuple[int, ...]]:
    """{name: path into the returned (nested) tuple} of every tensor `mod` returned as `out`
    (the first is the default of a fwd_output fault): "output" for a tensor; LSTM's output,
    h_n, c_n; GRU's and RNN's output, h_n; MultiheadAttention's output, attn_weights; any
    other tuple's tensors as "0", "1", "1.0", ... (the first also as "output")."""
    if isinstance(out, torch.Tensor):
        return {"output": ()}
    if isinstance(mod, nn.LSTM):
        named = {"output": (0,), "h_n": (1, 0), "c_n": (1, 1)}
    elif isinstance(mod, nn.RNNBase):
        named = {"output": (0,), "h_n": (1,)}
    elif isinstance(mod, nn.MultiheadAttention):
        named = {"output": (0,), "attn_weights": (1,)}
    else:
        named = {}

        def walk(o, path):
            if isinstance(o, torch.Tensor):
                named.setdefault("output", path)
                named[".".join(map(str, path))] = path
            elif isinstance(o, (tuple, list)):
                for i, x in enumerate(o):
                    walk(x, path + (i,))
        walk(out, ())
        return named
    return {k: p for k, p in named.items() if isinstance(output_at(out, p), torch.Tensor)}


def output_at(out, path: tuple[int, ...]):
    """The element of a (nested) tuple at `path`, None where there is none."""
    for i in path:
        if not isinstance(out, (tuple, list)) or i >= len(out):
            return None
        out = out[i]
    return out


def replace_at(out, path: tuple[int, ...], new):
    """`out` with the element at `path` replaced by `new` (tuples, named tuples, lists)."""
    if not path:
        return new
    items = list(out)
    items[path[0]] = replace_at(items[path[0]], path[1:], new)
    if isinstance(out, list):
        return items
    return type(out)(*items) if hasattr(out, "_fields") else tuple(items)


def opt_target(tensor: str | None) -> tuple[str, str]:
    """(parameter name, optimizer state name) an opt_state fault's `tensor` names:
    "m" / "v" (Adam's moments) or "weight" / "bias" (the exp_avg of that parameter), a
    state name of the weight ("exp_avg", "momentum_buffer", "sum", ...), or
    "<parameter>.<state>" ("weight_hh_l0.exp_avg_sq")."""
    legacy = {None: ("weight", "exp_avg"), "m": ("weight", "exp_avg"),
              "v": ("weight", "exp_avg_sq"), "weight": ("weight", "exp_avg"),
              "bias": ("bias", "exp_avg")}
    if tensor in legacy:
        return legacy[tensor]
    param, _, slot = tensor.rpartition(".")
    return param or "weight", {"m": "exp_avg", "v": "exp_avg_sq"}.get(slot, slot)


# --- backward operand recomputation --------------------------------------------------------------

def conv_geometry(mod: nn.Conv2d, h: int, w: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) input padding a conv module applies to an h x w input."""
    if hasattr(mod, "pads"):
        return mod.pads(h, w)
    if isinstance(mod.padding, str):
        if mod.padding == "valid":
            return (0, 0, 0, 0)
        kh, kw = mod.kernel_size
        return ((kh - 1) // 2, kh // 2, (kw - 1) // 2, kw // 2)
    ph, pw = mod.padding
    return (ph, ph, pw, pw)


def dilated_grad(mod: nn.Conv2d, g: torch.Tensor, in_hw: tuple[int, int]) -> torch.Tensor:
    """The artifact's INPUT operand of a backward conv: the incoming gradient dilated by the
    stride, on the input's spatial grid (N, C_out, H_in, W_in)."""
    sh, sw = mod.stride
    n, c, ho, wo = g.shape
    h, w = in_hw
    if (ho - 1) * sh + 1 > h or (wo - 1) * sw + 1 > w:
        raise SpecError("backward operand faults need padding <= kernel - 1")
    if sh == 1 and sw == 1 and (ho, wo) == (h, w):
        return g
    d = g.new_zeros((n, c, h, w))
    d[:, :, 0:(ho - 1) * sh + 1:sh, 0:(wo - 1) * sw + 1:sw] = g
    return d


def conv_grad_input(mod: nn.Conv2d, d: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """grad_in[x] = sum_a D[x + pad_before - a] W[a]: a full convolution of the dilated gradient
    with the 180-degree-rotated kernel, as the artifact computes it."""
    if mod.groups != 1 or tuple(mod.dilation) != (1, 1):
        raise SpecError("backward operand faults support groups=1, dilation=1 convolutions")
    kh, kw = weight.shape[-2:]
    t, _, l, _ = conv_geometry(mod, d.shape[-2], d.shape[-1])
    dp = F.pad(d, (kw - 1 - l, l, kh - 1 - t, t))
    return F.conv2d(dp, weight.flip(-1, -2).transpose(0, 1))


# --- operand shapes --------------------------------------------------------------------------------

def record_operands(table: dict, name: str, m: nn.Module, args, out) -> None:
    """Add layer `name`'s operands (canonical shapes and dtypes, by site) seen in one call of
    module `m` (a forward hook's arguments) to `table`. The one copy of this logic:
    operand_table and the torch trainer's operand_shapes (meta device) both hook it in."""
    x = args[0] if args else None
    entry = table.setdefault(name, {})
    w = m.weight
    wshape = canonical_shape(w.shape, weight_perm(w.dim()))
    wd = dtype_name(w)
    entry.update({Site.FWD_WEIGHT: (wshape, wd), Site.GRAD_WT: (wshape, wd),
                  Site.PARAM: (wshape, wd), Site.OPT_STATE: (wshape, wd),
                  Site.BWD_WEIGHT: (wshape, wd)})
    if getattr(m, "bias", None) is not None:
        entry["bias"] = (tuple(m.bias.shape), dtype_name(m.bias))
    if isinstance(out, torch.Tensor):
        oshape = canonical_shape(out.shape, act_perm(out.dim()))
        entry[Site.FWD_OUTPUT] = entry[Site.GRAD_OUT] = (oshape, dtype_name(out))
    if isinstance(x, torch.Tensor):
        ishape = canonical_shape(x.shape, act_perm(x.dim()))
        entry[Site.FWD_INPUT] = entry[Site.GRAD_IN] = (ishape, dtype_name(x))
        if isinstance(m, nn.Conv2d) and isinstance(out, torch.Tensor):
            # the dilated incoming gradient lives on the input's spatial grid
            n, h, w_, _ = ishape
            entry[Site.BWD_INPUT] = ((n, h, w_, oshape[-1]), dtype_name(out))
        elif isinstance(m, nn.Linear) and isinstance(out, torch.Tensor):
            entry[Site.BWD_INPUT] = (oshape, dtype_name(out))
    if not isinstance(m, (nn.Conv2d, nn.Linear)):
        entry.pop(Site.BWD_WEIGHT, None)


def operand_table(model: nn.Module, example_input, layers: dict | None = None) -> dict:
    """{layer: {Site | "bias": (shape, dtype)}}: every injectable layer's operands in the
    canonical layout, from one forward pass of `model` on `example_input` (one replica's
    batch, in torch's layout), in eval mode and without gradients: the model's parameters,
    buffers and train / eval modes are left as they were. `layers` defaults to
    faultlab.backends.torch.models.layer_map(model)."""
    if layers is None:
        from faultlab.backends.torch.models import layer_map
        layers = layer_map(model)
    table: dict[str, dict] = {}
    modes = [(m, m.training) for m in model.modules()]
    handles = [mod.register_forward_hook(
        lambda m, args, out, name=name: record_operands(table, name, m, args, out))
        for name, mod in layers.items()]
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    return table


# --- the injector --------------------------------------------------------------------------------

@dataclass
class _Firing:
    fault: FaultSpec
    step: int
    cache: dict = field(default_factory=dict)


class TorchInjector:
    """Installs the hooks that deliver a step's faults into a model (and its optimizer).

    layers: the injectable layers by name (faultlab.backends.torch.models.layer_map);
    optimizer: for opt_state faults; replicas: how many replicas the caller emulates (the
    values it gives ``injector.replica``), so a fault's replica is range-checked. It defaults
    to 1, a plain single-process model: ``TorchInjector(layers)`` then accepts replica 0
    only, and a fault on any other replica is a SpecError. A loop that emulates R replicas
    (sets ``injector.replica`` to 0..R-1, as TorchTrainer does) passes ``replicas=R``.
    operands: the activation operands' shapes, canonical layout, one replica's batch
    ({layer: {site: (shape, dtype)}}: :func:`operand_table` of the model on one replica's
    input, or ``operand_shapes(config)`` of the torch trainer), so activation positions are
    range-checked too. Weight-shaped operands are always checked (their shapes come from the
    layers). Checks run when faults are handed over (begin_step, validate)."""

    def __init__(self, layers: dict[str, nn.Module], optimizer: torch.optim.Optimizer | None = None,
                 *, replicas: int = 1, operands=None):
        try:
            n = None if isinstance(replicas, bool) else operator.index(replicas)
        except TypeError:
            n = None
        if n is None or n < 1:
            raise ValueError(f"replicas must be an integer of at least 1, got {replicas!r}")
        self.layers = layers
        self.optimizer = optimizer
        self.replicas = n
        self._entries: dict[str, dict] = {}
        self.operands = operands
        self.replica = 0          # the emulated replica whose shard is being computed
        self.copies = None        # ReplicaCopies: per-replica parameter / optimizer copies
        self._handles: list = []
        self._shadowed: list[nn.Module] = []

    @property
    def operands(self):
        """The activation operands' shapes faults are checked against (None: unchecked)."""
        return self._operands

    @operands.setter
    def operands(self, table) -> None:
        self._operands = table
        self._entries.clear()

    # corruption of one tensor, resolved once per (fault, step, shape)
    def _corrupt(self, fi: _Firing, t: torch.Tensor, perm, inplace: bool = False) -> torch.Tensor:
        key = (tuple(t.shape), t.dtype, t.device)
        tc = fi.cache.get(key)
        if tc is None:
            canon = canonical_shape(t.shape, perm)
            try:
                c = fi.fault.resolve(canon, dtype_name(t), fi.step)
            except SpecError:
                self.end_step()       # a stale hook must not fail every later call
                raise
            src = remap(c.src, canon, perm) if c.src is not None else None
            tc = prepare(c, t, index=remap(c.index, canon, perm), src=src)
            fi.cache[key] = tc
        return tc.apply_(t) if inplace else tc.apply(t)

    def _mine(self, fi: _Firing) -> bool:
        return self.replica == fi.fault.replica

    def layer(self, name: str) -> nn.Module:
        try:
            return self.layers[name]
        except KeyError:
            raise SpecError(f"unknown layer {name!r}: valid layers are "
                            f"{choices(self.layers)}", "layer") from None

    @staticmethod
    def operand_table(model: nn.Module, example_input, layers: dict | None = None) -> dict:
        """{layer: {Site | "bias": (shape, dtype)}}: the operands of `model`'s injectable
        layers (canonical layout) for `example_input` (one replica's batch, torch layout),
        for ``TorchInjector(..., operands=)``; see :func:`operand_table`."""
        return operand_table(model, example_input, layers)

    def _entry(self, name: str) -> dict:
        """{Site | "bias": (shape, dtype) or None}: the operands layer `name` offers a fault,
        canonical layout; None where the shape is not known (an activation without
        `operands`). Built once per layer."""
        entry = self._entries.get(name)
        if entry is not None:
            return entry
        mod = self.layers[name]
        known = (self._operands or {}).get(name)
        entry = {}

        def activation(site):
            if known is None:
                entry[site] = None              # any shape: checked when the hook resolves it
            elif site in known:
                entry[site] = known[site]
        for site in (Site.FWD_INPUT, Site.FWD_OUTPUT, Site.GRAD_OUT, Site.GRAD_IN):
            activation(site)
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor):
            wd = (canonical_shape(w.shape, weight_perm(w.dim())), dtype_name(w))
            entry[Site.GRAD_WT] = entry[Site.PARAM] = entry[Site.OPT_STATE] = wd
            if isinstance(mod._parameters.get("weight"), torch.Tensor):
                entry[Site.FWD_WEIGHT] = wd
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                entry[Site.BWD_WEIGHT] = wd
                activation(Site.BWD_INPUT)
        b = getattr(mod, "bias", None)
        if isinstance(b, torch.Tensor):
            entry["bias"] = (tuple(int(d) for d in b.shape), dtype_name(b))
        self._entries[name] = entry
        return entry

    def validate(self, faults) -> None:
        """Raise a one-line SpecError (field "replica", "layer", "site" or "positions"; the
        message lists the valid choices) for the first fault this injector cannot deliver:
        a replica outside `replicas`, a layer not in `layers`, a site the layer does not have
        (a backward operand of a layer that is not conv / linear, a bias it lacks, optimizer
        state without an optimizer), a position outside the operand's canonical shape
        (weights always, activations with `operands`). begin_step calls it first."""
        for f in faults:
            check_replica(f, self.replicas, "this injector")
            check_layer(f, self.layers)
            check_operand(f, self._entry(f.layer))
            if f.site is Site.OPT_STATE and self.optimizer is None:
                raise SpecError("optimizer-state faults need the optimizer "
                                "(TorchInjector(layers, optimizer))", "site")

    def begin_step(self, faults, step: int, *, checked: bool = False) -> None:
        """Install hooks for `faults` (those firing at `step`); state faults apply at once.
        Every fault is checked first (validate; `checked`: the caller has checked them,
        as faultlab.torch.Injector does against its own tables), so a SpecError installs
        and corrupts nothing."""
        self.end_step()
        faults = list(faults)
        if not checked:
            self.validate(faults)
        for f in faults:
            self._install(_Firing(f, step))

    def end_step(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for mod, name in self._shadowed:
            _unshadow(mod, name)
        self._shadowed.clear()

    def _tensor(self, mod: nn.Module, name: str | None) -> torch.Tensor:
        t = getattr(mod, name or "weight", None)
        if not isinstance(t, torch.Tensor):
            raise SpecError(f"layer has no {name or 'weight'} tensor")
        return t

    def _install(self, fi: _Firing) -> None:
        f = fi.fault
        mod = self.layer(f.layer)
        site = f.site
        add = self._handles.append

        if site is Site.FWD_INPUT and f.tensor not in (None, "input"):
            name = f.tensor
            names = input_names(mod)
            at = names.index(name) if name in names else None

            def pre_kw(m, args, kwargs):
                if not self._mine(fi):
                    return None
                x = kwargs.get(name)
                if isinstance(x, torch.Tensor):
                    kwargs = dict(kwargs)
                    kwargs[name] = self._corrupt(fi, x, act_perm(x.dim()))
                    return args, kwargs
                if at is not None and at < len(args) and isinstance(args[at], torch.Tensor):
                    x = args[at]
                    args = args[:at] + (self._corrupt(fi, x, act_perm(x.dim())),) + args[at + 1:]
                    return args, kwargs
                raise SpecError(f"layer {f.layer} was called without a tensor {name!r}",
                                "tensor")
            add(mod.register_forward_pre_hook(pre_kw, with_kwargs=True))

        elif site is Site.FWD_INPUT:
            def pre(m, args):
                if self._mine(fi) and args and isinstance(args[0], torch.Tensor):
                    x = args[0]
                    return (self._corrupt(fi, x, act_perm(x.dim())),) + tuple(args[1:])
            add(mod.register_forward_pre_hook(pre))

        elif site is Site.FWD_OUTPUT:
            def post(m, args, out):
                if self._mine(fi):
                    if isinstance(out, torch.Tensor) and f.tensor in (None, "output"):
                        return self._corrupt(fi, out, act_perm(out.dim()))
                    path = output_paths(m, out).get(f.tensor or "output")
                    if path is None:
                        self.end_step()
                        raise SpecError(f"layer {f.layer} returned no tensor "
                                        f"{f.tensor or 'output'!r}", "tensor")
                    t = output_at(out, path)
                    return replace_at(out, path, self._corrupt(fi, t, act_perm(t.dim())))
            add(mod.register_forward_hook(post))

        elif site is Site.FWD_WEIGHT:
            # Shadow the parameter with a corrupted tensor for this call only: an instance
            # attribute wins over nn.Module.__getattr__, and _parameters is never touched.
            # (An RNN reads its weights from _flat_weights, rebuilt from the attributes.)
            wname = f.tensor or "weight"

            def pre_w(m, args):
                if self._mine(fi):
                    w = m._parameters[wname]
                    wc = self._corrupt(fi, w.detach(), weight_perm(w.dim()))
                    m.__dict__[wname] = _Substitute.apply(w, wc)
                    if isinstance(m, nn.RNNBase):
                        m._init_flat_weights()
                    self._shadowed.append((m, wname))

            def post_w(m, args, out):
                _unshadow(m, wname)
            add(mod.register_forward_pre_hook(pre_w))
            add(mod.register_forward_hook(post_w))

        elif site is Site.GRAD_OUT:
            def bpre(m, grad_output):
                if self._mine(fi) and grad_output[0] is not None:
                    g = grad_output[0]
                    return (self._corrupt(fi, g, act_perm(g.dim())),) + tuple(grad_output[1:])
            add(mod.register_full_backward_pre_hook(bpre))

        elif site is Site.GRAD_IN:
            def bhook(m, grad_input, grad_output):
                if self._mine(fi) and grad_input and grad_input[0] is not None:
                    g = grad_input[0]
                    return (self._corrupt(fi, g, act_perm(g.dim())),) + tuple(grad_input[1:])
            add(mod.register_full_backward_hook(bhook))

        elif site in (Site.BWD_INPUT, Site.BWD_WEIGHT):
            if not isinstance(mod, (nn.Conv2d, nn.Linear)):
                raise SpecError(f"backward operand faults need a conv or dense layer, "
                                f"{f.layer} is {type(mod).__name__}")
            add(mod.register_full_backward_hook(self._bwd_operand_hook(fi)))

        elif site is Site.GRAD_WT:
            p = self._tensor(mod, f.tensor)

            def ghook(g):
                if self._mine(fi):
                    return self._corrupt(fi, g, weight_perm(g.dim()))
            add(p.register_hook(ghook))

        elif site is Site.PARAM:
            # Stored parameters are mirrored variables: the fault hits the replica's own copy
            # (forked from the shared one; without replica copies, the one shared copy).
            p = self._tensor(mod, f.tensor)
            target = self.copies.param(f.replica, p) if self.copies is not None else p.data
            with torch.no_grad():
                self._corrupt(fi, target, weight_perm(p.dim()), inplace=True)

        elif site is Site.OPT_STATE:
            if self.optimizer is None:
                raise SpecError("optimizer-state faults need a workload with an optimizer")
            pname, slot = opt_target(f.tensor)
            p = self._tensor(mod, pname)

            if self.copies is not None:
                self.copies.fork(f.replica)   # the replica's own optimizer state diverges
            created = []                      # the state this step creates is hit after it

            def hit(opt, st):
                if slot not in st:
                    self.end_step()
                    raise SpecError(f"optimizer {type(opt).__name__} has no '{slot}' state "
                                    f"for {f.layer} at step {fi.step}", "tensor")
                with torch.no_grad():
                    self._corrupt(fi, st[slot], weight_perm(st[slot].dim()), inplace=True)

            def opt_pre(opt, args, kwargs):
                if self.copies is not None and not self.copies.is_state_of(f.replica, opt.state):
                    return                    # another replica's optimizer step
                st = opt.state.get(p)
                if st:
                    hit(opt, st)
                else:
                    created.append(True)

            def opt_post(opt, args, kwargs):
                if created and (self.copies is None or
                                self.copies.is_state_of(f.replica, opt.state)):
                    created.clear()
                    hit(opt, opt.state.get(p, {}))
            add(self.optimizer.register_step_pre_hook(opt_pre))
            add(self.optimizer.register_step_post_hook(opt_post))

        else:
            raise SpecError(f"site {site.value} is not supported by the torch injector "
                            f"(no offloaded host state in this workload)")

    def _bwd_operand_hook(self, fi: _Firing):
        """Recompute the gradient w.r.t. the layer input with one corrupted operand, so the
        error fans out through the backward conv as a faulty operand register would."""
        f = fi.fault

        def hook(m, grad_input, grad_output):
            if not self._mine(fi) or not grad_input or grad_input[0] is None:
                return None
            g, w = grad_output[0], m.weight.detach()
            with torch.no_grad():
                if isinstance(m, nn.Linear):
                    if f.site is Site.BWD_INPUT:
                        g = self._corrupt(fi, g, act_perm(g.dim()))
                    else:
                        w = self._corrupt(fi, w, weight_perm(2))
                    gi = g @ w
                else:
                    d = dilated_grad(m, g, tuple(grad_input[0].shape[-2:]))
                    if f.site is Site.BWD_INPUT:
                        d = self._corrupt(fi, d, act_perm(4))
                    else:
                        w = self._corrupt(fi, w, weight_perm(4))
                    gi = conv_grad_input(m, d, w)
            return (gi.reshape(grad_input[0].shape),) + tuple(grad_input[1:])
        return hook
