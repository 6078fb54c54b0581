"""faultlab.torch.Offload: offloaded training (docs/offload.md) for the loop a user keeps.

The mechanism of the built-in workloads' ``offload = window:N`` (faultlab.backends.torch.
offload: host master copies, a window of N layers on the device side filled by a prefetch
thread, gradients copied to the host as autograd accumulates them, the optimizer stepping the
host copies) put on any ``nn.Module``::

    import faultlab.torch as ft
    off = ft.Offload(model, lambda params: torch.optim.Adam(params, lr=1e-3), window=2)
    injector = ft.Injector(model, offload=off)        # host_state faults, if you want them
    for step, (x, y) in enumerate(loader):
        with injector.step(step):
            off.optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            off.optimizer.step()                      # the host step

Training is bit-identical to the same loop without offload on a CPU (tests/torch/
test_own_offload.py). ``off.optimizer`` is the optimizer to step (built over the host copies);
``off.parameters()`` are the host copies (what holds the values and gradients: clip and save
those); ``off.close()`` puts every value back into the model and removes every hook.
``faultlab.torch.Checkpointer(model=model)`` saves and restores the host copies (through
``state_dict`` / ``load_state_dict`` here).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn

from faultlab.backends.torch.offload import (Unit, Window, _Armed, _release, corrupt_host,
                                             host_copy, offload_units, start_pass)
from faultlab.errors import SpecError
from faultlab.faults import FaultSpec

__all__ = ["Offload"]

#: modules whose forward returns nested tuples: no full backward pre-hook can see them
_NESTED = (nn.RNNBase, nn.MultiheadAttention)


class Offload:
    """Host-resident state for your own loop: `model`'s parameters get master copies in host
    memory (pinned where CUDA is present) and the model's own parameters hold bytes only for
    a window of `window` layers (modules that own parameters) at a time.

    optimizer: a factory, ``params -> torch.optim.Optimizer`` (called once with the host
    copies, in ``model.parameters()`` order), or an optimizer over the model's parameters that
    has not stepped yet (rebuilt over the host copies with its groups' settings; keep using
    ``off.optimizer``, not the one you passed). window: layers on the device at once, 1 up to
    one less than the model has."""

    def __init__(self, model: nn.Module, optimizer, *, window: int):
        if not isinstance(model, nn.Module):
            raise SpecError(f"Offload needs the torch.nn.Module you train, got "
                            f"{type(model).__name__}", "layer")
        if getattr(model, "_faultlab_offload", None) is not None:
            raise SpecError("this model is already offloaded (an Offload is attached): "
                            "close() it first", "offload")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise SpecError(f"offload window must be an int >= 1 (layers on the device), got "
                            f"{window!r}", "offload")
        named, pinned = offload_units(model)
        if window >= len(named):
            raise SpecError(f"offload window {window} keeps all {len(named)} layers of the "
                            f"model on the device (none outside the window): choose 1.."
                            f"{len(named) - 1}", "offload")
        seen: dict[int, str] = {}
        paths = {m: n for n, m in model.named_modules()}
        for name, mod in named:
            if isinstance(mod, _NESTED):
                raise SpecError(f"Offload cannot move layer {paths[mod]!r} "
                                f"({type(mod).__name__}): its forward returns nested tuples, "
                                f"which no backward pre-hook sees", "layer")
            for p in mod.parameters():
                if id(p) in seen:
                    raise SpecError(f"layers {seen[id(p)]!r} and {paths[mod]!r} share a "
                                    f"parameter (tied weights): Offload moves each parameter "
                                    f"with one layer", "layer")
                seen[id(p)] = paths[mod]
        self.model = model
        use_pinned = torch.cuda.is_available()
        self._host_of: dict[int, nn.Parameter] = {}
        self.units: list[Unit] = []
        for name, mod in named:
            params = list(mod.parameters())
            host = [self._host_copy(p, use_pinned) for p in params]
            self.units.append(Unit(name, mod, params, host,
                                   sum(p.numel() * p.element_size() for p in params)))
        self._pinned = pinned
        for p in pinned:
            self._host_copy(p, use_pinned)
        self.host_params = [self._host_of[id(p)] for p in model.parameters()]
        self.optimizer = self._build_optimizer(optimizer)
        self.unit_of: dict[int, int] = {id(p): i for i, u in enumerate(self.units)
                                        for p in u.params}
        self.replica = 0            # the emulated replica whose pass is being computed
        self._armed: list[_Armed] = []
        self._tainted = False
        arrived = weakref.WeakMethod(self._arrived)
        self.window = Window(self.units, window, lambda u, r: arrived()(u, r))
        for u in self.units:
            for p in u.params:
                _release(p)
        # weak references: hooks living in C++ would otherwise keep this object (and its
        # prefetch thread) alive through a cycle the garbage collector cannot see
        me = weakref.ref(self)
        self._hooks = [model.register_forward_pre_hook(
            lambda m, a: me()._begin_pass(m), prepend=True)]
        for i, u in enumerate(self.units):
            self._hooks.append(u.module.register_forward_pre_hook(
                lambda m, a, i=i: me().window.acquire(i), prepend=True))
            self._hooks.append(u.module.register_full_backward_pre_hook(
                lambda m, g, i=i: me().window.acquire(i), prepend=True))
        for p in model.parameters():
            if p.requires_grad:
                h = self._host_of[id(p)]
                self._hooks.append(p.register_post_accumulate_grad_hook(
                    lambda p, h=h: me()._grad_back(p, h)))
        # step hooks, not a replaced step method: LR schedulers wrap optimizer.step
        self._created: list[_Armed] = []
        self._hooks += [self.optimizer.register_step_pre_hook(self._before_step),
                        self.optimizer.register_step_post_hook(self._after_step)]
        # the gradients are the host copies': model.zero_grad() clears those (a loop that
        # zeroes through the model would otherwise add every step's gradient to the last)
        opt = self.optimizer
        model.zero_grad = lambda set_to_none=True: opt.zero_grad(set_to_none)
        model._faultlab_offload = self     # the model keeps its offload alive (hooks are weak)
        self.closed = False

    # --- construction --------------------------------------------------------------------------

    def _host_copy(self, p: nn.Parameter, pinned: bool) -> nn.Parameter:
        return host_copy(p, pinned, self._host_of)

    def _build_optimizer(self, optimizer) -> torch.optim.Optimizer:
        if isinstance(optimizer, torch.optim.Optimizer):
            if any(optimizer.state.values()):
                raise SpecError(f"the {type(optimizer).__name__} given to Offload has stepped "
                                f"already (it holds state): build Offload before the first "
                                f"step, or pass a factory", "offload")
            groups = []
            for g in optimizer.param_groups:
                for p in g["params"]:
                    if id(p) not in self._host_of:
                        raise SpecError(f"the {type(optimizer).__name__} given to Offload "
                                        f"optimizes a tensor that is not a parameter of the "
                                        f"model", "offload")
                groups.append({**{k: v for k, v in g.items() if k != "params"},
                               "params": [self._host_of[id(p)] for p in g["params"]]})
            try:
                opt = type(optimizer)(groups, **optimizer.defaults)
            except TypeError as e:
                raise SpecError(f"Offload cannot rebuild {type(optimizer).__name__} over the "
                                f"host copies ({e}): pass a factory, params -> optimizer",
                                "offload") from None
            return opt
        if not callable(optimizer):
            raise SpecError(f"Offload takes a torch.optim.Optimizer or a factory params -> "
                            f"optimizer, got {type(optimizer).__name__}", "offload")
        opt = optimizer(self.host_params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise SpecError(f"the optimizer factory given to Offload returned "
                            f"{type(opt).__name__}, not a torch.optim.Optimizer", "offload")
        ours = {id(h) for h in self.host_params}
        if any(id(p) not in ours for g in opt.param_groups for p in g["params"]):
            raise SpecError("the optimizer factory given to Offload must optimize the "
                            "parameters it is given (the host copies)", "offload")
        return opt

    # --- public ----------------------------------------------------------------------------------

    def parameters(self) -> list[nn.Parameter]:
        """The host copies, in ``model.parameters()`` order: the values and gradients (clip
        gradients over these; the model's own parameters hold bytes only inside the window)."""
        return list(self.host_params)

    def host_copy(self, param: torch.Tensor) -> nn.Parameter:
        """The host copy of one of the model's parameters."""
        h = self._host_of.get(id(param))
        if h is None:
            raise SpecError("not a parameter of the offloaded model", "layer")
        return h

    def state_dict(self, keep_vars: bool = False) -> dict[str, torch.Tensor]:
        """The model's state_dict with every parameter read from its host copy (the host
        Parameter with keep_vars, else a detached alias, as torch's own) and the buffers,
        which stay with the model. ``faultlab.torch.Checkpointer(model=model)`` saves this."""
        out = {}
        for k, v in self.model.state_dict(keep_vars=True).items():
            t = self._host_of.get(id(v), v)
            out[k] = t if keep_vars else t.detach()
        return out

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Copy a (model) state_dict into the host copies and the buffers (strict: exactly
        the model's keys; otherwise those it has)."""
        self.window.finish()
        live = self.model.state_dict(keep_vars=True)
        extra = sorted(set(state) - set(live))
        missing = sorted(set(live) - set(state)) if strict else []
        if extra or missing:
            raise SpecError(f"the state_dict does not match the model: "
                            f"{(extra or missing)[0]!r}", "offload")
        with torch.no_grad():
            for k, v in live.items():
                if k in state:
                    self._host_of.get(id(v), v).copy_(state[k])

    def close(self) -> None:
        """Give the model its values back (every parameter's storage refilled from its host
        copy) and remove every hook; the prefetch thread ends. The model trains as before."""
        if self.closed:
            return
        self.window.finish()
        self.window.close()
        for h in self._hooks:
            h.remove()
        self._hooks = []
        with torch.no_grad():
            for p in self.model.parameters():
                h = self._host_of[id(p)]
                if p.untyped_storage().nbytes() == 0:
                    p.untyped_storage().resize_(h.numel() * h.element_size())
                p.data.copy_(h)
        del self.model.zero_grad
        self.model._faultlab_offload = None
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def stats(self) -> dict:
        """Window figures: fetches, synchronous fetches, peak bytes resident."""
        w = self.window
        return {"fetches": w.fetches, "sync_fetches": w.sync_fetches,
                "peak_bytes": w.peak_bytes,
                "all_bytes": sum(u.nbytes for u in self.units)}

    # --- host_state faults (armed by faultlab.torch.Injector) ----------------------------------

    def arm(self, faults, step: int) -> None:
        """Deliver host_state faults (layer = a module path of the model, canonical positions)
        at training step `step`: master weight / bias now, moments at the host step, transit at
        the layer's arrival in the named replica's pass, grad on its way back."""
        self._armed = [_Armed(f, step) for f in faults]
        self.window.finish()          # a corrupted master reaches the device at its next fetch
        with torch.no_grad():
            for a in self._armed:
                if (a.fault.tensor or "weight") in ("weight", "bias"):
                    corrupt_host(a, self._target(a.fault))

    def disarm(self) -> None:
        """The step is over: forget its faults; a corrupted copy in transit is released."""
        if self._tainted:
            self.window.finish()
            self._tainted = False
        self._armed = []

    def _param(self, f: FaultSpec, which: str | None = None) -> nn.Parameter:
        mod = dict(self.model.named_modules())[f.layer]
        return getattr(mod, which or ("bias" if f.tensor == "bias" else "weight"))

    def _target(self, f: FaultSpec, which: str | None = None) -> nn.Parameter:
        return self._host_of[id(self._param(f, which))]

    # --- the mechanism ---------------------------------------------------------------------------

    def _begin_pass(self, model) -> None:
        start_pass(self, self.replica, model.training,
                   lambda f: self.unit_of[id(self._param(f, "weight"))])

    def _arrived(self, u: int, replica: int) -> None:
        for a in self._armed:
            f = a.fault
            if f.tensor == "transit" and f.replica == replica:
                p = self._param(f, "weight")
                if self.unit_of.get(id(p)) == u:
                    corrupt_host(a, p.data)
                    self._tainted = True

    def _grad_back(self, p: nn.Parameter, h: nn.Parameter) -> None:
        g = p.grad
        t = torch.empty_like(h)
        with torch.no_grad():
            t.copy_(g)
            for a in self._armed:
                f = a.fault
                if (f.tensor == "grad" and f.replica == self.replica
                        and self._param(f, "weight") is p):
                    corrupt_host(a, t)
            if h.grad is None:
                h.grad = t
            else:
                h.grad.add_(t)
        p.grad = None

    def _before_step(self, optimizer, args, kwargs) -> None:
        """Before the optimizer steps the host copies: fetches in flight end and every device
        copy is released (stale after the step); the moments a fault names are hit now, or
        just after the step when this step creates them."""
        from faultlab.backends.torch.injector import opt_target
        self.window.finish()
        self._created = []
        with torch.no_grad():
            for a in self._armed:
                if a.fault.tensor not in ("m", "v"):
                    continue
                st = self.optimizer.state.get(self._target(a.fault, "weight"))
                if st:
                    corrupt_host(a, st[opt_target(a.fault.tensor)[1]])
                else:
                    self._created.append(a)

    def _after_step(self, optimizer, args, kwargs) -> None:
        from faultlab.backends.torch.injector import opt_target
        with torch.no_grad():
            for a in self._created:
                st = self.optimizer.state[self._target(a.fault, "weight")]
                corrupt_host(a, st[opt_target(a.fault.tensor)[1]])
        self._created = []
