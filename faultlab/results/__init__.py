"""Trial results: the SQLite store, exports, DataFrames (``load``, ``curves``; ``load_runs``:
each run's configuration and determinism fingerprint; ``load_crash``: stored ``faultlab crash``
campaigns), statistics (public API, ``faultlab.results``); the text tables are
faultlab.report's, re-exported here."""

from faultlab.report import describe_fault, describe_faults, format_results, format_summary
from faultlab.results.export import EXPORT_COLUMNS, to_csv, to_pandas, to_parquet, to_records
from faultlab.results.frame import (CRASH_REPORT_COLUMNS, CURVE_COLUMNS, RUNS_COLUMNS,
                                    TRIAL_COLUMNS, curves, load, load_crash, load_runs,
                                    split_id)
from faultlab.results.runs import golden_records
from faultlab.results.stats import (OutcomeRow, summarize, summarize_after_recovery,
                                    wilson_interval)
from faultlab.results.store import (APPLICATION_ID, BUSY_TIMEOUT_S, OUTCOMES, SCHEMA_VERSION,
                                    TOTAL, ResultsError, ResultStore, TrialResult)

__all__ = ["APPLICATION_ID", "BUSY_TIMEOUT_S", "CRASH_REPORT_COLUMNS", "CURVE_COLUMNS",
           "EXPORT_COLUMNS", "OUTCOMES", "RUNS_COLUMNS", "SCHEMA_VERSION", "TOTAL",
           "TRIAL_COLUMNS", "OutcomeRow", "ResultsError", "ResultStore", "TrialResult",
           "curves", "describe_fault", "describe_faults", "format_results", "format_summary",
           "golden_records", "load", "load_crash", "load_runs", "split_id", "summarize",
           "summarize_after_recovery", "to_csv", "to_pandas", "to_parquet", "to_records",
           "wilson_interval"]
