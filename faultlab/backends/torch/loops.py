"""Built-in crash-test training loops on torch (``faultlab crash --workload mlp / rng-mlp``)."""

from __future__ import annotations

import random

import numpy as np
import torch

from faultlab.backends.torch.adapter import TorchCheckpointAdapter
from faultlab.backends.torch.trainer import TorchTrainer
from faultlab.crash.loops import Sampler
from faultlab.workloads.base import default_config


class TrainerLoop:
    """faultlab's own MLP workload (TorchTrainer) at a tiny size, with the torch adapter."""

    def __init__(self, width: int = 16):
        cfg = default_config("mlp", replicas=1, per_replica_batch=16, width=width,
                             steps_per_epoch=20, epochs=10, seed=0)
        random.seed(0)          # unused by the trainer, but captured: a fresh start must be
        np.random.seed(0)       # deterministic (a forked child's `random` is reseeded at fork)
        self.trainer = TorchTrainer(cfg)
        self.adapter = TorchCheckpointAdapter(self.trainer.model, self.trainer.optimizer)

    def step(self, k: int) -> None:
        self.trainer.train_step(k)

    def capture(self, step: int):
        return self.adapter.capture(step, data_position=step)

    def restore(self, state, meta) -> None:
        self.adapter.restore(state, meta)


class RngLoop:
    """A loop whose every step depends on carried random state: dropout and input noise (torch
    generator), batches from a sampler driven by NumPy's global generator, a coin from Python's
    random, a GradScaler under bf16 autocast. Resuming it exactly needs all of them."""

    def __init__(self):
        torch.manual_seed(1)
        np.random.seed(2)
        random.seed(3)
        gen = np.random.RandomState(4)
        self.x = gen.standard_normal((256, 16)).astype(np.float32)
        self.y = (self.x[:, :4].sum(1) > 0).astype(np.int64)
        self.model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32),
                                         torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                         torch.nn.Linear(32, 2))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=3e-3)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 6, growth_interval=4)
        self.sampler = Sampler(len(self.y), 16)
        self.adapter = TorchCheckpointAdapter(self.model, self.opt, self.scaler,
                                              data=self.sampler)

    def step(self, k: int) -> None:
        idx = self.sampler.next()
        x = torch.from_numpy(self.x[idx])
        if random.random() < 0.5:
            x = -x
        x = x + 0.05 * torch.randn_like(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(self.model(x).float(),
                                                     torch.from_numpy(self.y[idx]))
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()

    def capture(self, step: int):
        return self.adapter.capture(step, data_position=step)

    def restore(self, state, meta) -> None:
        self.adapter.restore(state, meta)


def mlp_loop() -> TrainerLoop:
    return TrainerLoop()


def rng_loop() -> RngLoop:
    return RngLoop()
