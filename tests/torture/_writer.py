"""The writer process of the kill torture (tests/torture/kill_harness.py starts and kills it).

    python tests/torture/_writer.py --file F --log L --salt N --start S --config JSON

Opens a CheckpointEngine on F with the settings in --config and saves make_state(salt, step)
for step = S, S+1, ... until killed (or --steps saves). The durable-step log L gets
"begin S" before save() is called (not synced) and "durable S" (write + fsync) once that
save's wait() has returned. Progress lines go to stdout, flushed, for the parent to time its
SIGKILL on: "ready", "begin S", "saved S" (save() returned), "durable S", "done".

--broken MODE makes this process misbehave so that the harness's self-test can check that its
oracle notices (never used for the real verdicts):
  lie     log "durable S" as soon as save() returns, before wait(): a durability lie
  mutate  borrowed saves, then change a byte of the borrowed arrays right after save()
          returns (the engine writes and checksums what it finds: a wrong state, valid sums)
  drop    the storage silently drops one in eight writes (a lost write)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from torture_states import make_state  # noqa: E402

from faultlab.checkpointing import CheckpointEngine, OSStorage  # noqa: E402


class DroppingStorage(OSStorage):
    """A broken disk: one write in eight silently never happens (self-test only)."""

    def __init__(self, path, seed):
        super().__init__(path)
        self._rng = random.Random(seed)
        self._drop_lock = threading.Lock()

    def pwrite(self, offset, data):
        with self._drop_lock:
            drop = offset > 0 and self._rng.random() < 0.125
        if not drop:
            super().pwrite(offset, data)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--file", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--salt", type=int, required=True)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1 << 30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", required=True)
    ap.add_argument("--broken", choices=("lie", "mutate", "drop"), default=None)
    args = ap.parse_args(argv)
    cfg = json.loads(args.config)
    rng = random.Random(args.seed)

    out = sys.stdout
    out_lock = threading.Lock()

    def say(line: str) -> None:
        with out_lock:
            out.write(line + "\n")
            out.flush()

    log_fd = os.open(args.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    log_lock = threading.Lock()

    def log(line: str, sync: bool) -> None:
        with log_lock:
            os.write(log_fd, (line + "\n").encode())
            if sync:
                os.fsync(log_fd)

    target = DroppingStorage(args.file, args.seed) if args.broken == "drop" else args.file
    engine = CheckpointEngine(target, max_in_flight=cfg["max_in_flight"], keep=cfg["keep"],
                              chunk_bytes=cfg["chunk_bytes"], pool_bytes=cfg["pool_bytes"],
                              writers=cfg["writers"], slot_bytes=cfg["slot_bytes"],
                              block_size=cfg["block_size"])
    say("ready")

    failed = []

    def on_done(handle) -> None:
        try:
            handle.wait()                 # finished: returns at once, or raises its failure
        except Exception as e:            # noqa: BLE001
            failed.append(f"step {handle.step}: {e}")
            log(f"failed {handle.step}", sync=True)
            say(f"failed {handle.step} {e}")
            return
        if args.broken != "lie":
            log(f"durable {handle.step}", sync=True)
        say(f"durable {handle.step}")

    for step in range(args.start, args.start + args.steps):
        state, meta = make_state(args.salt, step, cfg["max_bytes"])
        borrowed = args.broken == "mutate" or rng.random() < cfg["borrow_p"]
        log(f"begin {step}", sync=False)
        say(f"begin {step}")
        handle = engine.save(step, state, meta, borrowed=borrowed)
        if args.broken == "lie":
            log(f"durable {step}", sync=True)
        if args.broken == "mutate":
            big = max(state.values(), key=lambda a: getattr(a, "nbytes", 0))
            if isinstance(big, __import__("numpy").ndarray) and big.nbytes and \
                    big.flags.c_contiguous and big.flags.writeable:
                flat = big.reshape(-1).view("u1")
                flat[rng.randrange(flat.size)] ^= 0xFF
        say(f"saved {step}")
        handle.add_done_callback(on_done)
        if rng.random() < cfg["wait_p"]:     # sometimes a synchronous save
            handle.join()
        if failed:
            break
    engine.close()
    say("done")
    return 3 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
