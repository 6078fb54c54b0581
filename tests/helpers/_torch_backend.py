"""The conformance suite's PyTorch adapter: how the shared tests run a kernel, an instrumented
two-replica network, a training trial and a checkpointed session on torch. The TF adapter
(_tf_backend.py) has the same names. Arrays cross in the canonical layout (NHWC
activations, HWIO conv kernels, (in, out) dense kernels), as faults name positions."""

from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from faultlab.backends import load_backend
from faultlab.backends.torch.injector import TorchInjector, act_perm, weight_perm
from faultlab.backends.torch.kernels import prepare
from faultlab.backends.torch.models import Conv2dSame, layer_map

NAME = "torch"
BACKEND = load_backend(NAME)

#: hypothesis examples per kernel property (the torch kernels are cheap: many examples)
EXAMPLES = {"single_bit": 600, "k_bit": 400, "set": 400, "replacement": 300, "scale": 400}

TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
         "float64": torch.float64, "int8": torch.int8}
_SINT = {"float32": torch.int32, "float16": torch.int16, "bfloat16": torch.int16,
         "float64": torch.int64, "int8": torch.int8}


def _uint(x: np.ndarray) -> np.dtype:
    return np.dtype(f"u{x.dtype.itemsize}")


def to_torch(x: np.ndarray, dtype: str) -> torch.Tensor:
    """A NumPy array of `dtype` (bf16 as uint16 bits) as a torch tensor, bit for bit."""
    u = np.ascontiguousarray(x).view(_uint(x))
    return torch.from_numpy(u.view(np.dtype(f"i{u.itemsize}")).copy()).view(TORCH[dtype])


def bits(t: torch.Tensor, dtype: str) -> np.ndarray:
    i = t.contiguous().view(_SINT[dtype]).numpy()
    return i.view(np.dtype(f"u{i.itemsize}"))


# --- kernels ----------------------------------------------------------------------------------

def kernel_outputs(x: np.ndarray, c, dtype: str) -> dict[str, np.ndarray]:
    """The bits each way of applying corruption `c` to `x` gives: out of place (``apply``,
    which must leave its input alone) and in place (``apply_``, into the same storage)."""
    t = to_torch(x, dtype)
    tc = prepare(c, t)
    out = bits(tc.apply(t), dtype)
    assert (bits(t, dtype) == np.ascontiguousarray(x).view(_uint(x))).all(), \
        "apply modified its input"
    t2 = to_torch(x, dtype)
    ptr = t2.data_ptr()
    assert tc.apply_(t2) is t2 and t2.data_ptr() == ptr, "apply_ did not work in place"
    return {"apply": out, "apply_": bits(t2, dtype)}


def native_set(values: np.ndarray, dtype: str) -> np.ndarray:
    """The bits of float64 `values` converted to `dtype` by torch's own casts (int8: rounded
    and clamped first, as the set model documents)."""
    if dtype == "int8":
        return bits(torch.from_numpy(np.clip(np.rint(values), -128, 127)).to(torch.int8), dtype)
    return bits(torch.from_numpy(values).to(TORCH[dtype]), dtype)


def native_scale(x: np.ndarray, idx: np.ndarray, factor: float, dtype: str):
    """(bits, comparable) of x[idx] * factor in torch's own arithmetic (the factor rounded to
    fp32 below float64; int8 rounded and clamped); comparable is False where NaN is involved
    (payloads are the reference's business)."""
    t = to_torch(x, dtype)[torch.from_numpy(idx)]
    with np.errstate(over="ignore"):
        f32 = float(np.float32(factor))
    if dtype == "int8":
        plain = torch.round(t.float() * f32).clamp(-128, 127).to(torch.int8)
        return bits(plain, dtype), np.ones(idx.size, bool)
    plain = t * (factor if dtype == "float64" else f32)
    return bits(plain, dtype), ~torch.isnan(plain.float()).numpy()


# --- an instrumented two-replica network ------------------------------------------------------

def _canonical(t: torch.Tensor, perm) -> np.ndarray:
    return np.ascontiguousarray(t.detach().numpy().transpose(np.argsort(perm)))


class Net(nn.Module):
    """conv (3x3, stride 2, 'same', no bias) -> ReLU -> conv2 (3x3, 'same') -> dense."""

    def __init__(self):
        super().__init__()
        self.conv = Conv2dSame(2, 4, 3, 2)
        self.conv2 = Conv2dSame(4, 4, 3, 1, bias=True)
        self.dense = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        c1 = self.conv(x)
        a1 = F.relu(c1)
        c2 = self.conv2(a1)
        # flatten in NHWC order, so the dense kernel's rows are the canonical positions
        return c1, a1, c2, self.dense(c2.permute(0, 2, 3, 1).flatten(1))


class InjectorHarness:
    """R emulated replicas of one network (as TorchTrainer runs them: one shard each, in
    turn, the injector told which replica is computing); `run` returns each replica's
    activations, parameter gradients (by Keras-style path) and input gradient, canonically."""

    R, B = 2, 3

    def __init__(self):
        torch.manual_seed(3)
        self.net = Net()
        self.inj = TorchInjector(layer_map(self.net), replicas=self.R)
        rng = np.random.default_rng(0)
        self.x = rng.normal(size=(self.R * self.B, 8, 8, 2)).astype(np.float32)
        self.y = rng.integers(0, 5, size=self.R * self.B)
        self._params = {"conv/kernel": self.net.conv.weight, "conv2/kernel": self.net.conv2.weight,
                        "conv2/bias": self.net.conv2.bias, "dense/kernel": self.net.dense.weight,
                        "dense/bias": self.net.dense.bias}

    def kernel(self, layer: str) -> np.ndarray:
        w = getattr(self.net, layer).weight
        return _canonical(w, weight_perm(w.dim()))

    def run(self, faults=(), step=0) -> list[dict]:
        res = []
        self.inj.begin_step(list(faults), step)
        try:
            for r in range(self.R):
                self.inj.replica = r
                self.net.zero_grad(set_to_none=True)
                shard = slice(r * self.B, (r + 1) * self.B)
                x = torch.from_numpy(self.x[shard].transpose(0, 3, 1, 2).copy()).requires_grad_()
                c1, a1, c2, logits = self.net(x)
                F.cross_entropy(logits, torch.from_numpy(self.y[shard])).backward()
                act = act_perm(4)
                res.append({"c1": _canonical(c1, act), "a1": _canonical(a1, act),
                            "c2": _canonical(c2, act), "logits": logits.detach().numpy(),
                            "g": {n: _canonical(p.grad, weight_perm(p.dim()))
                                  for n, p in self._params.items()},
                            "dx": _canonical(x.grad, act)})
        finally:
            self.inj.replica = 0
            self.inj.end_step()
        return res


# --- a checkpointed training session ----------------------------------------------------------

class CheckpointSession:
    """A small model (BatchNorm, dropout) trained by Adam on inputs with noise from a torch
    generator; `adapter` is the backend's checkpoint adapter over the model, the optimizer
    and the generator (and the global RNGs); `batch` is the data position."""

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(),
                                   nn.Dropout(0.25), nn.Linear(8, 3))
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        self.noise = torch.Generator().manual_seed(seed + 1)
        self.data = torch.from_numpy(
            np.random.RandomState(4).standard_normal((64, 6)).astype(np.float32))
        self.adapter = BACKEND.checkpoint_adapter()(self.model, self.opt,
                                                    generators={"noise": self.noise})
        self.batch = 0

    def step(self) -> None:
        idx = torch.arange(self.batch * 8, self.batch * 8 + 8) % 64
        self.batch += 1
        x = self.data[idx] + 0.1 * torch.randn((8, 6), generator=self.noise)
        loss = F.cross_entropy(self.model(x), idx % 3)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()

    def fingerprint(self) -> tuple[dict, str]:
        """Everything that decides the following steps, as bytes."""
        state, meta = self.adapter.capture(self.batch)
        return ({k: (v.dtype.str, v.shape, v.tobytes()) for k, v in state.items()},
                json.dumps(meta, sort_keys=True))
