"""Per-replica copies of the mirrored state for emulated torch replicas.

Under MirroredStrategy every replica holds its own copy of the variables and of the optimizer
state; the copies stay identical because every replica applies the same all-reduced update.
A fault in one replica's copy (a `param` or `opt_state` fault) makes that replica diverge for
good: it computes its gradients with its own weights and applies the common update to its own
copy. The torch backend emulates replicas in one process with one shared copy, so it keeps a
*fork* for each replica whose copy was corrupted: its own parameter tensors and its own
optimizer state. Replicas without a fork share the model's parameters. Nothing is copied and
nothing costs anything until a fault forks a replica.

`active(k)` puts replica k's copy in place (parameter storage swapped through `.data`, the
optimizer's `state` mapping swapped) for its forward / backward pass and for its optimizer
step; `checksums()` gives one exact checksum per replica (the divergence detector compares
them)."""

from __future__ import annotations

import contextlib
import copy
from collections import defaultdict
from dataclasses import dataclass

import torch


@dataclass
class Fork:
    params: list[torch.Tensor]   # the replica's parameter tensors, in model.parameters() order
    state: dict                  # the replica's optimizer state (param -> {slot: tensor})


def checksum(tensors) -> int:
    """An exact, order-independent checksum of tensors' bits: the sum of their bit patterns
    as integers, modulo 2^64 (equal copies give equal sums, bit for bit)."""
    total = 0
    for t in tensors:
        t = t.detach()
        ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
        total += int(t.contiguous().view(ints).sum(dtype=torch.int64))
    return total % (1 << 64)


class ReplicaCopies:
    """The forks of one model's mirrored state (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None):
        self.params = list(model.parameters())
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self.optimizer = optimizer
        self.forks: dict[int, Fork] = {}

    def fork(self, replica: int) -> Fork:
        """Replica `replica`'s own copy, made from the shared one the first time."""
        f = self.forks.get(replica)
        if f is None:
            params = [p.detach().clone() for p in self.params]
            state: dict = defaultdict(dict)
            if self.optimizer is not None:
                for p in self.params:
                    st = self.optimizer.state.get(p)
                    if st:
                        state[p] = {n: v.clone() if torch.is_tensor(v) else copy.deepcopy(v)
                                    for n, v in st.items()}
            f = self.forks[replica] = Fork(params, state)
        return f

    def param(self, replica: int, p: torch.Tensor) -> torch.Tensor:
        """Replica `replica`'s copy of parameter `p` (forking the replica)."""
        return self.fork(replica).params[self._index[id(p)]]

    def is_state_of(self, replica: int, state) -> bool:
        f = self.forks.get(replica)
        return f is not None and f.state is state

    @contextlib.contextmanager
    def active(self, replica: int):
        """Inside the block the model's parameters and the optimizer's state are replica
        `replica`'s (no-op for a replica without a fork)."""
        f = self.forks.get(replica)
        if f is None:
            yield
            return
        saved = [p.data for p in self.params]
        opt = self.optimizer
        saved_state = opt.state if opt is not None else None
        for p, t in zip(self.params, f.params):
            p.data = t
        if opt is not None:
            opt.state = f.state
        try:
            yield
        finally:
            for i, (p, t) in enumerate(zip(self.params, saved)):
                f.params[i] = p.data   # load_state_dict copies in place; keep what is there
                p.data = t
            if opt is not None:
                f.state = opt.state    # load_state_dict replaces the mapping
                opt.state = saved_state

    def clear(self) -> None:
        self.forks.clear()

    def checksums(self, replicas: int) -> list[int]:
        """One checksum of each replica's parameters (forked replicas their own copy)."""
        shared = None
        out = []
        for r in range(replicas):
            f = self.forks.get(r)
            if f is not None:
                out.append(checksum(f.params))
            else:
                if shared is None:
                    shared = checksum(self.params)
                out.append(shared)
        return out
