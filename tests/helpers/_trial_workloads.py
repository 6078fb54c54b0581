"""Workloads for executor tests: a fault that reaches a control-flow decision crashes or hangs
the process, as a corrupted pointer or loop bound would on real hardware."""

import os
import threading

import torch
import torch.nn as nn

from faultlab.workloads import data as datamod
from faultlab.torch import TorchWorkload


class Tripwire(nn.Module):
    """Identity with a weight; a huge input value kills the process, -12345 blocks forever."""

    def __init__(self, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x):
        if bool((x > 1e30).any()):
            os._exit(3)
        if bool((x == -12345.0).any()):
            threading.Event().wait()
        return x * self.weight


class Net(nn.Module):
    def __init__(self, inputs: int, width: int):
        super().__init__()
        self.dense_1 = nn.Linear(inputs, width)
        self.trip = Tripwire(width)
        self.dense_2 = nn.Linear(width, 10)

    def forward(self, x):
        return self.dense_2(torch.relu(self.trip(self.dense_1(x.flatten(1)))))


def tripwire(config):
    s = config.input_size
    return TorchWorkload(Net(s * s, config.width), datamod.load(config, channels=1), (s, s, 1))
