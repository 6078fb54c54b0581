"""Campaign files' entry points: read a file of either format into a :class:`Campaign`,
its format detected; nothing in a file is executed, every cell is checked (cells.py)."""

from __future__ import annotations

import codecs
import dataclasses
import csv
import hashlib
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from faultlab.campaigns.cells import data_lines, framework_override, show
from faultlab.campaigns.columnar import COLUMNS, parse_columnar
from faultlab.campaigns.isca import ISCA_KEYS, parse_isca
from faultlab.errors import CampaignError, SpecError, printable
from faultlab.faults import Framework, parse_enum
from faultlab.trials import Trial
from faultlab.workloads.allow import allowing, parse_entry

#: a campaign file larger than this is refused before it is parsed
MAX_FILE_BYTES = 64 << 20


@dataclass
class Campaign:
    """A parsed campaign file: its trials and a digest naming it in the results store."""

    path: str
    format: str            # "isca" | "columnar"
    trials: list[Trial]
    digest: str            # sha256 of the file bytes plus the framework override, 16 hex digits

    def with_horizon(self, horizon: int) -> "Campaign":
        """The same campaign with every trial's horizon set to `horizon` steps after its first
        fault (`faultlab run --horizon`); a different experiment, so a different digest."""
        if not isinstance(horizon, int) or isinstance(horizon, bool) or horizon < 0:
            raise SpecError(f"--horizon must be a whole number of steps >= 0, got {horizon!r}")
        trials = [dataclasses.replace(t, horizon=horizon) for t in self.trials]
        digest = hashlib.sha256(f"{self.digest}:horizon={horizon}".encode()).hexdigest()[:16]
        return Campaign(self.path, self.format, trials, digest)

    def info(self) -> dict:
        """What `faultlab validate` reports: path, format, digest, trial and fault counts, and
        the framework:workload pairs it runs."""
        return {"campaign": self.path, "format": self.format, "digest": self.digest,
                "trials": len(self.trials), "faults": sum(len(t.faults) + len(t.process_faults)
                                                for t in self.trials),
                "workloads": sorted({f"{t.workload.framework.value}:{t.workload.workload}"
                                     for t in self.trials})}


# --- entry points -------------------------------------------------------------------------------

def load_campaign(path, framework: str | None = None, *,
                  allow_workloads: Iterable[str] = ()) -> Campaign:
    """Read a campaign file of either format; `framework` (torch|tf) overrides the file's.

    A user workload (`module:function`) the file names must be allowed: by `allow_workloads`
    (modules, `pkg.mod:function`; as `--allow-workload`), an installed entry point or the
    project's pyproject.toml (faultlab/workloads/allow.py); otherwise a CampaignError at its
    cell, and nothing is imported. Built-in workloads too large for this machine are refused
    (faultlab/workloads/estimate.py)."""
    try:
        p = os.fsdecode(os.fspath(path))
    except TypeError:
        raise CampaignError(f"not a file path: {show(repr(path))}") from None
    try:
        st = os.stat(p)
        if stat.S_ISDIR(st.st_mode):
            raise CampaignError("is a directory, not a campaign file", file=p)
        if not stat.S_ISREG(st.st_mode):
            raise CampaignError("is not a regular file", file=p)
        with open(p, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise CampaignError("no such campaign file", file=p) from None
    except (OSError, ValueError) as e:   # permissions, name too long, NUL in the path, ...
        raise CampaignError(f"cannot read the campaign file: {getattr(e, 'strerror', None) or e}",
                            file=p) from None
    if len(data) > MAX_FILE_BYTES:
        raise CampaignError(f"file is larger than {MAX_FILE_BYTES >> 20} MiB", file=p)
    return parse_campaign(data, p, framework, allow_workloads=allow_workloads)


def parse_campaign(data: bytes, path: str = "<campaign>", framework: str | None = None, *,
                   allow_workloads: Iterable[str] = ()) -> Campaign:
    """Parse the bytes of a campaign file (format detected); see :func:`load_campaign`.

    `path` names the file in messages and in each trial's `source`; it is escaped once here
    (errors.printable: a line break, a terminal escape or a NUL in a file name must not
    reach a one-line message), and CampaignError escapes whatever it is given again."""
    real = str(path)
    path = printable(real)
    fw = framework_override(framework, path)
    text = decode(data, path)
    fmt = detect_format(text, path)
    parse = parse_isca if fmt == "isca" else parse_columnar
    if isinstance(allow_workloads, str):
        allow_workloads = (allow_workloads,)
    try:
        entries = [parse_entry(e) for e in allow_workloads]
    except SpecError as e:
        raise CampaignError(f"allow_workloads: {e}", file=path) from None
    with allowing(entries):
        trials = parse(text, path, fw)
    return Campaign(path=real, format=fmt, trials=trials, digest=campaign_digest(data, fw))


def campaign_digest(data: bytes, framework: str | None = None) -> str:
    """sha256 of the file bytes and the framework override (hex, 16 digits)."""
    h = hashlib.sha256(data)
    if framework is not None:
        h.update(b"\0framework=" + parse_enum(Framework, framework, "framework").value.encode())
    return h.hexdigest()[:16]


def decode(data: bytes, path: str = "<campaign>") -> str:
    """UTF-8 (optionally with a BOM) text of a campaign file, or a CampaignError."""
    if not data:
        raise CampaignError("file is empty", file=path)
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        row = data[:e.start].count(b"\n") + 1
        raise CampaignError(f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                            f"campaign files are UTF-8 CSV", file=path, row=row) from None


def detect_format(text: str, path: str = "<campaign>") -> str:
    """'columnar' when the first data line is a header with a `workload` column, 'isca' when
    its first field is an ISCA key; otherwise a CampaignError saying why neither matched."""
    first = next(data_lines(text, path), None)
    if first is None:
        raise CampaignError("no campaign data (only blank lines and comments)", file=path)
    row, line = first
    try:
        cells = next(csv.reader([line], strict=True, skipinitialspace=True), [])
    except csv.Error:
        cells = line.split(",")
    names = [c.strip().lower() for c in cells]
    if "workload" in names:
        return "columnar"
    given = [n for n in names if n]
    if len(given) >= 2 and all(n in COLUMNS for n in given):
        raise CampaignError("looks like a columnar header but has no 'workload' column",
                            file=path, row=row)
    if names and names[0] in ISCA_KEYS:
        return "isca"
    raise CampaignError(
        f"neither format matched: the first line is not an ISCA key/value line (first field "
        f"{show(cells[0].strip() if cells else '')} is not a key such as model, stage, fmodel) "
        f"nor a columnar header (no 'workload' column)", file=path, row=row)

