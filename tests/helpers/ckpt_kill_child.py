"""Child process for the kill -9 tests: saves checkpoints in a loop until it is killed.

    python ckpt_kill_child.py PATH

Reopens PATH if it exists (a previous child was killed) and goes on from the step after the
newest checkpoint. After each commit is durable it writes "committed COUNTER STEP" to stdout;
the parent kills it with SIGKILL after reading some of those lines.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from faultlab.checkpointing import CheckpointEngine


def state_for(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    return {"w": rng.standard_normal(150_000).astype(np.float32),
            "opt/m": rng.standard_normal(20_000),
            "rng": rng.integers(0, 2**63, 4, dtype=np.uint64),
            "step": np.array(step, dtype=np.int64)}


def main() -> None:
    path = sys.argv[1]
    engine = CheckpointEngine(path, max_in_flight=2, keep=2, chunk_bytes=64 * 1024,
                              pool_bytes=256 * 1024, writers=2)
    latest = max((c.step for c in engine.committed()), default=-1)

    def report(handle):
        if handle.error is None:
            os.write(1, f"committed {handle.counter} {handle.step}\n".encode())

    os.write(1, f"ready {latest}\n".encode())
    step = latest + 1
    while True:
        engine.save(step, state_for(step), {"step": step}).add_done_callback(report)
        step += 1


if __name__ == "__main__":
    main()
