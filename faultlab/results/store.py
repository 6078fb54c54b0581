"""The results store: one row per finished trial, durable as soon as it is written.

A campaign writes each finished trial with :meth:`ResultStore.add`, which commits before it
returns, so an interrupted campaign loses nothing and resumes by skipping
:meth:`ResultStore.done`. The store is a single SQLite file in WAL mode with a busy timeout, so
several processes may append to it at once.

Non-finite floats
-----------------
SQLite turns NaN into NULL, and strict JSON has no NaN or Infinity. So:

* scalar float columns (``final_train_acc``, ``final_test_acc``, ``golden_test_acc``,
  ``final_loss``, ``max_acc_drop``, ``wall_s``) are stored as REAL when finite; a non-finite
  value is stored as NULL and its kind (``"nan"``, ``"inf"`` or ``"-inf"``) is recorded in the
  row's ``nonfinite`` column, a JSON object such as ``{"final_loss": "nan"}`` (NULL when the row
  has none). SQL aggregates over the columns thus only ever see finite numbers, and a plain NULL
  (no ``nonfinite`` entry) still means "not measured".
* the JSON columns (``faults``, ``metrics``) use the JSON extension of Python's :mod:`json`
  (the bare tokens ``NaN``, ``Infinity``, ``-Infinity``), which round-trips exactly.
* :meth:`TrialResult.to_dict` with ``strict=True`` gives strict JSON: non-finite floats become
  the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"``; :meth:`TrialResult.from_dict`
  turns those strings back into floats in the float fields, the metrics and the faults (the
  fault vocabulary's own strings, such as the value model ``"nan"``, are lower case and are not
  touched).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from faultlab.errors import FaultlabError, printable

#: the outcome classes, in reporting order (the taxonomy of the ISCA'23 study plus Crash/Hang)
OUTCOMES = ("Masked", "ImmediateINFsNaNs", "ShortTermINFsNaNs", "LatentINFsNaNs",
            "SharpDegrade", "SlowDegrade", "SharpSlowDegrade", "LowTestAccuracy", "Crash", "Hang")

#: the outcome name of the total row that :func:`summarize` appends
TOTAL = "Total"

#: version of the database layout, kept in ``PRAGMA user_version``. 1: the ``results`` table;
#: 2: adds ``runs`` (per campaign run and configuration: the workload configuration and the
#: golden run's determinism fingerprint) and ``crash_reports`` (``faultlab crash`` campaigns)
SCHEMA_VERSION = 2

#: ``PRAGMA application_id`` of a faultlab results database ("FLRS")
APPLICATION_ID = 0x464C5253

#: seconds a writer waits for another process's lock before giving up
BUSY_TIMEOUT_S = 60.0

FLOAT_FIELDS = ("final_train_acc", "final_test_acc", "golden_test_acc", "final_loss",
                 "max_acc_drop", "wall_s")
INT_FIELDS = ("inject_step", "first_nonfinite_step", "steps_run", "detect_step")
BOOL_FIELDS = ("bit_exact", "detected", "recovered")
JSON_FIELDS = ("faults", "metrics")

_NONFINITE_STR = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
_STR_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


class ResultsError(FaultlabError):
    """A results database is unreadable, foreign, corrupt or from a newer faultlab."""


@dataclass
class TrialResult:
    """One finished trial.

    ``bit_exact`` is true when every recorded metric equals the golden run's. ``metrics`` holds
    the per-step series of the trial and of the golden run (any JSON-able dict). The detection
    fields (``detected`` .. ``outcome_after``) are filled by detection/recovery, else None.
    """

    campaign: str                       # campaign digest
    trial_id: str
    source: str                         # "file:row" the trial came from
    framework: str
    workload: str
    workload_key: str
    faults: list[dict]
    outcome: str                        # one of OUTCOMES
    bit_exact: bool
    inject_step: int | None = None
    first_nonfinite_step: int | None = None
    final_train_acc: float | None = None
    final_test_acc: float | None = None
    golden_test_acc: float | None = None
    final_loss: float | None = None
    max_acc_drop: float | None = None
    steps_run: int = 0
    wall_s: float = 0.0
    error: str | None = None
    metrics: dict = field(default_factory=dict)
    detected: bool | None = None
    detect_step: int | None = None
    detector: str | None = None
    recovered: bool | None = None
    outcome_after: str | None = None

    def __post_init__(self):
        if self.outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {self.outcome!r}; expected one of "
                             + ", ".join(OUTCOMES))
        if self.outcome_after is not None and self.outcome_after not in OUTCOMES:
            raise ValueError(f"unknown outcome_after {self.outcome_after!r}")

    def to_dict(self, strict: bool = False) -> dict:
        """All fields as a dict (deep copies of faults and metrics). With ``strict``, non-finite
        floats anywhere become "NaN"/"Infinity"/"-Infinity" so that the dict is strict JSON."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["faults"] = json.loads(json_dumps(self.faults))
        d["metrics"] = json.loads(json_dumps(self.metrics))
        return _strict_json(d) if strict else d

    @classmethod
    def from_dict(cls, d: dict) -> "TrialResult":
        """Inverse of :meth:`to_dict` (either form). Unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for k in FLOAT_FIELDS:
            if isinstance(kw.get(k), str):
                kw[k] = _STR_NONFINITE.get(kw[k], kw[k])
        for k in JSON_FIELDS:
            if k in kw:
                kw[k] = _unstrict_json(kw[k])
        return cls(**kw)

    def to_json(self, strict: bool = False) -> str:
        return json.dumps(self.to_dict(strict=strict), allow_nan=not strict, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrialResult":
        return cls.from_dict(json.loads(text))


def _strict_json(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return _NONFINITE_STR[_nonfinite_kind(obj)]
    if isinstance(obj, dict):
        return {k: _strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict_json(v) for v in obj]
    return obj


def _unstrict_json(obj: Any) -> Any:
    if isinstance(obj, str):
        return _STR_NONFINITE.get(obj, obj)
    if isinstance(obj, dict):
        return {k: _unstrict_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unstrict_json(v) for v in obj]
    return obj


def _json_default(o: Any) -> Any:
    """NumPy scalars and arrays (and anything else with .tolist()) as plain JSON values."""
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def json_dumps(obj: Any) -> str:
    return json.dumps(obj, default=_json_default)


def _nonfinite_kind(x: float) -> str:
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


# --------------------------------------------------------------------------------------------
# the store

COLUMNS = ("campaign", "trial_id", "source", "framework", "workload", "workload_key", "faults",
            "outcome", "bit_exact", "inject_step", "first_nonfinite_step", "final_train_acc",
            "final_test_acc", "golden_test_acc", "final_loss", "max_acc_drop", "steps_run",
            "wall_s", "error", "metrics", "detected", "detect_step", "detector", "recovered",
            "outcome_after")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    campaign TEXT NOT NULL,
    trial_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    source TEXT NOT NULL,
    framework TEXT NOT NULL,
    workload TEXT NOT NULL,
    workload_key TEXT NOT NULL,
    faults TEXT NOT NULL,
    outcome TEXT NOT NULL,
    bit_exact INTEGER NOT NULL,
    inject_step INTEGER,
    first_nonfinite_step INTEGER,
    final_train_acc REAL,
    final_test_acc REAL,
    golden_test_acc REAL,
    final_loss REAL,
    max_acc_drop REAL,
    steps_run INTEGER NOT NULL,
    wall_s REAL,
    error TEXT,
    metrics TEXT NOT NULL,
    detected INTEGER,
    detect_step INTEGER,
    detector TEXT,
    recovered INTEGER,
    outcome_after TEXT,
    nonfinite TEXT,
    PRIMARY KEY (campaign, trial_id)
);
CREATE INDEX IF NOT EXISTS results_seq ON results (seq);
"""

#: what version 2 adds (schema version 1 files are migrated by running it: _migrate)
_SCHEMA_V2 = """
CREATE TABLE IF NOT EXISTS runs (
    campaign TEXT NOT NULL,
    workload_key TEXT NOT NULL,
    fingerprint_digest TEXT NOT NULL,
    framework TEXT NOT NULL,
    workload TEXT NOT NULL,
    config TEXT NOT NULL,
    threads INTEGER,
    executor TEXT,
    fingerprint TEXT,
    fingerprint_source TEXT,
    faultlab TEXT NOT NULL,
    recorded_at TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (campaign, workload_key, fingerprint_digest)
);
CREATE TABLE IF NOT EXISTS crash_reports (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    recorded_at TEXT NOT NULL,
    mode TEXT NOT NULL CHECK (mode IN ('kill', 'power-loss')),
    engine TEXT NOT NULL,
    workload TEXT NOT NULL,
    steps INTEGER,
    every INTEGER,
    seed INTEGER,
    kills INTEGER NOT NULL,
    crash_points INTEGER NOT NULL,
    images INTEGER NOT NULL,
    recoveries INTEGER NOT NULL,
    exact INTEGER NOT NULL,
    nothing_committed INTEGER NOT NULL,
    torn INTEGER NOT NULL,
    mixed INTEGER NOT NULL,
    lost_committed INTEGER NOT NULL,
    incomplete_state INTEGER NOT NULL,
    steps_lost_mean REAL,
    steps_lost_max INTEGER,
    runs INTEGER NOT NULL,
    runs_bit_identical INTEGER NOT NULL,
    resumes INTEGER NOT NULL,
    resumes_bit_identical INTEGER NOT NULL,
    ok INTEGER NOT NULL,
    wall_s REAL,
    note TEXT,
    faultlab TEXT NOT NULL,
    report TEXT NOT NULL
);
"""

#: columns of ``runs`` as :meth:`ResultStore.runs` returns them (``config`` and ``fingerprint``
#: parsed from their JSON; ``fingerprint`` None when not recorded)
RUN_COLUMNS = ("campaign", "workload_key", "framework", "workload", "config", "threads",
               "executor", "fingerprint", "fingerprint_digest", "fingerprint_source",
               "faultlab", "recorded_at")

#: the counts and figures of a crash report stored as columns of ``crash_reports`` (each a key
#: of ``EngineReport.to_json()``); the whole report is in ``report`` (strict JSON)
CRASH_INT_FIELDS = ("kills", "crash_points", "images", "recoveries", "exact",
                    "nothing_committed", "torn", "mixed", "lost_committed", "incomplete_state",
                    "steps_lost_max", "runs", "runs_bit_identical", "resumes",
                    "resumes_bit_identical")
CRASH_FLOAT_FIELDS = ("steps_lost_mean", "wall_s")

#: columns of ``crash_reports`` as :meth:`ResultStore.crash_reports` returns them
CRASH_COLUMNS = ("run_id", "recorded_at", "mode", "engine", "workload", "steps", "every",
                 "seed", *CRASH_INT_FIELDS[:10], "steps_lost_mean", *CRASH_INT_FIELDS[10:],
                 "ok", "wall_s", "note", "faultlab", "report")

#: the crash campaign modes
CRASH_MODES = ("kill", "power-loss")


@contextmanager
def _immediate(conn: sqlite3.Connection):
    """One write transaction (BEGIN IMMEDIATE: the write lock up front), committed at the end
    of the block, rolled back if anything in it raises (Ctrl-C included)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


class ResultStore:
    """SQLite store of trial results; one row per (campaign, trial_id).

    Re-adding a trial replaces its row (and moves it to the end of the insertion order).
    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._name = printable(self.path)    # the path in one-line messages
        self._conn: sqlite3.Connection | None = None
        self.journal_mode = ""
        self.version = 0                     # the file's schema version (PRAGMA user_version)
        if self.path.is_dir():
            raise ResultsError(f"{self._name}: is a directory, not a faultlab results database")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ResultsError(f"{self._name}: cannot create its folder: {e.strerror or e}") from None
        try:
            self._conn = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_S,
                                         isolation_level=None)
            self._conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            self._init_schema()
        except ResultsError:
            self.close()
            raise
        except sqlite3.Error as e:
            self.close()
            raise ResultsError(f"{self._name}: not a faultlab results database "
                               f"({one_line(e)})") from None

    # -- setup

    def _init_schema(self) -> None:
        c = self._conn
        app_id, version = self._ident()
        if app_id == APPLICATION_ID and 1 <= version <= SCHEMA_VERSION:
            # an older version is read as it is; it is upgraded (_upgrade) only when something
            # it has no table for is written, so reading never changes a file
            self.version = version
            self._wal()
            return
        self._check_ident(app_id, version)
        with _immediate(c):                   # another process may be initialising too
            app_id, version = self._ident()
            self._check_ident(app_id, version)
            if app_id == 0:
                for stmt in (_SCHEMA + _SCHEMA_V2).split(";"):
                    if stmt.strip():
                        c.execute(stmt)
                c.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                version = SCHEMA_VERSION
        self.version = version
        self._wal()

    def _upgrade(self) -> None:
        """Migrate an older file to SCHEMA_VERSION in one transaction (its rows are kept as
        they are: each version only adds tables), before writing what it had no table for."""
        if self.version >= SCHEMA_VERSION:
            return
        c = self.conn
        try:
            with _immediate(c):
                version = self._ident()[1]
                if version < 2:
                    for stmt in _SCHEMA_V2.split(";"):
                        if stmt.strip():
                            c.execute(stmt)
                if version < SCHEMA_VERSION:
                    c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.Error as e:
            raise ResultsError(f"{self._name}: cannot upgrade the results database from "
                               f"schema version {self.version}: {one_line(e)}") from None
        self.version = SCHEMA_VERSION

    def _has_v2(self) -> bool:
        return self.version >= 2

    def _ident(self) -> tuple[int, int]:
        c = self._conn
        return (c.execute("PRAGMA application_id").fetchone()[0],
                c.execute("PRAGMA user_version").fetchone()[0])

    def _check_ident(self, app_id: int, version: int) -> None:
        if app_id == 0:
            n = self._conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if n:
                raise ResultsError(f"{self._name}: an SQLite database of another program, "
                                   "not a faultlab results database")
            return
        if app_id != APPLICATION_ID:
            raise ResultsError(f"{self._name}: an SQLite database of another program "
                               f"(application id {app_id:#x}), not a faultlab results database")
        if version > SCHEMA_VERSION:
            raise ResultsError(f"{self._name}: results schema version {version} is newer than "
                               f"this faultlab supports ({SCHEMA_VERSION}); upgrade faultlab")
        if version < 1:
            raise ResultsError(f"{self._name}: faultlab results database without a schema "
                               "version; it is damaged")

    def _wal(self) -> None:
        # WAL lets readers and one writer work at once. It may be refused (e.g. a file system
        # without shared memory); the rollback journal then still works, only slower.
        self.journal_mode = str(
            self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
        # a WAL commit with synchronous=FULL is durable at once, even on power loss
        self._conn.execute("PRAGMA synchronous = FULL")

    # -- context manager

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ResultsError(f"{self._name}: results store is closed")
        return self._conn

    def _run(self, sql: str, args: Sequence = ()) -> sqlite3.Cursor:
        try:
            return self.conn.execute(sql, args)
        except sqlite3.Error as e:
            raise ResultsError(f"{self._name}: {one_line(e)}") from None

    # -- writing

    def add(self, result: TrialResult) -> None:
        """Write (or replace) one trial's row; committed and durable when this returns."""
        row, nonfinite = _to_row(result)
        cols = ", ".join(COLUMNS)
        marks = ", ".join("?" for _ in COLUMNS)
        self._run(f"INSERT OR REPLACE INTO results (seq, nonfinite, {cols}) VALUES "
                  f"((SELECT coalesce(max(seq), 0) + 1 FROM results), ?, {marks})",
                  [nonfinite, *row])

    def clear(self, campaign: str) -> int:
        """Delete every row of ``campaign``; returns how many were deleted."""
        return self._run("DELETE FROM results WHERE campaign = ?", (campaign,)).rowcount

    # -- reading

    def done(self, campaign: str) -> set[str]:
        """Ids of the trials of ``campaign`` already finished."""
        return {r[0] for r in self._run("SELECT trial_id FROM results WHERE campaign = ?",
                                        (campaign,))}

    def results(self, campaign: str | None = None) -> list[TrialResult]:
        """Stored results (of one campaign, or all), in insertion order."""
        sel = f"SELECT nonfinite, {', '.join(COLUMNS)} FROM results"
        if campaign is None:
            rows = self._run(sel + " ORDER BY seq").fetchall()
        else:
            rows = self._run(sel + " WHERE campaign = ? ORDER BY seq", (campaign,)).fetchall()
        return [self._from_row(r) for r in rows]

    def campaigns(self) -> list[str]:
        """Campaign digests present, in order of their first stored trial."""
        return [r[0] for r in self._run(
            "SELECT campaign FROM results GROUP BY campaign ORDER BY min(seq)")]

    # -- runs: the configuration and determinism fingerprint of each campaign run

    def add_runs(self, campaign: str, runs: Sequence[dict]) -> None:
        """Record, for the campaign id ``campaign`` (a digest, or digest+detect), each workload
        configuration its trials ran on and the determinism fingerprint of its golden run. Each
        entry: ``workload_key``, ``framework``, ``workload``, ``config`` (a JSON-able dict),
        and optionally ``threads``, ``executor``, ``fingerprint`` (Fingerprint.to_dict(), or
        None when unknown) and ``fingerprint_source``. One transaction; a run recorded again
        with the same fingerprint is replaced, one with another fingerprint (a campaign resumed
        elsewhere) is kept beside it."""
        from faultlab import __version__
        self._upgrade()
        rows = []
        for r in runs:
            fp = r.get("fingerprint")
            fp_json = None if fp is None else json.dumps(_strict_json(fp), sort_keys=True,
                                                         allow_nan=False)
            # the same digest as Fingerprint.digest() (the golden run's cache folder ends in it)
            digest = "" if fp is None else _digest(json.dumps(
                _strict_json(fp), sort_keys=True, separators=(",", ":"), allow_nan=False))
            rows.append((campaign, str(r["workload_key"]), digest, str(r["framework"]),
                         str(r["workload"]),
                         json.dumps(_strict_json(r["config"]), sort_keys=True,
                                    allow_nan=False, default=_json_default),
                         None if r.get("threads") is None else int(r["threads"]),
                         r.get("executor"), fp_json, r.get("fingerprint_source"),
                         __version__, _now()))
        self._write_many(
            "INSERT OR REPLACE INTO runs (campaign, workload_key, fingerprint_digest, "
            "framework, workload, config, threads, executor, fingerprint, fingerprint_source, "
            "faultlab, recorded_at, seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
            "(SELECT coalesce(max(seq), 0) + 1 FROM runs))", rows)

    def runs(self, campaign: str | None = None) -> list[dict]:
        """The recorded runs (:data:`RUN_COLUMNS`; of one campaign id, or all) in the order
        recorded; empty for a file written before schema version 2."""
        if not self._has_v2():
            return []
        cols = list(RUN_COLUMNS)
        sel = f"SELECT {', '.join(cols)} FROM runs"
        rows = (self._run(sel + " ORDER BY seq").fetchall() if campaign is None else
                self._run(sel + " WHERE campaign = ? ORDER BY seq", (campaign,)).fetchall())
        out = []
        for r in rows:
            d = dict(zip(cols, r))
            try:
                d["config"] = json.loads(d["config"])
                d["fingerprint"] = (json.loads(d["fingerprint"]) if d["fingerprint"] is not None
                                    else None)
            except ValueError as e:
                raise ResultsError(f"{self._name}: damaged run row for campaign "
                                   f"{d['campaign']!r}: {one_line(e)}") from None
            d["fingerprint_digest"] = d["fingerprint_digest"] or None
            out.append(d)
        return out

    # -- crash campaigns (faultlab crash)

    def add_crash_reports(self, reports: Sequence[dict], *, run_id: str, workload: str,
                          steps: int | None = None, every: int | None = None,
                          seed: int | None = None) -> None:
        """Store the per-engine reports (``EngineReport.to_json()`` dicts) of one
        ``faultlab crash`` campaign ``run_id``, in one transaction: the counts as columns,
        the whole report as strict JSON."""
        from faultlab import __version__
        rows = []
        for rep in reports:
            mode = rep.get("mode")
            if mode not in CRASH_MODES:
                raise ValueError(f"crash report mode must be one of {', '.join(CRASH_MODES)}, "
                                 f"not {mode!r}")
            row = {"run_id": str(run_id), "recorded_at": _now(), "mode": mode,
                   "engine": str(rep["engine"]), "workload": str(workload),
                   "steps": steps, "every": every, "seed": seed,
                   "ok": int(bool(rep.get("ok"))), "note": rep.get("note") or "",
                   "faultlab": __version__,
                   "report": json.dumps(_strict_json(rep), sort_keys=True, allow_nan=False,
                                        default=_json_default)}
            for k in CRASH_INT_FIELDS:
                row[k] = int(rep.get(k) or 0)
            for k in CRASH_FLOAT_FIELDS:
                v = rep.get(k)
                row[k] = float(v) if v is not None and math.isfinite(float(v)) else None
            rows.append(tuple(row[c] for c in CRASH_COLUMNS))
        self._upgrade()
        self._write_many(f"INSERT INTO crash_reports ({', '.join(CRASH_COLUMNS)}) VALUES "
                         f"({', '.join('?' for _ in CRASH_COLUMNS)})", rows)

    def crash_reports(self) -> list[dict]:
        """Every stored crash report (:data:`CRASH_COLUMNS`, ``ok`` a bool and ``report`` the
        parsed JSON), in the order stored; empty for a file written before schema version 2."""
        if not self._has_v2():
            return []
        out = []
        for r in self._run(f"SELECT {', '.join(CRASH_COLUMNS)} FROM crash_reports "
                           "ORDER BY seq").fetchall():
            d = dict(zip(CRASH_COLUMNS, r))
            try:
                d["report"] = json.loads(d["report"])
            except ValueError as e:
                raise ResultsError(f"{self._name}: damaged crash report of {d['engine']!r}: "
                                   f"{one_line(e)}") from None
            d["ok"] = bool(d["ok"])
            out.append(d)
        return out

    def _write_many(self, sql: str, rows: Sequence[tuple]) -> None:
        c = self.conn
        try:
            with _immediate(c):
                for row in rows:
                    c.execute(sql, row)
        except sqlite3.Error as e:
            raise ResultsError(f"{self._name}: {one_line(e)}") from None

    def __len__(self) -> int:
        return self._run("SELECT count(*) FROM results").fetchone()[0]

    def _from_row(self, r: tuple) -> TrialResult:
        try:
            return _from_row(r)
        except (ValueError, TypeError, KeyError) as e:
            raise ResultsError(f"{self._name}: damaged row for trial {r[2]!r}: "
                               f"{one_line(e)}") from None


def _to_row(r: TrialResult) -> tuple[list, str | None]:
    nonfinite = {}
    row = []
    for name in COLUMNS:
        v = getattr(r, name)
        if name in FLOAT_FIELDS and v is not None:
            v = float(v)
            if not math.isfinite(v):
                nonfinite[name] = _nonfinite_kind(v)
                v = None
        elif name in BOOL_FIELDS and v is not None:
            v = int(bool(v))
        elif name in INT_FIELDS and v is not None:
            v = int(v)
        elif name in JSON_FIELDS:
            v = json_dumps(v)
        row.append(v)
    return row, (json.dumps(nonfinite, sort_keys=True) if nonfinite else None)


def _from_row(r: tuple) -> TrialResult:
    nonfinite = json.loads(r[0]) if r[0] else {}
    kw = dict(zip(COLUMNS, r[1:]))
    for name, kind in nonfinite.items():
        kw[name] = float(kind)
    for name in BOOL_FIELDS:
        if kw[name] is not None:
            kw[name] = bool(kw[name])
    for name in JSON_FIELDS:
        kw[name] = json.loads(kw[name])
    for name in FLOAT_FIELDS:
        if kw[name] is not None:
            kw[name] = float(kw[name])
    return TrialResult(**kw)


def _now() -> str:
    import datetime
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _digest(text: str) -> str:
    import hashlib
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__

