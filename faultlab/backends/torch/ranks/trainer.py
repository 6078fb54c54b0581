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

    def __init__(self, config, rank: int, world: int, *, group=None, zero: bool = False):
        super().__init__(config)
        if config.replicas != world:
            raise ValueError(f"{world} ranks train {config.replicas} replicas")
        self.rank, self.world, self.group = rank, world, group
        self.copies = None                   # a rank holds its own state: no emulated forks
        self.injector.copies = None
        self.injector.replica = rank
        if self._carry is not None:
            self._carry = [self._carry[rank]]
        self.ddp = DistributedDataParallel(self.model, process_group=group,
                                           broadcast_buffers=False)
        self.ddp.register_comm_hook(None, _ordered_mean_hook(group, world))
        self.zero = zero
        if zero:
            from torch.distributed.optim import ZeroRedundancyOptimizer
            base = self.optimizer
            self.optimizer = ZeroRedundancyOptimizer(
                self.model.parameters(), optimizer_class=type(base), process_group=group,
                **base.defaults)
            self.injector.optimizer = self.optimizer.optim   # this rank's shard's optimizer
        self.local_grads: dict[str, torch.Tensor] | None = None  # record_local_grads()

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
                    _signed(checksum(self.model.parameters()))]
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
                    replica_checksums=[row[6] % (1 << 64) for row in rows])
        return StepMetrics(total, acc, g)

    # --- state --------------------------------------------------------------------------------

    def _state_arrays(self, copy: bool = True) -> dict[str, np.ndarray]:
        def host(v):
            if not isinstance(v, torch.Tensor):
                return np.asarray(v)
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

    def get_state(self) -> dict[str, np.ndarray]:
        """This rank's state: parameters and buffers, its optimizer state (its shard under
        ZeRO), its carried state."""
        out = self._state_arrays()
        import torch.utils._pytree as pytree
        for i, t in enumerate(pytree.tree_flatten(self._carry[0])[0] if self._carry else ()):
            out[f"carry/0/{i}"] = t.detach().cpu().numpy().copy()
        return out

    def set_state(self, state: Mapping[str, np.ndarray]) -> None:
        self._load_arrays(state)
        if self._carry is not None:
            self._load_carry(state)

    def state_checksum(self) -> int:
        """An exact checksum of this rank's parameters (equal across ranks under DDP)."""
        return checksum(self.model.parameters())
