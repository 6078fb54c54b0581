"""The PyTorch backend. Importing this package does not import torch: its modules do.

Modules (the TF backend has the same names for the same jobs): ``trainer`` (TorchTrainer,
replica emulation, operand shapes), ``models``, ``replicas`` (per-replica state copies),
``injector`` and ``kernels`` (hooks and vectorised corruption kernels), ``adapter`` (the
checkpoint adapter), ``cow`` (copy-on-write saves), ``checkpointers`` (sync, CheckFreq-style,
torch.distributed.checkpoint baselines) and ``loops`` (crash-test training loops).
"""

from __future__ import annotations

import os

from faultlab.backends.base import Backend, OperandTable, TrainerBase
from faultlab.workloads.base import WorkloadConfig


class TorchBackend(Backend):
    name = "torch"
    checkpointers = {
        "faultlab+cow": "faultlab.backends.torch.checkpointers:CowEngineCheckpointer",
        "sync": "faultlab.backends.torch.checkpointers:SyncSave",
        "checkfreq": "faultlab.backends.torch.checkpointers:CheckFreqStyle",
        "dcp-async": "faultlab.backends.torch.checkpointers:TorchDCPAsync",
    }
    crash_loops = {"mlp": "faultlab.backends.torch.loops:mlp_loop",
                   "rng-mlp": "faultlab.backends.torch.loops:rng_loop"}

    def build_trainer(self, config: WorkloadConfig) -> TrainerBase:
        if config.offload:              # host-resident state (docs/offload.md)
            from faultlab.backends.torch.offload import OffloadTrainer
            return OffloadTrainer(config)
        from faultlab.backends.torch.trainer import TorchTrainer
        return TorchTrainer(config)

    def operand_shapes(self, config: WorkloadConfig) -> OperandTable:
        from faultlab.backends.torch.trainer import operand_shapes
        return operand_shapes(config)

    def configure(self, threads: int) -> None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch
        torch.set_num_threads(threads)

    def checkpoint_adapter(self) -> type:
        from faultlab.backends.torch.adapter import TorchCheckpointAdapter
        return TorchCheckpointAdapter

    def run_ranks(self, job):
        from faultlab.backends.torch.ranks.launch import run_job
        return run_job(job, job.config.processes, port=job.port,
                       max_restarts=job.max_restarts)

    def prepare_fork(self, threads: int) -> None:
        # forked children must not inherit a started OpenMP pool (it is not fork-safe)
        import torch
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass            # a user's loop module did parallel torch work when imported

    def crash_preload(self, engines=()) -> list[str]:
        # torch is fork-safe before its thread pools start: children of the zygote share it
        mods = ["torch", "faultlab.backends.torch.loops", "faultlab.backends.torch.trainer",
                "faultlab.backends.torch.adapter"]
        if "dcp-async" in engines:
            mods.append("torch.distributed.checkpoint")
        for name in engines:                 # this framework's checkpointers, imported once
            if name in self.checkpointers:
                module = self.checkpointers[name].partition(":")[0]
                if module not in mods:
                    mods.append(module)
        return mods


BACKEND = TorchBackend()
