"""Detection and recovery on the reference workload, side by side with no protection.

    python benchmarks/detection.py [--steps 60] [--fp-only] [--json]

1. Overhead per detector set (none / nonfinite+history / +spike / abft / params), interleaved
   blocks in one process, median step time and ratio to none.
2. Recovery: checkpoint-only and rollback+replay every 10 steps vs plain, and the recovery time
   against its bound (checkpoint load at 0.9x disk read bandwidth + the replayed steps).
3. False positives of each detector and threshold on golden runs of three workloads (the
   thresholds' defaults come from this sweep).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from faultlab.detectors import default_suite  # noqa: E402
from faultlab.detectors.signals import Signals  # noqa: E402
from faultlab.backends import load_backend  # noqa: E402
from faultlab.replay.overhead import (REFERENCE, detection_overhead, false_positives,  # noqa: E402
                                      replay_overhead)
from faultlab.report import format_recovery  # noqa: E402
from faultlab.runner import Session  # noqa: E402
from faultlab.workloads.base import default_config  # noqa: E402

GOLDEN = {
    "resnet18 (reference)": REFERENCE,
    "mlp": default_config("mlp", replicas=2, per_replica_batch=16, width=32, input_size=8,
                          steps_per_epoch=10, epochs=10, seed=0, lr=1e-2),
    "transformer": default_config("transformer", replicas=2, per_replica_batch=8, width=32,
                                  input_size=32, steps_per_epoch=20, epochs=5, seed=0),
}
SWEEP = {"spike": [("z", z) for z in (3, 6, 12, 24)],
         "history": [("bound", b) for b in (0.5, 1.0, 5.0, 20.0)]}


def fp_sweep(threads: int) -> list[dict]:
    session = Session(threads=threads)
    rows = []
    for name, cfg in GOLDEN.items():
        g = session.golden(cfg)
        mmax = max((max(s["m_max"].values()) for s in g.signals if s["m_max"]), default=0.0)
        rows.append({"workload": name, "detector": "nonfinite", "threshold": "-",
                     **_fp(g.signals, ["nonfinite"]), "max_m": mmax})
        for det, grid in SWEEP.items():
            for key, val in grid:
                suite = default_suite([det], **{key: val})
                alarms = sum(suite.observe(Signals.from_dict(d)) is not None for d in g.signals)
                rows.append({"workload": name, "detector": det, "threshold": f"{key}={val:g}",
                             "steps": len(g.signals), "alarms": alarms,
                             "rate": alarms / len(g.signals), "max_m": mmax})
    return rows


def _fp(signals, names):
    r = false_positives(signals, names)
    return {"steps": r["steps"], "alarms": r["alarms"], "rate": r["rate"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fp-only", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    load_backend(REFERENCE.framework).configure(a.threads)
    t0 = time.time()
    out = {"false_positives": fp_sweep(a.threads)}
    if not a.fp_only:
        out["detection"] = detection_overhead(REFERENCE, a.steps, variants={
            "nonfinite+history": ["nonfinite", "history"],
            "nonfinite+history+spike": ["nonfinite", "history", "spike"],
            "abft": ["abft"]})
        out["recovery"] = replay_overhead(REFERENCE, a.steps, 10, 10, 2)
    out["wall_s"] = time.time() - t0
    if a.json:
        print(json.dumps(out, default=str))
        return
    print(f"torch threads {a.threads}, cores {os.cpu_count()}")
    print("\nfalse positives on golden runs")
    print(f"{'workload':22s} {'detector':10s} {'threshold':10s} {'steps':>5s} {'alarms':>6s}  max |m|")
    for r in out["false_positives"]:
        print(f"{r['workload']:22s} {r['detector']:10s} {r['threshold']:10s} {r['steps']:5d} "
              f"{r['alarms']:6d}  {r['max_m']:.3g}")
    if "detection" in out:
        print("\ndetection overhead (median step, interleaved blocks)")
        for r in out["detection"]["rows"]:
            print(f"  {r['variant']:26s} {r['median_ms']:8.1f} ms  x{r['ratio']:.4f}")
        rec = out["recovery"]
        print("\ncheckpoint / rollback+replay overhead (best of repeats)")
        for r in rec["rows"]:
            print(f"  {r['variant']:12s} {r['wall_s']:8.2f} s  x{r['ratio']:.4f}")
        print("  " + format_recovery(rec["recovery"], rec["state_mb"]))


if __name__ == "__main__":
    main()
