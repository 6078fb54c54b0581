#!/usr/bin/env python
"""Measurements behind the engine's defaults: checksum speed and persist throughput vs dd.

    python benchmarks/engine_rates.py [DIR] [--mib 512] [--reps 3] [--busy]

Each repetition first flushes the page cache's dirty data (os.sync) so that runs do not pay
for each other's write-back, then times `dd ... conv=fdatasync` and the engine on the same
file system, so the two are compared under the same conditions. Not part of the tests.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import statistics
import subprocess
import threading
import time
import zlib
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from faultlab.checkpointing.engine import CheckpointEngine  # noqa: E402
from faultlab.checkpointing.format import digest  # noqa: E402

MiB = 1 << 20


def hash_rates(nbytes: int = 64 * MiB) -> dict[str, float]:
    """Single-thread checksum throughput (bytes/s) of the candidates."""
    data = np.frombuffer(os.urandom(nbytes), dtype=np.uint8)
    candidates = {"xxh3_64 (xxhash)": digest, "zlib.crc32": zlib.crc32}
    try:
        import crc32c
        candidates["crc32c (crc32c, hw)"] = crc32c.crc32c
    except ImportError:
        pass
    out = {}
    for name, fn in candidates.items():
        fn(data)
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            fn(data)
            best = min(best, time.perf_counter() - start)
        out[name] = nbytes / best
    return out


def dd_rate(directory: Path, mib: int) -> float | None:
    """bytes/s of `dd if=/dev/zero of=FILE bs=1M count=mib conv=fdatasync`."""
    path = directory / f".faultlab-dd-{os.getpid()}"
    try:
        out = subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={mib}",
                              "conv=fdatasync"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    finally:
        path.unlink(missing_ok=True)
    m = re.search(r"copied, ([\d.]+) s", out.stderr)
    return mib * MiB / float(m.group(1)) if m else None


def _spin(stop: threading.Event) -> None:
    while not stop.is_set():          # a training loop busy in Python, holding the GIL
        pass


def engine_rates(directory: Path, state: dict, reps: int, busy: bool, **settings):
    """(save() seconds, durable bytes/s) per repetition, one engine, after a warm-up save."""
    nbytes = sum(a.nbytes for a in state.values())
    path = directory / f".faultlab-bench-{os.getpid()}-{secrets.token_hex(4)}"
    results = []
    try:
        with CheckpointEngine(path, max_in_flight=1, keep=1, slot_bytes=nbytes + 8 * MiB,
                              **settings) as eng:
            for warm in (-2, -1):           # first writes convert the preallocated extents
                eng.save(warm, state).wait()
            for r in range(reps):
                os.sync()
                stop = threading.Event()
                spinner = threading.Thread(target=_spin, args=(stop,))
                if busy:
                    spinner.start()
                start = time.perf_counter()
                h = eng.save(r + 1, state)
                staged = time.perf_counter() - start
                h.wait()
                results.append((staged, nbytes / (time.perf_counter() - start)))
                stop.set()
                if busy:
                    spinner.join()
    finally:
        path.unlink(missing_ok=True)
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("directory", nargs="?", default=".")
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--busy", action="store_true", help="a Python thread spins during saves")
    args = ap.parse_args(argv)
    directory = Path(args.directory).resolve()
    for name, rate in hash_rates().items():
        print(f"hash {name:22s} {rate / 1e9:6.2f} GB/s (best of 5, one thread)")
    dd = []
    for _ in range(args.reps):
        os.sync()
        dd.append(dd_rate(directory, args.mib) or float("nan"))
    print(f"dd bs=1M count={args.mib} conv=fdatasync: median {statistics.median(dd) / 1e6:.0f} "
          f"MB/s  (runs: {', '.join(f'{r / 1e6:.0f}' for r in dd)})")
    state = {"w": np.frombuffer(os.urandom(args.mib * MiB), dtype=np.uint8)}
    for chunk in (MiB, 4 * MiB, 8 * MiB, 16 * MiB):
        for writers in (1, 2, 4):
            res = engine_rates(directory, state, args.reps, args.busy, chunk_bytes=chunk,
                               writers=writers, pool_bytes=256 * MiB)
            rates = [r for _, r in res]
            print(f"engine chunk={chunk // MiB:2d}MiB writers={writers}: save() "
                  f"{statistics.median(s for s, _ in res) * 1e3:5.0f} ms, durable median "
                  f"{statistics.median(rates) / 1e6:5.0f} MB/s  (runs: "
                  f"{', '.join(f'{r / 1e6:.0f}' for r in rates)})", flush=True)


if __name__ == "__main__":
    main()
