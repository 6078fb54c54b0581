"""A checkpoint writer in its own process, for the live-read tests (test_live_read.py).

    python tests/helpers/live_writer.py PATH free ELEMS   save as fast as it can until stdin
                                                          closes; after each commit append
                                                          "STEP\\n" to PATH.log (fsynced)
    python tests/helpers/live_writer.py PATH step ELEMS   one save per "go" line on stdin,
                                                          admitted only if a slot is free
                                                          now: answers "ok STEP" / "refused"

The state of step S is a pure function of S (live_state), so a reader checks what it got
without asking the writer. Prints "ready" after the first commit.
"""

from __future__ import annotations

import os
import select
import sys

import numpy as np


def live_state(step: int, elems: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    n = elems - (step % 7) * 1024                  # sizes move so chunk boundaries move
    return {"w": rng.standard_normal(n, dtype=np.float32),
            "b": rng.integers(-2**62, 2**62, size=max(1, n // 64), dtype=np.int64),
            "step": np.array(step, dtype=">i8")}


def main(path: str, mode: str, elems: int) -> None:
    from faultlab.checkpointing import CheckpointEngine
    slot = CheckpointEngine.slot_bytes_for(live_state(0, elems), meta={"step": 2**62})
    eng = CheckpointEngine(path, keep=2, max_in_flight=1 if mode == "step" else 2,
                           chunk_bytes=256 * 1024, slot_bytes=slot)
    log = os.open(path + ".log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    step = 0

    def save(timeout=None):
        nonlocal step
        step += 1
        eng.save(step, live_state(step, elems), {"step": step}, timeout=timeout).wait()
        os.write(log, f"{step}\n".encode())
        os.fsync(log)

    save()
    print("ready", flush=True)
    if mode == "free":
        while not select.select([sys.stdin], [], [], 0)[0]:
            save()
    else:
        for line in sys.stdin:
            try:
                save(timeout=0)
                print(f"ok {step}", flush=True)
            except TimeoutError:
                step -= 1
                print("refused", flush=True)
    eng.close()
    print(f"saved {step}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
