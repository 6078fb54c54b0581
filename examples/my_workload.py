"""An example of plugging your own training code into faultlab.

Run a campaign against it with `workload` set to `examples.my_workload:tiny_cnn` (the module
must be importable: run from the repository root, or put it on PYTHONPATH). faultlab imports
user code named by a campaign file only when you allow it (docs/workloads.md, "Allowing your
code"): pass `--allow-workload examples.my_workload` (the module and any of its functions;
`examples.my_workload:tiny_cnn` allows that function only), or list it under
`[tool.faultlab] allow-workloads` in your pyproject.toml:

    faultlab validate examples/my_campaign.csv --allow-workload examples.my_workload
    faultlab run examples/my_campaign.csv --allow-workload examples.my_workload

From Python: `faultlab.load_campaign("examples/my_campaign.csv",
allow_workloads=["examples.my_workload"])`.

`lstm_lm` is a recurrent language model that carries its hidden state across batches
(`init_state`) and reads its token stream in order (`batches`); a campaign names it
`examples.my_workload:lstm_lm`, e.g. with `options` `schedule=constant` for a flat learning
rate (docs/workloads.md, "Options").
"""

import numpy as np
import torch
import torch.nn as nn

from faultlab.workloads.data import Dataset
from faultlab.torch import TorchWorkload


class TinyCNN(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def make_data(seed: int, size: int) -> Dataset:
    """Four classes of 'stripes': a locally made dataset (nothing is downloaded)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, size=600)
    x = rng.random((600, size, size, 1), dtype=np.float32) * 0.3
    for c in range(4):
        x[y == c, :, c * size // 4:(c + 1) * size // 4, :] += 0.7
    return Dataset(x[:500], y[:500], x[500:], y[500:], classes=4)


def tiny_cnn(config) -> TorchWorkload:
    """faultlab calls this with the campaign's WorkloadConfig; seeds are already set."""
    s = config.input_size
    return TorchWorkload(model=TinyCNN(config.width), data=make_data(config.seed, s),
                         sample_shape=(s, s, 1))


# --- a recurrent language model that carries its hidden state across batches ----------------

class LSTMLM(nn.Module):
    """Word-level LSTM language model, written as the PyTorch example is: forward takes and
    returns the hidden state."""

    def __init__(self, vocab: int, width: int):
        super().__init__()
        self.width = width
        self.embed = nn.Embedding(vocab, width)
        self.lstm = nn.LSTM(width, width, batch_first=True)
        self.head = nn.Linear(width, vocab)

    def forward(self, x, hidden):
        out, hidden = self.lstm(self.embed(x), hidden)
        return self.head(out), hidden

    def init_hidden(self, batch: int):
        return (torch.zeros(1, batch, self.width), torch.zeros(1, batch, self.width))


def token_stream(seed: int, length: int, vocab: int = 16) -> np.ndarray:
    """A generated token stream (a fixed random Markov chain: learnable, nothing downloaded)."""
    rng = np.random.default_rng(seed)
    nxt = rng.integers(0, vocab, size=(vocab, 2))       # each token has two likely successors
    out = np.empty(length, dtype=np.int64)
    out[0] = 0
    for i in range(1, length):
        out[i] = nxt[out[i - 1], int(rng.random() < 0.3)]
    return out


def lstm_lm(config) -> TorchWorkload:
    """Truncated backpropagation through time: the stream is cut into `global_batch` parallel
    streams (batchify), step k reads the next `input_size` tokens of each in order, and the
    hidden state of step k is the one step k-1 left (faultlab detaches it and keeps it in
    its checkpoints, so a rollback or a replay resumes it exactly)."""
    vocab, bptt, g = 16, config.input_size, config.global_batch
    stream = token_stream(config.seed, 20_000, vocab)
    train, test = stream[:16_000], stream[16_000:]
    streams = train[:len(train) // g * g].reshape(g, -1)      # row j: parallel stream j
    chunks = (streams.shape[1] - 1) // bptt

    def batches(step: int):
        k = step % chunks
        return (streams[:, k * bptt:(k + 1) * bptt], streams[:, k * bptt + 1:(k + 1) * bptt + 1])

    n = (len(test) - 1) // bptt
    xt = test[:n * bptt].reshape(n, bptt)
    yt = test[1:n * bptt + 1].reshape(n, bptt)
    model = LSTMLM(vocab, config.width)
    return TorchWorkload(
        model=model, data=Dataset(xt, yt, xt, yt, classes=vocab), sample_shape=(bptt,),
        input_dtype=torch.long, batches=batches, init_state=model.init_hidden,
        loss=lambda logits, y: nn.functional.cross_entropy(logits.reshape(-1, vocab),
                                                           y.reshape(-1)))
