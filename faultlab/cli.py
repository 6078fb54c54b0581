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

from .errors import FaultlabError

EPILOGS = {
    "run": """examples:
  faultlab run campaigns/inj_masked.csv
  faultlab run campaigns/mixed.csv --workers 2 --results out/mixed.sqlite
  faultlab run ../shared/reference/isca_ae/injections/inj_masked.csv --framework torch --json
  faultlab run campaigns/inj_slow_degrade.csv --expect SlowDegrade   # exit 1 if not

An interrupted campaign resumes where it stopped: run the same command again.""",
    "validate": """examples:
  faultlab validate campaigns/mixed.csv
  faultlab validate ../shared/reference/isca_ae/injections/inj_slow_degrade.csv --json""",
    "workloads": """examples:
  faultlab workloads
  faultlab workloads --layers resnet18 --json""",
    "report": """examples:
  faultlab report faultlab-results/inj_masked.sqlite
  faultlab report faultlab-results/mixed.sqlite --csv mixed.csv""",
}


class _Parser(argparse.ArgumentParser):
    """argparse with a usage error on one line, like every other bad input (exit 2)."""

    def error(self, message: str):
        command = self.prog.split(None, 1)[1:]          # "faultlab run" -> ["run"]
        where = f"{command[0]}: " if command else ""
        message = " ".join(message.split())
        self.exit(2, f"faultlab: error: {where}{message} (see '{self.prog} --help')\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="faultlab",
        description="Inject hardware faults into DL training, classify what they do, "
                    "detect and recover.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'faultlab COMMAND --help' for examples.")
    from . import __version__
    p.add_argument("--version", action="version", version=f"faultlab {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def cmd(name, help_):
        return sub.add_parser(name, help=help_, description=help_, epilog=EPILOGS.get(name),
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    r = cmd("run", "run a campaign: golden run, trials, outcomes, summary")
    r.add_argument("campaign", help="campaign file (ISCA key/value or columnar CSV)")
    r.add_argument("--framework", choices=["torch", "tf"], help="override the file's framework")
    r.add_argument("--workers", type=int, default=1, help="trial worker processes (default 1)")
    r.add_argument("--threads", type=int, default=0,
                   help="threads per worker (default: cores / workers); part of the golden key")
    r.add_argument("--results", help="results database (default faultlab-results/NAME.sqlite)")
    r.add_argument("--fresh", action="store_true", help="discard earlier results of this campaign")
    r.add_argument("--timeout", type=float, default=3600.0, help="seconds before a trial is a Hang")
    r.add_argument("--rule", action="append", default=[], metavar="NAME=VALUE",
                   help="change an outcome threshold (see docs/outcomes.md)")
    r.add_argument("--expect", metavar="OUTCOME", help="exit 1 unless every trial has OUTCOME")
    r.add_argument("--csv", help="also export the results to this CSV file")
    r.add_argument("--json", action="store_true", help="one JSON document on stdout")

    v = cmd("validate", "check a campaign file against its workloads (no training)")
    v.add_argument("campaign")
    v.add_argument("--framework", choices=["torch", "tf"])
    v.add_argument("--json", action="store_true")

    w = cmd("workloads", "list built-in workloads (and a workload's layers)")
    w.add_argument("--layers", metavar="WORKLOAD", help="list the layers and operand shapes")
    w.add_argument("--framework", choices=["torch", "tf"], default="torch")
    w.add_argument("--json", action="store_true")

    rp = cmd("report", "summarise a results database; export CSV / Parquet")
    rp.add_argument("results")
    rp.add_argument("--campaign", help="campaign digest (default: all)")
    rp.add_argument("--csv")
    rp.add_argument("--parquet")
    rp.add_argument("--json", action="store_true")
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

def _default_threads(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def cmd_validate(a) -> int:
    from .campaigns import load_campaign
    from .runner import validate_trials
    camp = load_campaign(a.campaign, a.framework)
    validate_trials(camp.trials)
    info = {"campaign": camp.path, "format": camp.format, "digest": camp.digest,
            "trials": len(camp.trials), "faults": sum(len(t.faults) for t in camp.trials),
            "workloads": sorted({f"{t.workload.framework.value}:{t.workload.workload}" for t in camp.trials}),
            "valid": True}
    if a.json:
        print(json.dumps(info))
    else:
        print(f"{camp.path}: valid {camp.format} campaign, {info['trials']} trial(s), "
              f"{info['faults']} fault(s) on {', '.join(info['workloads'])}")
    return 0


def cmd_workloads(a) -> int:
    from .workloads.base import BUILTINS, default_config
    if a.layers:
        from .backend import load_backend
        cfg = default_config(a.layers, framework=a.framework)
        table = load_backend(cfg.framework).operand_shapes(cfg)
        rows = {layer: {(s.value if hasattr(s, "value") else s): list(shape)
                        for s, (shape, _) in sites.items()} for layer, sites in table.items()}
        if a.json:
            print(json.dumps({"workload": a.layers, "config": cfg.to_dict(), "layers": rows}))
        else:
            print(f"{a.layers} ({a.framework}, per-replica batch {cfg.per_replica_batch}; "
                  f"canonical layout NHWC / HWIO / (in, out))")
            for layer, sites in rows.items():
                io = f"in {tuple(sites.get('fwd_input', []))} out {tuple(sites.get('fwd_output', []))}"
                print(f"  {layer:40s} weight {tuple(sites.get('fwd_weight', []))}  {io}")
        return 0
    items = [{"name": w.name, "description": w.description, "frameworks": list(w.frameworks),
              "defaults": w.defaults} for w in BUILTINS.values()]
    if a.json:
        print(json.dumps({"workloads": items}))
    else:
        for w in items:
            d = w["defaults"]
            print(f"{w['name']:12s} {w['description']}")
            print(f"{'':12s} defaults: {d['replicas']} replicas x batch {d['per_replica_batch']}, "
                  f"width {d['width']}, input {d['input_size']}, {d['dataset']}, "
                  f"{d['epochs']} epochs x {d['steps_per_epoch']} steps")
        print("your own: module:function returning a TorchWorkload (docs/workloads.md)")
    return 0


def _results_path(a, campaign_path: str) -> Path:
    if a.results:
        return Path(a.results)
    return Path("faultlab-results") / (Path(campaign_path).stem + ".sqlite")


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


def cmd_run(a) -> int:
    from .campaigns import load_campaign
    from .executor import LocalPool
    from .outcomes import OutcomeRules
    from .results import OUTCOMES, ResultStore, format_results, format_summary, summarize, to_csv
    from .runner import validate_trials

    if a.workers < 1:
        raise FaultlabError("--workers must be at least 1")
    if a.expect and a.expect not in OUTCOMES:
        raise FaultlabError(f"--expect: unknown outcome {a.expect!r} (one of: {', '.join(OUTCOMES)})")
    rules = OutcomeRules.from_pairs(a.rule)
    stop_after = _stop_after()
    camp = load_campaign(a.campaign, a.framework)
    validate_trials(camp.trials)
    threads = a.threads or _default_threads(a.workers)
    store = ResultStore(_results_path(a, camp.path))
    with store:
        if a.fresh:
            store.clear(camp.digest)
        done = store.done(camp.digest)
        todo = [t for t in camp.trials if t.trial_id not in done]
        quiet = a.json
        if done:
            _say(f"resuming: {len(done)} of {len(camp.trials)} trial(s) already done "
                 f"in {store.path}", quiet)
        if todo:
            with LocalPool(min(a.workers, len(todo)), threads, rules, a.timeout) as pool:
                configs = {t.workload.key(): t.workload for t in todo}
                _say(f"golden run: {len(configs)} configuration(s) "
                     f"({', '.join(sorted({c.workload for c in configs.values()}))}), "
                     f"cached after the first time", quiet)
                pool.golden(configs.values())
                bar = Progress(len(todo), "trials", enabled=not quiet)
                bar.update(note="running")

                stored = 0

                def on_result(res):
                    nonlocal stored
                    store.add(res)
                    bar.update(res.outcome)
                    stored += 1
                    if stop_after is not None and stored >= stop_after:
                        # test hook (FAULTLAB_STOP_AFTER): simulate Ctrl-C after N stored results
                        raise KeyboardInterrupt
                pool.trials(todo, camp.digest, on_result)
        results = store.results(camp.digest)
        rows = summarize(results)
        if a.csv:
            to_csv(results, a.csv)
        if a.json:
            print(json.dumps({"campaign": camp.path, "digest": camp.digest,
                              "results_db": str(store.path),
                              "summary": [r.__dict__ for r in rows],
                              "trials": [r.to_dict(strict=True) for r in results]},
                             default=str))
        else:
            print(format_results(results))
            print()
            print(format_summary(rows))
    if a.expect and any(r.outcome != a.expect for r in results):
        _say(f"expected every trial to be {a.expect}: "
             f"{', '.join(sorted({r.outcome for r in results}))}")
        return 1
    return 0


def cmd_report(a) -> int:
    from .results import (ResultStore, format_results, format_summary, summarize, to_csv,
                          to_parquet)
    if not Path(a.results).is_file():
        raise FaultlabError(f"{a.results}: no such results database")
    with ResultStore(a.results) as store:
        results = store.results(a.campaign)
    rows = summarize(results)
    if a.csv:
        to_csv(results, a.csv)
    if a.parquet:
        to_parquet(results, a.parquet)
    if a.json:
        print(json.dumps({"summary": [r.__dict__ for r in rows],
                          "trials": [r.to_dict(strict=True) for r in results]}, default=str))
    else:
        print(format_results(results))
        print()
        print(format_summary(rows))
    return 0


COMMANDS = {"run": cmd_run, "validate": cmd_validate, "workloads": cmd_workloads,
            "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    a = parser.parse_args(argv)
    if not a.command:
        parser.print_help()
        return 2
    try:
        return COMMANDS[a.command](a)
    except FaultlabError as e:
        print(f"faultlab: error: {e}", file=sys.stderr)
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
