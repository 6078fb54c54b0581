"""Exports of trial results: flat records, CSV, pandas and Parquet (the last two optional)."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any, Iterable

from faultlab.errors import FaultlabError, printable
from faultlab.results.store import (BOOL_FIELDS, COLUMNS, FLOAT_FIELDS, INT_FIELDS, TrialResult,
                                    json_dumps, one_line)

#: columns of :func:`to_csv` / :func:`to_records`: every field but ``metrics``
EXPORT_COLUMNS = tuple(c for c in COLUMNS if c != "metrics")


def to_records(results: Iterable[TrialResult], include_metrics: bool = False) -> list[dict]:
    """Flat dicts, one per result: the columns of :data:`EXPORT_COLUMNS`, ``faults`` as JSON
    text (and ``metrics`` as JSON text too when ``include_metrics``). Floats stay floats."""
    out = []
    for r in results:
        d = {c: getattr(r, c) for c in EXPORT_COLUMNS}
        d["faults"] = json_dumps(r.faults)
        if include_metrics:
            d["metrics"] = json_dumps(r.metrics)
        out.append(d)
    return out


def _csv_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)            # shortest exact form; nan, inf, -inf as float() reads them
    return str(v)


def to_csv(results: Iterable[TrialResult], path_or_file: str | os.PathLike | io.TextIOBase) -> int:
    """Write results as CSV (header row, then one row per result); returns the row count.

    Columns are :data:`EXPORT_COLUMNS`: ``faults`` as JSON text, no metrics. None is an empty
    cell, booleans are ``true``/``false``, floats are exact (``nan``, ``inf``, ``-inf`` for the
    non-finite ones)."""
    records = to_records(results)

    def write(f) -> None:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(EXPORT_COLUMNS)
        for d in records:
            w.writerow([_csv_cell(d[c]) for c in EXPORT_COLUMNS])

    if isinstance(path_or_file, (str, os.PathLike)):
        p = Path(path_or_file)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            with open(p, "w", newline="", encoding="utf-8") as f:
                write(f)
        except OSError as e:
            raise FaultlabError(f"{printable(p)}: cannot write CSV: {e.strerror or e}") from None
    else:
        write(path_or_file)
    return len(records)


def _need(module: str, purpose: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        raise FaultlabError(f"{purpose} needs the optional package '{top}', which is not "
                            f"installed (pip install {top})") from None


def to_pandas(results: Iterable[TrialResult], include_metrics: bool = False):
    """A pandas DataFrame of :func:`to_records`; integer and boolean columns that may be
    missing use pandas' nullable dtypes. Needs pandas."""
    pd = _need("pandas", "exporting to pandas")
    df = pd.DataFrame.from_records(to_records(results, include_metrics),
                                   columns=list(EXPORT_COLUMNS)
                                   + (["metrics"] if include_metrics else []))
    for c in INT_FIELDS:
        df[c] = df[c].astype("Int64")
    for c in BOOL_FIELDS:
        df[c] = df[c].astype("boolean")
    for c in FLOAT_FIELDS:
        df[c] = df[c].astype("float64")
    return df


def to_parquet(results: Iterable[TrialResult], path: str | os.PathLike,
               include_metrics: bool = False) -> int:
    """Write :func:`to_records` as a Parquet file with an explicit schema; returns the row
    count. Needs pyarrow."""
    pa = _need("pyarrow", "exporting to Parquet")
    pq = _need("pyarrow.parquet", "exporting to Parquet")
    records = to_records(results, include_metrics)
    types = {c: pa.string() for c in EXPORT_COLUMNS}
    types.update({c: pa.int64() for c in INT_FIELDS})
    types.update({c: pa.bool_() for c in BOOL_FIELDS})
    types.update({c: pa.float64() for c in FLOAT_FIELDS})
    cols = list(EXPORT_COLUMNS) + (["metrics"] if include_metrics else [])
    schema = pa.schema([(c, types.get(c, pa.string())) for c in cols])
    table = pa.Table.from_pylist(records, schema=schema)
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, str(p))
    except OSError as e:
        raise FaultlabError(f"{printable(p)}: cannot write Parquet: {one_line(e)}") from None
    return len(records)
