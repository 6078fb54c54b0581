"""Trial results: the SQLite store, exports, statistics (public API, ``faultlab.results``)."""

from faultlab.results.store import (APPLICATION_ID, BUSY_TIMEOUT_S, EXPORT_COLUMNS, OUTCOMES,
                                    SCHEMA_VERSION, TOTAL, OutcomeRow, ResultsError,
                                    ResultStore, TrialResult, describe_fault, describe_faults,
                                    format_results, format_summary, summarize, to_csv,
                                    to_pandas, to_parquet, to_records, wilson_interval)

__all__ = ["APPLICATION_ID", "BUSY_TIMEOUT_S", "EXPORT_COLUMNS", "OUTCOMES", "SCHEMA_VERSION",
           "TOTAL", "OutcomeRow", "ResultsError", "ResultStore", "TrialResult",
           "describe_fault", "describe_faults", "format_results", "format_summary", "summarize",
           "to_csv", "to_pandas", "to_parquet", "to_records", "wilson_interval"]
