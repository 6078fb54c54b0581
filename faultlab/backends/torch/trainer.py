"""The torch backend: builds workloads, trains them with emulated data-parallel replicas, and
reports operand shapes.

Replica emulation (MirroredStrategy semantics in one process): each global batch is split into
R shards; replica r runs forward and backward on its shard with its own batch statistics, the
gradients are averaged (each shard's mean loss is scaled by 1/R and accumulated in replica
order, a fixed order, so results are bit-reproducible) and one optimizer step follows. BatchNorm
running statistics are the mean of the replicas'. A fault fires only while its replica's shard
is computed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree

from faultlab.backends.base import EvalMetrics, StepMetrics, TrainerBase
from faultlab.bits import bit_sum, key_weight
from faultlab.errors import FaultlabError, SpecError
from faultlab.faults import FaultSpec
from faultlab.backends.torch.injector import TorchInjector, record_operands
from faultlab.workloads import data as datamod
from faultlab.workloads.base import WorkloadConfig, is_user_workload, load_user_workload, lr_schedule
from faultlab.backends.torch.models import MLP, ResNet18, TransformerLM, layer_map
from faultlab.backends.torch.replicas import ReplicaCopies, checksum


def _lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y)


def _call_with_state(model: nn.Module, x: torch.Tensor, state):
    return model(x, state)


@dataclass
class TorchWorkload:
    """What a torch workload function returns (see docs/workloads.md).

    model: the nn.Module; data: the dataset (NumPy arrays; images NHWC in [0, 1]);
    sample_shape: one input sample's shape in the canonical layout (e.g. (32, 32, 3));
    loss: mean loss of (outputs, labels); augment: apply the artifact's flip/pad/crop;
    make_optimizer: builds the optimizer from (parameters, lr).

    State carried across batches (a recurrent model's hidden state): init_state(batch_size)
    returns it (a tensor, or a tuple / list / dict of tensors) for a batch of that many samples;
    each step then calls forward(model, x, state) -> (outputs, new_state) (default
    ``model(x, state)``), detaches new_state (truncated backpropagation through time) and
    hands it to the next step. Each emulated replica carries its own; checkpoints hold it.
    batches(step) -> (x, y): the global batch of a step, a pure function of the step (e.g. the
    contiguous chunks a recurrent language model reads in order); default: faultlab's
    shuffled batches of `data`."""

    model: nn.Module
    data: datamod.Dataset | None
    sample_shape: tuple[int, ...]
    input_dtype: torch.dtype = torch.float32
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = _ce
    augment: bool = False
    make_optimizer: Callable = field(default=lambda params, lr: torch.optim.Adam(params, lr=lr))
    init_state: Callable[[int], object] | None = None
    forward: Callable | None = None
    batches: Callable[[int], tuple[np.ndarray, np.ndarray]] | None = None

    def __post_init__(self):
        if self.forward is not None and self.init_state is None:
            raise SpecError("TorchWorkload: forward(model, x, state) needs init_state "
                            "(the state of the first batch)")
        for name in ("loss", "make_optimizer", "init_state", "forward", "batches"):
            fn = getattr(self, name)
            if fn is not None and not callable(fn):
                raise SpecError(f"TorchWorkload: {name} must be callable, got "
                                f"{type(fn).__name__}")

    @property
    def stateful(self) -> bool:
        return self.init_state is not None

    def new_state(self, batch_size: int):
        """init_state(batch_size), checked: a tensor or a tuple / list / dict of tensors."""
        state = self.init_state(batch_size)
        leaves, _ = pytree.tree_flatten(state)
        if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
            raise SpecError(f"TorchWorkload: init_state({batch_size}) must return a tensor or "
                            f"a tuple / list / dict of tensors, got {type(state).__name__}")
        return state

    def run(self, model: nn.Module, x: torch.Tensor, state):
        """(outputs, state after x): the model on one batch, carrying `state` when stateful."""
        if not self.stateful:
            return model(x), None
        got = (self.forward or _call_with_state)(model, x, state)
        if not (isinstance(got, (tuple, list)) and len(got) == 2):
            raise SpecError(f"TorchWorkload: the stateful forward must return (outputs, "
                            f"state), got {type(got).__name__}")
        out, new = got
        return out, pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t,
                                    new)


def build_workload(config: WorkloadConfig, with_data: bool = True) -> TorchWorkload:
    """Build the model (and data) of a configuration; seeds the initial weights."""
    torch.manual_seed(config.seed)
    name = config.workload
    if is_user_workload(name):
        return load_user_workload(config, TorchWorkload)
    channels = 1 if name == "mlp" else 3
    data = datamod.load(config, channels) if with_data or name == "transformer" else None
    s = config.input_size
    if name == "resnet18":
        dropout = float(config.option("dropout", "0.1"))
        return TorchWorkload(ResNet18(config.width, 10, 3, dropout), data, (s, s, 3),
                             augment=config.option("augment", "1") == "1")
    if name == "mlp":
        return TorchWorkload(MLP(s * s, config.width, 10), data if with_data else None, (s, s, 1))
    if name == "transformer":
        model = TransformerLM(data.classes, config.width, s,
                              int(config.option("blocks", "2")), int(config.option("heads", "4")))
        return TorchWorkload(model, data if with_data else None, (s,), torch.long, _lm_loss)
    raise SpecError(f"workload {name!r} has no torch implementation")


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(1)[0])


def _to_input(x: np.ndarray, wl: TorchWorkload) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x))
    if wl.input_dtype is torch.long:
        return t.long()
    t = t.to(wl.input_dtype)
    return t.permute(0, 3, 1, 2).contiguous() if t.dim() == 4 else t


_SIGNED = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bit_sum(t: torch.Tensor) -> int:
    """bits.bit_sum of a tensor, on the tensor (its bits as signed intN, summed in int64)."""
    t = t.detach()
    ints = _SIGNED.get(t.element_size())
    if ints is None or t.is_complex():
        return bit_sum(t.cpu().numpy())
    return int(t.contiguous().view(ints).sum(dtype=torch.int64)) & ((1 << 64) - 1)


def _view(v) -> torch.Tensor:
    """A NumPy array as a tensor for reading (a copy only if the array is read-only)."""
    a = np.asarray(v)
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def load_optimizer_state(optimizer, state: Mapping[str, np.ndarray]) -> None:
    """Put a state's `optim/{i}/{name}` arrays into `optimizer`: copied into the tensors it
    already has when every one exists with the same shape and dtype (see
    TorchTrainer._load_arrays for why), otherwise through load_state_dict."""
    opt: dict[int, dict] = {}
    for k, v in state.items():
        if k.startswith("optim/"):
            _, i, name = k.split("/", 2)
            opt.setdefault(int(i), {})[name] = _view(v)
    sd = optimizer.state_dict()
    live = sd["state"]
    if live.keys() == opt.keys() and all(
            live[i].keys() == opt[i].keys() and all(
                isinstance(live[i][n], torch.Tensor) and live[i][n].shape == t.shape
                and live[i][n].dtype == t.dtype for n, t in opt[i].items())
            for i in opt):
        with torch.no_grad():
            for i, entries in opt.items():
                for n, t in entries.items():
                    live[i][n].copy_(t)
        return
    sd["state"] = {i: {n: t.clone() for n, t in e.items()} for i, e in opt.items()}
    optimizer.load_state_dict(sd)


class TorchTrainer(TrainerBase):
    """A training session of one workload configuration (see the module docstring)."""

    def __init__(self, config: WorkloadConfig):
        torch.use_deterministic_algorithms(True)
        self.config = config
        self.wl = build_workload(config)
        self.model = self.wl.model
        self.pipeline = datamod.Pipeline(config, self.wl.data, augment=self.wl.augment)
        self.optimizer = self.wl.make_optimizer(self.model.parameters(), config.lr)
        self.layers = layer_map(self.model)
        # the replica count, so a fault on a replica this configuration lacks is refused
        self.injector = TorchInjector(self.layers, self.optimizer, replicas=config.replicas)
        # per-replica copies of parameters / optimizer state, made when a fault forks one
        self.copies = ReplicaCopies(self.model, self.optimizer) if config.replicas > 1 else None
        self.injector.copies = self.copies
        self._buffers = [b for _, b in self.model.named_buffers()]
        self._probe: dict | None = None
        self._kernels: list | None = None
        self._kernel_names: dict | None = None
        self.signal_spec = None   # a faultlab.detectors.SignalSpec to collect signals
        self.lr_scale = 1.0       # set by a recovery policy that re-runs a step more gently
        self._lr_at = lr_schedule(config)
        # state carried across batches (TorchWorkload.init_state), one per emulated replica
        self._carry = ([self.wl.new_state(config.per_replica_batch)
                        for _ in range(config.replicas)] if self.wl.stateful else None)

    def lr_at(self, step: int) -> float:
        """Polynomial (power 1) decay from lr to lr * end_lr_ratio, as in the artifact."""
        return self._lr_at(step)

    def train_step(self, step: int, faults: Sequence[FaultSpec] = ()) -> StepMetrics:
        c = self.config
        self.model.train()
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr_at(step) * self.lr_scale
        self.optimizer.zero_grad(set_to_none=True)
        x, y = self._batch(step)
        b = c.per_replica_batch
        carry = list(self._carry) if self._carry is not None else None
        snapshot = [t.clone() for t in self._buffers] if c.replicas > 1 else None
        after: list[list[torch.Tensor]] = []
        loss_sum, correct, count = 0.0, 0, 0
        replica_losses: list[float] = []
        self.injector.begin_step(faults, step)
        probes = self._install_probe() if self._probe is not None else []
        abft = None
        if self.signal_spec is not None and self.signal_spec.abft:
            abft = torch.zeros((), dtype=torch.float32)
            probes += self._install_abft(abft)
        try:
            for r in range(c.replicas):
                self.injector.replica = r
                torch.manual_seed(_seed(c.seed, step, r))
                if snapshot is not None and r:
                    for t, s in zip(self._buffers, snapshot):
                        t.copy_(s)
                xr, yr = _to_input(x[r * b:(r + 1) * b], self.wl), torch.from_numpy(y[r * b:(r + 1) * b])
                with self._replica_copy(r):
                    if carry is None:
                        out = self.model(xr)
                    else:
                        out, carry[r] = self.wl.run(self.model, xr, carry[r])
                    loss = self.wl.loss(out, yr)
                    (loss / c.replicas).backward()
                loss_r = float(loss.detach())
                loss_sum += loss_r
                replica_losses.append(loss_r)
                correct += int((out.detach().argmax(-1) == yr).sum())
                count += yr.numel()
                if snapshot is not None:
                    after.append([t.clone() for t in self._buffers])
            self.injector.replica = 0
            if snapshot is not None:
                with torch.no_grad():
                    for i, t in enumerate(self._buffers):
                        if t.is_floating_point():
                            t.copy_(torch.stack([a[i] for a in after]).mean(0))
                        else:
                            t.copy_(after[-1][i])
            pre = self._pre_step_signals(replica_losses) if self.signal_spec else None
            self.optimizer.step()
            for k in sorted(self.copies.forks) if self.copies is not None else ():
                with self.copies.active(k):    # the same update on every diverged copy
                    self.optimizer.step()
            sig = self._post_step_signals(step, pre, abft) if pre is not None else None
            if carry is not None:
                self._carry = carry        # the step completed: its state carries on
        finally:
            self.injector.end_step()
            for h in probes:
                h.remove()
        return StepMetrics(loss_sum / c.replicas, correct / max(count, 1), sig)

    def _batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The global batch of `step`: the workload's own batches(step), or the pipeline's."""
        if self.wl.batches is None:
            return self.pipeline.batch(step)
        x, y = (np.asarray(a) for a in self.wl.batches(step))
        if len(x) != self.config.global_batch or len(y) != self.config.global_batch:
            raise SpecError(f"workload {self.config.workload!r}: batches({step}) returned "
                            f"{len(x)} inputs and {len(y)} labels, not the global batch of "
                            f"{self.config.global_batch} (replicas x per_replica_batch)")
        return x, y

    def _replica_copy(self, replica: int):
        """Replica `replica`'s own parameters in place (when a fault forked it)."""
        return self.copies.active(replica) if self.copies is not None else contextlib.nullcontext()

    # --- detector signals: fused reductions, one host sync per step -----------------------------

    def _kernel_params(self) -> list[tuple[str, torch.Tensor]]:
        if self._kernels is None:
            self._kernels = [(name, m.weight) for name, m in self.layers.items()
                             if isinstance(m, (nn.Conv2d, nn.Linear))]
        return self._kernels

    def _pre_step_signals(self, replica_losses: list[float]):
        """Norm of the averaged gradient (one fused foreach reduction), when asked for."""
        spec = self.signal_spec
        # without Adam moments (e.g. SGD), the gradient norm carries the non-finite check
        if not spec.grads and not (spec.history and self.optimizer.state):
            return replica_losses, None
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return replica_losses, torch.stack(torch._foreach_norm(grads)) if grads else None

    def _install_abft(self, acc: torch.Tensor) -> list:
        """Checksum every conv / dense output against the stored kernel's column sums
        (registered after the injector's hooks, so it sees what the layer delivered); the
        largest relative residual of the step accumulates in `acc` on the device."""
        handles = []
        for _, m in self._kernel_params_modules():
            def hook(mod, args, out):
                x = args[0]
                w = mod._parameters["weight"].detach()     # the stored kernel, not an operand
                with torch.no_grad():
                    b = mod.bias.detach().sum() if mod.bias is not None else 0.0
                    if isinstance(mod, nn.Linear):
                        ref = x.detach() @ w.sum(0) + b
                        got = out.detach().sum(-1)
                    else:
                        xd = x.detach()
                        if hasattr(mod, "pads"):
                            t, bt, l, r = mod.pads(xd.shape[-2], xd.shape[-1])
                            xd = F.pad(xd, (l, r, t, bt))
                            pad = 0
                        else:
                            pad = mod.padding
                        ref = F.conv2d(xd, w.sum(0, keepdim=True), None, mod.stride, pad,
                                       mod.dilation, 1)[:, 0] + b
                        got = out.detach().sum(1)
                    res = (got - ref).abs().amax() / (got.abs().amax() + 1e-6)
                    acc.copy_(torch.maximum(acc, torch.nan_to_num(res, nan=float("inf"))))
            handles.append(m.register_forward_hook(hook))
        return handles

    def _kernel_params_modules(self):
        return [(n, m) for n, m in self.layers.items()
                if isinstance(m, (nn.Conv2d, nn.Linear)) and getattr(m, "groups", 1) == 1]

    def _moments(self) -> list[tuple[str | None, torch.Tensor]]:
        """(kernel layer name or None, Adam first moment) for every parameter with state."""
        if self._kernel_names is None:
            self._kernel_names = {id(p): n for n, p in self._kernel_params()}
        st = self.optimizer.state
        return [(self._kernel_names.get(id(p)), st[p]["exp_avg"]) for p in self.model.parameters()
                if p in st and "exp_avg" in st[p]]

    def _post_step_signals(self, step: int, pre, abft=None):
        """The step's signals in one host transfer. The history bound needs max |m| per kernel;
        the L2 norm bounds it from above and is far cheaper on CPU, so the exact maximum is
        computed only for kernels whose L2 norm exceeds the bound (a second, rare transfer)."""
        from faultlab.detectors.signals import Signals
        spec = self.signal_spec
        replica_losses, gnorms = pre
        parts = []
        if gnorms is not None:
            parts.append(gnorms.square().sum().sqrt().reshape(1))
        moments = self._moments() if spec.history else []
        if moments:
            parts.append(torch.stack(torch._foreach_norm([m for _, m in moments])))
        if spec.params:
            parts.append(self._param_norm().reshape(1))
        if abft is not None:
            parts.append(abft.reshape(1))
        vals = torch.cat(parts).tolist() if parts else []   # the one host sync of the step
        i = 0
        grad_norm = vals[0] if gnorms is not None else 0.0
        i += gnorms is not None
        m_norms = vals[i:i + len(moments)]
        i += len(moments)
        m_max, m_other = {}, 0.0
        for (name, m), v in zip(moments, m_norms):
            if name is None:
                m_other = max(m_other, v) if v == v else v
            elif v > spec.bound or v != v:
                m_max[name] = float(m.abs().amax())
            else:
                m_max[name] = v
        param_sum = vals[i] if spec.params else None
        i += bool(spec.params)
        return Signals(step=step, loss=sum(replica_losses) / len(replica_losses),
                       replica_loss=replica_losses, grad_norm=grad_norm, m_max=m_max,
                       m_other=m_other, param_norm=param_sum,
                       abft_residual=vals[i] if abft is not None else None,
                       replica_checksums=self._replica_checksums() if spec.replicas else None)

    def _param_norm(self) -> torch.Tensor:
        """The parameter norm (sum of per-tensor norms) of the replica copy where it is
        largest (NaN if any copy holds one): a fault in one replica's copy shows."""
        copies = [list(self.model.parameters())]
        if self.copies is not None:
            copies += [f.params for f in self.copies.forks.values()]
        return torch.stack([torch.stack(torch._foreach_norm(ps)).sum() for ps in copies]).max()

    def _replica_checksums(self) -> list[int]:
        """One exact checksum per replica of its own parameters (torch_replicas.checksum)."""
        if self.copies is None:
            return [checksum(self.model.parameters())]
        return self.copies.checksums(self.config.replicas)

    def signal_cost(self, spec, suite=None, repeats: int = 50) -> float:
        """Median seconds that collecting `spec`'s signals (and judging them) adds to a step,
        timed in isolation on the current gradients and optimizer state: a low-noise figure
        beside the interleaved whole-step comparison. ABFT's forward-hook cost shows only in
        the whole-step comparison."""
        from faultlab.replay.overhead import time_signals
        saved, self.signal_spec = self.signal_spec, spec
        try:
            return time_signals(lambda: self._post_step_signals(0, self._pre_step_signals([0.0])),
                                suite, repeats)
        finally:
            self.signal_spec = saved

    def evaluate(self) -> EvalMetrics:
        """Test loss and accuracy of replica 0's copy (the one the TF backend evaluates)."""
        with self._replica_copy(0):
            return self._evaluate()

    @torch.no_grad()
    def _evaluate(self) -> EvalMetrics:
        self.model.eval()
        total, correct, loss_sum = 0, 0, 0.0
        state, n_state = None, 0    # a stateful model's, carried across the test batches in order
        for x, y in self.pipeline.test_batches(256):
            xt, yt = _to_input(x, self.wl), torch.from_numpy(y)
            if not self.wl.stateful:
                out = self.model(xt)
            else:
                if state is None or len(x) != n_state:
                    state, n_state = self.wl.new_state(len(x)), len(x)
                out, state = self.wl.run(self.model, xt, state)
            n = yt.numel()
            loss_sum += float(self.wl.loss(out, yt)) * n
            correct += int((out.argmax(-1) == yt).sum())
            total += n
        return EvalMetrics(loss_sum / max(total, 1), correct / max(total, 1))

    def _state_arrays(self) -> dict[str, np.ndarray]:
        out = {f"model/{k}": v.detach().cpu().numpy().copy()
               for k, v in self.model.state_dict().items()}
        for i, st in self.optimizer.state_dict()["state"].items():
            for k, v in st.items():
                out[f"optim/{i}/{k}"] = (v.detach().cpu().numpy().copy()
                                         if isinstance(v, torch.Tensor) else np.asarray(v))
        return out

    def full_checksum(self) -> int:
        """bits.state_checksum(get_state()), computed on the live tensors without copying them
        (the replicas' own copies or a carried state: through get_state)."""
        if (self.copies is not None and self.copies.forks) or self._carry:
            return super().full_checksum()
        total = 0
        for k, v in self.model.state_dict().items():
            total += key_weight(f"model/{k}") * _bit_sum(v)
        for i, st in self.optimizer.state_dict()["state"].items():
            for k, v in st.items():
                total += key_weight(f"optim/{i}/{k}") * (
                    _bit_sum(v) if isinstance(v, torch.Tensor) else bit_sum(np.asarray(v)))
        return total & ((1 << 64) - 1)

    def _load_arrays(self, state: Mapping[str, np.ndarray]) -> None:
        """Copy a state into the live tensors. Optimizer state is copied into the tensors
        the optimizer already has when their layout matches: tensors made from NumPy arrays
        are only 16-byte aligned, and every step after a rollback ran about 8% slower on
        them (vectorised kernels); a different layout goes through load_state_dict, with
        tensors from torch's own (64-byte aligned) allocator."""
        model = {k[6:]: _view(v) for k, v in state.items() if k.startswith("model/")}
        self.model.load_state_dict(model)
        load_optimizer_state(self.optimizer, state)

    def get_state(self) -> dict[str, np.ndarray]:
        """Model (parameters and buffers) and optimizer state of the shared copy; a replica
        whose own copy diverged (after a param / opt_state fault) adds `replica{k}/...`
        entries where it differs, as the TF backend does."""
        out = self._state_arrays()
        for k in sorted(self.copies.forks) if self.copies is not None else ():
            with self.copies.active(k):
                mine = self._state_arrays()
            out.update({f"replica{k}/{key}": a for key, a in mine.items()
                        if key not in out or a.tobytes() != out[key].tobytes()})
        for r, state in enumerate(self._carry or ()):
            for i, t in enumerate(pytree.tree_flatten(state)[0]):
                out[f"carry/{r}/{i}"] = t.detach().cpu().numpy().copy()
        return out

    def _load_carry(self, state: Mapping[str, np.ndarray]) -> None:
        """The carried state (TorchWorkload.init_state) of every replica from a get_state."""
        carry = []
        for r, mine in enumerate(self._carry):
            leaves, spec = pytree.tree_flatten(mine)
            try:
                new = [torch.from_numpy(np.array(state[f"carry/{r}/{i}"])).to(t.device)
                       for i, t in enumerate(leaves)]
            except KeyError:
                raise SpecError(f"workload {self.config.workload!r}: the state restored holds "
                                f"no carried state (carry/{r}/...) for its init_state") from None
            carry.append(pytree.tree_unflatten(new, spec))
        self._carry = carry

    def set_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore a state from get_state, every replica's copy included."""
        shared = {k: v for k, v in state.items() if not k.startswith("replica")}
        self._load_arrays(shared)
        if self._carry is not None:
            self._load_carry(shared)
        if self.copies is None:
            return
        self.copies.clear()
        own: dict[int, dict] = {}
        for key, v in state.items():
            if key.startswith("replica"):
                r, _, rest = key.partition("/")
                own.setdefault(int(r[len("replica"):]), {})[rest] = v
        for k, entries in sorted(own.items()):
            self.copies.fork(k)
            with self.copies.active(k):
                self._load_arrays({**shared, **entries})

    def replica_gradient_probe(self):
        """Record each replica's contribution to every parameter's gradient in the following
        steps, as the optimizer receives it (after any injected corruption): returns
        (records {replica: {name: grad}}, stop). For tests and the divergence detector."""
        records: dict[int, dict[str, torch.Tensor]] = {}
        self._probe = records

        def stop():
            self._probe = None
        return records, stop

    def _install_probe(self) -> list:
        """Hooks registered after the injector's, so they see the delivered gradient."""
        records = self._probe
        handles = []
        for name, p in self.model.named_parameters():
            def hook(g, name=name):
                records.setdefault(self.injector.replica, {})[name] = g.detach().clone()
            handles.append(p.register_hook(hook))
        return handles


def operand_shapes(config: WorkloadConfig):
    """Every layer's operand shapes (canonical layout, per replica). A built-in workload is
    built and run on the meta device: nothing is allocated, so the artifact's full size is
    instant. A user workload is never called on the meta device (its code may read tensor
    values, e.g. `.numpy()`): it is built on the CPU as training builds it, and one
    replica's shard of the first batch runs forward once without gradients (a dry run)."""
    if is_user_workload(config.workload):
        return _user_operand_shapes(config)
    with torch.device("meta"):
        wl = build_workload(config, with_data=False)
    model = wl.model
    table: dict[str, dict] = {}
    handles = [mod.register_forward_hook(
        lambda m, args, out, name=name: record_operands(table, name, m, args, out))
        for name, mod in layer_map(model).items()]
    shape = (config.per_replica_batch,) + tuple(wl.sample_shape)
    with torch.device("meta"):
        x = torch.zeros(shape, dtype=wl.input_dtype)
        if x.dim() == 4:
            x = x.permute(0, 3, 1, 2)
        model(x)
    for h in handles:
        h.remove()
    if config.offload:          # offloaded state: the host_state site (backends/torch/offload.py)
        from faultlab.backends.torch.offload import host_operands
        host_operands(config, model, table)
    return table


#: operand tables of user workloads by configuration key (a dry run builds the model)
_USER_SHAPES: dict[str, dict] = {}


def _user_operand_shapes(config: WorkloadConfig) -> dict:
    key = config.key()
    if key in _USER_SHAPES:
        return _USER_SHAPES[key]
    with torch.random.fork_rng(devices=[]):     # the caller's RNG is left as it was
        wl = build_workload(config)             # one-line SpecError if the factory fails
        model = wl.model
        table: dict[str, dict] = {}
        handles = [mod.register_forward_hook(
            lambda m, args, out, name=name: record_operands(table, name, m, args, out))
            for name, mod in layer_map(model).items()]
        b = config.per_replica_batch
        try:
            if wl.batches is not None or wl.data is not None:
                x = _to_input(TorchTrainer._batch(_Probe(config, wl), 0)[0][:b], wl)
            else:
                x = _to_input(np.zeros((b,) + tuple(wl.sample_shape),
                                       dtype=np.int64 if wl.input_dtype is torch.long
                                       else np.float32), wl)
            torch.manual_seed(_seed(config.seed, 0, 0))
            with torch.no_grad():
                wl.run(model, x, wl.new_state(b) if wl.stateful else None)
        except FaultlabError:
            raise
        except Exception as e:  # noqa: BLE001 - the user's model failed on its first batch
            from faultlab.workloads.base import _one_line
            raise SpecError(f"workload {config.workload!r}: the dry run that finds the operand "
                            f"shapes (one batch of {b} on the CPU, no gradients) raised "
                            f"{_one_line(e)}") from e
        finally:
            for h in handles:
                h.remove()
    if len(_USER_SHAPES) >= 8:
        _USER_SHAPES.pop(next(iter(_USER_SHAPES)))
    _USER_SHAPES[key] = table
    return table


class _Probe:
    """What TorchTrainer._batch reads, without a trainer (for the dry run)."""

    def __init__(self, config: WorkloadConfig, wl: TorchWorkload):
        self.config, self.wl = config, wl
        self.pipeline = datamod.Pipeline(config, wl.data) if wl.data is not None else None
