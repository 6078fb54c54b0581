"""A bounded pool of reusable staging buffers, one chunk each.

Training waits only while state is copied into these buffers; writers hand each buffer back as
soon as its chunk is on its way to the file, so a state larger than the pool streams through
it. Buffers are allocated on first use, so a small state never costs the whole pool.
"""

from __future__ import annotations

import threading

import numpy as np


class BufferPool:
    def __init__(self, chunk_bytes: int, capacity: int):
        if chunk_bytes < 1 or capacity < 1:
            raise ValueError("chunk size and pool capacity must be positive")
        self.chunk_bytes, self.capacity = chunk_bytes, capacity
        self._free: list[np.ndarray] = []
        self._created = 0
        self._cond = threading.Condition()

    def acquire(self) -> np.ndarray:
        """A free buffer; blocks while all `capacity` buffers are in use."""
        with self._cond:
            while not self._free and self._created >= self.capacity:
                self._cond.wait()
            if self._free:
                return self._free.pop()
            self._created += 1
        return np.empty(self.chunk_bytes, dtype=np.uint8)

    def release(self, buf: np.ndarray) -> None:
        with self._cond:
            self._free.append(buf)
            self._cond.notify()

    @property
    def allocated_bytes(self) -> int:
        with self._cond:
            return self._created * self.chunk_bytes
