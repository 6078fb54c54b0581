"""Text reports: the one table formatter, and every table faultlab prints with it."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any


def ascii_cell(s: Any) -> str:
    """A cell as printable ASCII (names from files may hold anything)."""
    return str(s).encode("ascii", "backslashreplace").decode("ascii")


def clip(s: str, width: int) -> str:
    return s if len(s) <= width else s[: max(0, width - 3)] + "..."


def table(header: Sequence[str], rows: Sequence[Sequence[Any]],
          right: Collection[int] = ()) -> str:
    """A fixed-width ASCII table: the header, a rule, the rows; columns in `right` (indices)
    right-aligned, the others left-aligned; trailing spaces stripped."""
    cells = [[ascii_cell(c) for c in row] for row in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])
