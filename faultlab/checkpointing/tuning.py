"""Default engine settings, the `auto` probe that picks them per storage, and measurements.

Defaults come from measurements on the development machine (2 shared cores, ext4 on a virtio
disk; see docs/checkpoint_format.md, "Measurements"): 8 MiB chunks keep the per-chunk GIL
hand-offs rare while a busy training thread holds the GIL, two writers overlap hashing with
writing, and a 256 MiB pool lets states up to that size be staged at memory speed.

`python benchmarks/engine_rates.py [DIR]` repeats the measurements.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from faultlab.checkpointing.format import digest

MiB = 1 << 20
DEFAULT_CHUNK_BYTES = 8 * MiB
DEFAULT_POOL_BYTES = 256 * MiB
DEFAULT_WRITERS = 2

_PROBE_BYTES = 32 * MiB
_cache: dict[str, Probed] = {}


@dataclass(frozen=True)
class Probed:
    chunk_bytes: int
    pool_bytes: int
    writers: int
    throughput: float          # bytes/s of the best configuration, synced


DEFAULTS = Probed(DEFAULT_CHUNK_BYTES, DEFAULT_POOL_BYTES, DEFAULT_WRITERS, 0.0)


def _persist_rate(path: Path, total: int, chunk: int, writers: int) -> float:
    """Hash + pwrite `total` bytes in `chunk`s from `writers` threads, then fdatasync.

    A Python thread spins meanwhile, as a training loop would: it holds the GIL between the
    writers' calls, which is what makes small chunks slow (measured in the docs).
    """
    buf = np.frombuffer(secrets.token_bytes(chunk), dtype=np.uint8)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    stop = threading.Event()
    spinner = threading.Thread(target=_spin, args=(stop,), daemon=True)
    try:
        os.posix_fallocate(fd, 0, total)
        for off in range(0, total, chunk):          # convert the unwritten extents first
            os.pwrite(fd, buf[:min(chunk, total - off)], off)
        os.fdatasync(fd)
        offsets = list(range(0, total, chunk))
        lock = threading.Lock()

        def work():
            while True:
                with lock:
                    if not offsets:
                        return
                    off = offsets.pop()
                digest(buf)
                os.pwrite(fd, buf[:min(chunk, total - off)], off)

        spinner.start()
        start = time.perf_counter()
        threads = [threading.Thread(target=work) for _ in range(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        os.fdatasync(fd)
        return total / (time.perf_counter() - start)
    finally:
        stop.set()
        os.close(fd)
        path.unlink(missing_ok=True)


def _spin(stop: threading.Event) -> None:
    while not stop.is_set():
        pass


def _best(rates: dict[int, float], default: int) -> int:
    """The fastest option, unless the default is within 10% of it (probe noise)."""
    best = max(rates, key=rates.get)
    return default if default in rates and rates[default] >= 0.9 * rates[best] else best


def probe(storage) -> Probed:
    """Pick chunk size, pool size and writer count for a storage by writing ~300 MiB beside it.

    Storages that are not real files (SimDisk) get the defaults. Results are cached per
    directory for the life of the process.
    """
    from faultlab.checkpointing.storage import OSStorage
    if not isinstance(storage, OSStorage):
        return DEFAULTS
    directory = storage.path.resolve().parent
    if str(directory) in _cache:
        return _cache[str(directory)]
    tmp = directory / f".faultlab-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        by_writers = {w: _persist_rate(tmp, _PROBE_BYTES, DEFAULT_CHUNK_BYTES, w)
                      for w in (1, 2, 4)}
        writers = _best(by_writers, DEFAULT_WRITERS)
        by_chunk = {c: _persist_rate(tmp, _PROBE_BYTES, c, writers) for c in (4 * MiB, 16 * MiB)}
        by_chunk[DEFAULT_CHUNK_BYTES] = by_writers[writers]
        chunk = _best(by_chunk, DEFAULT_CHUNK_BYTES)
    except OSError:
        return DEFAULTS
    result = Probed(chunk, max(DEFAULT_POOL_BYTES, 4 * writers * chunk), writers,
                    by_chunk[chunk])
    _cache[str(directory)] = result
    return result
