"""Campaign throughput: the local pool and Ray, side by side, on the reference campaign; and
early decision against full horizons on random56 and mixed.

    python benchmarks/campaign_throughput.py [--trials N] [--workers 2] [--threads T]
                                             [--address auto|HOST:PORT] [--quick] [--json]
    python benchmarks/campaign_throughput.py --early [--trials N] [--workers 2] [--json]

Runs campaigns/random56.csv (or its first N trials) once with `--executor local` and once with
`--executor ray` (a local Ray started for the run, or the cluster at --address), the same
worker count and threads, each into a fresh results database, against one golden run recorded
before either is timed (the golden run is paid once per configuration, not per trial).

Reported per executor:

- first-trial latency: from run_campaign's call to the first stored result (pool start,
  golden runs found in the cache / shipped, control trials, the first trial);
- trial phase and trials per hour: from the first trial's dispatch to the last result;
- per-trial overhead beyond the trained steps (target at most 10% of a trial), in two parts:
  inside the task, restore of the golden checkpoint + evaluation against the trial's steps
  (restore, evaluation and step time measured here, alone, on a trainer of the same
  configuration and threads: a ratio that does not move with the machine's load), and outside
  the task, the share of each worker slot (trial phase x workers / trials) not spent inside a
  task (the result's ``wall_s``): dispatch, process start and imports, shipping the golden
  run. overhead = outside + (1 - outside) x inside.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from faultlab.campaigns import load_campaign  # noqa: E402
from faultlab.determinism import configure  # noqa: E402
from faultlab.report import table  # noqa: E402
from faultlab.runner.campaign import default_threads, run_campaign  # noqa: E402
from faultlab.runner.session import Session  # noqa: E402

CAMPAIGN = os.path.join(os.path.dirname(__file__), "..", "campaigns", "random56.csv")
OVERHEAD_BOUND = 0.10


def costs(cfg, threads: int, steps: int) -> dict:
    """Seconds of one training step (median after a warm-up), of a golden-checkpoint restore
    and of an evaluation, on a trainer of `cfg` in this process, with nothing else of ours
    running; and the golden run's wall time."""
    configure(cfg.framework, threads)
    session = Session(threads=threads)
    gold = session.golden(cfg)               # recorded here once (cached for both executors)
    trainer = session.trainer(cfg)
    ckpt = gold.checkpoints[len(gold.checkpoints) // 2]

    def timed(fn, n):
        out = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return statistics.median(out)
    restore = timed(lambda: trainer.set_state(gold.state(ckpt)), 3)
    times = []
    for step in range(ckpt, ckpt + steps + 2):
        t = time.perf_counter()
        trainer.train_step(step)
        times.append(time.perf_counter() - t)
    evaluate = timed(trainer.evaluate, 2)
    return {"step": statistics.median(times[2:]), "restore": restore, "evaluate": evaluate,
            "golden": gold.wall_s}


def run_one(executor: str, campaign, workers: int, threads: int, address, tmp: str) -> dict:
    db = os.path.join(tmp, f"{executor}.sqlite")
    marks: dict = {}
    t0 = time.perf_counter()

    def on_start(n):
        marks["start"] = time.perf_counter()

    def on_result(r):
        marks.setdefault("first", time.perf_counter())
        marks["last"] = time.perf_counter()
    run = run_campaign(campaign, db, workers=workers, threads=threads, executor=executor,
                       address=address if executor == "ray" else None, fresh=True,
                       on_start=on_start, on_result=on_result)
    end = time.perf_counter()
    return {"executor": executor, "results": run.results, "total": end - t0,
            "first": marks["first"] - t0, "phase": marks["last"] - marks["start"],
            "golden_phase": marks["start"] - t0}


def summarize(m: dict, c: dict, workers: int) -> dict:
    """Throughput and overhead of one executor's run. The overhead beyond the trained steps
    has two parts: inside the task (restore + evaluation, from `costs`, against the trial's
    steps at the same step time: both measured alone, so the ratio does not depend on how
    busy the machine is) and outside it (the part of each worker slot not spent in a task:
    dispatch, process start, imports, shipping the golden run; measured in the run)."""
    rs = m["results"]
    n = len(rs)
    steps = statistics.mean(r.steps_run for r in rs)
    task = statistics.mean(r.wall_s for r in rs)
    slot = m["phase"] * workers / n
    fixed = c["restore"] + c["evaluate"]
    in_task = fixed / (fixed + steps * c["step"])
    outside = max(0.0, (slot - task) / slot) if slot else 0.0
    return {"executor": m["executor"], "trials": n, "first_s": m["first"],
            "golden_phase_s": m["golden_phase"], "phase_s": m["phase"],
            "per_hour": n / m["phase"] * 3600, "steps": steps, "task_s": task, "slot_s": slot,
            "in_task": in_task, "outside": outside,
            "overhead": outside + (1 - outside) * in_task,
            "outcomes": sorted((r.trial_id, r.outcome, r.bit_exact) for r in rs)}


EARLY_CAMPAIGNS = ("random56.csv", "mixed.csv")


def early(camp, workers: int, threads: int, tmp: str, step_samples: int) -> dict:
    """One campaign run twice on the local pool, with early decision and without (each into a
    fresh results database, against the same golden run, recorded first): trials per hour, the
    share decided early, the steps trained, and the per-trial overhead beyond the trained steps
    (1 - trained steps x step time / task time: restore, evaluation, checksums, classification),
    with the step time measured alone on a trainer of the same configuration."""
    cfgs = {t.workload.key(): t.workload for t in camp.trials}
    cost = {k: costs(cfg, threads, step_samples) for k, cfg in cfgs.items()}
    rows = {}
    for mode, flag in (("full horizon", False), ("early decision", True)):
        marks: dict = {}
        db = os.path.join(tmp, f"{os.path.basename(camp.path)}-{flag}.sqlite")

        def on_start(n, marks=marks):
            marks["start"] = time.perf_counter()

        def on_result(r, marks=marks):
            marks["last"] = time.perf_counter()
        run = run_campaign(camp, db, workers=workers, threads=threads, fresh=True,
                           early_stop=flag, on_start=on_start, on_result=on_result)
        rs = run.results
        phase = marks["last"] - marks["start"]
        trained = sum(r.steps_run for r in rs)
        window = sum(r.steps_run + (r.metrics.get("early_stop") or {}).get("steps_skipped", 0)
                     for r in rs)
        task = sum(r.wall_s for r in rs)
        stepping = sum(r.steps_run * cost[r.workload_key]["step"] for r in rs)
        rows[mode] = {"mode": mode, "trials": len(rs), "phase_s": phase,
                      "per_hour": len(rs) / phase * 3600,
                      "early": sum(1 for r in rs if r.metrics.get("early_stop")),
                      "trained": trained, "window": window, "task_s": task,
                      "overhead": max(0.0, 1 - stepping / task) if task else 0.0,
                      "results": {r.trial_id: r for r in rs}}
    full, fast = rows["full horizon"], rows["early decision"]
    diffs = []
    for tid, a in full["results"].items():
        b = fast["results"][tid]
        same = (a.outcome, a.bit_exact) == (b.outcome, b.bit_exact)
        if same and a.bit_exact:
            same = ((a.final_loss, a.final_train_acc, a.final_test_acc)
                    == (b.final_loss, b.final_train_acc, b.final_test_acc)
                    and a.metrics["loss"] == b.metrics["loss"])
        if not same:
            diffs.append((tid, a.outcome, b.outcome))
    for r in rows.values():
        del r["results"]
    return {"campaign": os.path.basename(camp.path), "rows": [full, fast],
            "speedup": fast["per_hour"] / full["per_hour"], "differences": diffs,
            "step_ms": {k: c["step"] * 1e3 for k, c in cost.items()}}


def main_early(a, threads: int) -> int:
    out = []
    with tempfile.TemporaryDirectory(prefix="faultlab-early-") as tmp:
        os.environ.setdefault("FAULTLAB_CACHE", os.path.join(tmp, "cache"))
        for name in EARLY_CAMPAIGNS:
            camp = load_campaign(os.path.join(os.path.dirname(CAMPAIGN), name))
            if a.trials:
                camp = dataclasses.replace(camp, trials=camp.trials[:a.trials])
            out.append(early(camp, a.workers, threads, tmp, a.step_samples))
    if a.json:
        print(json.dumps(out, default=str))
        return 0
    print(f"early decision: {a.workers} worker(s) x {threads} thread(s); cpu count "
          f"{os.cpu_count()}; load average {os.getloadavg()[0]:.1f}")
    head = ["campaign", "mode", "trials", "trial phase", "trials/hour", "speed-up",
            "decided early", "steps trained", "of window", "overhead beyond steps"]
    body = []
    for e in out:
        for r in e["rows"]:
            body.append([e["campaign"], r["mode"], str(r["trials"]), f"{r['phase_s']:.1f} s",
                         f"{r['per_hour']:.0f}",
                         f"{r['per_hour'] / e['rows'][0]['per_hour']:.2f}x",
                         f"{r['early']} ({r['early'] / r['trials'] * 100:.0f}%)",
                         str(r["trained"]), f"{r['trained'] / r['window'] * 100:.0f}%",
                         f"{r['overhead'] * 100:.1f}%"])
    print(table(head, body, right={2, 3, 4, 5, 7, 8, 9}))
    print()
    for e in out:
        ok = not e["differences"]
        print(f"{'PASS' if ok else 'FAIL'} {e['campaign']}: every trial has the same outcome "
              f"(and, where bit-exact, the same final metrics) with and without early decision"
              + ("" if ok else f": {e['differences'][:5]}"))
        print(f"{'PASS' if e['speedup'] >= 1 else 'FAIL'} {e['campaign']}: early decision "
              f"{e['speedup']:.2f}x the trials per hour of full horizons (bound: >= 1.00x)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=0, help="first N trials (default: all 56)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="default: cores / workers")
    ap.add_argument("--address", default=None, help="Ray cluster (default: a local Ray)")
    ap.add_argument("--ray-first", action="store_true",
                    help="run Ray before the local pool (to see an order effect: load, caches)")
    ap.add_argument("--step-samples", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="4 trials, 5 step samples")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--native", action="store_true",
                    help="native kernels (default: portable mode, as `faultlab run`)")
    ap.add_argument("--early", action="store_true",
                    help="early decision against full horizons on random56 and mixed "
                         "(local pool) instead of local against Ray")
    a = ap.parse_args()
    from faultlab.determinism import choose
    choose("native" if a.native else "auto")    # before torch is imported here or anywhere
    if a.quick:
        a.trials, a.step_samples = a.trials or 4, 5
    threads = a.threads or default_threads(a.workers)
    if a.early:
        return main_early(a, threads)
    camp = load_campaign(CAMPAIGN)
    if a.trials:
        camp = dataclasses.replace(camp, trials=camp.trials[:a.trials])
    cfgs = {t.workload.key(): t.workload for t in camp.trials}
    if len(cfgs) != 1:
        print("the benchmark expects one configuration", file=sys.stderr)
        return 2
    cfg = next(iter(cfgs.values()))
    with tempfile.TemporaryDirectory(prefix="faultlab-throughput-") as tmp:
        os.environ.setdefault("FAULTLAB_CACHE", os.path.join(tmp, "cache"))
        t = time.perf_counter()
        c = costs(cfg, threads, a.step_samples)
        golden_s = time.perf_counter() - t
        order = ("ray", "local") if a.ray_first else ("local", "ray")
        done = {ex: summarize(run_one(ex, camp, a.workers, threads, a.address, tmp), c,
                              a.workers) for ex in order}
        rows = [done["local"], done["ray"]]
    local, ray = rows
    same = local["outcomes"] == ray["outcomes"]
    if a.json:
        print(json.dumps({"costs": c, "golden_s": golden_s, "rows": rows,
                          "same_outcomes": same}, default=str))
        return 0
    print(f"campaign {os.path.basename(CAMPAIGN)}: {len(camp.trials)} trial(s) of "
          f"{cfg.workload}; {a.workers} worker(s) x {threads} thread(s); cpu count "
          f"{os.cpu_count()}; load average {os.getloadavg()[0]:.1f}")
    print(f"alone: step {c['step'] * 1e3:.1f} ms (median of {a.step_samples}), restore "
          f"{c['restore'] * 1e3:.1f} ms, evaluation {c['evaluate'] * 1e3:.1f} ms; golden run "
          f"{c['golden']:.1f} s, recorded once before timing ({golden_s:.1f} s with build)")
    print()
    head = ["executor", "trials", "first trial", "trial phase", "trials/hour", "vs local",
            "steps/trial", "task s", "slot s", "in-task over", "outside task", "overhead"]
    body = []
    for r in rows:
        body.append([r["executor"], str(r["trials"]), f"{r['first_s']:.1f} s",
                     f"{r['phase_s']:.1f} s", f"{r['per_hour']:.0f}",
                     f"{r['per_hour'] / local['per_hour']:.2f}x", f"{r['steps']:.1f}",
                     f"{r['task_s']:.2f}", f"{r['slot_s']:.2f}", f"{r['in_task'] * 100:.1f}%",
                     f"{r['outside'] * 100:.1f}%", f"{r['overhead'] * 100:.1f}%"])
    print(table(head, body, right=set(range(1, len(head)))))
    print()
    for r in rows:
        ok = r["overhead"] <= OVERHEAD_BOUND
        print(f"{'PASS' if ok else 'FAIL'} {r['executor']}: per-trial overhead beyond the "
              f"trained steps {r['overhead'] * 100:.1f}% <= {OVERHEAD_BOUND * 100:.0f}% "
              f"(in the task {r['in_task'] * 100:.1f}%, outside it "
              f"{r['outside'] * 100:.1f}%)")
    print(f"{'PASS' if same else 'FAIL'} same outcomes and bit_exact flags on both executors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
