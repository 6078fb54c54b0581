"""The text report of crash campaigns: one table for kill campaigns, one for power loss."""

from __future__ import annotations

from collections.abc import Sequence

from faultlab.checkpointing.api import Phase
from faultlab.crash.kill import EngineReport
from faultlab.report import table


def format_reports(reports: Sequence[EngineReport]) -> str:
    """A readable table of campaign reports."""
    parts = []
    kill = [r for r in reports if r.mode == "kill"]
    if kill:
        head = ("engine", "kills", "recoveries", "torn", "mixed", "lost-committed",
                "incomplete-state", "steps lost mean/max", "runs bit-identical",
                "kills by phase s/w/c/i")
        rows = []
        for r in kill:
            j = r.to_json()
            ph = "/".join(str(r.phases.get(p.value, 0)) for p in Phase)
            rows.append((r.engine, r.kills, r.recoveries, r.torn, r.mixed, r.lost, r.incomplete,
                         f"{j['steps_lost_mean']:.2f} / {j['steps_lost_max']}",
                         f"{r.runs_identical}/{r.runs}", ph))
        parts.append(table(head, rows, right=range(1, len(head))))
    power = [r for r in reports if r.mode == "power-loss"]
    if power:
        head = ("engine (power loss)", "crash points", "images", "torn", "mixed",
                "lost-committed", "steps lost mean/max", "resumed bit-identical", "note")
        rows = []
        for r in power:
            j = r.to_json()
            rows.append((r.engine, r.crash_points, r.images, r.torn, r.mixed, r.lost,
                         f"{j['steps_lost_mean']:.2f} / {j['steps_lost_max']}",
                         f"{r.resumes_identical}/{r.resumes}", r.note))
        parts.append(table(head, rows, right=range(1, len(head))))
    return "\n\n".join(parts)
