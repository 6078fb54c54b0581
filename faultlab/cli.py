"""The `faultlab` command line.

Exit codes: 0 success, 1 a failed check (e.g. --expect not met), 2 bad input (one line on
stderr naming the problem, never a traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

from faultlab.backends import load_backend, names as framework_names
from faultlab.errors import FaultlabError, printable

EPILOGS = {
    "run": """examples:
  faultlab run campaigns/inj_masked.csv
  faultlab run campaigns/mixed.csv --workers 2 --results out/mixed.sqlite
  faultlab run ../shared/reference/isca_ae/injections/inj_masked.csv --framework torch --json
  faultlab run campaigns/inj_slow_degrade.csv --expect SlowDegrade   # exit 1 if not
  faultlab run examples/my_campaign.csv --allow-workload examples.my_workload   # your code

An interrupted campaign resumes where it stopped: run the same command again.""",
    "validate": """examples:
  faultlab validate campaigns/mixed.csv
  faultlab validate ../shared/reference/isca_ae/injections/inj_slow_degrade.csv --json""",
    "workloads": """examples:
  faultlab workloads
  faultlab workloads --layers resnet18 --json""",
    "detect": """examples:
  faultlab detect --check                       # overhead of detection on the reference workload
  faultlab detect --check --workload mlp --json
  faultlab detect --campaign campaigns/mixed.csv --workers 2   # coverage, latency, recovery

Without --check it only times the workload unprotected (as the artifact's detection.py does).""",
    "replay": """examples:
  faultlab replay --rerun                       # checkpoint + rollback/replay overhead, recovery time
  faultlab replay --rerun --every 5 --steps 40 --json""",
    "plan": """examples:
  faultlab plan -o campaigns/random.csv                   # 5% margin, 95% confidence
  faultlab plan --trials 60 --horizon 30 --seed 1 -o campaigns/random60.csv""",
    "report": """examples:
  faultlab report faultlab-results/inj_masked.sqlite
  faultlab report faultlab-results/mixed.sqlite --csv mixed.csv
  faultlab report faultlab-results/mixed.sqlite --html mixed.html --figures figures/""",
    "crash": """examples:
  faultlab crash                                   # 100 SIGKILLs of the faultlab engine
  faultlab crash --engine all --kills 50           # the engine and every baseline side by side
  faultlab crash --engine sync --engine checkfreq --kills 20 --json
  faultlab crash --workload rng-mlp --steps 40     # a loop that carries every RNG state
  faultlab crash --power-loss                      # power-loss images at 60 crash points
  faultlab crash --power-loss --points 0 --images 30   # every crash point, 30 images each
  faultlab crash --engine naive --kills 20         # negative control: it tears (exit 1)
  faultlab crash --engine tf-sync --engine tf-async --kills 20   # TF's savers, a Keras loop
  faultlab crash --workload keras-mlp --kills 20   # the engine fed by the TF adapter
  faultlab crash --kills 20 --results crash.sqlite && faultlab report crash.sqlite --html crash.html

Engines: faultlab, sync, checkfreq, dcp-async, naive, tf-sync, tf-async; all = the first four.
Exit code 1 when an engine tore, mixed or lost a committed checkpoint, or a resumed run did
not end bit-identical to the uninterrupted one (docs/checkpointing.md).""",
}


class _Parser(argparse.ArgumentParser):
    """argparse with a usage error on one line, like every other bad input (exit 2)."""

    def error(self, message: str):
        command = self.prog.split(None, 1)[1:]          # "faultlab run" -> ["run"]
        where = f"{command[0]}: " if command else ""
        message = printable(" ".join(message.split()))
        self.exit(2, f"faultlab: error: {where}{message} (see '{self.prog} --help')\n")


def _protect_args(p, with_flag: bool = True) -> None:
    if with_flag:
        p.add_argument("--detect", "--protect", action="store_true", dest="detect",
                       help="also run each trial under detection and recovery (multi-process "
                            "trials: every rank detects, all roll back together)")
    p.add_argument("--detectors", default="nonfinite,history,spike",
                   help="comma-separated: nonfinite, history, spike, abft (default: %(default)s)")
    p.add_argument("--threshold", action="append", default=[], metavar="NAME=VALUE",
                   help="detector threshold, e.g. bound=20 z=12 tol=1e-3 (docs/detection.md)")
    p.add_argument("--checkpoint-every", type=int, default=10,
                   help="steps between persistent checkpoints of a protected trial")
    p.add_argument("--policy", choices=["stop", "skip", "lower_lr"], default="stop",
                   help="what to do when replay repeats the anomaly (default stop)")


def _dist_args(p) -> None:
    g = p.add_argument_group("multi-process trials (processes > 1, or kill rows; "
                             "docs/distributed.md)")
    g.add_argument("--snapshot-every", type=int, default=1, metavar="N",
                   help="steps between snapshots into peer memory (default 1)")
    g.add_argument("--persist-every", type=int, default=10, metavar="K",
                   help="steps between the engine's persistent checkpoints (default 10)")
    g.add_argument("--copies", type=int, default=1, metavar="M",
                   help="peers holding each rank's snapshot (default 1)")
    g.add_argument("--zero", action="store_true",
                   help="shard optimizer state across ranks (ZeroRedundancyOptimizer)")
    g.add_argument("--fsdp", action="store_true",
                   help="shard parameters, gradients and optimizer state (FSDP2 fully_shard)")
    g.add_argument("--port", type=int, default=0,
                   help="rendezvous port on 127.0.0.1 (default: a free one)")
    g.add_argument("--rank-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="gloo and store timeout: how long a dead or hung rank stalls the "
                        "others (default 10)")


def _dist_options(a):
    from faultlab.runner.ranks import DistOptions
    for flag in ("snapshot_every", "persist_every", "copies"):
        v = getattr(a, flag)
        if v < (0 if flag == "copies" else 1):
            raise FaultlabError(f"--{flag.replace('_', '-')} must be at least "
                                f"{0 if flag == 'copies' else 1}, got {v}")
    if not 0 <= a.port <= 65535:
        raise FaultlabError(f"--port must be from 0 to 65535, got {a.port}")
    if a.port:
        from faultlab.runner.ranks import check_port
        check_port(a.port)
    if not a.rank_timeout > 0:
        raise FaultlabError(f"--rank-timeout must be positive, got {a.rank_timeout}")
    return DistOptions(a.snapshot_every, a.persist_every, a.copies, a.zero, a.rank_timeout,
                       a.port, a.fsdp)


def _detect_options(a):
    from faultlab.runner.session import DetectOptions
    th = []
    for t in a.threshold:
        k, sep, v = t.partition("=")
        try:
            th.append((k.strip(), float(v)))
        except ValueError:
            raise FaultlabError(f"--threshold {t!r}: expected NAME=NUMBER") from None
        if not sep:
            raise FaultlabError(f"--threshold {t!r}: expected NAME=NUMBER")
    opts = DetectOptions(tuple(x.strip() for x in a.detectors.split(",") if x.strip()),
                         tuple(th), a.checkpoint_every, a.policy)
    opts.suite()  # validates names now: a bad one is a one-line error before any work
    return opts


def _allow_entry(text: str):
    """--allow-workload's value, checked when the command line is parsed."""
    from faultlab.errors import SpecError
    from faultlab.workloads.allow import parse_entry
    try:
        return parse_entry(text)
    except SpecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _allow_args(p) -> None:
    p.add_argument("--allow-workload", action="append", default=[], type=_allow_entry,
                   metavar="MODULE",
                   help="let user code be imported: a module (with its submodules), "
                        "module:function, or a .py file (repeatable; docs/workloads.md); "
                        "also: [tool.faultlab] allow-workloads in pyproject.toml")


def _check_workload_option(name: str | None, option: str = "--workload") -> None:
    """A user workload named on the command line is imported only when allowed."""
    from faultlab.errors import SpecError
    from faultlab.workloads.allow import check_allowed
    from faultlab.workloads.base import is_user_workload
    if name and is_user_workload(name):
        try:
            check_allowed(name)
        except SpecError as e:
            raise FaultlabError(f"{option}: {e}") from None


def _kernel_args(p) -> None:
    """--portable / --native: the run's CPU kernels (faultlab/determinism.py)."""
    kernels = p.add_mutually_exclusive_group()
    kernels.add_argument("--portable", action="store_true",
                         help="pin CPU math kernels to AVX2+FMA so one golden run serves every "
                              "x86-64 machine with AVX2 (the default where the CPU has them; "
                              "docs/cluster.md)")
    kernels.add_argument("--native", action="store_true",
                         help="let the math libraries pick this CPU's fastest kernels (about "
                              "5-10%% faster; golden runs then serve only this kind of CPU)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="faultlab",
        description="Inject hardware faults into DL training, classify what they do, "
                    "detect and recover.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'faultlab COMMAND --help' for examples.")
    from faultlab import __version__
    p.add_argument("--version", action="version", version=f"faultlab {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def cmd(name, help_):
        return sub.add_parser(name, help=help_, description=help_, epilog=EPILOGS.get(name),
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    r = cmd("run", "run a campaign: golden run, trials, outcomes, summary")
    r.add_argument("campaign", help="campaign file (ISCA key/value or columnar CSV)")
    r.add_argument("--framework", choices=framework_names(), help="override the file's framework")
    r.add_argument("--workers", type=int, default=1, help="trial worker processes (default 1)")
    r.add_argument("--threads", type=int, default=0,
                   help="threads per worker (default: cores / workers); part of the golden key")
    r.add_argument("--results", help="results database (default faultlab-results/NAME.sqlite)")
    r.add_argument("--fresh", action="store_true", help="discard earlier results of this campaign")
    r.add_argument("--timeout", type=float, default=3600.0, help="seconds before a trial is a Hang")
    r.add_argument("--no-early-stop", dest="early_stop", action="store_false",
                   help="run every trial to its horizon (default: a trial whose whole state is "
                        "the golden run's, bit for bit, after its last fault ends there as "
                        "Masked)")
    r.add_argument("--horizon", type=int, metavar="N",
                   help="run each trial N steps past its first fault (to that epoch's end) "
                        "instead of the file's horizon; ISCA files run to the end of training")
    r.add_argument("--rule", action="append", default=[], metavar="NAME=VALUE",
                   help="change an outcome threshold (see docs/outcomes.md)")
    r.add_argument("--expect", metavar="OUTCOME", help="exit 1 unless every trial has OUTCOME")
    r.add_argument("--expect-after", metavar="OUTCOME",
                   help="with --detect: exit 1 unless every trial ends OUTCOME after recovery")
    r.add_argument("--csv", help="also export the results to this CSV file")
    r.add_argument("--json", action="store_true", help="one JSON document on stdout")
    _kernel_args(r)
    r.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="where trials run: worker processes here (default) or a Ray cluster")
    r.add_argument("--address", metavar="auto|HOST:PORT",
                   help="with --executor ray: the cluster to join (default: auto, or a local "
                        "Ray started for this run)")
    _protect_args(r)
    _dist_args(r)
    _allow_args(r)

    v = cmd("validate", "check a campaign file against its workloads (no training)")
    v.add_argument("campaign")
    v.add_argument("--framework", choices=framework_names())
    v.add_argument("--json", action="store_true")
    _allow_args(v)

    w = cmd("workloads", "list built-in workloads (and a workload's layers)")
    w.add_argument("--layers", metavar="WORKLOAD", help="list the layers and operand shapes")
    w.add_argument("--framework", choices=framework_names(), default=framework_names()[0])
    w.add_argument("--json", action="store_true")
    _allow_args(w)

    d = cmd("detect", "measure detection overhead; with --campaign, detection coverage")
    d.add_argument("--check", action="store_true",
                   help="also run with detection, interleaved, and print the overhead ratio")
    d.add_argument("--workload", help="built-in workload (default: the reference ResNet-18)")
    d.add_argument("--framework", choices=framework_names())
    d.add_argument("--campaign", help="run this campaign with --detect and report coverage")
    d.add_argument("--steps", type=int, default=60, help="timed steps per variant (default 60)")
    d.add_argument("--threads", type=int, default=1,
                   help="torch threads for the timing (default 1: stable on a shared machine)")
    d.add_argument("--workers", type=int, default=1)
    d.add_argument("--results", help="results database for --campaign")
    d.add_argument("--json", action="store_true")
    _protect_args(d, with_flag=False)
    _allow_args(d)

    rr = cmd("replay", "measure checkpoint + rollback/replay overhead and recovery time")
    rr.add_argument("--rerun", action="store_true",
                    help="roll back and replay every --every steps (else checkpointing only)")
    rr.add_argument("--workload", help="built-in workload (default: the reference ResNet-18)")
    rr.add_argument("--framework", choices=framework_names())
    rr.add_argument("--steps", type=int, default=60)
    rr.add_argument("--every", type=int, default=10, help="steps between reruns (default 10)")
    rr.add_argument("--checkpoint-every", type=int, default=10)
    rr.add_argument("--repeats", type=int, default=1)
    rr.add_argument("--threads", type=int, default=1)
    rr.add_argument("--json", action="store_true")
    _allow_args(rr)

    pl = cmd("plan", "write a random campaign sized by the statistical FI formula")
    pl.add_argument("--workload", default="reference",
                    help="built-in workload (default: the reference ResNet-18 of campaigns/)")
    pl.add_argument("--framework", choices=framework_names())
    pl.add_argument("--trials", type=int, help="number of trials (default: from --margin)")
    pl.add_argument("--margin", type=float, default=0.05, help="margin of error (default 0.05)")
    pl.add_argument("--confidence", type=float, default=0.95)
    pl.add_argument("--seed", type=int, default=0)
    pl.add_argument("--horizon", type=int, help="steps to run after each injection")
    pl.add_argument("--layer", action="append", help="restrict to these layers")
    pl.add_argument("-o", "--output", required=True, help="campaign file to write")
    pl.add_argument("--json", action="store_true")
    _allow_args(pl)

    rp = cmd("report", "summarise a results database (each run of a campaign on its own); "
                       "export CSV / Parquet, an offline HTML report, figures")
    rp.add_argument("results")
    rp.add_argument("--campaign", help="campaign digest, both runs (or digest+detect: one run; "
                                       "default: all)")
    rp.add_argument("--csv")
    rp.add_argument("--parquet")
    rp.add_argument("--html", metavar="FILE",
                    help="write one self-contained HTML report (opens offline)")
    rp.add_argument("--figures", metavar="DIR",
                    help="write each figure as SVG and PNG into DIR (for papers)")
    rp.add_argument("--trials", metavar="ID,...",
                    help="trials whose loss / accuracy curves to draw (default: up to 12, "
                         "harmful ones first)")
    rp.add_argument("--json", action="store_true")

    c = cmd("crash", "kill -9 / power-loss campaign against checkpoint engines")
    c.add_argument("--engine", action="append", metavar="NAME",
                   help="engine to test (repeatable; default faultlab; also naive, tf-sync, "
                        "tf-async; 'all' = faultlab, sync, checkfreq, dcp-async)")
    c.add_argument("--kills", type=int, default=100, help="SIGKILLs per engine (default 100)")
    c.add_argument("--power-loss", action="store_true",
                   help="power-loss mode: check every image of a simulated disk at chosen "
                        "crash points instead of killing processes")
    c.add_argument("--workload",
                   help="training loop: mlp (default), rng-mlp, keras-mlp (TensorFlow; the "
                        "default when every engine is tf-sync / tf-async), or module:function "
                        "/ file.py:function returning a TrainingLoop (with --allow-workload)")
    c.add_argument("--steps", type=int, default=24, help="training steps per run (default 24)")
    c.add_argument("--every", type=int, default=1, help="checkpoint every N steps (default 1)")
    c.add_argument("--seed", type=int, default=0, help="seed of the kill points (default 0)")
    c.add_argument("--jitter-ms", type=float, default=0.0,
                   help="race kills: wait a random 0..N ms after the announcement")
    c.add_argument("--points", type=int, default=60,
                   help="power loss: crash points to check (0 = every operation; default 60)")
    c.add_argument("--images", type=int, default=12,
                   help="power loss: images per crash point (default 12)")
    c.add_argument("--dir", help="working directory (default: a temporary one, removed after)")
    c.add_argument("--results", metavar="PATH",
                   help="results database each engine's report is stored in as it ends "
                        f"(default {CRASH_RESULTS}; `faultlab report PATH` shows it)")
    c.add_argument("--no-results", action="store_true",
                   help="store nothing (print the report only)")
    c.add_argument("--json", action="store_true")
    _allow_args(c)
    _bundle_parsers(cmd)        # faultlab bundle / fetch: the block below, before main()
    _isca_import_parser(cmd)    # faultlab import-isca: the block before main()
    return p


# --- progress ------------------------------------------------------------------------------------

class Progress:
    """A one-line progress bar on stderr (a line per update when stderr is not a terminal)."""

    def __init__(self, total: int, label: str, enabled: bool = True):
        self.total, self.label, self.done = total, label, 0
        self.counts: Counter = Counter()
        self.t0 = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.enabled = enabled

    def update(self, outcome: str | None = None, note: str = "") -> None:
        if outcome:
            self.done += 1
            self.counts[outcome] += 1
        if not self.enabled:
            return
        frac = self.done / self.total if self.total else 1.0
        bar = "#" * int(frac * 24) + "." * (24 - int(frac * 24))
        el = time.monotonic() - self.t0
        eta = f" eta {el / self.done * (self.total - self.done):.0f}s" if self.done and self.done < self.total else ""
        tally = " ".join(f"{k}:{v}" for k, v in sorted(self.counts.items()))
        line = f"{self.label} [{bar}] {self.done}/{self.total} {tally}{eta} {note}".rstrip()
        if self.tty:
            sys.stderr.write("\r\033[K" + line)
            if self.done == self.total:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _say(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


# --- commands ------------------------------------------------------------------------------------

def cmd_validate(a) -> int:
    """`faultlab validate`: parse a campaign and check its trials against their workloads."""
    from faultlab.campaigns import load_campaign
    from faultlab.report import format_validation
    from faultlab.runner.session import validate_trials
    camp = load_campaign(a.campaign, a.framework)
    validate_trials(camp.trials)
    info = {**camp.info(), "valid": True}
    print(json.dumps(info) if a.json else format_validation(info))
    return 0


def cmd_workloads(a) -> int:
    """`faultlab workloads`: list the built-in workloads, or one workload's layers."""
    from faultlab.report import format_layers, format_workloads, operand_rows, workload_entries
    from faultlab.workloads.base import BUILTINS, default_config
    if a.layers:
        _check_workload_option(a.layers, "--layers")
        cfg = default_config(a.layers, framework=a.framework)
        rows = operand_rows(load_backend(cfg.framework).operand_shapes(cfg))
        if a.json:
            print(json.dumps({"workload": a.layers, "config": cfg.to_dict(), "layers": rows}))
        else:
            print(format_layers(a.layers, cfg, rows))
        return 0
    items = workload_entries(BUILTINS.values())
    print(json.dumps({"workloads": items}) if a.json else format_workloads(items))
    return 0


def _stop_after() -> int | None:
    """FAULTLAB_STOP_AFTER=N: a test hook that simulates Ctrl-C once N results of this run are
    stored (tests/test_cli.py uses it to check that an interrupted campaign resumes and loses
    nothing). Unset or empty: no effect."""
    text = os.environ.get("FAULTLAB_STOP_AFTER", "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise FaultlabError(f"FAULTLAB_STOP_AFTER must be a positive integer, got {text!r}")
    return int(text)


def _run_campaign(a, detect=None):
    """Run the campaign of `a` (faultlab run / detect --campaign) with a progress bar."""
    from faultlab.campaigns import load_campaign
    from faultlab.outcomes import OutcomeRules
    from faultlab.runner.campaign import default_results_path, run_campaign

    rules = OutcomeRules.from_pairs(getattr(a, "rule", []))
    stop_after = _stop_after()
    _kernel_mode(a)         # before any framework is imported here or in a worker
    camp = load_campaign(a.campaign, a.framework)
    if getattr(a, "horizon", None) is not None:
        camp = camp.with_horizon(a.horizon)
    bar = None

    def on_start(n):
        nonlocal bar
        bar = Progress(n, "trials", enabled=not a.json)
        bar.update(note="running")

    def on_result(res):
        bar.update(res.outcome if detect is None else f"{res.outcome}->{res.outcome_after}")
        if stop_after is not None and bar.done >= stop_after:
            raise KeyboardInterrupt   # test hook (FAULTLAB_STOP_AFTER): Ctrl-C after N results
    run = run_campaign(camp, a.results or default_results_path(camp.path), workers=a.workers,
                       threads=getattr(a, "threads", 0), rules=rules,
                       timeout=getattr(a, "timeout", 3600.0), detect=detect,
                       fresh=getattr(a, "fresh", False), say=lambda m: _say(m, a.json),
                       dist=_dist_options(a) if hasattr(a, "snapshot_every") else None,
                       executor=getattr(a, "executor", "local"),
                       address=getattr(a, "address", None),
                       early_stop=getattr(a, "early_stop", True),
                       on_start=on_start, on_result=on_result)
    return run.campaign, run.campaign_id, run.results_path, run.results


def cmd_run(a) -> int:
    """`faultlab run`: run a campaign (resuming), print the per-trial table and the summary."""
    from faultlab.report import (format_coverage, format_distributed, format_results,
                                 format_summary)
    from faultlab.results import OUTCOMES, summarize, summarize_after_recovery, to_csv
    from faultlab.results.coverage import coverage

    for flag in ("expect", "expect_after"):
        want = getattr(a, flag)
        if want and want not in OUTCOMES:
            raise FaultlabError(f"--{flag.replace('_', '-')}: unknown outcome {want!r} "
                                f"(one of: {', '.join(OUTCOMES)})")
    detect = _detect_options(a) if a.detect else None
    camp, cid, db, results = _run_campaign(a, detect)
    rows = summarize(results)
    after_rows = summarize_after_recovery(results) if detect is not None else None
    if a.csv:
        to_csv(results, a.csv)
    cov = coverage(results) if detect is not None else None
    if a.json:
        doc = {"campaign": camp.path, "digest": cid, "results_db": str(db),
               "summary": [r.__dict__ for r in rows],
               "trials": [r.to_dict(strict=True) for r in results]}
        if detect is not None:
            doc["summary_after_recovery"] = [r.__dict__ for r in after_rows]
            doc["coverage"] = cov
        print(json.dumps(doc, default=str))
    else:
        print(format_results(results))
        print()
        print(format_summary(rows))
        early = [r for r in results if (r.metrics or {}).get("early_stop")]
        if early:
            skipped = sum(r.metrics["early_stop"]["steps_skipped"] for r in early)
            print(f"\nearly decision: {len(early)} of {len(results)} trial(s) were back on the "
                  f"golden run bit for bit after their last fault and stopped there "
                  f"({skipped} step(s) not trained; --no-early-stop runs them out)")
        dist = format_distributed(results)
        if dist:
            print()
            print(dist)
        if detect is not None:
            print()
            print("after detection and recovery:")
            print(format_summary(after_rows))
            print()
            print(format_coverage(cov))
    status = 0
    if a.expect and any(r.outcome != a.expect for r in results):
        _say(f"expected every trial to be {a.expect}: "
             f"{', '.join(sorted({r.outcome for r in results}))}")
        status = 1
    if a.expect_after and any((r.outcome_after or r.outcome) != a.expect_after for r in results):
        _say(f"expected every trial to end {a.expect_after} after recovery: "
             f"{', '.join(sorted({str(r.outcome_after) for r in results}))}")
        status = 1
    return status


def cmd_detect(a) -> int:
    """`faultlab detect`: time detection's overhead; with --campaign, detection coverage."""
    from faultlab.replay.overhead import detection_overhead, false_positives, reference
    from faultlab.report import format_coverage, format_detection
    if a.campaign:
        a.fresh, a.rule, a.timeout, a.threads = False, [], 3600.0, 0
        detect = _detect_options(a)
        camp, cid, db, results = _run_campaign(a, detect)
        from faultlab.results.coverage import coverage
        from faultlab.runner.campaign import default_threads
        from faultlab.runner.golden import cached_signals
        cov = coverage(results)
        sigs = cached_signals((t.workload for t in camp.trials), default_threads(a.workers))
        fps = false_positives(sigs, list(detect.detectors)) if sigs else None
        if a.json:
            print(json.dumps({"campaign": camp.path, "results_db": str(db), "coverage": cov,
                              "golden_false_positives": fps}, default=str))
        else:
            print(format_coverage(cov, fps))
        return 0
    _check_workload_option(a.workload)
    cfg = reference(a.workload, a.framework)
    load_backend(cfg.framework).configure(a.threads)
    if not a.check:
        res = detection_overhead(cfg, a.steps, variants={})
    else:
        detectors = [x.strip() for x in a.detectors.split(",") if x.strip()]
        res = detection_overhead(cfg, a.steps, variants={
            "nonfinite+history": ["nonfinite", "history"], ",".join(detectors): detectors,
            "abft": ["abft"]}, progress=lambda i, n: _say(f"detect: round {i}/{n}", a.json))
    print(json.dumps(res, default=str) if a.json else
          format_detection(res, cfg, a.threads, a.check))
    return 0


def cmd_replay(a) -> int:
    """`faultlab replay`: time checkpointing and rollback-replay; the recovery time."""
    from faultlab.replay.overhead import reference, replay_overhead
    from faultlab.report import format_replay
    _check_workload_option(a.workload)
    cfg = reference(a.workload, a.framework)
    load_backend(cfg.framework).configure(a.threads)
    every = a.every if a.rerun else 10**9
    res = replay_overhead(cfg, a.steps, a.checkpoint_every, every, a.repeats,
                          progress=lambda k, n: _say(f"replay: step {k}/{n}", a.json))
    if not a.rerun:
        res["rows"] = [r for r in res["rows"] if r["variant"] != "rerun"]
    print(json.dumps(res, default=str) if a.json else
          format_replay(res, cfg, a.steps, a.checkpoint_every, a.every if a.rerun else None))
    return 0


def cmd_report(a) -> int:
    """`faultlab report`: summarise a results database, each run of a campaign on its own, and
    the `faultlab crash` campaigns stored in it; export it as CSV / Parquet; an offline HTML
    report (--html) and figures (--figures)."""
    from faultlab.report import format_crash_runs, format_report, group_runs
    from faultlab.results import (ResultStore, summarize, summarize_after_recovery, to_csv,
                                  to_parquet)
    if not Path(a.results).is_file():
        raise FaultlabError(f"{printable(a.results)}: no such results database")
    with ResultStore(a.results) as store:
        results = store.results(a.campaign)
        if a.campaign and not results:       # a digest names both runs of a campaign
            results = [r for r in store.results()
                       if r.campaign.partition("+")[0] == a.campaign]
        cids = {r.campaign for r in results}
        runs = [r for r in store.runs() if r["campaign"] in cids]
        crash = [] if a.campaign else store.crash_reports()
    if a.campaign and not results:
        raise FaultlabError(f"{printable(a.results)}: no campaign {a.campaign!r} in it")
    trials = [t for t in (a.trials or "").split(",") if t.strip()] or None
    if a.csv:
        to_csv(results, a.csv)
    if a.parquet:
        to_parquet(results, a.parquet)
    if a.html or a.figures:
        from faultlab.report_html import write_report
        written = write_report(results, html=a.html, figures=a.figures, trials=trials,
                               title=Path(a.results).name, runs=runs, crash=crash)
        for w in written:
            _say(f"wrote {printable(w)}", a.json)
    if a.json:
        doc_runs = []
        for cid, rs in group_runs(results):
            run = {"campaign": cid, "summary": [r.__dict__ for r in summarize(rs)],
                   "trials": [r.trial_id for r in rs],
                   "configurations": [{k: v for k, v in r.items() if k != "campaign"}
                                      for r in runs if r["campaign"] == cid]}
            if any(r.detected is not None for r in rs):
                run["summary_after_recovery"] = [r.__dict__ for r in summarize_after_recovery(rs)]
            doc_runs.append(run)
        doc = {"runs": doc_runs, "trials": [r.to_dict(strict=True) for r in results],
               "crash": crash}
        if len(doc_runs) == 1:
            doc["summary"] = doc_runs[0]["summary"]
        print(json.dumps(doc, default=str))
    else:
        parts = [format_report(results)] if results or not crash else []
        if crash:
            parts.append(format_crash_runs(crash))
        print("\n\n".join(parts))
    return 0


def cmd_crash(a) -> int:
    import shutil
    import tempfile

    from faultlab.crash import KillCampaign, campaign_setup, format_reports, power_loss_report
    for flag, value, low in (("--kills", a.kills, 1), ("--steps", a.steps, 1),
                             ("--every", a.every, 1), ("--points", a.points, 0),
                             ("--images", a.images, 1)):
        if value < low:
            raise FaultlabError(f"{flag} must be at least {low}, got {value}")
    if a.jitter_ms < 0:
        raise FaultlabError(f"--jitter-ms must be >= 0, got {a.jitter_ms}")
    if a.dir:
        try:
            Path(a.dir).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise FaultlabError(f"--dir {printable(a.dir)}: cannot create it: "
                                f"{e.strerror or e}") from None
    if a.workload and ":" in a.workload:      # user code: imported only when allowed
        from faultlab.crash.loops import check_factory_allowed
        try:
            check_factory_allowed(a.workload)
        except FaultlabError as e:
            raise FaultlabError(f"--workload: {e}") from None
    setup = campaign_setup(a.engine or (), a.workload, steps=a.steps, every=a.every)
    mode = "power-loss" if a.power_loss else "kill"
    db, run_id = None, _crash_run_id()
    if a.results and a.no_results:
        raise FaultlabError("--results and --no-results exclude each other")
    if not a.no_results:
        from faultlab.results import ResultStore
        db = Path(a.results or CRASH_RESULTS)
        ResultStore(db).close()       # a bad path is an error now, before any work

    def store(rep) -> None:           # each engine's report, durable as soon as it ends
        if db is not None:
            from faultlab.results import ResultStore
            with ResultStore(db) as st:
                st.add_crash_reports([rep.to_json()], run_id=run_id, workload=setup.workload,
                                     steps=a.steps, every=a.every, seed=a.seed)
        reports.append(rep)

    workdir = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="faultlab-crash-"))
    reports: list = []
    try:
        if a.power_loss:
            for n in setup.engines:
                points = a.points or None
                bar = Progress(points or 0, f"power loss {n}", enabled=not a.json and
                               points is not None)
                store(power_loss_report(
                    n, setup.loop.factory, steps=a.steps, every=a.every, points=points,
                    images_per_point=a.images, seed=a.seed,
                    progress=lambda bar=bar: bar.update("checked")))
        else:
            _say(f"starting the training zygote ({setup.workload}); kills follow", a.json)
            with KillCampaign(setup.loop, workdir, engines=setup.engines) as kc:
                kc.reference()
                for n in setup.engines:
                    bar = Progress(a.kills, f"crash {n}", enabled=not a.json)
                    store(kc.campaign(n, a.kills, seed=a.seed, jitter=a.jitter_ms / 1000.0,
                                      on_kill=lambda r, bar=bar: bar.update(r.verdict)))
    finally:
        if not a.dir:
            shutil.rmtree(workdir, ignore_errors=True)
    ok = all(r.ok for r in reports)
    if a.json:
        doc = {"mode": mode, "workload": setup.workload, "steps": a.steps, "every": a.every,
               "seed": a.seed, "ok": ok, "engines": [r.to_json() for r in reports]}
        if db is not None:
            doc.update(results_db=str(db), run_id=run_id)
        print(json.dumps(doc))
    else:
        print(format_reports(reports))
        for r in reports:
            for problem in r.problems[:5]:
                _say(f"{r.engine}: {problem}")
        if db is not None:
            _say(f"stored as crash campaign {run_id} in {printable(db)} "
                 f"(faultlab report {printable(db)})")
    return 0 if ok else 1


#: where `faultlab crash` stores its reports unless told otherwise (beside `faultlab run`'s
#: faultlab-results/<campaign>.sqlite)
CRASH_RESULTS = Path("faultlab-results") / "crash.sqlite"


def _crash_run_id() -> str:
    """A crash campaign's id: its UTC start time and a random suffix (unique in a file)."""
    import datetime
    import secrets
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def cmd_plan(a) -> int:
    """`faultlab plan`: write a random campaign sized by the statistical FI formula."""
    from faultlab.campaigns import write_columnar
    from faultlab.campaigns.plan import plan
    from faultlab.replay.overhead import reference
    _check_workload_option(a.workload)
    cfg = reference(a.workload, a.framework)
    if a.trials is not None and a.trials < 1:
        raise FaultlabError("--trials must be at least 1")
    trials = plan(cfg, a.trials, a.margin, a.confidence, a.seed, a.horizon, a.layer)
    out = write_columnar(trials, a.output)
    info = {"output": str(out), "trials": len(trials), "workload": cfg.workload,
            "margin": a.margin, "confidence": a.confidence, "seed": a.seed}
    if a.json:
        print(json.dumps(info))
    else:
        print(f"{out}: {len(trials)} trial(s) on {cfg.workload}"
              + ("" if a.trials else f" (margin {a.margin:g} at {100 * a.confidence:g}% confidence)"))
    return 0


COMMANDS = {"run": cmd_run, "plan": cmd_plan, "validate": cmd_validate, "workloads": cmd_workloads,
            "detect": cmd_detect, "replay": cmd_replay,
            "report": cmd_report, "crash": cmd_crash}



# --- bundles: faultlab bundle / faultlab fetch (faultlab/bundles/, docs/bundles.md) ---------------

EPILOGS.update({
    "bundle": """examples:
  faultlab run campaigns/mixed.csv                     # golden runs and results first
  faultlab bundle campaigns/mixed.csv -o mixed.tar.gz
  faultlab bundle campaigns/mixed.csv --results out/mixed.sqlite --threads 4 -o mixed.tar.gz

The bundle holds the campaign file, the cached golden run of each of its configurations for
this machine's fingerprint (the same thread count and kernel mode as the run), the results
database (when there is one) and manifest.json (sha256 and size of every member). The same
inputs give the same bytes.""",
    "fetch": """examples:
  faultlab fetch https://example.org/mixed.tar.gz
  faultlab fetch 1AbCdEfGhIjKlMnOpQrStUvWxYz012345 -o mixed    # a Google Drive file id
  faultlab fetch https://drive.google.com/drive/folders/FOLDER_ID

Downloads are cached under ~/.cache/faultlab/bundles (FAULTLAB_CACHE) and resumed when
interrupted: run the same command again. Every member is checked against the manifest before
anything is installed; golden runs are installed only where their fingerprint is this
machine's (exit 2 otherwise: the campaign and results are still placed).""",
})


def _bundle_parsers(cmd) -> None:
    b = cmd("bundle", "pack a campaign, its golden runs and results into one .tar.gz")
    b.add_argument("campaign", help="campaign file (run it first)")
    b.add_argument("--results", help="results database (default faultlab-results/NAME.sqlite; "
                                     "left out when that default does not exist)")
    b.add_argument("-o", "--output", help="bundle to write (default NAME.bundle.tar.gz)")
    b.add_argument("--threads", type=int, default=0,
                   help="thread count of the golden runs (default: as faultlab run with one "
                        "worker: this machine's cores)")
    b.add_argument("--framework", choices=framework_names(),
                   help="the --framework the campaign was run with")
    b.add_argument("--json", action="store_true")
    _kernel_args(b)
    _allow_args(b)

    f = cmd("fetch", "download a bundle, verify it, install its golden runs")
    f.add_argument("source", metavar="URL|DRIVE_ID",
                   help="http(s) URL of a bundle, a Google Drive file or folder URL, or a "
                        "Drive file id")
    f.add_argument("-o", "--output", metavar="DIR",
                   help="where the campaign and results go (default faultlab-bundles/NAME)")
    f.add_argument("--refresh", action="store_true",
                   help="drop the cached download (and any partial one) and download again")
    f.add_argument("--retries", type=int, default=3,
                   help="retries of a failed transfer within this run, each resumed with a "
                        "Range request (default 3)")
    f.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for the server between bytes (default 60)")
    f.add_argument("--json", action="store_true")
    _kernel_args(f)
    _allow_args(f)


def _kernel_mode(a) -> None:
    """Apply --portable / --native (auto without either: faultlab/determinism.py)."""
    from faultlab.determinism import choose
    choose("portable" if getattr(a, "portable", False) else
           "native" if getattr(a, "native", False) else "auto")


def cmd_bundle(a) -> int:
    """`faultlab bundle`: a campaign, its golden runs and its results as one .tar.gz."""
    from faultlab.bundles.pack import make_bundle
    _kernel_mode(a)
    info = make_bundle(a.campaign, a.output, results=a.results, threads=a.threads,
                       framework=a.framework, say=lambda m: _say(m, a.json))
    m = info.manifest
    if a.json:
        print(json.dumps({"bundle": str(info.path), "size": info.size, "sha256": info.sha256,
                          "manifest": m.to_json()}))
        return 0
    print(f"{printable(info.path)}: {info.size} bytes, sha256 {info.sha256}")
    print(f"  campaign  {m.campaign} ({m.digest})")
    for g in m.golden:
        print(f"  golden    {g.files['golden.json'].rsplit('/', 1)[0]}: {g.workload}, "
              f"{g.threads} thread(s), fingerprint "
              f"{'portable' if g.fingerprint.get('portable') else 'native'}")
    print(f"  results   {m.results or 'none'}")
    return 0


def cmd_fetch(a) -> int:
    """`faultlab fetch`: download (or resume), verify, extract, install golden runs."""
    from faultlab.bundles.fetch import fetch
    from faultlab.determinism import DeterminismError
    if a.retries < 0:
        raise FaultlabError(f"--retries must be at least 0, got {a.retries}")
    if not a.timeout > 0:
        raise FaultlabError(f"--timeout must be positive, got {a.timeout}")
    _kernel_mode(a)
    report = fetch(a.source, a.output, refresh=a.refresh, retries=a.retries,
                   timeout=a.timeout, quiet=a.json or not sys.stderr.isatty(),
                   say=lambda m: _say(m, a.json or not sys.stderr.isatty()))
    if a.json:
        print(json.dumps(report.to_json()))
    else:
        print(f"campaign  {printable(report.campaign)}")
        print(f"results   {printable(report.results) if report.results else 'none in the bundle'}")
        for g in report.golden:
            print(f"golden    {g.workload} ({g.key}, {g.threads} thread(s)): "
                  + (f"installed in {printable(g.directory)}" if g.installed
                     else "NOT installed (fingerprint differs)"))
        print(f"next      {report.run_command()}")
    refused = report.refused
    if refused:
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        raise DeterminismError(refused[0].reason + more + "; the campaign and results are in "
                               + printable(report.campaign.parent))
    return 0


COMMANDS.update({"bundle": cmd_bundle, "fetch": cmd_fetch})


# --- faultlab import-isca --------------------------------------------------------------------

EPILOGS["import-isca"] = """examples:
  faultlab import-isca fault_injection/ISCA_AE_CKPT --framework tf            # earliest epoch
  faultlab import-isca ISCA_AE_CKPT --epoch 30 --framework tf                 # from epoch_29
  faultlab import-isca ISCA_AE_CKPT --epoch 30 --steps 49 --framework tf      # CI: one epoch
  faultlab run ../shared/reference/isca_ae/injections/inj_masked.csv --framework tf

--epoch E is the artifact's target_epoch: it reads DIR/epoch_{E-1} (the state after E epochs) as
the golden checkpoint at step E*49, then trains on fault-free here, recording the golden run
(docs/isca_import.md). Use the same --threads as faultlab run (default: this machine's cores)."""


def _isca_import_parser(cmd) -> None:
    ii = cmd("import-isca", "use the ISCA artifact's golden checkpoints as the golden run")
    ii.add_argument("directory", metavar="DIR",
                    help="the artifact's checkpoint folder (ISCA_AE_CKPT: epoch_K.index/.data)")
    ii.add_argument("--epoch", type=int,
                    help="epoch the golden run starts at, as the artifact's target_epoch (reads "
                         "epoch_{N-1}; default: the earliest the folder allows)")
    ii.add_argument("--framework", choices=framework_names(), default="tf")
    ii.add_argument("--steps", type=int,
                    help="record only this many steps from the checkpoint (CI; default: to the "
                         "end of training)")
    ii.add_argument("--threads", type=int, default=0,
                    help="threads (part of the golden key: as faultlab run's, default cores)")
    ii.add_argument("--json", action="store_true")
    _kernel_args(ii)


def cmd_import_isca(a) -> int:
    """`faultlab import-isca`: artifact checkpoint -> faultlab's golden run (full size)."""
    from faultlab.runner.isca_import import import_isca
    _kernel_mode(a)
    rep = import_isca(a.directory, a.epoch, a.framework, a.steps, a.threads,
                      say=lambda m: _say(m, a.json))
    if a.json:
        print(json.dumps(rep.to_json()))
        return 0
    print(f"imported  {printable(rep.checkpoint)}: {rep.variables} variables matched, Adam "
          f"state {rep.optimizer} (iterations {rep.iterations})")
    if rep.folded:
        print(f"folded    {len(rep.folded)} conv biases into their BatchNorm moving means "
              f"(max |bias| {max(rep.folded.values()):.3g})")
    print(f"golden    {printable(rep.directory)}: steps {rep.origin}..{rep.end} "
          f"(epoch {rep.epoch} on), {rep.threads} thread(s)"
          + (", replacing the earlier one" if rep.replaced else ""))
    print(f"next      faultlab run FILE --framework {rep.config.framework.value}"
          + (f" --threads {a.threads}" if a.threads else ""))
    return 0


COMMANDS["import-isca"] = cmd_import_isca


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the command; its exit code (errors are one line)."""
    parser = _parser()
    a = parser.parse_args(argv)
    if not a.command:
        parser.print_help()
        return 2
    from faultlab.workloads.allow import allowing
    try:
        with allowing(getattr(a, "allow_workload", None) or ()):
            return COMMANDS[a.command](a)
    except FaultlabError as e:
        # one line whatever the message carries: the sources escape the user's text they
        # quote (file names, cells); this is the safety net for any that does not
        print(f"faultlab: error: {printable(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("\nfaultlab: interrupted; finished trials are saved, run again to resume",
              file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
