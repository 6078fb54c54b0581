"""Trial results: the SQLite store, exports, DataFrames (``load``, ``curves``), statistics
(public API, ``faultlab.results``); the text tables are faultlab.report's, re-exported here."""

from faultlab.report import describe_fault, describe_faults, format_results, format_summary
from faultlab.results.export import EXPORT_COLUMNS, to_csv, to_pandas, to_parquet, to_records
from faultlab.results.frame import CURVE_COLUMNS, TRIAL_COLUMNS, curves, load, split_id
from faultlab.results.stats import (OutcomeRow, summarize, summarize_after_recovery,
                                    wilson_interval)
from faultlab.results.store import (APPLICATION_ID, BUSY_TIMEOUT_S, OUTCOMES, SCHEMA_VERSION,
                                    TOTAL, ResultsError, ResultStore, TrialResult)

__all__ = ["APPLICATION_ID", "BUSY_TIMEOUT_S", "CURVE_COLUMNS", "EXPORT_COLUMNS", "OUTCOMES",
           "SCHEMA_VERSION", "TOTAL", "TRIAL_COLUMNS", "OutcomeRow", "ResultsError", "ResultStore", "TrialResult",
           "curves", "describe_fault", "describe_faults", "format_results", "format_summary",
           "load", "split_id", "summarize",
           "summarize_after_recovery", "to_csv", "to_pandas", "to_parquet", "to_records",
           "wilson_interval"]
