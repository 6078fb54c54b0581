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
