"""RankTrainer: one rank of a data-parallel job under DistributedDataParallel.

The rank trains replica ``rank`` of the configuration (its shard of each global batch, the same
shard TorchTrainer's emulated replica ``rank`` would get); DDP averages the gradients across
ranks. A value fault fires only on the rank it names (``replica`` = rank), at any site: a
forward / backward fault changes that rank's local gradient before the all-reduce, a ``param``
/ ``opt_state`` fault changes that rank's own copy of the state (which then diverges from the
others'). Optionally the optimizer state is sharded (ZeroRedundancyOptimizer): each rank then
holds and checkpoints its shard only.

Every step ends with ONE collective besides DDP's all-reduce: an all_gather of a small int64
vector per rank (loss, accuracy counts, and when detection is on, the detector signals and an
exact checksum of the rank's parameters), from which every rank computes the same global
metrics and the same detector verdict.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from faultlab.backends.base import StepMetrics
from faultlab.backends.torch.replicas import checksum
from faultlab.backends.torch.trainer import TorchTrainer, _seed, _to_input
from faultlab.faults import FaultSpec

_I64 = torch.int64


def _f2i(x: float) -> int:
    """A float's bit pattern as an int64 (exact through an integer collective)."""
    return int(np.array([x], dtype=np.float64).view(np.int64)[0])


def _i2f(v: int) -> float:
    return float(np.array([v], dtype=np.int64).view(np.float64)[0])


def _signed(u: int) -> int:
    return u - (1 << 64) if u >= (1 << 63) else u


def _ordered_mean_hook(group, world: int):
    """A DDP communication hook that averages each gradient bucket as the sum of every rank's
    bucket in rank order, divided by the world size: bit-reproducible whatever the bucket
    layout. (gloo's ring all-reduce sums each element in an order set by its position in the
    bucket, and DDP rebuilds its buckets after the first step of every process, so a run
    resumed at step k would round step k differently from an uninterrupted one.)"""
    def hook(state, bucket):
        t = bucket.buffer()
        parts = [torch.empty_like(t) for _ in range(world)]
        fut = dist.all_gather(parts, t, group=group, async_op=True).get_future()

        def mean(_):
            out = parts[0].clone()
            for p in parts[1:]:
                out += p
            return out.div_(world)
        return fut.then(mean)
    return hook


class RankTrainer(TorchTrainer):
    """Rank `rank` of `world` (see the module docstring). `group`: the process group DDP and
    the per-step collective use (default: the world)."""

    def __init__(self, config, rank: int, world: int, *, group=None, zero: bool = False,
                 fsdp: bool = False):
        super().__init__(config)
        if zero and fsdp:
            raise ValueError("zero and fsdp both shard the optimizer state: choose one")
        if config.replicas != world:
            raise ValueError(f"{world} ranks train {config.replicas} replicas")
        self.rank, self.world, self.group = rank, world, group
        self.copies = None                   # a rank holds its own state: no emulated forks
        self.injector.copies = None
        self.injector.replica = rank
        if self._carry is not None:
            self._carry = [self._carry[rank]]
        self.zero, self.fsdp = zero, fsdp
        if fsdp:
            self.ddp = self._fully_shard(group)
        else:
            self.ddp = DistributedDataParallel(self.model, process_group=group,
                                               broadcast_buffers=False)
            self.ddp.register_comm_hook(None, _ordered_mean_hook(group, world))
        if zero:
            from torch.distributed.optim import ZeroRedundancyOptimizer
            base = self.optimizer
            self.optimizer = ZeroRedundancyOptimizer(
                self.model.parameters(), optimizer_class=type(base), process_group=group,
                **base.defaults)
            self.injector.optimizer = self.optimizer.optim   # this rank's shard's optimizer
        self.local_grads: dict[str, torch.Tensor] | None = None  # record_local_grads()

    def _fully_shard(self, group):
        """FSDP2: every layer with parameters of its own, then the root, sharded over the
        group (dim 0 of every parameter); the optimizer is rebuilt over the sharded
        parameters. Parameters, gradients and optimizer state are this rank's shards."""
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import fully_shard
        mesh = DeviceMesh.from_group(group or dist.group.WORLD, "cpu")
        self.mesh = mesh
        for m in self.layers.values():
            if any(True for _ in m.parameters(recurse=False)):
                fully_shard(m, mesh=mesh, reshard_after_forward=True)
        fully_shard(self.model, mesh=mesh)
        self.optimizer = self.wl.make_optimizer(self.model.parameters(), self.config.lr)
        self.injector.optimizer = self.optimizer
        self._kernels = None
        return self.model

    def check_faults(self, faults: Sequence[FaultSpec]) -> None:
        """Faults this rank's training can take (SpecError otherwise): under FSDP2 a rank
        holds a shard of each parameter, its gradient and optimizer state, so faults on them
        (param, opt_state, grad_wt) are refused; activations and backward operands are whole
        on every rank."""
        if not self.fsdp:
            return
        from faultlab.errors import SpecError
        from faultlab.faults import Site
        for f in faults:
            if f.site in (Site.PARAM, Site.OPT_STATE, Site.GRAD_WT):
                raise SpecError(f"site {f.site.value} is not supported with FSDP2 sharding "
                                f"(each rank holds a shard of {f.layer}'s parameters, "
                                f"gradients and optimizer state); use DDP or ZeRO", "site")

    # --- one step ----------------------------------------------------------------------------

    def train_step(self, step: int, faults: Sequence[FaultSpec] = ()) -> StepMetrics:
        c = self.config
        r = self.rank
        self.model.train()
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr_at(step) * self.lr_scale
        self.optimizer.zero_grad(set_to_none=True)
        x, y = self._batch(step)
        b = c.per_replica_batch
        mine = [f for f in faults if f.replica == r]
        self.check_faults(mine)
        self.injector.begin_step(mine, step)
        self.injector.replica = r
        hooks = self._record_hooks() if self.local_grads is not None else []
        try:
            torch.manual_seed(_seed(c.seed, step, r))
            xr = _to_input(x[r * b:(r + 1) * b], self.wl)
            yr = torch.from_numpy(y[r * b:(r + 1) * b])
            if self._carry is None:
                out = self.ddp(xr)
            else:
                out, carry = self.wl.run(self.ddp, xr, self._carry[0])
            loss = self.wl.loss(out, yr)
            loss.backward()                 # DDP: the all-reduce of the gradients
            loss_r = float(loss.detach())
            correct = int((out.detach().argmax(-1) == yr).sum())
            count = yr.numel()
            pre = self._pre_step_signals([loss_r]) if self.signal_spec else None
            self.optimizer.step()
            sig = self._post_step_signals(step, pre) if pre is not None else None
            if self._carry is not None:
                self._carry = [carry]
        finally:
            self.injector.end_step()
            for h in hooks:
                h.remove()
        return self._gather(step, loss_r, correct, count, sig)

    def _record_hooks(self) -> list:
        """Hooks that see each parameter's local gradient as autograd delivers it on this
        rank, before DDP's all-reduce (registered after the injector's)."""
        rec = self.local_grads
        handles = []
        for name, p in self.model.named_parameters():
            def hook(g, name=name):
                rec[name] = g.detach().clone()
            handles.append(p.register_hook(hook))
        return handles

    def record_local_grads(self) -> dict[str, torch.Tensor]:
        """From now on, the local (pre-all-reduce) gradient of each parameter of the last step."""
        self.local_grads = {}
        return self.local_grads

    # --- the one collective of a step ---------------------------------------------------------

    def _gather(self, step: int, loss: float, correct: int, count: int, sig) -> StepMetrics:
        from faultlab.detectors.signals import Signals
        vec = [_f2i(loss), correct, count]
        names: list[str] = []
        if sig is not None:
            names = sorted(sig.m_max)
            vec += [_f2i(sig.grad_norm), _f2i(sig.m_other),
                    _f2i(sig.param_norm if sig.param_norm is not None else 0.0),
                    _signed(checksum(self._local_params()))]
            vec += [_f2i(sig.m_max[n]) for n in names]
        mine = torch.tensor(vec, dtype=_I64)
        got = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(got, mine, group=self.group)
        rows = [g.tolist() for g in got]
        losses = [_i2f(row[0]) for row in rows]
        acc = sum(row[1] for row in rows) / max(sum(row[2] for row in rows), 1)
        total = sum(losses) / self.world
        if sig is None:
            return StepMetrics(total, acc, None)

        def worst(i: int) -> float:
            vals = [_i2f(row[i]) for row in rows]
            return next((v for v in vals if v != v), max(vals))   # NaN anywhere shows

        m_max = {n: worst(7 + k) for k, n in enumerate(names)}
        g = Signals(step=step, loss=total, replica_loss=losses, grad_norm=worst(3),
                    m_max=m_max, m_other=worst(4),
                    param_norm=worst(5) if sig.param_norm is not None else None,
                    # FSDP2 shards hold different parameters: no replicas to compare
                    replica_checksums=(None if self.fsdp
                                       else [row[6] % (1 << 64) for row in rows]))
        return StepMetrics(total, acc, g)

    # --- state --------------------------------------------------------------------------------

    def _state_arrays(self, copy: bool = True) -> dict[str, np.ndarray]:
        def host(v):
            if not isinstance(v, torch.Tensor):
                return np.asarray(v)
            if hasattr(v, "to_local"):          # FSDP2: this rank's shard
                v = v.to_local()
            a = v.detach().cpu().numpy()
            return a.copy() if copy and v.device.type == "cpu" else a
        out = {f"model/{k}": host(v) for k, v in self.model.state_dict().items()}
        opt = self.optimizer.optim if self.zero else self.optimizer
        index = {id(p): i for i, p in enumerate(self.model.parameters())}
        for p, st in opt.state.items():
            for k, v in st.items():
                out[f"optim/{index[id(p)]}/{k}"] = host(v)
        return out

    def state_views(self) -> dict[str, np.ndarray]:
        """This rank's state as NumPy views of the live CPU tensors (no copy; host copies of
        device tensors): valid until the next optimizer step, for a snapshot that copies them
        at once. Carried state included."""
        out = self._state_arrays(copy=False)
        import torch.utils._pytree as pytree
        for i, t in enumerate(pytree.tree_flatten(self._carry[0])[0] if self._carry else ()):
            out[f"carry/0/{i}"] = t.detach().cpu().numpy()
        return out

    def _load_arrays(self, state: Mapping[str, np.ndarray]) -> None:
        model = {k[6:]: torch.from_numpy(np.array(v)) for k, v in state.items()
                 if k.startswith("model/")}
        if self.fsdp:
            self._load_sharded(model, state)
            return
        self.model.load_state_dict(model)
        opt = self.optimizer.optim if self.zero else self.optimizer
        params = list(self.model.parameters())
        entries: dict[int, dict] = {}
        for k, v in state.items():
            if k.startswith("optim/"):
                _, i, name = k.split("/", 2)
                entries.setdefault(int(i), {})[name] = torch.from_numpy(np.array(v))
        opt.state.clear()
        for i, st in entries.items():
            opt.state[params[i]] = st

    def _load_sharded(self, model: dict, state: Mapping[str, np.ndarray]) -> None:
        """FSDP2: copy each shard into the live local tensors; optimizer state as DTensors
        placed as their parameters are."""
        from torch.distributed.tensor import DTensor
        live = self.model.state_dict()
        with torch.no_grad():
            for k, v in live.items():
                (v.to_local() if hasattr(v, "to_local") else v).copy_(model[k])
        params = list(self.model.parameters())
        self.optimizer.state.clear()
        for k, v in state.items():
            if k.startswith("optim/"):
                _, i, name = k.split("/", 2)
                p = params[int(i)]
                t = torch.from_numpy(np.array(v))
                if t.dim() and isinstance(p, DTensor):
                    t = DTensor.from_local(t, p.device_mesh, p.placements, run_check=False,
                                           shape=p.shape, stride=p.stride())
                self.optimizer.state.setdefault(p, {})[name] = t

    def get_state(self) -> dict[str, np.ndarray]:
        """This rank's state: parameters and buffers (their shards under FSDP2), its optimizer
        state (its shard under ZeRO and FSDP2), its carried state."""
        out = self._state_arrays()
        import torch.utils._pytree as pytree
        for i, t in enumerate(pytree.tree_flatten(self._carry[0])[0] if self._carry else ()):
            out[f"carry/0/{i}"] = t.detach().cpu().numpy().copy()
        return out

    def set_state(self, state: Mapping[str, np.ndarray]) -> None:
        self._load_arrays(state)
        if self._carry is not None:
            self._load_carry(state)

    def _pre_step_signals(self, replica_losses: list[float]):
        spec = self.signal_spec
        if not spec.grads and not (spec.history and self.optimizer.state):
            return replica_losses, None
        grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                 for p in self.model.parameters() if p.grad is not None]
        return replica_losses, torch.stack(torch._foreach_norm(grads)) if grads else None

    def _local_params(self) -> list[torch.Tensor]:
        return [p.to_local() if hasattr(p, "to_local") else p for p in self.model.parameters()]

    def state_checksum(self) -> int:
        """An exact checksum of this rank's parameters (equal across ranks under DDP and ZeRO;
        under FSDP2 of its shards)."""
        return checksum(self._local_params())

    def _param_norm(self) -> torch.Tensor:
        return torch.stack(torch._foreach_norm(self._local_params())).sum()

    def _moments(self):
        out = super()._moments()
        return [(n, m.to_local() if hasattr(m, "to_local") else m) for n, m in out]


class SoloTrainer(TorchTrainer):
    """A single-process workload run as a one-rank job (kill rows with processes = 1): the
    TorchTrainer itself, emulated replicas and all, with what the rank worker calls. The
    restarted process recovers from its own memory domain or the engine's file."""

    zero = fsdp = False

    def __init__(self, config, rank: int = 0, world: int = 1, *, group=None,
                 zero: bool = False, fsdp: bool = False):
        from faultlab.errors import SpecError
        if zero or fsdp:
            raise SpecError("--zero and --fsdp shard state across ranks: they need "
                            "processes > 1")
        super().__init__(config)
        self.local_grads = None

    def state_views(self) -> dict[str, np.ndarray]:
        return self.get_state()

    def state_checksum(self) -> int:
        return checksum(self.model.parameters())

    def check_faults(self, faults) -> None:
        """Every fault a TorchTrainer takes (checked when the campaign was read)."""

    def record_local_grads(self):
        raise ValueError("local gradients are recorded by the ranks of a multi-process job")
