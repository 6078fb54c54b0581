"""faultlab.torch: the PyTorch user API (public path; the code lives in faultlab/backends/torch/).

Names are imported on first use, so ``import faultlab.torch`` does not import torch:

* ``TorchWorkload``: what a ``module:function`` user workload returns (docs/workloads.md);
* ``TorchTrainer``: the built-in trainer (replica emulation, faults, detector signals);
* ``TorchInjector``: hooks that deliver faults into a model's layers for one step;
* ``TorchCheckpointAdapter``: a training session's whole state <-> the checkpoint engine.
"""

from __future__ import annotations

from faultlab.lazy import lazy_exports

_EXPORTS = {
    "TorchWorkload": "faultlab.backends.torch.trainer",
    "TorchTrainer": "faultlab.backends.torch.trainer",
    "TorchInjector": "faultlab.backends.torch.injector",
    "TorchCheckpointAdapter": "faultlab.backends.torch.adapter",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
