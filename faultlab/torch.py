"""faultlab.torch: the PyTorch user API (public path; the code lives in faultlab/backends/torch/).

Names are imported on first use, so ``import faultlab.torch`` does not import torch:

* ``TorchWorkload``: what a ``module:function`` user workload returns (docs/workloads.md);
* ``TorchTrainer``: the built-in trainer (replica emulation, faults, detector signals);
* ``TorchInjector``: hooks that deliver faults into a model's layers for one step, checking
  each fault's replica, layer, site and positions when it is handed over;
* ``operand_table(model, example_input)``: every injectable layer's operand shapes (canonical
  layout) from one forward pass on one replica's batch, for ``TorchInjector(...,
  operands=)`` so activation positions are checked too (the model is left as it was);
* ``TorchCheckpointAdapter``: a training session's whole state <-> the checkpoint engine;
* ``Injector(model, optimizer)``: faults in the training loop you keep (``arm(faults)``, then
  ``with injector.step(k):`` around each step; docs/torch.md), with ``fault`` (the same as
  ``faultlab.fault``) to build them and ``optimizer_state_names(optimizer, param)``;
* ``Offload(model, optimizer_or_factory, window=N)``: offloaded training for the loop you
  keep (host master copies, a window of N layers on the device, a prefetch thread, the
  optimizer stepping the host copies: ``off.optimizer``); ``Injector(model, offload=off)``
  injects ``host_state`` faults into it (docs/offload.md);
* ``Checkpointer(path, every=N, model=, optimizer=, scheduler=, data=, extra=)``: the
  checkpoint engine and the adapter as one object for the loop you keep: ``start =
  ckpt.resume()``, ``ckpt.step(step + 1)`` saves every N steps, ``ckpt.stats``
  (``CheckpointStats``) reports the stall (docs/checkpointing.md);
* ``Protector(model, optimizer, step_fn, batches=..., every=N)``: detection, rollback to the
  last checkpoint and deterministic replay for the loop you keep; ``prot.report``
  (``ProtectionReport``) says what happened (docs/torch.md, "Protecting your loop").
"""

from __future__ import annotations

from faultlab.lazy import lazy_exports

_EXPORTS = {
    "TorchWorkload": "faultlab.backends.torch.trainer",
    "TorchTrainer": "faultlab.backends.torch.trainer",
    "TorchInjector": "faultlab.backends.torch.injector",
    "operand_table": "faultlab.backends.torch.injector",
    "TorchCheckpointAdapter": "faultlab.backends.torch.adapter",
    "Injector": "faultlab.backends.torch.own_loop",
    "Offload": "faultlab.backends.torch.own_offload",
    "optimizer_state_names": "faultlab.backends.torch.own_loop",
    "fault": "faultlab.faults",
    "Checkpointer": "faultlab.backends.torch.own_checkpointer",
    "CheckpointStats": "faultlab.backends.torch.own_checkpointer",
    "Protector": "faultlab.backends.torch.protector",
    "ProtectionReport": "faultlab.backends.torch.protector",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
