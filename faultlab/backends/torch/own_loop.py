"""faultlab.torch.Injector: faults in the PyTorch training loop a user keeps.

Published as ``faultlab.torch.Injector``; docs/torch.md walks through it::

    import faultlab, faultlab.torch as ft
    injector = ft.Injector(model, optimizer)
    injector.arm([faultlab.fault("param", "lstm", tensor="weight_hh_l0", step=3, bit=30)])
    for step, (x, y) in enumerate(loader):
        with injector.step(step):
            loss = loss_fn(model(x), y); loss.backward(); optimizer.step()
        optimizer.zero_grad()

It wraps the built-in trainer's :class:`~faultlab.backends.torch.injector.TorchInjector`
(the same hooks, kernels and layout remapping) with what a loop written by someone else
needs: layer names are torch's module paths (``encoder.layers.0.linear1``; faultlab's
``encoder_layers_0_linear1`` too), every module is a target (parameters and buffers by their
names, every tensor a module takes or returns by name: LSTM's ``h_n``, MultiheadAttention's
``query``, ...), optimizer state by the optimizer's own names (``exp_avg``,
``momentum_buffer``, ``sum``, ...), positions in torch's own layout unless asked otherwise,
and every fault checked when it is armed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import operator

import torch
import torch.nn as nn

from faultlab.errors import SpecError
from faultlab.faults import (POSITION_LAYOUTS, UNSUPPORTED_SITES, FaultSpec, PositionMode, Site,
                             check_corruption, check_replica, choices, torch_to_canonical)
from faultlab.backends.torch.injector import (TorchInjector, dtype_name, input_names,
                                              output_paths)

__all__ = ["Injector", "optimizer_state_names"]


# --- optimizer state, by optimizer class ----------------------------------------------------------

def _adafactor(group, shape):
    if len(shape) >= 2:
        return {"row_var": (*shape[:-1], 1), "col_var": (*shape[:-2], 1, shape[-1])}
    return {"variance": shape}


#: {optimizer class name: f(param group, param shape) -> {state name: shape}}: the
#: parameter-shaped state each torch optimizer keeps (before its first step the state is
#: empty, so faults are checked against this table)
_OPT_STATE = {
    "SGD": lambda g, s: {"momentum_buffer": s} if g.get("momentum", 0) else {},
    "Adam": lambda g, s: {"exp_avg": s, "exp_avg_sq": s,
                          **({"max_exp_avg_sq": s} if g.get("amsgrad") else {})},
    "AdamW": lambda g, s: {"exp_avg": s, "exp_avg_sq": s,
                           **({"max_exp_avg_sq": s} if g.get("amsgrad") else {})},
    "Adamax": lambda g, s: {"exp_avg": s, "exp_inf": s},
    "NAdam": lambda g, s: {"exp_avg": s, "exp_avg_sq": s},
    "RAdam": lambda g, s: {"exp_avg": s, "exp_avg_sq": s},
    "SparseAdam": lambda g, s: {"exp_avg": s, "exp_avg_sq": s},
    "Adagrad": lambda g, s: {"sum": s},
    "RMSprop": lambda g, s: {"square_avg": s,
                             **({"momentum_buffer": s} if g.get("momentum", 0) else {}),
                             **({"grad_avg": s} if g.get("centered") else {})},
    "Adadelta": lambda g, s: {"square_avg": s, "acc_delta": s},
    "Rprop": lambda g, s: {"prev": s, "step_size": s},
    "ASGD": lambda g, s: {"ax": s},
    "Muon": lambda g, s: {"momentum_buffer": s},
    "Adafactor": _adafactor,
}


def optimizer_state_names(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict | None:
    """{state name: shape} of the tensor state `optimizer` keeps (or will keep, from its
    first step) for `param`: from faultlab's table of torch's optimizers (a subclass counts
    as its base), else from the state it holds now; None when neither says."""
    group = next((g for g in optimizer.param_groups if any(q is param for q in g["params"])),
                 None)
    shape = tuple(int(d) for d in param.shape)
    for cls in type(optimizer).__mro__:
        table = _OPT_STATE.get(cls.__name__)
        if table is not None and cls.__module__.startswith("torch.optim"):
            return {k: tuple(v) for k, v in table(group or {}, shape).items()}
    st = optimizer.state.get(param)
    if st:
        return {k: tuple(v.shape) for k, v in st.items()
                if isinstance(v, torch.Tensor) and v.dim() > 0}
    return None


# --- the injector ----------------------------------------------------------------------------------

_PARAM_SITES = (Site.PARAM, Site.GRAD_WT, Site.FWD_WEIGHT, Site.OPT_STATE)
_ACTIVATION_SITES = (Site.FWD_INPUT, Site.FWD_OUTPUT, Site.GRAD_OUT, Site.GRAD_IN,
                     Site.BWD_INPUT)


#: modules that return tuples (no full backward hooks on them)
_TUPLE_MODULES = (nn.RNNBase, nn.MultiheadAttention)


def _close(word, names) -> str:
    close = difflib.get_close_matches(str(word), [str(n) for n in names], n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _q(name) -> str:
    return repr(str(name))


class Injector:
    """Faults in your own PyTorch training loop.

    model: the ``nn.Module`` you train; optimizer: yours (for ``opt_state`` faults);
    replicas: how many replicas your loop emulates (set ``injector.replica`` to the one
    being computed; a plain loop leaves it at 1); example_input: one batch (a tensor, a
    tuple of positional arguments or a dict of keyword arguments) to learn every module's
    input and output shapes from a dry run (eval mode, no gradients, the RNG untouched), so
    activation positions are checked when a fault is armed; without it they are checked at
    the first forward call of the model in a step, before anything is corrupted.
    positions: the layout explicit positions are given in, ``"torch"`` (NCHW activations,
    (out, in, kh, kw) and (out, in) weights: what ``tensor[index]`` reads) or
    ``"canonical"`` (NHWC / HWIO / (in, out): campaign files' layout); a fault built with
    ``faultlab.fault(..., layout="canonical")`` is canonical whatever this says.
    distributed: your loop is one rank of a torch.distributed job (torchrun, DDP, FSDP):
    a fault's ``replica`` is then the rank it fires on, checked against the world size, and
    every rank arms the same faults (the others' fire elsewhere). The process group must be
    initialised first.
    offload: a ``faultlab.torch.Offload`` of `model` (docs/offload.md): the optimizer is then
    the offload's host optimizer (leave `optimizer` out), ``host_state`` faults hit the host
    copies (tensor ``weight``, ``bias``, ``m``, ``v``, ``transit``, ``grad``), and ``param`` /
    ``opt_state`` faults are refused (the model holds no device-resident copy between steps).

    Constructing it installs nothing and draws no random numbers; between steps the model
    and optimizer carry no hook of it."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 replicas: int = 1, example_input=None, positions: str = "torch",
                 distributed: bool = False, offload=None):
        if not isinstance(model, nn.Module):
            raise SpecError(f"Injector needs the torch.nn.Module you train, got "
                            f"{type(model).__name__}", "layer")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise SpecError(f"optimizer must be a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}", "site")
        self.positions = self._layout(positions)
        self.offload = None
        if offload is not None:
            from faultlab.backends.torch.own_offload import Offload
            if not isinstance(offload, Offload):
                raise SpecError(f"offload must be a faultlab.torch.Offload, got "
                                f"{type(offload).__name__}", "offload")
            if offload.model is not model or offload.closed:
                raise SpecError("offload must be an open faultlab.torch.Offload of this "
                                "model", "offload")
            if optimizer is not None and optimizer is not offload.optimizer:
                raise SpecError("with offload the optimizer is the offload's host optimizer "
                                "(off.optimizer): leave optimizer out", "site")
            if distributed:
                raise SpecError("Injector(offload=) emulates replicas in one process; it does "
                                "not take distributed=True", "offload")
            optimizer, self.offload = offload.optimizer, offload
        self.model = model
        self.optimizer = optimizer
        self.modules = {n: m for n, m in model.named_modules() if n}
        self._alias = {}
        for n in self.modules:
            self._alias.setdefault(n.replace(".", "_"), n)
        self.rank: int | None = None
        if distributed:
            import torch.distributed as dist
            if not (dist.is_available() and dist.is_initialized()):
                raise SpecError("Injector(distributed=True) needs the torch.distributed "
                                "process group initialised first (init_process_group)")
            if replicas != 1:
                raise SpecError("Injector(distributed=True): each rank is one replica; "
                                "leave replicas at 1", "replica")
            replicas, self.rank = dist.get_world_size(), dist.get_rank()
        self._core = TorchInjector(self.modules, optimizer, replicas=replicas)
        self.replicas = self._core.replicas
        if self.rank is not None:
            self._core.replica = self.rank
        self._shapes: dict | None = None
        # (as given, as the wrapped TorchInjector takes it, the layout it was armed in)
        self._armed: list[tuple[FaultSpec, FaultSpec, str]] = []
        self._unchecked = False        # some activation operand still to check (shapes unknown)
        self._probe = None
        self._step: int | None = None
        if example_input is not None:
            self._shapes = self._record(*self._call_args(example_input))

    # --- public -----------------------------------------------------------------------------------

    @property
    def replica(self) -> int:
        """The emulated replica whose shard the loop is computing (0 in a plain loop)."""
        return self._core.replica

    @replica.setter
    def replica(self, r: int) -> None:
        self._core.replica = r
        if self.offload is not None:
            self.offload.replica = r

    @property
    def layers(self) -> list[str]:
        """Every module a fault can name, by its torch path."""
        return list(self.modules)

    @property
    def armed(self) -> list[FaultSpec]:
        """The armed faults, as they were given."""
        return [u for u, _, _ in self._armed]

    def validate(self, faults, *, positions: str | None = None) -> None:
        """Raise a one-line SpecError for the first fault this injector cannot deliver
        (replica, layer, site, tensor, positions; see arm); arm nothing."""
        self._checked(faults, positions)

    def arm(self, faults, *, positions: str | None = None) -> list[FaultSpec]:
        """Arm `faults` (FaultSpecs: faultlab.fault(...), or a campaign's), replacing those
        armed before; each fires at the steps its step and duration say. Every fault is
        checked first, so a SpecError arms nothing: the replica is in range, the layer is a
        module of the model, the site applies to it, the tensor it names exists (a parameter
        or buffer, an input or output of the module, a state of the optimizer's class), the
        positions lie inside the operand (activations: once their shapes are known).
        positions: the layout of these faults' explicit positions (default: the
        injector's)."""
        checked = self._checked(faults, positions)
        self._armed = checked
        self._unchecked = self._shapes is None and any(
            u.site in _ACTIVATION_SITES for u, _, _ in checked)
        return [u for u, _, _ in checked]

    @contextlib.contextmanager
    def only(self, faults):
        """Within the block, deliver only those of the armed faults that are in `faults` (the
        same objects `armed` lists); the rest stay armed and fire again after it. A recovery
        replaying steps uses it so that a transient fault does not strike twice."""
        keep = {id(f) for f in faults}
        saved = self._armed
        self._armed = [t for t in saved if id(t[0]) in keep]
        try:
            yield self
        finally:
            self._armed = saved

    def disarm(self) -> None:
        """Forget every armed fault (and remove any hook)."""
        self.end()
        self._armed = []
        self._unchecked = False

    def begin(self, step: int) -> None:
        """Start training step `step`: install the hooks of the armed faults that fire now
        (parameter faults apply at once). Call end() when the step is over, whatever
        happens (or use ``with injector.step(step):``)."""
        self.end()
        step = operator.index(step)
        self._step = step
        if self.offload is not None:
            self.offload.arm([f for f in self._firing(step, host=True)], step)
        if self._unchecked:            # check at the first forward call, then install
            self._probe = self.model.register_forward_pre_hook(self._first_call,
                                                               with_kwargs=True)
            return
        try:
            self._core.begin_step(self._firing(step), step, checked=True)
        except BaseException:
            self.end()                 # nothing half-installed survives a failed begin
            raise

    def end(self) -> None:
        """End the step: remove every hook this injector installed."""
        if self._probe is not None:
            self._probe.remove()
            self._probe = None
        self._core.end_step()
        if self.offload is not None:
            self.offload.disarm()
        self._step = None

    @contextlib.contextmanager
    def step(self, step: int):
        """``with injector.step(k):`` around training step k's forward, backward and
        optimizer step; the hooks are removed however the block ends."""
        self.begin(step)
        try:
            yield self
        finally:
            self.end()

    # callback form, for Lightning- / Hugging-Face-style loops (on_train_batch_start/end...)
    def on_step_begin(self, step: int) -> None:
        """Callback form of begin(step)."""
        self.begin(step)

    def on_step_end(self, *args, **kwargs) -> None:
        """Callback form of end() (any arguments a framework passes are ignored)."""
        self.end()

    # --- checks ------------------------------------------------------------------------------------

    @staticmethod
    def _layout(positions) -> str:
        p = str(positions).strip().lower()
        if p not in POSITION_LAYOUTS:
            raise SpecError(f"unknown positions layout {positions!r}: valid layouts are "
                            f"{', '.join(POSITION_LAYOUTS)}", "positions")
        return p

    def _checked(self, faults, positions) -> list[tuple[FaultSpec, FaultSpec, str]]:
        layout = self.positions if positions is None else self._layout(positions)
        if isinstance(faults, FaultSpec):
            faults = [faults]
        out = []
        for f in faults:
            if not isinstance(f, FaultSpec):
                raise SpecError(f"arm() takes FaultSpecs (faultlab.fault(...)), got "
                                f"{type(f).__name__}")
            out.append((f, self._check(f, layout), layout))
        return out

    def _resolve_layer(self, f: FaultSpec) -> tuple[str, str | None]:
        """(module path, tensor) a fault names; a state_dict name as the layer of a param
        / grad_wt / opt_state fault names its module and tensor."""
        name = f.layer
        path = name if name in self.modules else self._alias.get(name)
        if path is not None:
            return path, f.tensor
        if f.site in _PARAM_SITES and f.tensor is None and "." in name:
            mod, _, t = name.rpartition(".")
            mpath = mod if mod in self.modules else self._alias.get(mod)
            if mpath is not None and t in self._tensors(self.modules[mpath], f.site):
                return mpath, t
        names = list(self.modules)
        hint = _close(name, names) or _close(name, list(self._alias))
        raise SpecError(f"unknown layer {_q(name)}: valid layers are {choices(names)}{hint}",
                        "layer")

    def _tensors(self, mod: nn.Module, site: Site) -> list[str]:
        params = [n for n, p in mod.named_parameters(recurse=False) if p is not None]
        if site is Site.PARAM:
            return params + [n for n, b in mod.named_buffers(recurse=False) if b is not None]
        if site is Site.GRAD_WT:
            return [n for n, p in mod.named_parameters(recurse=False) if p.requires_grad]
        return params

    def _sites(self, path: str, mod: nn.Module) -> list[str]:
        """The sites module `path` offers (for messages)."""
        sites = [Site.FWD_INPUT, Site.FWD_OUTPUT]
        if not isinstance(mod, _TUPLE_MODULES):
            sites += [Site.GRAD_OUT, Site.GRAD_IN]
        if self._tensors(mod, Site.FWD_WEIGHT):
            sites += [Site.FWD_WEIGHT, Site.GRAD_WT]
        if self._tensors(mod, Site.PARAM):
            sites.append(Site.PARAM)
        if self.optimizer is not None and self._tensors(mod, Site.FWD_WEIGHT):
            sites.append(Site.OPT_STATE)
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            sites += [Site.BWD_INPUT, Site.BWD_WEIGHT]
        return [s.value for s in Site if s in sites]

    def _not_here(self, f: FaultSpec, path: str, mod: nn.Module, why: str) -> SpecError:
        return SpecError(f"site {f.site.value} does not apply to layer {_q(path)} "
                         f"({type(mod).__name__}{why}): valid sites are "
                         f"{', '.join(self._sites(path, mod))}", "site")

    def _pick(self, f, path, mod, tensor, names, default, what) -> str:
        """The tensor name a fault means among `names` (its default `default`)."""
        if not names:
            raise self._not_here(f, path, mod, f": it has no {what}")
        if tensor is None:
            if default in names:
                return default
            raise SpecError(f"layer {_q(path)} ({type(mod).__name__}) has no {default!r}: "
                            f"name the {what} with tensor= (valid tensors are "
                            f"{choices(names)})", "tensor")
        if tensor not in names:
            raise SpecError(f"unknown tensor {_q(tensor)} for site {f.site.value} on layer "
                            f"{_q(path)} ({type(mod).__name__}): valid tensors are "
                            f"{choices(names)}{_close(tensor, names)}", "tensor")
        return tensor

    def _check(self, f: FaultSpec, layout: str) -> FaultSpec:
        """The fault as the wrapped TorchInjector takes it (module path, explicit tensor,
        canonical positions), after every check this injector can run now."""
        check_replica(f, self.replicas, "this injector")
        if f.site is Site.HOST_STATE and self.offload is not None:
            return self._host_state(f, layout)
        if self.offload is not None and f.site in (Site.PARAM, Site.OPT_STATE):
            raise SpecError(f"site {f.site.value} is device-resident state, but the model is "
                            f"offloaded (faultlab.torch.Offload keeps parameters and optimizer "
                            f"state in host memory): use site host_state (tensor weight, bias, "
                            f"m or v)", "site")
        if f.site is Site.HOST_STATE:
            raise SpecError("site host_state needs an offloaded model: wrap it in "
                            "faultlab.torch.Offload(model, optimizer, window=N) and pass "
                            "Injector(model, offload=off)", "site")
        if f.site in UNSUPPORTED_SITES:
            raise SpecError(f"site {f.site.value} is not supported by the torch injector: "
                            f"{UNSUPPORTED_SITES[f.site]}", "site")
        path, tensor = self._resolve_layer(f)
        mod = self.modules[path]
        site = f.site
        shape = dtype = None
        inner = tensor
        if site in (Site.PARAM, Site.GRAD_WT, Site.FWD_WEIGHT):
            what = "parameter or buffer" if site is Site.PARAM else "parameter"
            if site is Site.GRAD_WT:
                what = "trainable parameter"
            inner = self._pick(f, path, mod, tensor, self._tensors(mod, site), "weight", what)
            t = getattr(mod, inner)
            shape, dtype = tuple(t.shape), dtype_name(t)
        elif site is Site.OPT_STATE:
            inner, shape, dtype = self._opt_state(f, path, mod, tensor)
        elif site in (Site.BWD_INPUT, Site.BWD_WEIGHT):
            if not isinstance(mod, (nn.Conv2d, nn.Linear)):
                raise self._not_here(f, path, mod, ": backward operands are those of a "
                                     "Conv2d or Linear")
            self._no_tensor(f, path, mod, tensor)
            inner = None
            if site is Site.BWD_WEIGHT:
                shape, dtype = tuple(mod.weight.shape), dtype_name(mod.weight)
            else:
                rec = self._record_of(path)
                if rec is not None:
                    oshape, dtype = rec["out"]["output"]
                    ishape = rec["in"]["input"][0]
                    shape = (oshape if isinstance(mod, nn.Linear) else
                             (oshape[0], oshape[1], ishape[2], ishape[3]))
        elif site in (Site.FWD_OUTPUT, Site.FWD_INPUT):
            inner, shape, dtype = self._activation(f, path, mod, tensor)
        else:                              # GRAD_OUT, GRAD_IN: the one input / output
            if isinstance(mod, _TUPLE_MODULES):
                raise self._not_here(f, path, mod, ": gradients are hooked on a module that "
                                     "takes and returns one tensor; use fwd_output")
            self._no_tensor(f, path, mod, tensor)
            inner = None
            rec = self._record_of(path)
            if rec is not None:
                side = rec["out"] if site is Site.GRAD_OUT else rec["in"]
                key = "output" if site is Site.GRAD_OUT else "input"
                if key not in side or (site is Site.GRAD_OUT and len(side) > 1):
                    raise self._not_here(f, path, mod, ": gradients are hooked on a module "
                                         "that takes and returns one tensor")
                shape, dtype = side[key]
        canonical = layout == "canonical" or f.positions_layout == "canonical"
        positions = f.positions
        what = (f"{site.value} operand{f' {inner!r}' if inner else ''} of layer {_q(path)} "
                f"({'canonical' if canonical else 'torch'} layout)")
        if shape is not None:
            check_corruption(f.value, positions, torch_to_canonical(site, shape) if canonical
                             else shape, dtype, what)
        else:
            check_corruption(f.value, positions, None, None, what)
        if not canonical and positions.mode is PositionMode.EXPLICIT:
            positions = dataclasses.replace(positions, indices=tuple(
                torch_to_canonical(site, ix) for ix in positions.indices))
        return dataclasses.replace(f, layer=path, tensor=inner, positions=positions,
                                   positions_layout="canonical")

    def _host_state(self, f: FaultSpec, layout: str) -> FaultSpec:
        """A host_state fault on an offloaded model (docs/offload.md): the layer owns the
        parameter it names (weight; bias for tensor bias), the shared host copies (weight,
        bias, m, v) are replica 0's, m / v are states of the host optimizer, positions lie in
        the parameter (torch layout unless canonical)."""
        from faultlab.faults import HOST_TENSORS
        path, _ = self._resolve_layer(f)
        mod = self.modules[path]
        tensor = f.tensor or "weight"
        if tensor not in HOST_TENSORS:
            raise SpecError(f"unknown tensor {_q(tensor)} for site host_state: valid tensors "
                            f"are {', '.join(HOST_TENSORS)}{_close(tensor, HOST_TENSORS)}",
                            "tensor")
        if tensor in ("weight", "bias", "m", "v") and f.replica != 0:
            raise SpecError(f"host_state tensor {tensor} is the one host copy every replica "
                            f"shares: replica must be 0, got {f.replica} (transit and grad "
                            f"hit one replica's transfers)", "replica")
        pname = "bias" if tensor == "bias" else "weight"
        p = mod._parameters.get(pname)
        if not isinstance(p, nn.Parameter) or id(p) not in self.offload.unit_of:
            raise self._not_here(f, path, mod, f": it owns no offloaded {pname!r} parameter")
        if tensor == "grad" and not p.requires_grad:
            raise SpecError(f"layer {_q(path)}: its weight is frozen (requires_grad=False), "
                            f"no gradient travels back", "tensor")
        if tensor in ("m", "v"):
            from faultlab.backends.torch.injector import opt_target
            opt = self.offload.optimizer
            slot = opt_target(tensor)[1]
            table = optimizer_state_names(opt, self.offload.host_copy(p)) or {}
            if slot not in table:
                raise SpecError(f"host_state tensor {tensor} is Adam's {slot}, which the "
                                f"offload's {type(opt).__name__} does not keep for "
                                f"{path}.weight", "tensor")
        canonical = layout == "canonical" or f.positions_layout == "canonical"
        shape = tuple(p.shape)
        what = (f"host_state operand {tensor!r} of layer {_q(path)} "
                f"({'canonical' if canonical else 'torch'} layout)")
        check_corruption(f.value, f.positions, torch_to_canonical(Site.HOST_STATE, shape)
                         if canonical else shape, dtype_name(p), what)
        positions = f.positions
        if not canonical and positions.mode is PositionMode.EXPLICIT:
            positions = dataclasses.replace(positions, indices=tuple(
                torch_to_canonical(Site.HOST_STATE, ix) for ix in positions.indices))
        return dataclasses.replace(f, layer=path, tensor=tensor, positions=positions,
                                   positions_layout="canonical")

    def _no_tensor(self, f, path, mod, tensor) -> None:
        if tensor not in (None, "output" if f.site is Site.GRAD_OUT else "input"):
            raise SpecError(f"site {f.site.value} on layer {_q(path)} names no tensor (got "
                            f"{_q(tensor)}); fwd_input / fwd_output name inputs and outputs",
                            "tensor")

    def _record_of(self, path: str):
        """The input / output shapes module `path` was seen with, None while unknown; a
        module the model never called is an error once the shapes are known."""
        if self._shapes is None:
            return None
        rec = self._shapes.get(path)
        if rec is None:
            raise SpecError(f"layer {_q(path)} is not called by the model's forward, so a "
                            f"fault on its inputs or outputs would never fire", "layer")
        return rec

    def _activation(self, f, path, mod, tensor):
        out = f.site is Site.FWD_OUTPUT
        rec = self._record_of(path)
        if rec is not None:
            names = list(rec["out"] if out else rec["in"])
        elif out:
            names = {nn.LSTM: ["output", "h_n", "c_n"], nn.GRU: ["output", "h_n"],
                     nn.RNN: ["output", "h_n"],
                     nn.MultiheadAttention: ["output", "attn_weights"]}.get(type(mod))
        else:
            names = list(input_names(mod))
        what = "output tensor" if out else "input tensor"
        default = "output" if out else input_names(mod)[0]
        if names is None:                  # any output name: checked at the first call
            return tensor, None, None
        inner = self._pick(f, path, mod, tensor, names, default, what)
        if rec is None:
            return inner, None, None
        shape, dtype = (rec["out"] if out else rec["in"])[inner]
        return inner, shape, dtype

    def _opt_state(self, f, path, mod, tensor):
        opt = self.optimizer
        if opt is None:
            raise SpecError("opt_state faults need the optimizer: "
                            "faultlab.torch.Injector(model, optimizer)", "site")
        params = self._tensors(mod, Site.FWD_WEIGHT)
        if not params:
            raise self._not_here(f, path, mod, ": it has no parameters")
        pname = slot = None
        if tensor is not None and "." in tensor:
            pname, _, slot = tensor.rpartition(".")
        elif tensor in params:
            pname = tensor
        elif tensor in ("m", "v"):
            slot = {"m": "exp_avg", "v": "exp_avg_sq"}[tensor]
        else:
            slot = tensor
        pname = self._pick(f, path, mod, pname, params, "weight", "parameter")
        p = getattr(mod, pname)
        if not any(q is p for g in opt.param_groups for q in g["params"]):
            raise SpecError(f"parameter {pname!r} of layer {_q(path)} is not optimized by "
                            f"the injector's {type(opt).__name__}", "tensor")
        table = optimizer_state_names(opt, p)
        name = type(opt).__name__
        if table is None:
            raise SpecError(f"optimizer {name} is not one faultlab knows and holds no state "
                            f"for {path}.{pname} yet: arm opt_state faults on it after its "
                            f"first step", "tensor")
        if not table:
            raise SpecError(f"optimizer {name} keeps no state for {path}.{pname} with these "
                            f"settings (e.g. SGD without momentum): opt_state has nothing to "
                            f"hit", "tensor")
        slots = list(table)
        if slot is None:
            slot = slots[0]
        if slot not in table:
            raise SpecError(f"unknown tensor {_q(slot)} for opt_state of {name} on layer "
                            f"{_q(path)}: valid tensors are {', '.join(slots)}"
                            f"{_close(slot, slots)}", "tensor")
        return f"{pname}.{slot}", table[slot], dtype_name(p)

    # --- shapes ------------------------------------------------------------------------------------

    @staticmethod
    def _call_args(example):
        if isinstance(example, dict):
            return (), dict(example)
        if isinstance(example, (tuple, list)):
            return tuple(example), {}
        return (example,), {}

    def _record(self, args, kwargs) -> dict:
        """{module path: {"in": {name: (shape, dtype)}, "out": {name: (shape, dtype)}}},
        torch layout, from one forward pass in eval mode without gradients; the model's
        modes, parameters, buffers and the RNGs are left as they were."""
        table: dict[str, dict] = {}

        def rec(name):
            def hook(m, a, kw, out):
                if name in table:
                    return
                names = input_names(m)
                ins = {}
                for i, x in enumerate(a):
                    if isinstance(x, torch.Tensor):
                        ins.setdefault(names[i] if i < len(names) else f"arg{i}",
                                       (tuple(x.shape), dtype_name(x)))
                for k, x in kw.items():
                    if isinstance(x, torch.Tensor):
                        ins.setdefault(k, (tuple(x.shape), dtype_name(x)))
                outs = {}
                for n, path in output_paths(m, out).items():
                    t = out
                    for i in path:
                        t = t[i]
                    outs[n] = (tuple(t.shape), dtype_name(t))
                table[name] = {"in": ins, "out": outs}
            return hook
        modes = [(m, m.training) for m in self.model.modules()]
        handles = [m.register_forward_hook(rec(n), with_kwargs=True)
                   for n, m in self.modules.items()]
        devices = sorted({t.device.index or 0 for t in
                          list(self.model.parameters()) + list(self.model.buffers())
                          if t.device.type == "cuda"})
        try:
            self.model.eval()
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                self.model(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
            for m, mode in modes:
                m.training = mode
        return table

    def _firing(self, step: int, host: bool = False) -> list[FaultSpec]:
        """The faults firing at `step`: those for the model's hooks, or (host) the
        host_state ones, which the offload delivers."""
        return [inner for given, inner, _ in self._armed if given.active(step)
                and (self.rank is None or given.replica == self.rank)
                and (given.site is Site.HOST_STATE) == host]

    def _first_call(self, model, args, kwargs):
        """The model's first forward call in a step while activation shapes are unknown:
        learn them (a dry run on this call's input), check the armed faults, then install
        the step's hooks; a SpecError disarms everything and leaves no hook."""
        self._probe.remove()
        self._probe = None
        step = self._step
        try:
            self._shapes = self._record(args, kwargs)
            self._armed = [(u, self._check(u, layout), layout)
                           for u, _, layout in self._armed]
            self._unchecked = False
            self._core.begin_step(self._firing(step), step, checked=True)
        except BaseException:
            self._armed, self._unchecked = [], False
            self._core.end_step()
            raise
        return None
