"""Built-in torch models: ResNet-18 with the ISCA'23 artifact's layer names, an MLP, a small
causal transformer LM. Layer names are module paths with '.' replaced by '_'.

The ResNet follows the artifact's Keras model (see reference/isca_ae/README.md): 7x7 stride-2
`conv1` without max-pool, four stages of two basic blocks, TF 'same' padding (asymmetric for
stride 2, hence :class:`Conv2dSame`), BatchNorm with Keras' momentum 0.9 and epsilon 1e-3.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF 'same' padding (before, after) along one dimension."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """nn.Conv2d with TensorFlow's 'same' padding (asymmetric when the stride is 2)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, bias: bool = False):
        super().__init__(cin, cout, kernel, stride=stride, padding=0, bias=bias)

    def pads(self, h: int, w: int) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) padding for an input of h x w."""
        kh, kw = self.kernel_size
        sh, sw = self.stride
        return same_pads(h, kh, sh) + same_pads(w, kw, sw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, b, l, r = self.pads(x.shape[-2], x.shape[-1])
        if t or b or l or r:
            x = F.pad(x, (l, r, t, b))
        return F.conv2d(x, self.weight, self.bias, self.stride)


class KerasBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm as the fused kernels of an fp32 accelerator compute it: one-pass batch moments
    in fp32 (var = E[x^2] - E[x]^2), then `x * inv + (beta - mean * inv)`; biased moving
    variance, Keras' momentum 0.9 and epsilon 1e-3.

    torch's CPU kernel accumulates the moments in float64, which silently absorbs a value that
    overflows an fp32 accelerator: the artifact's ImmediateINFsNaNs example (one 2.87e24 in a
    conv output) turns the TPU's batch variance into Inf - Inf = NaN in the same step."""

    def __init__(self, c: int):
        super().__init__(c, eps=1e-3, momentum=0.1)

    def forward(self, x):
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = ((x * x).mean(dim=(0, 2, 3), keepdim=True) - mean * mean).clamp_min(0.0)
        with torch.no_grad():
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.flatten(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.flatten(), alpha=m)
            self.num_batches_tracked += 1
        inv = torch.rsqrt(var + self.eps) * self.weight.view(1, -1, 1, 1)
        return x * inv + (self.bias.view(1, -1, 1, 1) - mean * inv)


def _bn(c: int) -> nn.BatchNorm2d:
    return KerasBatchNorm2d(c)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dropout: float):
        super().__init__()
        self.conv1 = Conv2dSame(cin, cout, 3, stride)
        self.bn1 = _bn(cout)
        self.conv2 = Conv2dSame(cout, cout, 3, 1)
        self.bn2 = _bn(cout)
        self.downsample = Conv2dSame(cin, cout, 1, stride) if stride != 1 or cin != cout else None
        self.downsample_bn = _bn(cout) if self.downsample is not None else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        if self.dropout is not None:
            h = self.dropout(h)
        h = self.bn2(self.conv2(h))
        s = x if self.downsample is None else self.downsample_bn(self.downsample(x))
        return F.relu(h + s)


class Stage(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dropout: float):
        super().__init__()
        self.basic_0 = BasicBlock(cin, cout, stride, dropout)
        self.basic_1 = BasicBlock(cout, cout, 1, dropout)

    def forward(self, x):
        return self.basic_1(self.basic_0(x))


class ResNet18(nn.Module):
    """The artifact's ResNet-18; `width` is the channel count of the first stage (64 = full)."""

    def __init__(self, width: int = 64, classes: int = 10, channels: int = 3,
                 dropout: float = 0.1):
        super().__init__()
        w = width
        self.conv1 = Conv2dSame(channels, w, 7, 2)
        self.bn1 = _bn(w)
        self.basicblock_1 = Stage(w, w, 1, dropout)
        self.basicblock_2 = Stage(w, 2 * w, 2, dropout)
        self.basicblock_3 = Stage(2 * w, 4 * w, 2, dropout)
        self.basicblock_4 = Stage(4 * w, 8 * w, 2, dropout)
        self.dense = nn.Linear(8 * w, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.basicblock_4(self.basicblock_3(self.basicblock_2(self.basicblock_1(x))))
        return self.dense(x.mean(dim=(2, 3)))


class MLP(nn.Module):
    def __init__(self, inputs: int, width: int = 64, classes: int = 10):
        super().__init__()
        self.dense_1 = nn.Linear(inputs, width)
        self.dense_2 = nn.Linear(width, width)
        self.dense_3 = nn.Linear(width, classes)

    def forward(self, x):
        x = x.flatten(1)
        return self.dense_3(F.relu(self.dense_2(F.relu(self.dense_1(x)))))


class Attention(nn.Module):
    """Causal multi-head self-attention written with plain Linear layers (hookable sites)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.reshape(n, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        att = att.masked_fill(mask, float("-inf")).softmax(dim=-1)
        return self.out((att @ v).transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp_fc1 = nn.Linear(d, 4 * d)
        self.mlp_fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp_fc2(F.gelu(self.mlp_fc1(self.ln2(x))))


class TransformerLM(nn.Module):
    def __init__(self, vocab: int, d: int = 64, seq: int = 32, blocks: int = 2, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(seq, d))
        for i in range(blocks):
            self.add_module(f"block_{i}", Block(d, heads))
        self.blocks = blocks
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.embed(idx) + self.pos[: idx.shape[1]]
        for i in range(self.blocks):
            x = getattr(self, f"block_{i}")(x)
        return self.lm_head(self.ln_f(x))


def layer_map(model: nn.Module) -> dict[str, nn.Module]:
    """Injectable layers by name: every leaf module that has a weight, named by its path."""
    out = {}
    for name, mod in model.named_modules():
        if name and isinstance(getattr(mod, "weight", None), torch.Tensor):
            out[name.replace(".", "_")] = mod
    return out
