"""Your own DistributedDataParallel loop, one rank per process, with faults on one rank.

Run it as you run any DDP job (torchrun is torch.distributed.elastic's launcher):

    torchrun --nproc-per-node 3 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:29511 \\
        examples/ddp_loop.py --out /tmp/ddp

``faultlab.torch.Injector(..., distributed=True)`` makes a fault's ``replica`` the rank it
fires on: every rank arms the same faults, and only rank 1 corrupts its local gradient of
``0.weight`` at step 2, before DDP's all-reduce averages it into every rank's update. Each rank
writes the local gradients it computed (as autograd delivered them, after any fault) and its
final parameters to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import faultlab
import faultlab.torch as flt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for each rank's gradients")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--no-fault", action="store_true", help="the fault-free reference")
    a = p.parse_args(argv)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)                                    # the same initial weights
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 2))
    ddp = DistributedDataParallel(model)
    opt = torch.optim.Adam(ddp.parameters(), lr=1e-2)
    injector = flt.Injector(model, opt, distributed=True)
    if not a.no_fault:
        injector.arm([faultlab.fault("grad_wt", "0", replica=1, step=2, value="set",
                                     values=[100.0], positions=[(0, 0)])])
    gen = torch.Generator().manual_seed(rank)               # each rank its own data
    grads = {}
    for step in range(a.steps):
        x, y = torch.randn(4, 8, generator=gen), torch.randint(0, 2, (4,), generator=gen)
        with injector.step(step):
            # registered after the injector's hooks: sees the gradient it delivered
            h = model[0].weight.register_hook(
                lambda g, s=step: grads.__setitem__(f"step{s}", g.detach().numpy().copy()))
            opt.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            opt.step()
            h.remove()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / f"rank{rank}.npz", **grads,
             **{f"param/{k}": v.detach().numpy() for k, v in model.state_dict().items()})
    dist.destroy_process_group()
    # DDP sits in reference cycles, so without this it is freed by the interpreter's last
    # collection at exit, and the process group with it: a gloo thread still releasing its
    # last all-reduce then needs the GIL of a finalizing interpreter and aborts the process.
    # Free it here, while the interpreter is alive: the group's threads are joined cleanly.
    del ddp, opt, injector, model
    gc.collect()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
