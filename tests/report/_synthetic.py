"""A results database written directly (no training): one campaign run plainly and with
--detect, three trials each, the shapes of what `faultlab run` stores."""

from __future__ import annotations

import math

from faultlab.results import ResultStore, TrialResult

DIGEST = "d3c087834614d2d9"


def _metrics(start: int, n: int, blowup: int | None = None, protected: bool = False) -> dict:
    golden = [2.3 - 0.01 * (start + i) for i in range(n)]
    loss = [x if blowup is None or start + i < blowup else math.nan
            for i, x in enumerate(golden)]
    if blowup is not None:
        loss = loss[:blowup - start + 1]
    acc = [0.1 + 0.01 * (start + i) for i in range(len(loss))]
    m = {"start": start, "loss": loss, "acc": acc, "golden_loss": golden[:len(loss)],
         "golden_acc": [0.1 + 0.01 * (start + i) for i in range(len(loss))],
         "test": None if blowup else [2.2, 0.25], "golden_test": [2.2, 0.25]}
    if protected:
        det = [{"step": blowup, "detector": "nonfinite", "reason": "loss is nan",
                "rollback_to": start, "transient": True, "action": "recovered", "load_s": 0.001,
                "replay_s": 0.3, "steps_replayed": 3, "attempts": 1,
                "recovery_s": 0.301}] if blowup is not None else []
        m["protected"] = {"loss": golden, "acc": m["golden_acc"] + [0.2] * (n - len(loss)),
                          "test": [2.2, 0.25], "stopped_at": None, "bit_exact": True,
                          "detections": det}
    return m


def results(detect: bool) -> list[TrialResult]:
    cid = DIGEST + ("+detect" if detect else "")
    common = dict(campaign=cid, framework="torch", workload="mlp",
                  workload_key="c55d0f234599bce1")
    det = (lambda d, s=None, name=None, after="Masked": dict(
        detected=d, detect_step=s, detector=name, recovered=True if d else None,
        outcome_after=after)) if detect else (lambda *a, **k: {})
    return [
        TrialResult(trial_id="control", source="tiny.csv:2", faults=[], outcome="Masked",
                    bit_exact=True, steps_run=20, metrics=_metrics(0, 20, protected=detect),
                    final_test_acc=0.25, golden_test_acc=0.25, **common, **det(False)),
        TrialResult(trial_id="nan", source="tiny.csv:3",
                    faults=[{"site": "fwd_output", "layer": "dense_1", "replica": 0, "step": 7,
                             "value": "nan", "duration": "transient"}],
                    outcome="ImmediateINFsNaNs", bit_exact=False, inject_step=7,
                    first_nonfinite_step=7, final_loss=math.nan, steps_run=3,
                    metrics=_metrics(5, 15, blowup=7, protected=detect),
                    golden_test_acc=0.25, **common, **det(True, 7, "nonfinite")),
        TrialResult(trial_id="flip", source="tiny.csv:4",
                    faults=[{"site": "fwd_weight", "layer": "dense_3", "replica": 1, "step": 19,
                             "value": "bitflip", "bit": 30, "duration": "transient"}],
                    outcome="SlowDegrade", bit_exact=False, inject_step=19, steps_run=5,
                    metrics=_metrics(15, 5, protected=detect), final_test_acc=0.2,
                    golden_test_acc=0.25, **common, **det(False, after="SlowDegrade")),
    ]


def write(path, plain: bool = True, detect: bool = True) -> None:
    with ResultStore(path) as store:
        for r in (results(False) if plain else []) + (results(True) if detect else []):
            store.add(r)


FINGERPRINT = {"faultlab": "0.1.0", "python": "3.12.1", "numpy": "2.1.0",
               "framework": "torch 2.5.0", "machine": "x86_64",
               "isa": "GenuineIntel avx avx2 fma", "env": {}, "threads": 2, "device": "cpu",
               "portable": False}


def write_runs(path) -> None:
    """What `faultlab run` stores beside the trials: the configuration and the golden run's
    determinism fingerprint, per run."""
    entry = {"workload_key": "c55d0f234599bce1", "framework": "torch", "workload": "mlp",
             "config": {"workload": "mlp", "width": 8, "steps_per_epoch": 5}, "threads": 2,
             "executor": "local", "fingerprint": FINGERPRINT, "fingerprint_source": "golden run"}
    with ResultStore(path) as store:
        store.add_runs(DIGEST, [entry])
        store.add_runs(DIGEST + "+detect", [entry])


def crash_report(engine: str, mode: str = "kill", **kw) -> dict:
    """An EngineReport.to_json() of a healthy engine (override any count)."""
    rep = {"engine": engine, "mode": mode, "kills": 6 if mode == "kill" else 0,
           "recoveries": 6, "exact": 5, "nothing_committed": 1, "torn": 0, "mixed": 0,
           "lost_committed": 0, "incomplete_state": 0, "steps_lost_total": 6,
           "steps_lost_mean": 1.0, "steps_lost_max": 2, "runs": 1, "runs_bit_identical": 1,
           "kills_by_phase": {"staging": 2, "writing": 1, "committing": 2, "idle": 1},
           "crash_points": 0 if mode == "kill" else 8, "images": 0 if mode == "kill" else 40,
           "resumes": 0, "resumes_bit_identical": 0, "ok": True, "problems": [],
           "wall_s": 2.5, "note": ""}
    rep.update(kw)
    return rep


def write_crash(path) -> None:
    """Two `faultlab crash` campaigns: kills of faultlab and naive (which tears), power loss."""
    naive = crash_report("naive", exact=2, torn=3, recoveries=3, ok=False,
                         problems=["k1 at writing/0: torn: w differs"])
    power = crash_report("faultlab", "power-loss", recoveries=40, exact=38,
                         nothing_committed=2, resumes=4, resumes_bit_identical=4)
    with ResultStore(path) as store:
        store.add_crash_reports([crash_report("faultlab"), naive], run_id="kill-1",
                                workload="mlp", steps=6, every=1, seed=0)
        store.add_crash_reports([power], run_id="power-1", workload="mlp", steps=6, every=1,
                                seed=0)
