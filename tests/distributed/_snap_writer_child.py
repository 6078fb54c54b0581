"""Child of test_snapshots' kill test: writes owner 3's snapshots for steps 0, 1, 2, ... into
SnapshotStore(root, node 0, keep) with contents a pure function of the step, printing each
step once its write returned. Run as: python _snap_writer_child.py ROOT KEEP."""

import sys

import numpy as np

from faultlab.distributed.snapshots import SnapshotStore


_BASE = {}


def state(step: int) -> tuple[dict, dict]:
    """Deterministic per step; the big array (a few MB, so that a kill often lands inside a
    write) is one of five, built once."""
    k = step % 5
    if k not in _BASE:
        _BASE[k] = np.random.default_rng(k).standard_normal(500_000 + 79_193 * k) \
            .astype(np.float32)
    return ({"w": _BASE[k],
             "m": np.full((step % 3, 4), step, np.int64),
             "flag": np.array(step % 2 == 0)},
            {"step": step, "tag": "x" * (step % 7)})


def main() -> None:
    store = SnapshotStore(sys.argv[1], 0, keep=int(sys.argv[2]))
    step = 0
    while True:
        arrays, meta = state(step)
        store.write(3, step, arrays, meta, generation=1)
        print(step, flush=True)
        step += 1


if __name__ == "__main__":
    main()
