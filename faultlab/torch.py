"""faultlab.torch: the PyTorch user API (public path; the code lives in faultlab/backends/torch/).

Names are imported on first use, so ``import faultlab.torch`` does not import torch:

* ``TorchWorkload``: what a ``module:function`` user workload returns (docs/workloads.md);
* ``TorchTrainer``: the built-in trainer (replica emulation, faults, detector signals);
* ``TorchInjector``: hooks that deliver faults into a model's layers for one step;
* ``TorchCheckpointAdapter``: a training session's whole state <-> the checkpoint engine.
"""

from __future__ import annotations

import importlib

_NAMES = {
    "TorchWorkload": "faultlab.backends.torch.trainer",
    "TorchTrainer": "faultlab.backends.torch.trainer",
    "TorchInjector": "faultlab.backends.torch.injector",
    "TorchCheckpointAdapter": "faultlab.backends.torch.adapter",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_NAMES[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_NAMES))
