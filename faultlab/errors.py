"""Errors a user can cause. Each renders as one line and maps to exit code 2."""

from __future__ import annotations

import os


def printable(text) -> str:
    """`text` (a str, or a path: str, bytes or os.PathLike) for a one-line message: every
    character that is not printable (line breaks, tabs, terminal escapes, NUL, format and
    bidi controls, the surrogates of undecodable file-name bytes) is written as its Python
    escape (\\n, \\x1b, \\u202e, \\udcff), the rest is left as it is."""
    if isinstance(text, os.PathLike):
        text = os.fspath(text)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


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
    """A campaign file is malformed; names the file, row and column at fault.

    The file name and the column are user text: they are rendered through `printable`, so
    a name with a line break, a terminal escape or a NUL still gives one plain line."""

    def __init__(self, message: str, file: str | None = None, row: int | None = None,
                 column: str | None = None):
        self.message, self.file, self.row, self.column = message, file, row, column
        where = self.where
        super().__init__((where + ": " if where else "") + message)

    @property
    def where(self) -> str:
        """"file:row: column 'name'" (the parts that are known), escaped."""
        where = []
        if self.file is not None:
            where.append(printable(self.file) + (f":{self.row}" if self.row is not None else ""))
        if self.column is not None:
            where.append(f"column '{printable(self.column)}'")
        return ": ".join(where)


class DataError(FaultlabError):
    """A dataset a workload needs is missing or unreadable."""


class CheckpointError(FaultlabError):
    """A checkpoint is corrupt, truncated, foreign or cannot be written."""
