"""A results database as pandas DataFrames: one row per trial and run (:func:`load`), one row
per trial, run and step (:func:`curves`). Framework-free; needs pandas.

A campaign run plainly and with ``--detect`` is stored under two campaign ids (the digest, and
the digest + ``"+detect"``: runner/campaign.py ``campaign_id``); here they are one ``campaign``
(the digest) and two values of ``run``: ``"plain"`` and ``"detect"``. So each trial appears once
per run, never twice within a run.

    >>> import faultlab.results as fr
    >>> df = fr.load("faultlab-results/mixed.sqlite")
    >>> df.groupby(["run", "site"]).outcome.value_counts()
    >>> df.to_parquet("mixed.parquet")
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable

from faultlab.errors import FaultlabError, printable
from faultlab.report import describe_faults
from faultlab.results.store import (BOOL_FIELDS, CRASH_COLUMNS, CRASH_FLOAT_FIELDS,
                                    CRASH_INT_FIELDS, FLOAT_FIELDS, INT_FIELDS, RUN_COLUMNS,
                                    ResultStore, TrialResult, json_dumps)

#: the run of a plain campaign id (a protected run's id ends in "+detect": its run is "detect")
PLAIN = "plain"

#: columns of :func:`load`, in order
TRIAL_COLUMNS = (
    "campaign", "run", "campaign_id", "trial_id", "source", "framework", "workload",
    "workload_key", "fault", "n_faults", "site", "layer", "tensor", "value", "bit", "replica",
    "fault_step", "duration", "process", "outcome", "bit_exact", "inject_step",
    "first_nonfinite_step", "final_train_acc", "final_test_acc", "golden_test_acc",
    "final_loss", "max_acc_drop", "steps_run", "wall_s", "error", "detected", "detect_step",
    "detector", "recovered", "outcome_after", "outcome_final", "latency_steps", "recovery_s",
    "steps_replayed", "n_detections", "distributed", "faults")

#: columns of :func:`load_runs`, in order (``config`` and ``fingerprint`` as JSON text)
RUNS_COLUMNS = ("campaign", "run", "campaign_id", *RUN_COLUMNS[1:])

#: columns of :func:`load_crash`, in order (``report``: the whole report as JSON text)
CRASH_REPORT_COLUMNS = CRASH_COLUMNS

#: columns of :func:`curves`, in order
CURVE_COLUMNS = ("campaign", "run", "campaign_id", "trial_id", "step", "inject_step", "loss",
                 "acc", "golden_loss", "golden_acc", "protected_loss", "protected_acc")


def _pd():
    try:
        import pandas
    except ImportError:
        raise FaultlabError("faultlab.results.load needs pandas, which is not installed "
                            "(pip install pandas)") from None
    return pandas


def split_id(campaign_id: str) -> tuple[str, str]:
    """(campaign digest, run) of a stored campaign id: ``"abc+detect"`` -> ("abc", "detect"),
    ``"abc"`` -> ("abc", "plain")."""
    digest, plus, run = campaign_id.partition("+")
    return digest, (run if plus and run else PLAIN)


def read(path: str | os.PathLike, campaign: str | None = None) -> list[TrialResult]:
    """The stored results of a results database (of one campaign id or digest, or all); a
    one-line FaultlabError when the file is missing."""
    if not Path(path).is_file():
        raise FaultlabError(f"{printable(path)}: no such results database")
    with ResultStore(path) as store:
        results = store.results()
    return _select(results, campaign)


def _select(results: list[TrialResult], campaign: str | None) -> list[TrialResult]:
    if campaign is None:
        return results
    return [r for r in results if r.campaign == campaign or split_id(r.campaign)[0] == campaign]


def _source(path_or_results) -> list[TrialResult]:
    if isinstance(path_or_results, (str, os.PathLike)):
        return read(path_or_results)
    return list(path_or_results)


def _scalar(v):
    """A fault-dict value as one cell: lists joined, others kept."""
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return v


def _detections(r: TrialResult) -> list[dict]:
    return list((r.metrics.get("protected") or {}).get("detections") or ())


def trial_row(r: TrialResult) -> dict:
    """One flat record of :data:`TRIAL_COLUMNS` for a result (the first fault's fields; the
    count of faults in ``n_faults``, all of them as JSON in ``faults``)."""
    digest, run = split_id(r.campaign)
    f = r.faults[0] if r.faults else {}
    dets = _detections(r)
    secs = [d["recovery_s"] for d in dets if d.get("recovery_s") is not None]
    bit = f.get("bit")
    row = {
        "campaign": digest, "run": run, "campaign_id": r.campaign, "trial_id": r.trial_id,
        "source": r.source, "framework": r.framework, "workload": r.workload,
        "workload_key": r.workload_key, "fault": describe_faults(r.faults),
        "n_faults": len(r.faults), "site": f.get("site"), "layer": f.get("layer"),
        "tensor": f.get("tensor"), "value": f.get("value"),
        "bit": int(bit) if isinstance(bit, int) else None,
        "replica": f.get("replica"), "fault_step": f.get("step"),
        "duration": f.get("duration"), "process": f.get("process"),
        "latency_steps": (r.detect_step - r.inject_step
                          if r.detected and r.detect_step is not None
                          and r.inject_step is not None else None),
        "recovery_s": sum(secs) if secs else None,
        "steps_replayed": sum(d.get("steps_replayed", 0) for d in dets) if dets else None,
        "n_detections": len(dets) if r.detected is not None else None,
        "outcome_final": r.outcome_after or r.outcome,
        "distributed": "distributed" in r.metrics,
        "faults": json_dumps(r.faults),
    }
    for c in TRIAL_COLUMNS:
        if c not in row:
            row[c] = getattr(r, c)
    if row["replica"] is not None:        # an int, or a list of replicas: text either way
        row["replica"] = str(_scalar(row["replica"]))
    return {c: row[c] for c in TRIAL_COLUMNS}


def load(path_or_results: str | os.PathLike | Iterable[TrialResult],
         campaign: str | None = None):
    """A DataFrame with one row per trial and run (:data:`TRIAL_COLUMNS`), in stored order.

    ``campaign`` is the digest (both runs), the campaign digest of one run ("abc+detect") or
    None (every campaign). Integer and boolean columns that may be missing use pandas' nullable
    dtypes; write it with ``df.to_parquet(path)``."""
    pd = _pd()
    results = _select(_source(path_or_results), campaign)
    df = pd.DataFrame.from_records([trial_row(r) for r in results], columns=list(TRIAL_COLUMNS))
    for c in (*INT_FIELDS, "n_faults", "bit", "fault_step", "latency_steps", "steps_replayed",
              "n_detections"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("Int64")
    for c in (*BOOL_FIELDS, "distributed"):
        df[c] = df[c].astype("boolean")
    for c in (*FLOAT_FIELDS, "recovery_s"):
        df[c] = df[c].astype("float64")
    df["replica"] = df["replica"].astype("string")
    return df


def _series(m: dict, key: str) -> list:
    v = m.get(key)
    return list(v) if isinstance(v, (list, tuple)) else []


def curve_rows(r: TrialResult) -> list[dict]:
    """Per-step records of one result: the trial's loss and accuracy from its first step
    (``metrics["start"]``), the golden run's over the same steps, and for a ``--detect`` run
    the protected (after recovery) series."""
    digest, run = split_id(r.campaign)
    m = r.metrics or {}
    start = int(m.get("start") or 0)
    s = {k: _series(m, k) for k in ("loss", "acc", "golden_loss", "golden_acc")}
    prot = m.get("protected") or {}
    s["protected_loss"], s["protected_acc"] = _series(prot, "loss"), _series(prot, "acc")
    n = max(map(len, s.values()), default=0)
    rows = []
    for i in range(n):
        row = {"campaign": digest, "run": run, "campaign_id": r.campaign,
               "trial_id": r.trial_id, "step": start + i, "inject_step": r.inject_step}
        for k, v in s.items():
            x = v[i] if i < len(v) else None
            row[k] = math.nan if x is None else float(x)
        rows.append(row)
    return rows


def curves(path_or_results: str | os.PathLike | Iterable[TrialResult],
           campaign: str | None = None, trials: Iterable[str] | None = None):
    """A DataFrame of per-step metrics (:data:`CURVE_COLUMNS`): one row per trial, run and
    step; NaN where a series has no value (a trial stopped at its first non-finite loss is
    shorter than the golden run). ``trials`` keeps only those trial ids."""
    pd = _pd()
    results = _select(_source(path_or_results), campaign)
    keep = set(trials) if trials is not None else None
    rows = [row for r in results if keep is None or r.trial_id in keep
            for row in curve_rows(r)]
    df = pd.DataFrame.from_records(rows, columns=list(CURVE_COLUMNS))
    df["step"] = df["step"].astype("int64")
    df["inject_step"] = pd.to_numeric(df["inject_step"], errors="coerce").astype("Int64")
    return df


def _stored(path: str | os.PathLike, what: str):
    if not Path(path).is_file():
        raise FaultlabError(f"{printable(path)}: no such results database")
    with ResultStore(path) as store:
        return getattr(store, what)()


def load_runs(path: str | os.PathLike, campaign: str | None = None):
    """A DataFrame with one row per campaign run and workload configuration
    (:data:`RUNS_COLUMNS`): the configuration and the determinism fingerprint of the golden run
    its trials were compared with, as ``faultlab run`` recorded them (``fingerprint`` as JSON
    text, missing when not recorded; ``fingerprint_source`` says where it came from). Empty for
    a file written before results schema version 2. ``campaign`` as for :func:`load`."""
    pd = _pd()
    rows = []
    for r in _stored(path, "runs"):
        digest, run = split_id(r["campaign"])
        if campaign is not None and campaign not in (digest, r["campaign"]):
            continue
        rows.append({**r, "campaign": digest, "run": run, "campaign_id": r["campaign"],
                     "config": json_dumps(r["config"]),
                     "fingerprint": (None if r["fingerprint"] is None
                                     else json_dumps(r["fingerprint"]))})
    df = pd.DataFrame.from_records(rows, columns=list(RUNS_COLUMNS))
    df["threads"] = pd.to_numeric(df["threads"], errors="coerce").astype("Int64")
    return df


def load_crash(path: str | os.PathLike):
    """A DataFrame with one row per engine of each stored ``faultlab crash`` campaign
    (:data:`CRASH_REPORT_COLUMNS`): ``run_id`` (one campaign), ``mode`` (kill / power-loss),
    ``engine``, the loop (``workload``, ``steps``, ``every``, ``seed``), the counts (kills or
    crash points and images; recoveries; the verdicts ``exact``, ``nothing_committed``,
    ``torn``, ``mixed``, ``lost_committed``, ``incomplete_state``; runs and resumes
    bit-identical), ``ok``, and the whole report as JSON text in ``report``. Empty for a file
    without crash campaigns."""
    pd = _pd()
    rows = [{**r, "report": json_dumps(r["report"])} for r in _stored(path, "crash_reports")]
    df = pd.DataFrame.from_records(rows, columns=list(CRASH_REPORT_COLUMNS))
    for c in (*CRASH_INT_FIELDS, "steps", "every", "seed"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("Int64")
    for c in CRASH_FLOAT_FIELDS:
        df[c] = df[c].astype("float64")
    df["ok"] = df["ok"].astype("boolean")
    return df
