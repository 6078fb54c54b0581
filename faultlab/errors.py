"""Errors a user can cause. Each renders as one line and maps to exit code 2."""

from __future__ import annotations


class FaultlabError(Exception):
    """Base class for user-facing errors (bad input, missing data, bad settings)."""

    exit_code = 2


class SpecError(FaultlabError):
    """A fault, position or workload specification is invalid; `field` names the part
    (layer, site, positions, replica, step) so a caller can point at the file cell."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class CampaignError(FaultlabError):
    """A campaign file is malformed; names the file, row and column at fault."""

    def __init__(self, message: str, file: str | None = None, row: int | None = None,
                 column: str | None = None):
        self.message, self.file, self.row, self.column = message, file, row, column
        where = []
        if file is not None:
            where.append(str(file) + (f":{row}" if row is not None else ""))
        if column is not None:
            where.append(f"column '{column}'")
        super().__init__((": ".join(where) + ": " if where else "") + message)


class DataError(FaultlabError):
    """A dataset a workload needs is missing or unreadable."""


class CheckpointError(FaultlabError):
    """A checkpoint is corrupt, truncated, foreign or cannot be written."""
