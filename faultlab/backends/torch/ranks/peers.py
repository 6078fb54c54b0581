"""A rank's snapshots in host memory and their copies in peers' memory (Gemini).

Each rank has its own memory domain, a directory under the job's shared-memory root
(``<root>/node<n>/node<r>``: a SnapshotStore per rank inside its node's directory, tmpfs): it survives a ``kill -9`` of the rank's process, as
DLRover's flash checkpoints do, and is lost with its node (a node kill removes
``<root>/node<n>``). After every snapshot step the rank

1. stages its state into its own domain (one copy per tensor into a reused buffer, then one
   write of a temporary file and an atomic rename: a kill while staging leaves the previous
   snapshots intact);
2. hands the blob to its replication thread, which sends it to its m peers (other nodes first,
   faultlab.distributed.placement) on a process group of its own while training goes on, and
   receives the copies its senders send it; every copy is verified (xxh3) before it is kept.

At recovery, each rank reports what its domain holds, verified; the ranks agree on the newest
step every rank's state is complete somewhere (faultlab.distributed.agree), and a rank whose
own copy is missing gets it from a holder over the main process group.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from faultlab.distributed import (SnapshotStore, decode_snapshot, encode_into, peers,
                                  senders_to, snapshot_size)

_STOP = object()


class PeerMemory:
    """Rank `rank`'s snapshot domain, its replication thread and its recovery fetches.

    hook(phase, step): called at the kill points ("staging" half-way through the write of the
    temporary file, "replicating" after the sizes and before the payloads are sent)."""

    def __init__(self, root, rank: int, world: int, ranks_per_node: int, copies: int,
                 group, *, hook: Callable[[str, int], None] | None = None, keep: int = 2):
        self.rank, self.world = rank, world
        # the store's "node" is this rank's memory domain, inside its node's directory
        self.store = SnapshotStore(Path(root) / f"node{rank // ranks_per_node}", rank, keep=keep)
        self.dir = self.store.directory
        self.generation = 0
        self.peers = peers(rank, world, ranks_per_node, copies)
        self.senders = senders_to(rank, world, ranks_per_node, copies)
        self.group = group
        self.hook = hook or (lambda phase, step: None)
        self._buf = bytearray()
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._idle = threading.Event()
        self._idle.set()
        self._thread = None
        if self.peers or self.senders:
            self._thread = threading.Thread(target=self._replicate_loop, daemon=True,
                                            name=f"faultlab-replicate-{rank}")
            self._thread.start()
        self.stage_s = 0.0
        self.replicated: list[int] = []

    # --- staging ------------------------------------------------------------------------------

    def snapshot(self, step: int, arrays: dict[str, np.ndarray], meta: dict) -> None:
        """Stage step `step`'s state into this rank's domain and queue it for replication."""
        self.check()
        n = snapshot_size(arrays, meta)
        if len(self._buf) < n:
            self._idle.wait()           # the replication thread may still read the old buffer
            self._buf = bytearray(n)
        else:
            self._idle.wait()
        view = memoryview(self._buf)[:n]
        used = encode_into(view, self.rank, step, arrays, meta, self.generation)
        blob = view[:used]
        t0 = time.perf_counter()
        with self.store.open_write(self.rank, step, used) as pending:
            pending.buffer[:] = blob
            self.hook("staging", step)       # written, not yet published
            pending.commit()
        self.stage_s += time.perf_counter() - t0
        if self._thread is not None:
            self._idle.clear()
            self._queue.put((step, blob))

    # --- replication --------------------------------------------------------------------------

    def _replicate_loop(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is _STOP:
                    return
                step, blob = item
                self._exchange(step, blob)
                self.replicated.append(step)
                self._idle.set()
        except BaseException as e:      # a peer died: the main thread raises it at its next step
            self._error = e
            self._idle.set()

    def _exchange(self, step: int, blob: memoryview) -> None:
        """Send `blob` to every peer and receive one blob from every sender (sizes first)."""
        mine = torch.tensor([len(blob)], dtype=torch.int64)
        sizes = {s: torch.zeros(1, dtype=torch.int64) for s in self.senders}
        ops = [dist.P2POp(dist.isend, mine, p, self.group) for p in self.peers]
        ops += [dist.P2POp(dist.irecv, sizes[s], s, self.group) for s in self.senders]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        self.hook("replicating", step)
        payload = torch.frombuffer(blob, dtype=torch.uint8) if len(blob) else torch.empty(0, dtype=torch.uint8)
        got = {s: torch.empty(int(sizes[s]), dtype=torch.uint8) for s in self.senders}
        ops = [dist.P2POp(dist.isend, payload, p, self.group) for p in self.peers]
        ops += [dist.P2POp(dist.irecv, got[s], s, self.group) for s in self.senders]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        for s in self.senders:
            self.store.put_blob(memoryview(got[s].numpy()))

    def check(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"replication failed: {self._error}") from self._error

    def drain(self) -> None:
        """Wait until the queued snapshot has reached every peer."""
        self._idle.wait()
        self.check()

    def close(self) -> None:
        if self._thread is not None:
            self._idle.wait()
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None

    # --- recovery -----------------------------------------------------------------------------

    def inventory(self) -> dict[int, list[int]]:
        return self.store.inventory()

    def fetch(self, step: int, plan_fetch: dict, group) -> dict[str, np.ndarray] | None:
        """This rank's state of `step` by the agreed plan: from its own domain, or sent by the
        holder the plan names (every rank takes part in every transfer in owner order). The
        copy received is verified and kept in this rank's domain."""
        mine = None
        for owner in range(self.world):
            how, holder = plan_fetch[owner]
            if how == "local":
                if owner == self.rank:
                    mine = self.store.read(owner, step, copy=True).arrays
                continue
            if how != "peer":
                continue
            if self.rank == holder:
                blob = self.store.read_blob(owner, step)
                size = torch.tensor([len(blob)], dtype=torch.int64)
                dist.send(size, owner, group)
                dist.send(torch.frombuffer(bytearray(blob), dtype=torch.uint8), owner, group)
            elif self.rank == owner:
                size = torch.zeros(1, dtype=torch.int64)
                dist.recv(size, holder, group)
                buf = torch.empty(int(size), dtype=torch.uint8)
                dist.recv(buf, holder, group)
                blob = memoryview(buf.numpy())
                self.store.put_blob(blob)
                mine = decode_snapshot(bytes(blob), copy=True).arrays
        return mine

    def truncate_after(self, step: int) -> None:
        """Drop every copy of a step after `step` (after agreeing to recover to `step`: a
        rollback's newer copies hold corrupted state, a restart's belong to an abandoned
        timeline)."""
        self.drain()
        self.store.truncate_after(step)
