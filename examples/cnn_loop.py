#!/usr/bin/env python
"""An MNIST-style CNN trained by its own loop on scikit-learn's 8x8 digits (no download), with
a fault injected through faultlab.torch.Injector and checkpoints through
faultlab.torch.Checkpointer.

    python examples/cnn_loop.py          # about 5 s on 2 CPU cores

The loop is the classic MNIST one (PyTorch's examples/mnist, shrunk to 8x8 images): a
shuffling DataLoader, two convolutions, max pooling, dropout, two linear layers, Adadelta
with a StepLR schedule, the test accuracy after each epoch. faultlab's lines are marked at the
end of the line: `# [inject]` (4 lines with the import), `# [checkpoint]` (6 lines, one of
them the changed `step = 0`).

The data position for the Checkpointer is the user's own: a sampler that shuffles each epoch
from its own seed and remembers where it is, behind a DataLoader with `state_dict()` /
`load_state_dict()` (torchdata's StatefulDataLoader would do the same), so a run resumed
mid-epoch goes on with the same batches and the same dropout masks.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a source checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import faultlab.torch as ft  # noqa: E402                                      # [inject]

BATCH, EPOCHS, SEED = 64, 3, 1


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, 1, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, 1, padding=1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(self.dropout1(x), 1)
        x = self.dropout2(F.relu(self.fc1(x)))
        return F.log_softmax(self.fc2(x), dim=1)


class EpochSampler(torch.utils.data.Sampler):
    """Shuffles each epoch from (seed, epoch) and remembers its position: resumable."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0

    def __iter__(self):
        if self.pos >= self.n:
            self.epoch, self.pos = self.epoch + 1, 0
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(
            self.seed + self.epoch)).tolist()
        while self.pos < self.n:
            self.pos += 1
            yield order[self.pos - 1]

    def __len__(self) -> int:
        return self.n

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


class Loader(torch.utils.data.DataLoader):
    """A DataLoader whose position is its sampler's (what torchdata's StatefulDataLoader
    gives you ready-made). Hand the loader, not the sampler, to the Checkpointer: each new
    iterator of a DataLoader draws a seed from torch's global generator, and only a
    checkpointer that sees the loader can keep a mid-epoch resume from drawing one too many
    (docs/checkpointing.md)."""

    def state_dict(self):
        return self.sampler.state_dict()

    def load_state_dict(self, state) -> None:
        self.sampler.load_state_dict(state)


def digits():
    """sklearn's 1797 8x8 digits, scaled to [0, 1] and normalised; 1500 to train, 297 to test."""
    d = load_digits()
    x = torch.from_numpy((d.images / 16.0).astype(np.float32)).unsqueeze(1)
    x = (x - 0.3) / 0.4
    y = torch.from_numpy(d.target.astype(np.int64))
    return (x[:1500], y[:1500]), (x[1500:], y[1500:])


def test_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def train(ckpt_path, faults=(), every=10, epochs=EPOCHS, stop_after=None, log=None):
    """Train; returns {"losses": per step, "acc": per epoch, "model", "start"}.

    ckpt_path: the checkpoint file (saved every `every` steps; resumed from when it exists).
    faults: armed on the injector (none: a clean run). stop_after: return after that many
    steps (a run cut short, to resume)."""
    torch.manual_seed(SEED)
    (x, y), (x_test, y_test) = digits()
    sampler = EpochSampler(len(y), seed=SEED)
    loader = Loader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH, sampler=sampler)
    model = Net()
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    injector = ft.Injector(model, optimizer)                                   # [inject]
    injector.arm(list(faults))                                                 # [inject]
    ckpt = ft.Checkpointer(ckpt_path, every=every, model=model,                # [checkpoint]
                           optimizer=optimizer, scheduler=scheduler,           # [checkpoint]
                           data=loader)                                        # [checkpoint]
    step = ckpt.resume()                                           # [checkpoint] (was: step = 0)
    losses, acc, start = [], [], step
    model.train()
    while step < epochs * len(loader):
        for data, target in loader:
            with injector.step(step):                                          # [inject]
                optimizer.zero_grad()
                loss = F.nll_loss(model(data), target)
                loss.backward()
                optimizer.step()
            losses.append(loss.item())
            step += 1
            ckpt.step(step)                                                    # [checkpoint]
            if stop_after is not None and step - start >= stop_after:
                break
        else:                                   # the epoch's end
            scheduler.step()
            acc.append(test_accuracy(model, x_test, y_test))
            if log:
                log(f"epoch {step // len(loader)}: step {step:3d}, loss {losses[-1]:.4f}, "
                    f"test accuracy {acc[-1]:.3f}")
            continue
        break                                   # stopped early
    ckpt.close()                                                               # [checkpoint]
    return {"losses": losses, "acc": acc, "model": model, "start": start}


def same_params(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(),
                                                 b.state_dict().values()))


def main() -> int:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        print("clean run:")
        clean = train(tmp / "clean.ckpt", log=print)
        # a flip of bit 30 (the top exponent bit) of one element of conv1's output in the
        # forward pass of step 30; the position in torch's layout: (batch row, channel, h, w)
        flip = ft.fault("fwd_output", "conv1", step=30, bit=30, positions=[(0, 5, 3, 4)])
        print("\nwith a bit flip in conv1's output at step 30:")
        faulty = train(tmp / "faulty.ckpt", faults=[flip], log=print)
        first = next(k for k, (a, b) in enumerate(zip(clean["losses"], faulty["losses"]))
                     if a != b)
        print(f"losses identical up to step {first - 1}; step {first}: loss "
              f"{faulty['losses'][first]:.4g} (clean {clean['losses'][first]:.4g})")

        print("\ncheckpoint every 10 steps, stop after 35 steps, resume:")
        train(tmp / "cnn.ckpt", stop_after=35)
        rest = train(tmp / "cnn.ckpt", log=print)
    print(f"resumed at step {rest['start']}; losses from there identical to the clean run: "
          f"{rest['losses'] == clean['losses'][rest['start']:]}; final parameters identical: "
          f"{same_params(rest['model'], clean['model'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
