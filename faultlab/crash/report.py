"""The text report of crash campaigns: one table for kill campaigns, one for power loss (the
tables themselves are faultlab.report.format_crash, which `faultlab report` uses for stored
crash campaigns too)."""

from __future__ import annotations

from collections.abc import Sequence

from faultlab.crash.kill import EngineReport
from faultlab.report import format_crash


def format_reports(reports: Sequence[EngineReport]) -> str:
    """A readable table of campaign reports."""
    return format_crash([r.to_json() for r in reports])
