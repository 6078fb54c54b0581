"""Imported by the fork server before it forks any rank (launch.PRELOAD): one tiny training
step of the built-in mlp, so that what a rank's first step would import lazily (the dataset
reader and its scientific stack, torch's optimizer and compiler modules, ~3 s on 2 cores) is
already in every forked rank. One torch thread: no OpenMP team is started before a fork."""

from __future__ import annotations

import torch
import torch.distributed.optim  # noqa: F401  (ZeroRedundancyOptimizer)
import torch.distributed.fsdp  # noqa: F401
import torch.distributed.device_mesh  # noqa: F401

from faultlab.backends.torch.trainer import TorchTrainer
from faultlab.workloads.base import default_config

torch.set_num_threads(1)
TorchTrainer(default_config("mlp", replicas=1, width=8, per_replica_batch=4,
                            steps_per_epoch=1, epochs=1, eval_samples=4)).train_step(0)
