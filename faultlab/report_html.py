"""`faultlab report --html / --figures`: one self-contained HTML report of a results database
(Vega-Lite charts rendered by the Vega JavaScript bundled into the file: it opens offline, no
network at all), and each figure as SVG and PNG for papers. Framework-free.

The charts are plain Vega-Lite specs (JSON dicts) built from :func:`faultlab.results.load` /
:func:`faultlab.results.curves`; ``vl-convert-python`` supplies the JavaScript bundle and the
static export (no browser needed). Nothing here imports a framework.
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from faultlab.errors import FaultlabError, printable
from faultlab.report import format_distributed, group_runs
from faultlab.results.stats import wilson_interval
from faultlab.results.store import OUTCOMES, TrialResult

#: trials whose curves are drawn when --trials is not given
DEFAULT_CURVES = 12

#: the dimensions outcome rates are broken down by (DataFrame column, title)
DIMENSIONS = (("site", "site"), ("layer", "layer"), ("value", "value model"),
              ("bit", "bit position"), ("replica", "replica"))

#: outcome colours, in OUTCOMES order (Masked green, NaN/Inf reds, degrades oranges/purples)
COLORS = ("#4c9a2a", "#d62728", "#ff7f0e", "#e377c2", "#8c564b", "#bcbd22", "#9467bd",
          "#17becf", "#1f1f1f", "#7f7f7f")

#: readable text in every chart (>= 12 px)
CONFIG = {"font": "system-ui, -apple-system, Segoe UI, Roboto, sans-serif",
          "axis": {"labelFontSize": 12, "titleFontSize": 13, "labelLimit": 300},
          "legend": {"labelFontSize": 12, "titleFontSize": 13},
          "header": {"labelFontSize": 13, "titleFontSize": 13},
          "title": {"fontSize": 14}, "text": {"fontSize": 12},
          "view": {"stroke": "#ddd"}}

WIDTH = 1000            # px the charts of a page may take (the page is 1100 px wide at most)


def _vlc():
    try:
        import vl_convert
    except ImportError:
        raise FaultlabError("the HTML report and figures need the package 'vl-convert-python', "
                            "which is not installed (pip install vl-convert-python)") from None
    return vl_convert


def _clean(v: Any) -> Any:
    """A cell as strict JSON: NaN / Inf / pandas NA -> None, numpy scalars -> Python."""
    if v is None:
        return None
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        try:
            v = v.item()
        except (ValueError, TypeError):
            pass
    if isinstance(v, float) and not math.isfinite(v):
        return None
    try:
        import pandas as pd
        if v is pd.NA or v is pd.NaT:
            return None
    except ImportError:
        pass
    return v


def _records(df) -> list[dict]:
    return [{k: _clean(v) for k, v in row.items()} for row in df.to_dict("records")]


def _outcome_scale(present: Iterable[str]) -> dict:
    have = set(present)
    dom = [o for o in OUTCOMES if o in have]
    return {"domain": dom, "range": [COLORS[OUTCOMES.index(o)] for o in dom]}


# --- views: which outcome of which run a chart counts --------------------------------------------

def views(df) -> list[tuple[str, Any, str]]:
    """(label, rows, outcome column) per run: a plain run's outcomes; a --detect run's outcomes
    after recovery (and before recovery too when the file has no plain run of that campaign).
    Every trial is counted once per view."""
    campaigns = list(dict.fromkeys(df["campaign"]))
    many = len(campaigns) > 1
    out = []
    for c in campaigns:
        sub = df[df["campaign"] == c]
        runs = list(dict.fromkeys(sub["run"]))
        for run in runs:
            rows = sub[sub["run"] == run]
            prefix = f"{c[:8]} " if many else ""
            if run == "plain":
                out.append((f"{prefix}plain", rows, "outcome"))
            else:
                if "plain" not in runs:
                    out.append((f"{prefix}{run}: before recovery", rows, "outcome"))
                out.append((f"{prefix}{run}: after recovery", rows, "outcome_final"))
    return out


def rate_rows(df, column: str) -> list[dict]:
    """Per view, value of `column` and outcome: count k of n trials, rate, Wilson 95%."""
    rows = []
    for label, sub, oc in views(df):
        sub = sub[sub[column].notna()]
        for group, g in sub.groupby(column, sort=True):
            n = len(g)
            counts = g[oc].value_counts()
            for o in OUTCOMES:
                k = int(counts.get(o, 0))
                if not k:
                    continue
                lo, hi = wilson_interval(k, n)
                rows.append({"view": label, "group": str(_clean(group)), "outcome": o, "k": k,
                             "n": n, "rate": k / n, "lo": lo, "hi": hi})
    return rows


def harm_rows(df, x: str, y: str) -> list[dict]:
    """Per view and (x, y) cell: the share of trials not Masked, with the count."""
    rows = []
    for label, sub, oc in views(df):
        sub = sub[sub[x].notna() & sub[y].notna()]
        for (a, b), g in sub.groupby([x, y], sort=True):
            n = len(g)
            k = int((g[oc] != "Masked").sum())
            lo, hi = wilson_interval(k, n)
            rows.append({"view": label, x: str(_clean(a)), y: str(_clean(b)), "n": n, "k": k,
                         "rate": k / n, "lo": lo, "hi": hi})
    return rows


# --- chart specs ---------------------------------------------------------------------------------

def _view_order(rows: Sequence[dict]) -> list[str]:
    return list(dict.fromkeys(r["view"] for r in rows))


def _nviews(rows: Sequence[dict]) -> int:
    return max(1, len({r["view"] for r in rows}))


def rate_chart(rows: list[dict], title: str) -> dict:
    """Outcome rates per group with Wilson 95% intervals, one panel per view."""
    nv = _nviews(rows)
    groups = len({r["group"] for r in rows})
    enc_y = {"field": "group", "type": "nominal", "title": title, "sort": "ascending"}
    tooltip = [{"field": f} for f in ("view", "group", "outcome", "k", "n")] + [
        {"field": f, "format": ".1%"} for f in ("rate", "lo", "hi")]
    color = {"field": "outcome", "type": "nominal", "title": "outcome",
             "scale": _outcome_scale(r["outcome"] for r in rows)}
    return {
        "title": f"outcome rates by {title} (Wilson 95% intervals)",
        "data": {"values": rows},
        "facet": {"column": {"field": "view", "type": "nominal", "title": None,
                             "sort": _view_order(rows)}},
        "spec": {
            "width": max(200, min(440, (WIDTH - 220) // nv - 20)),
            # with yOffset the step is each outcome's sub-band: a group is outs x 11 px
            "height": {"step": 11} if groups else 40,
            "layer": [
                {"mark": {"type": "rule", "strokeWidth": 1.5},
                 "encoding": {"y": enc_y, "yOffset": {"field": "outcome"},
                              "x": {"field": "lo", "type": "quantitative",
                                    "scale": {"domain": [0, 1]}, "axis": {"format": "%"},
                                    "title": "share of trials"},
                              "x2": {"field": "hi"}, "color": color, "tooltip": tooltip}},
                {"mark": {"type": "point", "filled": True, "size": 40},
                 "encoding": {"y": enc_y, "yOffset": {"field": "outcome"},
                              "x": {"field": "rate", "type": "quantitative"},
                              "color": color, "tooltip": tooltip}},
            ]},
        "config": CONFIG,
    }


def heatmap(rows: list[dict], x: str, y: str, xtitle: str, ytitle: str) -> dict:
    """Share of trials not Masked per (x, y) cell, one panel per view, counts in the cells."""
    nv = _nviews(rows)
    nx = max(1, len({r[x] for r in rows}))
    step = max(14, min(40, ((WIDTH - 220) // nv) // nx))
    enc = {"x": {"field": x, "type": "nominal", "title": xtitle, "sort": "ascending"},
           "y": {"field": y, "type": "nominal", "title": ytitle, "sort": "ascending"}}
    tooltip = [{"field": "view"}, {"field": x}, {"field": y}, {"field": "k", "title": "not Masked"},
               {"field": "n", "title": "trials"}, {"field": "rate", "format": ".1%"},
               {"field": "lo", "format": ".1%"}, {"field": "hi", "format": ".1%"}]
    return {
        "title": f"sensitivity: share of trials not Masked, {ytitle} x {xtitle}",
        "data": {"values": rows},
        "facet": {"column": {"field": "view", "type": "nominal", "title": None,
                             "sort": _view_order(rows)}},
        "spec": {
            "width": {"step": step}, "height": {"step": 18},
            "layer": [
                {"mark": "rect", "encoding": {**enc, "color": {
                    "field": "rate", "type": "quantitative", "title": "not Masked",
                    "scale": {"domain": [0, 1], "scheme": "orangered"},
                    "legend": {"format": "%"}}, "tooltip": tooltip}},
                {"mark": {"type": "text", "fontSize": 12},
                 "encoding": {**enc, "text": {"field": "n"},
                              "color": {"condition": {"test": "datum.rate > 0.6",
                                                      "value": "white"}, "value": "black"}}},
            ]},
        "config": CONFIG,
    }


def curve_chart(rows: list[dict], metric: str, title: str, symlog: bool) -> dict:
    """The golden run against each selected trial (and the protected run after recovery),
    one small panel per trial; the injection step marked by a rule."""
    n = max(1, len({r["trial"] for r in rows}))
    cols = min(3, n)
    y = {"field": "value", "type": "quantitative", "title": title,
         "scale": {"type": "symlog", "zero": False} if symlog else {"zero": False}}
    series_scale = {"domain": ["golden", "trial", "after recovery"],
                    "range": ["#7f7f7f", "#d62728", "#1f77b4"]}
    return {
        "title": f"{title}: golden run vs faulty trial around the injection (dashed rule)",
        "data": {"values": [r for r in rows if r["metric"] == metric]},
        "facet": {"field": "trial", "type": "nominal", "title": None},
        "columns": cols,
        "spec": {
            "width": max(220, (WIDTH - 60) // cols - 40), "height": 150,
            "layer": [
                {"mark": {"type": "line", "point": {"size": 12}},
                 "encoding": {"x": {"field": "step", "type": "quantitative", "title": "step"},
                              "y": y,
                              "color": {"field": "series", "type": "nominal", "title": None,
                                        "scale": series_scale},
                              "strokeDash": {"field": "series", "type": "nominal",
                                             "title": None,
                                             "scale": {"domain": ["golden", "trial",
                                                                  "after recovery"],
                                                       "range": [[1, 0], [1, 0], [4, 2]]}},
                              "tooltip": [{"field": "trial"}, {"field": "series"},
                                          {"field": "step"}, {"field": "value"}]}},
                {"mark": {"type": "rule", "strokeDash": [4, 3], "color": "black"},
                 "transform": [{"filter": "isValid(datum.inject)"},
                               {"filter": "datum.step == datum.inject"}],
                 "encoding": {"x": {"field": "inject", "type": "quantitative"}}},
            ]},
        "resolve": {"scale": {"x": "independent", "y": "independent"}},
        "config": CONFIG,
    }


def hist_chart(values: list[float], title: str, unit: str) -> dict:
    return {
        "title": title, "width": 420, "height": 160,
        "data": {"values": [{"x": v} for v in values]},
        "mark": {"type": "bar", "color": "#1f77b4"},
        "encoding": {"x": {"field": "x", "type": "quantitative", "bin": {"maxbins": 20},
                           "title": unit},
                     "y": {"aggregate": "count", "type": "quantitative", "title": "trials"}},
        "config": CONFIG,
    }


def path_chart(rows: list[dict]) -> dict:
    """Recovery path: outcome before -> after detection and recovery, count per pair."""
    enc = {"x": {"field": "after", "type": "nominal", "title": "after recovery",
                 "sort": list(OUTCOMES)},
           "y": {"field": "before", "type": "nominal", "title": "before (unprotected)",
                 "sort": list(OUTCOMES)}}
    return {
        "title": "recovery path: outcome before -> after detection and recovery",
        "data": {"values": rows},
        "facet": {"column": {"field": "view", "type": "nominal", "title": None,
                             "sort": _view_order(rows)}},
        "spec": {"width": {"step": 70}, "height": {"step": 24}, "layer": [
            {"mark": "rect", "encoding": {**enc, "color": {
                "field": "n", "type": "quantitative", "title": "trials",
                "scale": {"scheme": "blues"}}}},
            {"mark": {"type": "text", "fontSize": 12},
             "encoding": {**enc, "text": {"field": "n"}}}]},
        "config": CONFIG,
    }


# --- the report's content ------------------------------------------------------------------------

def select_trials(df, wanted: Sequence[str] | None) -> list[str]:
    """Trial ids whose curves are drawn: the ones asked for (a one-line error naming unknown
    ids), else up to DEFAULT_CURVES faulty trials, the ones not Masked first."""
    ids = list(dict.fromkeys(df["trial_id"]))
    if wanted:
        unknown = [t for t in wanted if t not in set(ids)]
        if unknown:
            raise FaultlabError(f"--trials: no such trial(s) in the results: "
                                f"{', '.join(map(printable, unknown))}")
        return list(dict.fromkeys(wanted))
    faulty = df[df["n_faults"] > 0].drop_duplicates("trial_id")
    order = sorted(range(len(faulty)), key=lambda i: faulty["outcome"].iloc[i] == "Masked")
    return [faulty["trial_id"].iloc[i] for i in order][:DEFAULT_CURVES]


def curve_rows(curves_df, trials: Sequence[str]) -> list[dict]:
    """Long-form rows (trial, series, metric, step, value, inject) of the chosen trials: the
    plain run's curves where there is one (the protected series from the --detect run)."""
    out = []
    for t in trials:
        sub = curves_df[curves_df["trial_id"] == t]
        if sub.empty:
            continue
        base = sub[sub["run"] == "plain"]
        base = base if not base.empty else sub[sub["run"] == sub["run"].iloc[0]]
        base = base[base["campaign_id"] == base["campaign_id"].iloc[0]]
        prot = sub[sub["run"] != "plain"]
        for series, frame, prefix in (("golden", base, "golden_"), ("trial", base, ""),
                                      ("after recovery", prot, "protected_")):
            if frame.empty:
                continue
            frame = frame[frame["campaign_id"] == frame["campaign_id"].iloc[0]]
            for row in frame.to_dict("records"):
                for metric in ("loss", "acc"):
                    out.append({"trial": t, "series": series, "metric": metric,
                                "step": int(row["step"]),
                                "value": _clean(row[prefix + metric]),
                                "inject": _clean(row["inject_step"])})
    return out


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape('' if c is None else str(c))}</td>"
                                    for c in r) + "</tr>" for r in rows)
    return f'<div class="tw"><table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table></div>'


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def golden_runs(workload_key: str) -> list[dict]:
    """golden.json of every cached golden run of a configuration in the local cache (each
    thread count and fingerprint), with its directory."""
    from faultlab.runner.golden import cache_root
    root = cache_root() / "golden"
    found = []
    for d in sorted(root.glob(f"*-{workload_key}-t*")) if root.is_dir() else ():
        try:
            doc = json.loads((d / "golden.json").read_text())
        except (OSError, ValueError):
            continue
        found.append({"dir": str(d), "config": doc.get("config"),
                      "fingerprint": doc.get("fingerprint"), "faultlab": doc.get("faultlab")})
    return found


def _fp_table(fp: dict) -> str:
    return _table(["field", "value"], [[k, json.dumps(v) if isinstance(v, (dict, list)) else v]
                                       for k, v in fp.items()])


def _cached_fingerprints(key: str) -> list[str]:
    """The fallback for results without a stored fingerprint: the golden runs of the same
    configuration in the local cache."""
    from faultlab.runner.golden import cache_root
    gold = golden_runs(key)
    if not gold:
        return [f"<p>The results do not carry the determinism fingerprint (written by a faultlab "
                f"that did not store it) and no golden run of this configuration is in the "
                f"local cache ({html.escape(str(cache_root()))}).</p>"]
    cfg = gold[0]["config"] or {}
    parts = [_table(["setting", "value"], [[k, json.dumps(v)] for k, v in cfg.items()])]
    for gr in gold:
        parts.append(f"<p>determinism fingerprint of the golden run in the local cache "
                     f"(the results do not carry one): "
                     f"<code>{html.escape(Path(gr['dir']).name)}</code></p>")
        parts.append(_fp_table(gr["fingerprint"]) if gr["fingerprint"] else
                     "<p>(a legacy golden run without a fingerprint)</p>")
    return parts


def _stored_fingerprints(rows: Sequence[dict]) -> list[str]:
    """The configuration and fingerprint(s) `faultlab run` stored with the results."""
    from faultlab.results.frame import split_id
    parts = [_table(["setting", "value"], [[k, json.dumps(v)] for k, v in
                                          (rows[0]["config"] or {}).items()])]
    by_fp: dict[str, list[dict]] = {}
    for r in rows:
        by_fp.setdefault(r["fingerprint_digest"] or "", []).append(r)
    for digest, rs in by_fp.items():
        which = ", ".join(dict.fromkeys(split_id(r["campaign"])[1] for r in rs))
        r = rs[0]
        if not digest:
            parts.append(f"<p>No determinism fingerprint was recorded for the {html.escape(which)} "
                         f"run ({html.escape(str(r['executor']))} executor: its golden run was "
                         f"recorded on a cluster node).</p>")
            continue
        parts.append(f"<p>determinism fingerprint stored in the results (the {html.escape(which)} "
                     f"run, {html.escape(str(r['recorded_at']))}; from the "
                     f"{html.escape(str(r['fingerprint_source']))}, {r['threads']} thread(s)): "
                     f"<code>{html.escape(digest)}</code></p>")
        parts.append(_fp_table(r["fingerprint"]))
    return parts


def _config_section(df, runs: Sequence[dict] = ()) -> str:
    from faultlab.results.frame import split_id
    stored: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        stored.setdefault((split_id(r["campaign"])[0], r["workload_key"]), []).append(r)
    parts = []
    for c in dict.fromkeys(df["campaign"]):
        sub = df[df["campaign"] == c]
        files = sorted({s.rsplit(":", 1)[0] for s in sub["source"]})
        nruns = ", ".join(f"{r} ({int((sub['run'] == r).sum())} trials)"
                          for r in dict.fromkeys(sub["run"]))
        parts.append(f"<h3>campaign {html.escape(c)}</h3><p>file {html.escape(', '.join(files))}"
                     f"; runs: {html.escape(nruns)}</p>")
        for key, g in sub.groupby("workload_key", sort=False):
            w = g.iloc[0]
            parts.append(f"<p>configuration <code>{html.escape(key)}</code>: "
                         f"{html.escape(str(w['workload']))} on {html.escape(str(w['framework']))}"
                         "</p>")
            rows = stored.get((c, key))
            parts += _stored_fingerprints(rows) if rows else _cached_fingerprints(key)
            if rows and not any(r["fingerprint_digest"] for r in rows):
                parts += _cached_fingerprints(key)
    return "".join(parts)


def _summary_section(df) -> str:
    parts = []
    for label, sub, oc in views(df):
        n = len(sub)
        counts = sub[oc].value_counts()
        rows = []
        for o in OUTCOMES:
            k = int(counts.get(o, 0))
            if k:
                lo, hi = wilson_interval(k, n)
                rows.append([o, k, _pct(k / n), f"[{_pct(lo)}, {_pct(hi)}]"])
        rows.append(["Total", n, _pct(1.0 if n else 0.0), ""])
        parts.append(f"<h3>{html.escape(label)}</h3>"
                     + _table(["outcome", "trials", "rate", "Wilson 95% CI"], rows))
    return "".join(parts)


def _trials_section(df) -> str:
    cols = ["run", "trial_id", "fault", "inject_step", "outcome", "final_test_acc",
            "golden_test_acc", "bit_exact", "detected", "detect_step", "outcome_after"]
    rows = [[_clean(r[c]) if not isinstance(_clean(r[c]), float)
             else f"{r[c]:.4f}" for c in cols] for r in df.to_dict("records")]
    return ("<details><summary>every trial (" + str(len(df)) + " rows)</summary>"
            + _table(["run", "trial", "fault", "step", "outcome", "test acc", "golden",
                      "exact", "detected", "at", "after"], rows) + "</details>")


def _detection(df, results: Sequence[TrialResult], charts: list) -> str:
    from faultlab.results.coverage import coverage
    parts = []
    by_id = dict(group_runs(results))
    for cid in dict.fromkeys(df.loc[df["detected"].notna(), "campaign_id"]):
        c = coverage(by_id[cid])
        parts.append(f"<h3>{html.escape(cid)}</h3>")
        if c["coverage"] is not None:
            parts.append(f"<p>coverage: {c['non_masked_detected']}/{c['non_masked']} non-Masked "
                         f"trials detected ({_pct(c['coverage'])}, Wilson 95% CI "
                         f"[{_pct(c['ci_low'])}, {_pct(c['ci_high'])}]); false positives: "
                         f"{c['control_false_positives']} of {c['control_trials']} control "
                         f"trial(s); alarms on Masked trials: {c['masked_with_alarm']}; "
                         f"recovered {c['recovered']}/{c['detected']} detected; steps of work "
                         f"replayed: {c['steps_lost']}</p>")
        parts.append(_table(["outcome (unprotected)", "trials", "detected", "rate",
                             "Wilson 95% CI"],
                            [[r["outcome"], r["trials"], r["detected"], _pct(r["rate"]),
                              f"[{_pct(r['ci_low'])}, {_pct(r['ci_high'])}]"]
                             for r in c["by_outcome"]]))
    det = df[df["detected"].notna()]
    lat = [float(x) for x in det["latency_steps"].dropna()]
    rec = [1e3 * float(x) for x in det["recovery_s"].dropna()]
    if lat:
        charts.append(("detection_latency", hist_chart(
            lat, "detection latency (detect step - injection step)", "steps")))
    if rec:
        charts.append(("recovery_time", hist_chart(rec, "recovery time per trial", "ms")))
    path = []
    for cid, g in det.groupby("campaign_id", sort=False):
        for (b, a), h in g.groupby(["outcome", "outcome_final"], sort=False):
            path.append({"view": cid, "before": b, "after": a, "n": len(h)})
    if path:
        charts.append(("recovery_path", path_chart(path)))
    if not lat:
        parts.append("<p>No trial was detected: no latency or recovery times to show.</p>")
    return "".join(parts)


#: the verdicts of a crash report, in the order drawn (report key, label, colour)
CRASH_VERDICTS = (("exact", "exact", "#4c9a2a"), ("nothing_committed", "nothing committed",
                                                    "#9fb7cc"),
                  ("torn", "torn", "#d62728"), ("mixed", "mixed", "#8c1c13"),
                  ("lost_committed", "lost-committed", "#ff7f0e"),
                  ("incomplete_state", "incomplete-state", "#9467bd"))


def crash_label(row: dict) -> str:
    """A stored crash report's row label: engine, mode and the campaign's id."""
    return f"{row['engine']} ({row['mode']}, {row['run_id']})"


def crash_verdict_rows(crash: Sequence[dict]) -> list[dict]:
    """Verdict counts per stored crash report (kills, or power-loss images)."""
    out = []
    for row in crash:
        rep = row["report"]
        for key, label, _ in CRASH_VERDICTS:
            n = int(rep.get(key) or 0)
            if n:
                out.append({"report": crash_label(row), "verdict": label, "n": n,
                            "of": "kills" if row["mode"] == "kill" else "images"})
    return out


def crash_chart(rows: list[dict]) -> dict:
    """Stacked bars: each stored crash report's recoveries by verdict (all should be exact or
    nothing committed)."""
    labels = list(dict.fromkeys(r["report"] for r in rows))
    return {
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
        "title": "faultlab crash: recoveries by verdict (kills, or power-loss images)",
        "width": 560, "height": {"step": 26}, "config": CONFIG,
        "data": {"values": rows},
        "mark": {"type": "bar", "tooltip": True},
        "encoding": {
            "y": {"field": "report", "type": "nominal", "sort": labels, "title": None,
                  "axis": {"labelLimit": 360}},
            "x": {"field": "n", "type": "quantitative", "stack": "zero",
                  "title": "kills / images", "axis": {"tickMinStep": 1, "format": "d"}},
            "color": {"field": "verdict", "type": "nominal",
                      "scale": {"domain": [v[1] for v in CRASH_VERDICTS],
                                "range": [v[2] for v in CRASH_VERDICTS]},
                      "legend": {"title": "verdict", "orient": "bottom"}},
            "order": {"field": "verdict", "type": "nominal"},
            "tooltip": [{"field": "report"}, {"field": "verdict"},
                        {"field": "n", "type": "quantitative"}, {"field": "of"}]}}


def _crash_tables(crash: Sequence[dict], charts: list) -> str:
    """Stored `faultlab crash` campaigns: per campaign its tables, and one chart of all."""
    from faultlab.report import crash_title, group_crash
    parts = []
    for _, rows in group_crash(crash):
        parts.append(f"<h3>{html.escape(crash_title(rows[0]))}</h3>")
        kill = [r for r in rows if r["mode"] == "kill"]
        if kill:
            parts.append(_table(
                ["engine", "kills", "recoveries", "torn", "mixed", "lost-committed",
                 "incomplete-state", "steps lost mean / max", "runs bit-identical",
                 "kills by phase", "ok"],
                [[r["engine"], r["kills"], r["recoveries"], r["torn"], r["mixed"],
                  r["lost_committed"], r["incomplete_state"],
                  f"{r['steps_lost_mean'] or 0:.2f} / {r['steps_lost_max']}",
                  f"{r['runs_bit_identical']}/{r['runs']}",
                  ", ".join(f"{k} {v}" for k, v in
                            (r["report"].get("kills_by_phase") or {}).items()),
                  "yes" if r["ok"] else "NO"] for r in kill]))
        power = [r for r in rows if r["mode"] == "power-loss"]
        if power:
            parts.append(_table(
                ["engine (power loss)", "crash points", "images", "torn", "mixed",
                 "lost-committed", "steps lost mean / max", "resumed bit-identical", "ok",
                 "note"],
                [[r["engine"], r["crash_points"], r["images"], r["torn"], r["mixed"],
                  r["lost_committed"], f"{r['steps_lost_mean'] or 0:.2f} / "
                  f"{r['steps_lost_max']}", f"{r['resumes_bit_identical']}/{r['resumes']}",
                  "yes" if r["ok"] else "NO", r["note"]] for r in power]))
        problems = [f"{r['engine']}: {p}" for r in rows for p in r["report"].get("problems", [])]
        if problems:
            parts.append("<details><summary>problems (" + str(len(problems)) + ")</summary><pre>"
                         + html.escape("\n".join(problems)) + "</pre></details>")
    vrows = crash_verdict_rows(crash)
    if vrows:
        charts.append(("crash_verdicts", crash_chart(vrows)))
        parts.append("<!--chart:crash_verdicts-->")
    return "".join(parts)


def _crash_section(df, results: Sequence[TrialResult], crash: Sequence[dict] = (),
                   charts: list | None = None) -> str:
    parts = []
    if crash:
        parts.append("<p>Kill and power-loss campaigns of <code>faultlab crash</code> stored in "
                     "this file: a torn, mixed or lost-committed checkpoint, or incomplete loop "
                     "state, is a failure.</p>")
        parts.append(_crash_tables(crash, charts if charts is not None else []))
    else:
        parts.append("<p>No <code>faultlab crash</code> campaign is stored in this file "
                     "(<code>faultlab crash --results FILE</code> stores one).</p>")
    if df is None:
        return "".join(parts)
    dist = format_distributed(results)
    if dist:
        parts.append(f"<pre>{html.escape(dist)}</pre>")
    bad = df[df["outcome"].isin(["Crash", "Hang"])]
    if len(bad):
        parts.append(_table(["run", "trial", "fault", "outcome", "error"],
                            [[r["run"], r["trial_id"], r["fault"], r["outcome"], r["error"]]
                             for r in bad.to_dict("records")]))
    if not dist and not len(bad):
        parts.append("<p>No trial crashed or hung, and no trial had process faults.</p>")
    return "".join(parts)


def build(results: Sequence[TrialResult], trials: Sequence[str] | None = None,
          runs: Sequence[dict] = (), crash: Sequence[dict] = ()
          ) -> tuple[list[tuple[str, str]], list[tuple[str, dict]]]:
    """The report's sections ((title, HTML)) and charts ((name, Vega-Lite spec)); a chart is
    placed in the page where a section's HTML holds ``<!--chart:NAME-->``. ``runs``: each
    run's stored configuration and fingerprint (ResultStore.runs); ``crash``: the stored
    `faultlab crash` reports (ResultStore.crash_reports)."""
    from faultlab.results.frame import curves, load
    results = list(results)
    charts: list[tuple[str, dict]] = []
    sections: list[tuple[str, str]] = []
    if not results:
        if not crash:
            raise FaultlabError("no results to report")
        if trials:
            raise FaultlabError("--trials: this file holds no trials, only crash campaigns")
        sections.append(("Crash campaigns (faultlab crash)",
                         _crash_section(None, [], crash, charts)))
        return sections, charts
    df = load(results)

    sections.append(("Outcomes", _summary_section(df) + _trials_section(df)))

    rate_html = []
    for col, title in DIMENSIONS:
        rows = rate_rows(df, col)
        if rows:
            charts.append((f"rates_{col}", rate_chart(rows, title)))
            rate_html.append(f"<!--chart:rates_{col}-->")
        else:
            rate_html.append(f"<p>No trial has a {html.escape(title)}.</p>")
    sections.append(("Outcome rates with Wilson 95% intervals", "".join(rate_html)))

    heat = []
    for x, y, xt, yt in (("site", "layer", "site", "layer"), ("layer", "bit", "layer", "bit")):
        rows = harm_rows(df, x, y)
        if rows:
            charts.append((f"heatmap_{y}_{x}", heatmap(rows, x, y, xt, yt)))
            heat.append(f"<!--chart:heatmap_{y}_{x}-->")
        else:
            heat.append(f"<p>No {yt} x {xt} data (no trial has both).</p>")
    sections.append(("Sensitivity", "".join(heat)))

    chosen = select_trials(df, trials)
    crow = curve_rows(curves(results, trials=chosen), chosen)
    if crow:
        charts.append(("curves_loss", curve_chart(crow, "loss", "loss", symlog=True)))
        charts.append(("curves_acc", curve_chart(crow, "acc", "training accuracy",
                                                 symlog=False)))
        note = (f"<p>{len(chosen)} trial(s): " + html.escape(", ".join(chosen))
                + ("" if trials else f" (up to {DEFAULT_CURVES}, not Masked first; choose "
                   "with <code>--trials ID,...</code>)") + ". A curve that stops early hit a "
                "non-finite loss.</p>")
        sections.append(("Loss and accuracy around the injection",
                         note + "<!--chart:curves_loss--><!--chart:curves_acc-->"))
    else:
        sections.append(("Loss and accuracy around the injection",
                         "<p>No faulty trial with per-step metrics.</p>"))

    if df["detected"].notna().any():
        n0 = len(charts)
        text = _detection(df, results, charts)
        sections.append(("Detection and recovery (--detect)", text + "".join(
            f"<!--chart:{name}-->" for name, _ in charts[n0:])))
    else:
        sections.append(("Detection and recovery (--detect)",
                         "<p>No protected run in these results (run the campaign with "
                         "<code>faultlab run --detect</code>).</p>"))
    sections.append(("Crashes, hangs and process faults",
                     _crash_section(df, results, crash, charts)))
    sections.append(("Configuration and determinism", _config_section(df, runs)))
    return sections, charts


CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;
background:#fff}
main{max-width:1100px;margin:0 auto;padding:16px 20px;box-sizing:border-box}
h1{font-size:24px}h2{font-size:20px;border-bottom:1px solid #ddd;margin-top:32px}
h3{font-size:16px}
.tw{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:14px;margin:8px 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4}
pre{font-size:13px;overflow-x:auto;background:#f8f8f8;padding:8px}
code{font-size:14px}
.chart{margin:12px 0;overflow-x:auto;max-width:100%}
.err{color:#b00}
nav a{margin-right:12px}
"""


def _script_json(obj: Any) -> str:
    """JSON safe inside a <script> element."""
    return json.dumps(obj, allow_nan=False).replace("</", "<\\/").replace("<!--", "<\\!--")


def render_html(sections, charts, title: str) -> str:
    """The page: sections, a div per chart, the Vega bundle inlined, the specs inlined."""
    vlc = _vlc()
    bundle = vlc.javascript_bundle().replace("</script", "<\\/script")
    names = {name for name, _ in charts}
    body = []
    nav = []
    for i, (head, text) in enumerate(sections):
        nav.append(f'<a href="#s{i}">{html.escape(head)}</a>')
        for name in names:
            text = text.replace(f"<!--chart:{name}-->",
                                f'<div class="chart" id="chart-{name}" data-chart="{name}"></div>')
        body.append(f'<section id="s{i}"><h2>{html.escape(head)}</h2>{text}</section>')
    specs = _script_json({name: spec for name, spec in charts})
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title><style>{CSS}</style>
<script>{bundle}</script></head>
<body><main><h1>faultlab report: {html.escape(title)}</h1>
<nav>{''.join(nav)}</nav>
{''.join(body)}
</main>
<script>
const SPECS = {specs};
window.faultlabCharts = {{}};
for (const [name, spec] of Object.entries(SPECS)) {{
  const el = document.getElementById("chart-" + name);
  if (!el) continue;
  window.faultlabCharts[name] = vegaEmbed(el, spec, {{renderer: "svg", actions: false}})
    .then(() => {{ el.dataset.rendered = "1"; }})
    .catch(e => {{ el.textContent = "chart failed: " + e; el.className += " err";
                   console.error(e); }});
}}
</script></body></html>
"""


def _with_bg(spec: dict) -> dict:
    return {**spec, "background": "white"}


def write_report(results: Sequence[TrialResult], html: str | os.PathLike | None = None,
                 figures: str | os.PathLike | None = None, trials: Sequence[str] | None = None,
                 title: str = "results", runs: Sequence[dict] = (),
                 crash: Sequence[dict] = ()) -> list[Path]:
    """Write the HTML report and / or every figure (NAME.svg and NAME.png in `figures`);
    returns the paths written. ``runs`` and ``crash`` as for :func:`build`."""
    sections, charts = build(results, trials, runs, crash)
    written = []
    if html is not None:
        p = Path(html)
        page = render_html(sections, charts, title)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(page, encoding="utf-8")
        except OSError as e:
            raise FaultlabError(f"{printable(p)}: cannot write the report: "
                                f"{e.strerror or e}") from None
        written.append(p)
    if figures is not None:
        vlc = _vlc()
        d = Path(figures)
        try:
            d.mkdir(parents=True, exist_ok=True)
            for name, spec in charts:
                spec = _with_bg(spec)
                (d / f"{name}.svg").write_text(vlc.vegalite_to_svg(spec), encoding="utf-8")
                (d / f"{name}.png").write_bytes(vlc.vegalite_to_png(spec, scale=2))
                written += [d / f"{name}.svg", d / f"{name}.png"]
        except OSError as e:
            raise FaultlabError(f"{printable(d)}: cannot write figures: "
                                f"{e.strerror or e}") from None
    return written
