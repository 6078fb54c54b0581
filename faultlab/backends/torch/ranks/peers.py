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
import warnings
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from faultlab.distributed import (SnapshotError, SnapshotStore, encode_into, peers,
                                  senders_to, snapshot_size, verify_snapshot)

_STOP = object()


def _view(buf) -> torch.Tensor:
    """A uint8 tensor over a buffer, no copy (a read-only mapping is only ever sent from)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(buf, dtype=torch.uint8)


def _send(buf, dst: int, group) -> None:
    dist.send(_view(buf), dst, group)


def _recv(buf, src: int, group) -> None:
    dist.recv(_view(buf), src, group)


class PeerMemory:
    """Rank `rank`'s snapshot domain, its replication thread and its recovery fetches.

    hook(phase, step): called at the kill points ("staging": the snapshot written into its
    temporary file, not yet published; "replicating": the sizes exchanged with the peers, the
    payloads not yet sent).

    Copies: staging encodes the state's tensors straight into the memory-mapped temporary
    file (one copy each); replication sends from a read-only mapping of the published file
    and receives straight into the receiver's mapped temporary file, which is verified before
    it is published; a recovery fetch does the same, and the state is loaded from views of
    the mapping."""

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
        self.rejected: list[str] = []       # copies received that did not verify

    # --- staging ------------------------------------------------------------------------------

    def snapshot(self, step: int, arrays: dict[str, np.ndarray], meta: dict) -> None:
        """Stage step `step`'s state (arrays may be views of the live tensors: they are copied
        here, before this returns) into this rank's domain and queue it for replication."""
        self.check()
        t0 = time.perf_counter()
        n = snapshot_size(arrays, meta)
        with self.store.open_write(self.rank, step, n) as pending:
            encode_into(pending.buffer, self.rank, step, arrays, meta, self.generation)
            self.hook("staging", step)        # written, not yet published
            pending.commit()
        self.stage_s += time.perf_counter() - t0
        if self._thread is not None:
            self._idle.wait()                  # the previous step's replication is done
            self.check()
            self._idle.clear()
            self._queue.put(step)

    # --- replication --------------------------------------------------------------------------

    def _replicate_loop(self) -> None:
        try:
            while True:
                step = self._queue.get()
                if step is _STOP:
                    return
                self._exchange(step)
                self.replicated.append(step)
                self._idle.set()
        except BaseException as e:      # a peer died: the main thread raises it at its next step
            self._error = e
            self._idle.set()

    def _exchange(self, step: int) -> None:
        """Send this rank's snapshot of `step` to every peer and receive one from every
        sender (sizes first), each straight into a mapped temporary file, verified, then
        published."""
        mm = self.store.map_blob(self.rank, step) if self.peers else None
        try:
            mine = torch.tensor([len(mm) if mm is not None else 0], dtype=torch.int64)
            sizes = {s: torch.zeros(1, dtype=torch.int64) for s in self.senders}
            ops = [dist.P2POp(dist.isend, mine, p, self.group) for p in self.peers]
            ops += [dist.P2POp(dist.irecv, sizes[s], s, self.group) for s in self.senders]
            for w in dist.batch_isend_irecv(ops):
                w.wait()
            self.hook("replicating", step)
            pendings = {s: self.store.open_write(s, step, int(sizes[s])) for s in self.senders}
            try:
                self._transfer(mm, pendings)
                for s, pending in pendings.items():
                    self._publish(pending, s, step)
            finally:
                for pending in pendings.values():
                    try:
                        pending.abort()
                    except BufferError:     # a failed transfer still holds a view
                        pass
        finally:
            if mm is not None:
                mm.close()

    def _transfer(self, mm, pendings) -> None:
        """The payloads: this rank's mapping to every peer, every sender's into its pending
        file (views released before returning, so the files can be published)."""
        payload = _view(mm) if mm is not None else None
        got = {s: _view(p.buffer) for s, p in pendings.items()}
        ops = [dist.P2POp(dist.isend, payload, p, self.group) for p in self.peers]
        ops += [dist.P2POp(dist.irecv, got[s], s, self.group) for s in self.senders]
        works = dist.batch_isend_irecv(ops)
        for w in works:
            w.wait()

    def _publish(self, pending, owner: int, step: int) -> bool:
        """Verify a received copy fully and publish it; a copy that does not verify is
        dropped (and counted), never kept."""
        try:
            got = verify_snapshot(pending.buffer)
            if got[:2] != (owner, step):
                raise SnapshotError(f"snapshot: received owner {got[0]} step {got[1]}, "
                                    f"expected owner {owner} step {step}")
        except SnapshotError as e:
            self.rejected.append(str(e))
            pending.abort()
            return False
        pending.commit()
        return True

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

    def fetch(self, step: int, plan_fetch: dict, group):
        """This rank's snapshot of `step` by the agreed plan (a Snapshot whose arrays view a
        read-only mapping: load them, then drop it): from its own domain, or sent by the
        holder the plan names straight into a mapped temporary file of this rank's domain,
        verified, published, then mapped. Every rank takes part in every transfer, in owner
        order."""
        mine = None
        for owner in range(self.world):
            how, holder = plan_fetch[owner]
            if how == "local":
                if owner == self.rank:
                    mine = self.store.read(owner, step, copy=False)
                continue
            if how != "peer":
                continue
            if self.rank == holder:
                mm = self.store.map_blob(owner, step)
                try:
                    dist.send(torch.tensor([len(mm)], dtype=torch.int64), owner, group)
                    _send(mm, owner, group)
                finally:
                    mm.close()
            elif self.rank == owner:
                size = torch.zeros(1, dtype=torch.int64)
                dist.recv(size, holder, group)
                with self.store.open_write(owner, step, int(size)) as pending:
                    _recv(pending.buffer, holder, group)
                    if not self._publish(pending, owner, step):
                        raise SnapshotError(f"snapshot: the copy of rank {owner} step {step} "
                                            f"sent by rank {holder} does not verify: "
                                            f"{self.rejected[-1]}")
                mine = self.store.read(owner, step, copy=False)
        return mine

    def truncate_after(self, step: int) -> None:
        """Drop every copy of a step after `step` (after agreeing to recover to `step`: a
        rollback's newer copies hold corrupted state, a restart's belong to an abandoned
        timeline)."""
        self.drain()
        self.store.truncate_after(step)
