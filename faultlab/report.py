"""Text reports: the one table formatter, and every table and summary faultlab prints with it
(results, coverage, overhead, validation, workloads); the crash harness's tables use it too."""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from faultlab.results.stats import OutcomeRow
    from faultlab.results.store import TrialResult
    from faultlab.workloads.base import WorkloadConfig, WorkloadInfo


def ascii_cell(s: Any) -> str:
    """A cell as printable ASCII (names from files may hold anything)."""
    return str(s).encode("ascii", "backslashreplace").decode("ascii")


def clip(s: str, width: int) -> str:
    return s if len(s) <= width else s[: max(0, width - 3)] + "..."


def table(header: Sequence[str], rows: Sequence[Sequence[Any]],
          right: Collection[int] = ()) -> str:
    """A fixed-width ASCII table: the header, a rule, the rows; columns in `right` (indices)
    right-aligned, the others left-aligned; trailing spaces stripped."""
    cells = [[ascii_cell(c) for c in row] for row in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


# --- results ------------------------------------------------------------------------------------

def format_summary(rows: Sequence[OutcomeRow]) -> str:
    """A fixed-width ASCII table: outcome, count, rate %, CI (the total row below a rule)."""
    conf = rows[0].confidence if rows else 0.95
    ci_name = f"{conf * 100:g}% CI"
    body, total = [], None
    for r in rows:
        cells = [r.outcome, str(r.count), f"{r.rate * 100:.1f}",
                 f"[{r.ci_low * 100:5.1f}, {r.ci_high * 100:5.1f}]"]
        if r.is_total:
            cells[3] = ""
            total = cells
        else:
            body.append(cells)
    text = table(["outcome", "count", "rate %", ci_name], body + ([total] if total else []),
                 right={1, 2})
    if total is not None:       # a rule above the total row
        lines = text.split("\n")
        lines.insert(len(lines) - 1, lines[1])
        text = "\n".join(lines)
    return text


def describe_fault(f: dict) -> str:
    """Short description of one fault dict: ``layer/site[.tensor] model``, e.g.
    ``conv1/fwd_output bitflip`` or ``dense/param.bias zero``."""
    if "process" in f:                     # a process fault (faultlab/process_faults.py)
        who = f"node {f['node']}" if f["process"] == "kill_node" else f"rank {f['rank']}"
        phase = f.get("phase", "step")
        return f"{f['process']} {who}" + ("" if phase == "step" else f" in {phase}")
    where = f"{f.get('layer') or '*'}/{f.get('site', '?')}"
    if f.get("tensor"):
        where += f".{f['tensor']}"
    model = f.get("value")
    if model == "bitflip" and f.get("bit") is not None:
        model = f"bitflip:{f['bit']}"
    return f"{where} {model}" if model else where


def describe_faults(faults: Sequence[dict]) -> str:
    """The first fault described, and how many more; ``(control)`` for none."""
    if not faults:
        return "(control)"
    text = describe_fault(faults[0])
    return text + (f" +{len(faults) - 1} more" if len(faults) > 1 else "")


def _acc(x: float | None) -> str:
    if x is None:
        return "-"
    if not math.isfinite(x):
        return str(float(x))         # nan, inf, -inf
    return f"{x:.4f}"


def format_results(results: Sequence[TrialResult], fault_width: int = 60) -> str:
    """A per-trial ASCII table: trial id, fault (layer/site and value model), injection step,
    outcome, final test accuracy / golden, and ``=`` when the trial was bit-exact with the
    golden run. A detection column appears when any result has detection data."""
    results = list(results)
    with_det = any(r.detected is not None for r in results)
    header = ["trial", "fault", "step", "outcome", "test acc / golden", "exact"]
    if with_det:
        header.append("detected")
    rows = []
    for r in results:
        row = [r.trial_id, clip(describe_faults(r.faults), fault_width),
               "-" if r.inject_step is None else str(r.inject_step), r.outcome,
               f"{_acc(r.final_test_acc)} / {_acc(r.golden_test_acc)}",
               "=" if r.bit_exact else ""]
        if with_det:
            if r.detected is None:
                row.append("-")
            elif r.detected:
                row.append(f"step {r.detect_step}" if r.detect_step is not None else "yes")
            else:
                row.append("no")
        rows.append(row)
    return table(header, rows, right={2})


def group_runs(results: Iterable[TrialResult]) -> list[tuple[str, list[TrialResult]]]:
    """Results grouped by stored campaign id (one group per run: a campaign run plainly and
    with ``--detect`` is stored under the digest and the digest + "+detect"), groups in order of
    their first result, results in stored order."""
    groups: dict[str, list] = {}
    for r in results:
        groups.setdefault(r.campaign, []).append(r)
    return list(groups.items())


def run_title(campaign_id: str, n: int) -> str:
    """``campaign abc123, plain run: 3 trial(s)`` (``--detect run`` for "abc123+detect")."""
    digest, plus, run = campaign_id.partition("+")
    what = f"--{run} run" if plus else "plain run"
    return f"campaign {digest}, {what}: {n} trial(s)"


def format_report(results: Sequence[TrialResult]) -> str:
    """`faultlab report`: each run of each campaign on its own (each trial counted once per
    run): the per-trial table, the outcome summary, and for a protected run the summary after
    detection and recovery and the detection coverage."""
    from faultlab.results.coverage import coverage
    from faultlab.results.stats import summarize, summarize_after_recovery
    parts = []
    for cid, rs in group_runs(results):
        lines = [run_title(cid, len(rs)), format_results(rs), "", format_summary(summarize(rs))]
        dist = format_distributed(rs)
        if dist:
            lines += ["", dist]
        if any(r.detected is not None for r in rs):
            lines += ["", "after detection and recovery:",
                      format_summary(summarize_after_recovery(rs)), "",
                      format_coverage(coverage(rs))]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) if parts else "no results"


# --- crash campaigns (faultlab crash) -----------------------------------------------------------

def format_crash(reports: Sequence[Mapping]) -> str:
    """The tables of crash campaigns, from their per-engine reports (``EngineReport.to_json()``,
    as ``faultlab crash --json`` prints and the results store keeps them): one for kill
    campaigns, one for power loss."""
    from faultlab.checkpointing.api import Phase
    parts = []
    kill = [j for j in reports if j.get("mode") == "kill"]
    if kill:
        head = ("engine", "kills", "recoveries", "torn", "mixed", "lost-committed",
                "incomplete-state", "steps lost mean/max", "runs bit-identical",
                "kills by phase s/w/c/i")
        rows = []
        for j in kill:
            phases = j.get("kills_by_phase") or {}
            ph = "/".join(str(phases.get(p.value, 0)) for p in Phase)
            rows.append((j["engine"], j["kills"], j["recoveries"], j["torn"], j["mixed"],
                         j["lost_committed"], j["incomplete_state"],
                         f"{j['steps_lost_mean']:.2f} / {j['steps_lost_max']}",
                         f"{j['runs_bit_identical']}/{j['runs']}", ph))
        parts.append(table(head, rows, right=range(1, len(head))))
    power = [j for j in reports if j.get("mode") == "power-loss"]
    if power:
        head = ("engine (power loss)", "crash points", "images", "torn", "mixed",
                "lost-committed", "steps lost mean/max", "resumed bit-identical", "note")
        rows = []
        for j in power:
            rows.append((j["engine"], j["crash_points"], j["images"], j["torn"], j["mixed"],
                         j["lost_committed"],
                         f"{j['steps_lost_mean']:.2f} / {j['steps_lost_max']}",
                         f"{j['resumes_bit_identical']}/{j['resumes']}", j.get("note") or ""))
        parts.append(table(head, rows, right=range(1, len(head))))
    return "\n\n".join(parts)


def crash_title(row: Mapping) -> str:
    """``crash campaign RUN_ID (TIME): kill, workload mlp, 24 steps, checkpoint every 1,
    seed 0`` for a stored crash report row (faultlab.results.ResultStore.crash_reports)."""
    bits = [row["mode"], f"workload {row['workload']}"]
    if row.get("steps") is not None:
        bits.append(f"{row['steps']} steps")
    if row.get("every") is not None:
        bits.append(f"checkpoint every {row['every']}")
    if row.get("seed") is not None:
        bits.append(f"seed {row['seed']}")
    return f"crash campaign {row['run_id']} ({row['recorded_at']}): {', '.join(bits)}"


def group_crash(rows: Iterable[Mapping]) -> list[tuple[str, list[Mapping]]]:
    """Stored crash report rows grouped by campaign (``run_id``), in stored order."""
    groups: dict[str, list] = {}
    for r in rows:
        groups.setdefault(r["run_id"], []).append(r)
    return list(groups.items())


def format_crash_runs(rows: Sequence[Mapping]) -> str:
    """`faultlab report` on stored crash campaigns: per campaign a title line and its table."""
    parts = []
    for _, rs in group_crash(rows):
        parts.append(crash_title(rs[0]) + "\n" + format_crash([r["report"] for r in rs]))
    return "\n\n".join(parts)


def _recoveries(d: dict) -> str:
    got = [f"{r['source']}@{'-' if r['step'] is None else r['step']}"
           for r in d.get("recoveries", ()) if r["reason"] == "restart"]
    return ", ".join(got) if got else "-"


def format_distributed(results: Sequence[TrialResult]) -> str:
    """Multi-process trials (runner/ranks.py): per trial the process faults fired, each
    restart's recovery (source@step: memory = snapshots in host / peer memory, disk = the
    engine's file), steps of work lost, recovery seconds, and detection after rollback; then
    the campaign's crash consistency (torn, mixed, lost-committed: all must be 0), the work
    lost to kills, and the cost of protection. "load s": the ranks' agreement and state load;
    "down s": from the fault to the restarted job holding its state again (the agent noticing,
    the restart, the rendezvous, building the model, the load). Empty when no trial ran as a
    job."""
    runs = [r for r in results if "distributed" in r.metrics]
    if not runs:
        return ""
    header = ["trial", "ranks", "fired", "recovered from", "lost", "load s", "down s",
              "restarts", "exact"]
    prot = any("protected" in r.metrics for r in runs)
    if prot:
        header += ["detected", "after"]
    rows = []
    torn = mixed = lost_committed = lost = 0
    rec_s: list[float] = []
    for r in runs:
        d = r.metrics["distributed"]
        fired = [describe_fault(f) for f in d.get("fired", ())]
        secs = [x["seconds"] for x in d.get("recoveries", ()) if x["reason"] == "restart"]
        rec_s += secs
        lost += d.get("steps_lost", 0)
        torn += d.get("torn", 0)
        mixed += d.get("mixed", 0)
        lost_committed += d.get("lost_committed", 0)
        row = [r.trial_id, str(r.metrics.get("processes", 1)),
               clip("; ".join(fired) or "-", 40), clip(_recoveries(d), 30),
               str(d.get("steps_lost", 0)), f"{max(secs):.2f}" if secs else "-",
               f"{max(d['downtime_s']):.1f}" if d.get("downtime_s") else "-",
               str(d.get("restarts", 0)), "=" if r.bit_exact else ""]
        if prot:
            p = r.metrics.get("protected", {})
            dets = p.get("detections", [])
            row += [f"step {dets[0]['step']} ({dets[0]['detector']})" if dets else "no",
                    r.outcome_after or "-"]
        rows.append(row)
    lines = ["multi-process trials:", table(header, rows, right={1, 4, 5, 6, 7})]
    kills = sum(len(r.metrics["distributed"].get("fired", ())) for r in runs)
    lines.append(f"crash consistency: torn {torn}, mixed {mixed}, lost-committed "
                 f"{lost_committed} (all must be 0); {kills} process fault(s) fired, "
                 f"{lost} step(s) of work lost"
                 + (f", recovery {min(rec_s):.2f}-{max(rec_s):.2f} s" if rec_s else ""))
    return "\n".join(lines)


def format_coverage(c: dict, golden_fp: dict | None = None) -> str:
    """Detection coverage (:func:`faultlab.results.coverage.coverage`) as text: the headline
    rate, a table per outcome class, latency, recovery, false positives, before -> after."""
    lines = []
    if c["coverage"] is not None:
        lines.append(f"coverage: {c['non_masked_detected']}/{c['non_masked']} non-masked trials "
                     f"detected ({100 * c['coverage']:.1f}%, 95% CI "
                     f"[{100 * c['ci_low']:.1f}, {100 * c['ci_high']:.1f}])")
    lines.append("")
    lines.append(table(["outcome", "trials", "detected", "rate %", "95% CI"],
                       [[row["outcome"], row["trials"], row["detected"],
                         f"{100 * row['rate']:.1f}",
                         f"[{100 * row['ci_low']:5.1f}, {100 * row['ci_high']:5.1f}]"]
                        for row in c["by_outcome"]], right={1, 2, 3}))
    lines.append("")
    lat = c["latency_steps"]
    if lat["n"]:
        lines.append(f"detection latency: median {lat['median']} step(s), max {lat['max']}")
    if c["detected"]:
        lines.append(f"recovered: {c['recovered']}/{c['detected']} detected trials; Masked after "
                     f"recovery: {c['masked_after']}/{c['detected']}; steps of work lost (replayed): "
                     f"{c['steps_lost']}; median recovery {1e3 * (c['recovery_s_median'] or 0):.0f} ms")
    lines.append(f"false positives: {c['control_false_positives']} of {c['control_trials']} "
                 f"fault-free control trial(s); alarms on Masked trials: {c['masked_with_alarm']}")
    if golden_fp is not None:
        lines.append(f"false positives on golden runs: {golden_fp['alarms']} alarm(s) in "
                     f"{golden_fp['steps']} step(s)")
    if c["before_after"]:
        lines.append("")
        lines.append("outcome before -> after detection and recovery")
        for before, afters in c["before_after"].items():
            lines.append(f"  {before:18s} -> " + ", ".join(f"{k} {v}" for k, v in sorted(afters.items())))
    return "\n".join(lines)


# --- overhead -----------------------------------------------------------------------------------

def format_detection(res: dict, cfg: WorkloadConfig, threads: int, check: bool) -> str:
    """`faultlab detect`: the timed variants of :func:`faultlab.replay.overhead.detection_overhead`
    as a table, with the workload above it and the artifact's figure below (with `check`)."""
    rows = [[r["variant"], f"{r['median_ms']:.1f}", f"{r['ratio']:.4f}", f"{r['paired']:.4f}",
             f"{100 * (r['paired'] - 1):+.2f}",
             "-" if r.get("isolated_ms") is None else f"{r['isolated_ms']:.2f}",
             "-" if r.get("isolated_ratio") is None else f"{100 * (r['isolated_ratio'] - 1):+.2f}",
             r["steps"]] for r in res["rows"]]
    lines = [f"workload: {cfg.workload} ({cfg.replicas} replicas x {cfg.per_replica_batch}, "
             f"width {cfg.width}, {cfg.framework.value}, {threads} thread(s)); blocks of 2 "
             f"steps interleaved; ratio = median step / none's, paired = median of per-round ratios",
             table(["variant", "ms/step", "ratio", "paired", "overhead %", "isolated ms",
                    "isolated %", "steps"], rows),
             "isolated = the signals' and detectors' own cost per step, timed alone on live state"]
    if check:
        lines.append(f"the ISCA'23 artifact's figure: {100 * res['artifact']:.3f}% (its check run "
                     f"10,000x a step and amortised; ours is measured end to end)")
    return "\n".join(lines)


def format_replay(res: dict, cfg: WorkloadConfig, steps: int, checkpoint_every: int,
                  every: int | None) -> str:
    """`faultlab replay`: the variants of :func:`faultlab.replay.overhead.replay_overhead` as a
    table; with `every` (rollback + replay every so many steps) the recovery figures too."""
    rows = [[r["variant"], f"{r['wall_s']:.2f}", f"{r['ratio']:.4f}",
             f"{100 * (r['ratio'] - 1):+.2f}"] for r in res["rows"]]
    lines = [f"workload: {cfg.workload}, {steps} steps, checkpoint every {checkpoint_every}"
             + (f", rollback + replay every {every}" if every is not None else ""),
             table(["variant", "wall s", "ratio", "overhead %"], rows)]
    rec = res["recovery"]
    if every is not None and rec["count"]:
        lines.append(format_recovery(rec, res["state_mb"]))
        lines.append(f"the ISCA'23 artifact's figure: {100 * res['artifact']:.2f}% (two iterations "
                     f"re-executed every ten, amortised; no checkpoint reloaded)")
    return "\n".join(lines)


def format_recovery(rec: dict, state_mb: float) -> str:
    """The recovery figures of replay_overhead as two lines: the total against its bound, and
    each part (load, replayed steps) against its own."""
    steps = rec["median_steps_replayed"]
    per_step = rec["median_replay_s"] / steps if steps else 0.0
    verdict = "within" if rec["median_recovery_s"] <= rec["bound_s"] else "over"
    return (f"recovery (detection -> training resumed): median {1e3 * rec['median_recovery_s']:.1f} ms "
            f"= load {1e3 * rec['median_load_s']:.1f} ms + replay {1e3 * rec['median_replay_s']:.1f} ms "
            f"of {steps:.0f} step(s); bound {1e3 * rec['bound_s']:.1f} ms ({verdict}; "
            f"x{rec['median_recovery_s'] / rec['bound_s']:.3f})\n"
            f"  load bound {1e3 * rec['load_bound_s']:.1f} ms (state {state_mb:.1f} MB at 0.9 x "
            f"the disk's {rec['read_bandwidth_mb_s']:.0f} MB/s, O_DIRECT; at the page cache's "
            f"{rec['cache_read_mb_s']:.0f} MB/s the whole bound is "
            f"{1e3 * rec['cache_bound_s']:.1f} ms); replayed step {1e3 * per_step:.1f} ms vs "
            f"{1e3 * rec['own_step_s']:.1f} ms first time (unprotected step {1e3 * rec['step_s']:.1f} ms; "
            f"bound with it {1e3 * rec['plain_bound_s']:.1f} ms)")


# --- campaigns and workloads --------------------------------------------------------------------

def format_validation(info: Mapping) -> str:
    """`faultlab validate`'s line for a valid campaign (:meth:`Campaign.info`)."""
    return (f"{info['campaign']}: valid {info['format']} campaign, {info['trials']} trial(s), "
            f"{info['faults']} fault(s) on {', '.join(info['workloads'])}")


def workload_entries(infos: Iterable[WorkloadInfo]) -> list[dict]:
    """Registry entries as JSON-able dicts: name, description, frameworks, defaults."""
    return [{"name": w.name, "description": w.description, "frameworks": list(w.frameworks),
             "defaults": w.defaults} for w in infos]


def format_workloads(entries: Sequence[dict]) -> str:
    """The built-in workloads (:func:`workload_entries`), two lines each, and how to add one."""
    lines = []
    for w in entries:
        d = w["defaults"]
        lines.append(f"{w['name']:12s} {w['description']}")
        lines.append(f"{'':12s} defaults: {d['replicas']} replicas x batch {d['per_replica_batch']}, "
                     f"width {d['width']}, input {d['input_size']}, {d['dataset']}, "
                     f"{d['epochs']} epochs x {d['steps_per_epoch']} steps")
    lines.append("your own: module:function returning a TorchWorkload (docs/workloads.md)")
    return "\n".join(lines)


def operand_rows(shapes: Mapping) -> dict[str, dict[str, list[int]]]:
    """A backend's operand-shape table (layer -> site -> (shape, ...)) as JSON-able lists."""
    return {layer: {(s.value if hasattr(s, "value") else s): list(shape)
                    for s, (shape, _) in sites.items()} for layer, sites in shapes.items()}


def format_layers(name: str, cfg: WorkloadConfig, rows: Mapping[str, Mapping]) -> str:
    """A workload's layers (:func:`operand_rows`) with their weight, input and output shapes."""
    return "\n".join([
        f"{name} ({cfg.framework.value}, per-replica batch {cfg.per_replica_batch}; "
        f"canonical layout NHWC / HWIO / (in, out))",
        table(["layer", "weight", "in", "out"],
              [[layer, tuple(sites.get("fwd_weight", [])), tuple(sites.get("fwd_input", [])),
                tuple(sites.get("fwd_output", []))] for layer, sites in rows.items()])])
