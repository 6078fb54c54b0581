"""Append-only JSON-lines logs written by processes that may be killed at any instant
(framework-free): one `os.write` per record, and a reader that skips the torn last line."""

from __future__ import annotations

import json
import os
from pathlib import Path


def append(path: str | os.PathLike, record: dict) -> None:
    """Append one record as one line, in one write (O_APPEND)."""
    data = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read(path: str | os.PathLike) -> list[dict]:
    """The complete records, in order; a line a kill cut short is skipped; no file: []."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out
