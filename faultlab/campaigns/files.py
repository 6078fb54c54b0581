"""Campaign files: the ISCA'23 key/value format and faultlab's columnar CSV, read into trials.

Nothing in a file is executed (no eval, no pickle); every cell is checked against a closed
grammar. Every problem is a :class:`CampaignError` naming the file, the row (1-based line number)
and the column (ISCA key or CSV column name). See docs/formats.md for both formats.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import math
import os
import re
import stat
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from faultlab.errors import CampaignError, SpecError
from faultlab.faults import (ISCA_FMODELS, ISCA_STAGES, LAYOUT_BITS, BitLayout, Duration, DurationKind,
                     FaultSpec, Framework, PositionMode, PositionSpec, Site, ValueModel,
                     ValueSpec, _enum, isca_fault)
from faultlab.trials import Trial
from faultlab.workloads.base import BUILTINS, WorkloadConfig, default_config

#: a campaign file larger than this is refused before it is parsed
MAX_FILE_BYTES = 64 << 20
MAX_INT = 2**31 - 1          # counts, sizes, steps, indices
MAX_SEED = 2**63 - 1         # seeds fit a signed 64-bit integer (torch and tf both take it)
MAX_DIMS = 8                 # dimensions of a position
MAX_NAME = 200               # characters of a layer, workload, dataset or trial name

#: model names of the ISCA'23 artifact that faultlab does not build in
ISCA_ARTIFACT_MODELS = ("resnet18_sgd", "resnet18_nobn", "effnet", "densenet", "nfnet")

ISCA_REQUIRED = ("model", "stage", "fmodel", "target_worker", "target_layer", "target_epoch",
                 "target_step")
ISCA_OPTIONAL = ("inj_pos", "inj_values", "learning_rate", "seed")
ISCA_EXTENSIONS = ("framework", "replicas", "per_replica_batch", "width", "input_size",
                   "dataset", "steps_per_epoch", "epochs", "eval_samples", "checkpoint_every",
                   "horizon", "duration", "duration_steps", "probability", "fault_seed")
ISCA_KEYS = ISCA_REQUIRED + ISCA_OPTIONAL + ISCA_EXTENSIONS
ISCA_LIST_KEYS = frozenset({"inj_pos", "inj_values"})

#: columns of a trial's workload (rows of one trial must agree on them)
WORKLOAD_COLUMNS = ("framework", "workload", "replicas", "per_replica_batch", "width",
                    "input_size", "dataset", "steps_per_epoch", "epochs", "eval_samples",
                    "checkpoint_every", "lr", "seed", "horizon")
FAULT_COLUMNS = ("site", "layer", "tensor", "replica", "epoch", "step", "value", "bit", "bits",
                 "stuck", "factor", "values", "ramp", "layout", "positions", "position_mode",
                 "count", "groups", "duration", "duration_steps", "probability", "fault_seed",
                 "stage", "fmodel")
COLUMNS = ("trial",) + WORKLOAD_COLUMNS + FAULT_COLUMNS

#: integer workload settings: allowed range
_WORKLOAD_INTS = {"replicas": (1, 65536), "per_replica_batch": (1, MAX_INT),
                  "width": (1, MAX_INT), "input_size": (1, MAX_INT),
                  "steps_per_epoch": (1, MAX_INT), "epochs": (1, MAX_INT),
                  "eval_samples": (1, MAX_INT), "checkpoint_every": (0, MAX_INT),
                  "seed": (0, MAX_SEED)}
#: tensors a state site may name
_TENSORS = {Site.PARAM: ("weight", "bias"), Site.OPT_STATE: ("m", "v"),
            Site.HOST_STATE: ("weight", "bias", "m", "v")}

_INT_RE = re.compile(r"[+-]?[0-9]+")
_FLOAT_RE = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_NONFINITE_RE = re.compile(r"[+-]?(?:nan|inf|infinity)", re.IGNORECASE)
_LAYER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:/\[\]-]*")
_DATASET_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_TRIAL_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]*")
_USER_WORKLOAD_RE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*", re.ASCII)


@dataclass
class Campaign:
    """A parsed campaign file: its trials and a digest naming it in the results store."""

    path: str
    format: str            # "isca" | "columnar"
    trials: list[Trial]
    digest: str            # sha256 of the file bytes plus the framework override, 16 hex digits


# --- entry points -------------------------------------------------------------------------------

def load_campaign(path, framework: str | None = None) -> Campaign:
    """Read a campaign file of either format; `framework` (torch|tf) overrides the file's."""
    try:
        p = os.fsdecode(os.fspath(path))
    except TypeError:
        raise CampaignError(f"not a file path: {_show(repr(path))}") from None
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
    return parse_campaign(data, p, framework)


def parse_campaign(data: bytes, path: str = "<campaign>",
                   framework: str | None = None) -> Campaign:
    """Parse the bytes of a campaign file (format detected); see :func:`load_campaign`."""
    fw = _override(framework, path)
    text = decode(data, path)
    fmt = detect_format(text, path)
    parse = parse_isca if fmt == "isca" else parse_columnar
    return Campaign(path=str(path), format=fmt, trials=parse(text, path, fw),
                    digest=campaign_digest(data, fw))


def campaign_digest(data: bytes, framework: str | None = None) -> str:
    """sha256 of the file bytes and the framework override (hex, 16 digits)."""
    h = hashlib.sha256(data)
    if framework is not None:
        h.update(b"\0framework=" + _enum(Framework, framework, "framework").value.encode())
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
    first = next(_lines(text, path), None)
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
        f"{_show(cells[0].strip() if cells else '')} is not a key such as model, stage, fmodel) "
        f"nor a columnar header (no 'workload' column)", file=path, row=row)


# --- reading cells -------------------------------------------------------------------------------

def _show(text: str, limit: int = 40) -> str:
    """A user's text quoted for a one-line message: control characters escaped, clipped."""
    s = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text)[:limit + 1])
    return repr(s[:limit] + ("..." if len(s) > limit or len(str(text)) > limit else ""))


def _int(text: str, what: str, lo: int = 0, hi: int = MAX_INT) -> int:
    t = text.strip()
    if not _INT_RE.fullmatch(t):
        raise SpecError(f"{what} must be an integer, got {_show(t)}")
    if len(t.lstrip("+-").lstrip("0")) > 24:   # before int(): no giant conversions
        raise SpecError(f"{what} {_show(t)} is out of range {lo}..{hi}")
    n = int(t)
    if not lo <= n <= hi:
        raise SpecError(f"{what} {n} is out of range {lo}..{hi}")
    return n


def _float(text: str, what: str, finite: bool = True) -> float:
    t = text.strip()
    if _FLOAT_RE.fullmatch(t):
        x = float(t)
        if finite and not math.isfinite(x):
            raise SpecError(f"{what} {_show(t)} overflows a float")
        return x
    if _NONFINITE_RE.fullmatch(t):
        if finite:
            raise SpecError(f"{what} must be a finite number, got {_show(t)}")
        return float(t)
    raise SpecError(f"{what} must be a number, got {_show(t)}")


def _name(text: str, what: str, pattern: re.Pattern, hint: str) -> str:
    t = text.strip()
    if len(t) > MAX_NAME or not pattern.fullmatch(t):
        raise SpecError(f"{what} {_show(t)} is not a valid name ({hint})")
    return t


def _layer(text: str, what: str) -> str:
    return _name(text, what, _LAYER_RE, "letters, digits and _ . : / - [ ]")


def _dataset(text: str, what: str) -> str:
    return _name(text, what, _DATASET_RE, "letters, digits and _ . -")


def _trial_id(text: str, what: str) -> str:
    return _name(text, what, _TRIAL_RE, "letters, digits and _ . : -")


def _workload_name(text: str, what: str) -> str:
    t = text.strip()
    low = t.lower()
    if low in BUILTINS:
        return low
    if low in ISCA_ARTIFACT_MODELS:
        raise SpecError(f"the ISCA artifact's model {t!r} is not built into faultlab "
                        f"(built-ins: {', '.join(sorted(BUILTINS))}; or module:function "
                        f"for your own)")
    if ":" in t and _USER_WORKLOAD_RE.fullmatch(t):
        return t
    if ":" in t:
        raise SpecError(f"user workload {_show(t)} must be written module.path:function")
    try:
        default_config(t)
    except SpecError as e:
        raise SpecError(str(e).replace(repr(t), _show(t))) from None
    return t  # pragma: no cover - every other name is refused above


def _choice(enum_cls, what: str):
    def parse(text: str, _what: str):
        t = text.strip()
        try:
            return enum_cls(t.lower())
        except ValueError:
            raise SpecError(f"unknown {what} {_show(t)} (expected one of: "
                            f"{', '.join(m.value for m in enum_cls)})") from None
    return parse


def _positions(parts: Iterable[str], what: str) -> tuple[tuple[int, ...], ...]:
    out: list[tuple[int, ...]] = []
    seen: set[tuple[int, ...]] = set()
    for part in parts:
        p = part.strip()
        if not p:
            raise SpecError(f"{what}: empty position")
        dims = p.split("/")
        if len(dims) > MAX_DIMS:
            raise SpecError(f"{what}: position {_show(p)} has {len(dims)} dimensions "
                            f"(at most {MAX_DIMS})")
        try:
            ix = tuple(_int(d, "index", 0, MAX_INT) for d in dims)
        except SpecError as e:
            raise SpecError(f"{what}: position {_show(p)}: {e} (positions are "
                            f"non-negative indices a/b/c/d)") from None
        if out and len(ix) != len(out[0]):
            raise SpecError(f"{what}: position {_show(p)} has {len(ix)} dimensions but "
                            f"{'/'.join(map(str, out[0]))} has {len(out[0])}")
        if ix in seen:
            raise SpecError(f"{what}: position {_show(p)} is listed twice")
        seen.add(ix)
        out.append(ix)
    if not out:
        raise SpecError(f"{what}: no positions")
    return tuple(out)


def _floats(parts: Iterable[str], what: str, finite: bool = False) -> tuple[float, ...]:
    out = []
    for part in parts:
        if not part.strip():
            raise SpecError(f"{what}: empty value")
        out.append(_float(part, what, finite=finite))
    if not out:
        raise SpecError(f"{what}: no values")
    return tuple(out)


def _override(framework, path) -> str | None:
    if framework is None:
        return None
    try:
        return _enum(Framework, framework, "framework").value
    except SpecError as e:
        raise CampaignError(f"--framework: {e}", file=path, column="framework") from None


class _Record:
    """Cells of one ISCA file or one CSV row: column -> (row, text); empty cells absent."""

    def __init__(self, path: str, cells: dict[str, tuple[int, str]], row: int | None):
        self.path, self.cells, self.row = path, cells, row

    def has(self, col: str) -> bool:
        return col in self.cells

    def row_of(self, col: str | None) -> int | None:
        return self.cells[col][0] if col in self.cells else self.row

    def error(self, col: str | None, message: str, near: str | None = None) -> CampaignError:
        """An error at `col`; a missing cell is placed on the row of `near`, if any."""
        row = self.row_of(col) if col in self.cells or near is None else self.row_of(near)
        return CampaignError(message, file=self.path, row=row, column=col)

    @contextmanager
    def at(self, col: str | None):
        """Turn a SpecError raised inside into a CampaignError at this cell."""
        try:
            yield
        except SpecError as e:
            raise self.error(col, str(e)) from None

    def get(self, col: str, parse: Callable, *args, default=None, **kw):
        if col not in self.cells:
            return default
        with self.at(col):
            return parse(self.cells[col][1], col, *args, **kw)

    def require(self, col: str, parse: Callable, *args, why: str = "", **kw):
        if col not in self.cells:
            raise self.error(col, f"{col} is required{why}")
        return self.get(col, parse, *args, **kw)


# --- shared parts of both formats ------------------------------------------------------------

def _lines(text: str, path: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of each line that is not blank or a `#` comment."""
    if text.startswith("\ufeff"):
        text = text[1:]
    nul = text.find("\x00")
    if nul >= 0:
        raise CampaignError("contains a NUL byte (a binary file?)", file=path,
                            row=text.count("\n", 0, nul) + 1)
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw[:-1] if raw.endswith("\r") else raw
        s = line.strip()
        if s and not s.startswith("#"):
            yield number, line


def _workload(rec: _Record, name_col: str, lr_col: str, framework: str | None,
              inherit: WorkloadConfig | None = None) -> WorkloadConfig:
    """The workload configuration a record describes; empty cells take `inherit`'s values
    (rows after the first of a trial) or the workload's defaults."""
    name = rec.require(name_col, _workload_name)
    kw: dict = {}
    for col, (lo, hi) in _WORKLOAD_INTS.items():
        kw[col] = rec.get(col, _int, lo, hi)
    kw["lr"] = rec.get(lr_col, _positive_float)
    kw["dataset"] = rec.get("dataset", _dataset)
    file_fw = rec.get("framework", _choice(Framework, "framework"))
    kw["framework"] = framework or file_fw
    if inherit is not None and inherit.workload == name:
        for k, v in kw.items():
            if v is None and k != "framework":
                kw[k] = getattr(inherit, k)
        if kw["framework"] is None:
            kw["framework"] = inherit.framework
    with rec.at(name_col):
        return default_config(name, **kw)


def _positive_float(text: str, what: str) -> float:
    x = _float(text, what)
    if not x > 0:
        raise SpecError(f"{what} must be positive, got {_show(text.strip())}")
    return x


def _probability(text: str, what: str) -> float:
    x = _float(text, what)
    if not 0.0 < x <= 1.0:
        raise SpecError(f"{what} {_show(text.strip())} is out of range (0, 1]")
    return x


def _duration(rec: _Record) -> Duration:
    kind = rec.get("duration", _choice(DurationKind, "duration"), default=DurationKind.TRANSIENT)
    steps = rec.get("duration_steps", _int, 1, MAX_INT)
    prob = rec.get("probability", _probability)
    if steps is not None and kind is not DurationKind.STEPS:
        raise rec.error("duration_steps", f"duration_steps applies to duration 'steps', "
                                          f"not {kind.value!r}")
    if prob is not None and kind is not DurationKind.INTERMITTENT:
        raise rec.error("probability", f"probability applies to duration 'intermittent', "
                                       f"not {kind.value!r}")
    if kind is DurationKind.STEPS and steps is None:
        raise rec.error("duration_steps", "duration 'steps' needs duration_steps", "duration")
    if kind is DurationKind.INTERMITTENT and prob is None:
        raise rec.error("probability", "duration 'intermittent' needs a probability",
                        "duration")
    with rec.at("duration"):
        return Duration(kind, steps=steps or 1, probability=1.0 if prob is None else prob)


def _when(rec: _Record, cfg: WorkloadConfig, replica_col: str, epoch_col: str, step_col: str,
          required: bool) -> tuple[int, int]:
    """(replica, global step) checked against the workload's replicas and length."""
    get = rec.require if required else rec.get
    kw = {} if required else {"default": 0}
    replica = get(replica_col, _int, 0, MAX_INT, **kw)
    epoch = get(epoch_col, _int, 0, MAX_INT, **kw)
    step = get(step_col, _int, 0, MAX_INT, **kw)
    if replica >= cfg.replicas:
        raise rec.error(replica_col, f"{replica_col} {replica} is out of range "
                                     f"0..{cfg.replicas - 1} ({cfg.replicas} replicas)")
    if step >= cfg.steps_per_epoch:
        raise rec.error(step_col, f"{step_col} {step} is out of range "
                                  f"0..{cfg.steps_per_epoch - 1} ({cfg.steps_per_epoch} steps "
                                  f"an epoch)")
    total = cfg.total_steps
    glob = epoch * cfg.steps_per_epoch + step
    if glob >= total:
        raise rec.error(epoch_col, f"{epoch_col} {epoch} is out of range 0..{cfg.epochs - 1}: "
                                   f"global step {epoch}*{cfg.steps_per_epoch}+{step}={glob} is "
                                   f"past the run's {total} steps")
    return replica, glob


def _default_fault_seed(seed: int, trial_id: str, index: int) -> int:
    """Deterministic fault seed from (workload seed, trial id, row index within the trial)."""
    digest = hashlib.sha256(f"{seed}\x1f{trial_id}\x1f{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & MAX_SEED


# --- the ISCA key/value format ---------------------------------------------------------------

def parse_isca(text: str, path: str = "<campaign>", framework: str | None = None) -> list[Trial]:
    """One trial ("0") from an ISCA'23 key/value file (read unmodified; extensions optional)."""
    fw = _override(framework, path)
    cells: dict[str, tuple[int, str]] = {}
    lists: dict[str, tuple[int, list[str]]] = {}
    for row, line in _lines(text, path):
        parts = [p.strip() for p in line.split(",")]
        while len(parts) > 1 and not parts[-1]:   # trailing commas of spreadsheet exports
            parts.pop()
        key = parts[0].lower()
        if key not in ISCA_KEYS:
            raise CampaignError(f"unknown key {_show(parts[0])} (keys: {', '.join(ISCA_KEYS)})",
                                file=path, row=row, column=_show(parts[0])[1:-1])
        if key in cells:
            raise CampaignError(f"duplicate key {key} (first on row {cells[key][0]})",
                                file=path, row=row, column=key)
        values = parts[1:]
        if not values:
            raise CampaignError(f"key {key} has no value (expected {key},value)", file=path,
                                row=row, column=key)
        if "" in values:
            raise CampaignError(f"key {key} has an empty value in field "
                                f"{values.index('') + 2}", file=path, row=row, column=key)
        if key not in ISCA_LIST_KEYS and len(values) > 1:
            raise CampaignError(f"key {key} takes one value, got {len(values)}", file=path,
                                row=row, column=key)
        cells[key] = (row, values[0])
        if key in ISCA_LIST_KEYS:
            lists[key] = (row, values)
    if not cells:
        raise CampaignError("no campaign data (only blank lines and comments)", file=path)
    rec = _Record(path, cells, None)
    for key in ISCA_REQUIRED:
        if key not in cells:
            raise CampaignError(f"missing required key {key} (required: "
                                f"{', '.join(ISCA_REQUIRED)})", file=path, column=key)

    cfg = _workload(rec, "model", "learning_rate", fw)
    stage = rec.get("stage", _isca_stage)
    fmodel = rec.get("fmodel", _isca_fmodel)
    layer = rec.get("target_layer", _layer)
    replica, step = _when(rec, cfg, "target_worker", "target_epoch", "target_step", True)
    positions: tuple = ()
    values: tuple = ()
    if "inj_pos" in lists:
        with rec.at("inj_pos"):
            positions = _positions(lists["inj_pos"][1], "inj_pos")
    if "inj_values" in lists:
        with rec.at("inj_values"):
            values = _floats(lists["inj_values"][1], "inj_values")
        if not positions:
            raise rec.error("inj_values", "inj_values needs inj_pos (the positions they go to)")
        if len(values) not in (1, len(positions)):
            raise rec.error("inj_values", f"{len(values)} inj_values for {len(positions)} "
                                          f"positions (give 1 or {len(positions)})")
    with rec.at("target_layer"):
        site, base, vspec, pspec = isca_fault(fmodel, stage, layer, positions, values)
    horizon = rec.get("horizon", _int, 0, MAX_INT)
    duration = _duration(rec)
    seed = rec.get("fault_seed", _int, 0, MAX_SEED, default=cfg.seed)
    with rec.at("fmodel"):
        fault = FaultSpec(site, vspec, pspec, layer=base, replica=replica, step=step,
                          duration=duration, seed=seed)
    first = min(r for r, _ in cells.values())
    def loc(key):
        return f"{path}:{cells[key][0]}: column '{key}'" if key in cells else f"{path}:{first}"
    where = {"layer": loc("target_layer"), "site": loc("fmodel"), "positions": loc("inj_pos"),
             "replica": loc("target_worker"), "step": loc("target_step")}
    return [Trial("0", cfg, (fault,), horizon=horizon, source=f"{path}:{first}",
                  locations=(where,))]


def _isca_stage(text: str, what: str) -> str:
    t = text.strip().lower()
    if t not in ISCA_STAGES:
        raise SpecError(f"unknown {what} {_show(text.strip())} (expected one of: "
                        f"{', '.join(ISCA_STAGES)})")
    return t


def _isca_fmodel(text: str, what: str) -> str:
    t = text.strip().upper()
    if t not in ISCA_FMODELS:
        raise SpecError(f"unknown {what} {_show(text.strip())} (expected one of: "
                        f"{', '.join(sorted(ISCA_FMODELS))})")
    return t


# --- the columnar CSV format -----------------------------------------------------------------

def _csv_cells(line: str, path: str, row: int) -> list[str]:
    try:
        records = list(csv.reader([line], strict=True, skipinitialspace=True))
    except csv.Error as e:
        raise CampaignError(f"malformed CSV: {e}", file=path, row=row) from None
    if len(records) != 1:
        raise CampaignError("malformed CSV: a line break inside the row", file=path, row=row)
    return records[0]


@dataclass
class _Group:
    """The rows of one trial seen so far."""

    row: int
    explicit: bool
    cfg: WorkloadConfig
    horizon: int | None
    faults: list[FaultSpec]
    control: bool
    rows: list[int] = field(default_factory=list)


def parse_columnar(text: str, path: str = "<campaign>",
                   framework: str | None = None) -> list[Trial]:
    """Trials from a columnar CSV campaign (header line; one trial per row or trial id)."""
    fw = _override(framework, path)
    lines = iter(_lines(text, path))
    first = next(lines, None)
    if first is None:
        raise CampaignError("no campaign data (only blank lines and comments)", file=path)
    header_row, header_line = first
    raw = _csv_cells(header_line, path, header_row)
    names = [c.strip().lower() for c in raw]
    while names and not names[-1]:              # trailing commas of spreadsheet exports
        names.pop()
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if not n:
            raise CampaignError(f"header field {i + 1} is empty", file=path, row=header_row)
        if n not in COLUMNS:
            raise CampaignError(f"unknown column {_show(raw[i].strip())} (columns: "
                                f"{', '.join(COLUMNS)})", file=path, row=header_row,
                                column=_show(raw[i].strip())[1:-1])
        if n in seen:
            raise CampaignError(f"duplicate column {n} (fields {seen[n] + 1} and {i + 1})",
                                file=path, row=header_row, column=n)
        seen[n] = i
    if "workload" not in seen:
        raise CampaignError("the header has no 'workload' column", file=path, row=header_row)

    groups: dict[str, _Group] = {}
    for row, line in lines:
        cells = _csv_cells(line, path, row)
        extra = cells[len(names):]
        if len(cells) < len(names) or any(c.strip() for c in extra):
            raise CampaignError(f"row has {len(cells)} fields but the header names "
                                f"{len(names)} columns", file=path, row=row)
        rec = _Record(path, {n: (row, c.strip()) for n, c in zip(names, cells) if c.strip()},
                      row)
        explicit = rec.has("trial")
        tid = rec.get("trial", _trial_id, default=str(row))
        group = groups.get(tid)
        if group is not None and not (explicit and group.explicit):
            raise rec.error("trial", f"trial id {tid} of this row collides with the default id "
                                     f"(the row number) of row {group.row if explicit else row}")
        cfg = _workload(rec, "workload", "lr", fw, inherit=group.cfg if group else None)
        horizon = rec.get("horizon", _int, 0, MAX_INT,
                          default=group.horizon if group else None)
        fault = _columnar_fault(rec, cfg, tid, len(group.faults) if group else 0)
        if group is None:
            groups[tid] = _Group(row, explicit, cfg, horizon, [fault] if fault else [],
                                 fault is None, [row] if fault else [])
            continue
        _agree(rec, tid, group, cfg, horizon)
        if group.control or fault is None:
            raise rec.error("trial", f"trial {tid} mixes a fault-free control row with other "
                                     f"rows (first on row {group.row}); a control trial has "
                                     f"exactly one row")
        group.faults.append(fault)
        group.rows.append(row)
    if not groups:
        raise CampaignError("no trials (only a header)", file=path, row=header_row)
    return [Trial(tid, g.cfg, tuple(g.faults), horizon=g.horizon, source=f"{path}:{g.row}",
                  locations=tuple({k: f"{path}:{r}: column '{k}'" for k in
                                   ("layer", "site", "positions", "replica", "step")}
                                  for r in g.rows))
            for tid, g in groups.items()]


def _agree(rec: _Record, tid: str, group: _Group, cfg: WorkloadConfig,
           horizon: int | None) -> None:
    """Rows of one trial must describe the same workload."""
    if cfg != group.cfg or horizon != group.horizon:
        mine = dict(cfg.to_dict(), horizon=horizon)
        first = dict(group.cfg.to_dict(), horizon=group.horizon)
        col = next(k for k in ("workload",) + tuple(mine) if mine[k] != first[k])
        raise rec.error(col, f"rows of trial {tid} disagree on {col}: "
                             f"{_show(str(mine[col]))} here, {_show(str(first[col]))} on row "
                             f"{group.row}")


def _columnar_fault(rec: _Record, cfg: WorkloadConfig, tid: str, index: int) -> FaultSpec | None:
    """The fault a row describes; None for a fault-free control row."""
    isca = rec.has("fmodel") or rec.has("stage")
    native = rec.has("site") or rec.has("value")
    if isca and native:
        col = "fmodel" if rec.has("fmodel") else "stage"
        raise rec.error(col, "give either site/value or stage/fmodel (ISCA names), not both")
    if not isca and not rec.has("site"):
        given = [c for c in FAULT_COLUMNS if rec.has(c)]
        if given:
            raise rec.error("site", f"site is required: fault columns are set "
                                    f"({', '.join(given)}); leave them all empty for a "
                                    f"fault-free control trial")
        return None
    replica, step = _when(rec, cfg, "replica", "epoch", "step", False)
    duration = _duration(rec)
    seed = rec.get("fault_seed", _int, 0, MAX_SEED)
    if seed is None:
        seed = _default_fault_seed(cfg.seed, tid, index)
    if isca:
        site, layer, vspec, pspec = _columnar_isca(rec)
        tensor = None
    else:
        site = rec.get("site", _choice(Site, "site"))
        layer = rec.require("layer", _layer)
        tensor = _tensor(rec, site)
        vspec = _value_spec(rec)
        pspec = _position_spec(rec)
        _check_value_count(rec, vspec, pspec)
    with rec.at("fmodel" if isca else "site"):
        return FaultSpec(site, vspec, pspec, layer=layer, tensor=tensor, replica=replica,
                         step=step, duration=duration, seed=seed)


_NOT_WITH_FMODEL = ("tensor", "bit", "bits", "stuck", "factor", "ramp", "layout",
                    "position_mode", "count", "groups")


def _columnar_isca(rec: _Record):
    for col in ("stage", "fmodel"):
        if not rec.has(col):
            raise rec.error(col, f"{col} is required with "
                                 f"{'fmodel' if col == 'stage' else 'stage'} (ISCA names)")
    for col in _NOT_WITH_FMODEL:
        if rec.has(col):
            raise rec.error(col, f"{col} does not apply to an ISCA fmodel row (the fmodel "
                                 f"fixes the value and positions)")
    stage = rec.get("stage", _isca_stage)
    fmodel = rec.get("fmodel", _isca_fmodel)
    layer = rec.require("layer", _layer)
    positions = rec.get("positions", lambda t, w: _positions(t.split(";"), w), default=())
    values = rec.get("values", lambda t, w: _floats(t.split(";"), w), default=())
    if values and not positions:
        raise rec.error("values", "values need positions (the positions they go to)")
    if len(values) not in (0, 1, len(positions)):
        raise rec.error("values", f"{len(values)} values for {len(positions)} positions "
                                  f"(give 1 or {len(positions)})")
    with rec.at("layer"):
        return isca_fault(fmodel, stage, layer, positions, values)


def _tensor(rec: _Record, site: Site) -> str | None:
    if not rec.has("tensor"):
        return None
    allowed = _TENSORS.get(site)
    if allowed is None:
        raise rec.error("tensor", f"tensor applies to the state sites (param, opt_state, "
                                  f"host_state), not {site.value}")
    t = rec.cells["tensor"][1].lower()
    if t not in allowed:
        raise rec.error("tensor", f"tensor of site {site.value} must be one of "
                                  f"{', '.join(allowed)}, got {_show(rec.cells['tensor'][1])}")
    return t


#: value-model columns and the models they apply to
_VALUE_COLUMNS = {"bit": (ValueModel.BITFLIP, ValueModel.STUCK_AT), "bits": (ValueModel.BITFLIP,),
                  "stuck": (ValueModel.STUCK_AT,), "factor": (ValueModel.SCALE,),
                  "values": (ValueModel.SET,), "ramp": (ValueModel.DEGRADE,)}


def _value_spec(rec: _Record) -> ValueSpec:
    model = rec.get("value", _choice(ValueModel, "value model"), default=ValueModel.BITFLIP)
    for col, models in _VALUE_COLUMNS.items():
        if rec.has(col) and model not in models:
            raise rec.error(col, f"{col} applies to value {' or '.join(m.value for m in models)}"
                                 f", not {model.value}")
    layout = rec.get("layout", _choice(BitLayout, "bit layout"), default=BitLayout.NATIVE)
    width = LAYOUT_BITS.get(layout, 64)
    kw: dict = {"layout": layout}
    kw["bit"] = rec.get("bit", _int, 0, width - 1)
    if rec.has("bits"):
        kw["bits"] = rec.get("bits", _int, 1, width)
        if kw["bit"] is not None and kw["bits"] != 1:
            raise rec.error("bits", "give either a chosen bit or a number of random bits, "
                                    "not both")
    if rec.has("stuck"):
        kw["stuck"] = rec.get("stuck", _int, 0, 1)
    if model is ValueModel.SCALE:
        kw["factor"] = rec.require("factor", _float, why=" for value scale")
    if model is ValueModel.SET:
        kw["values"] = rec.require("values", lambda t, w: _floats(t.split(";"), w),
                                   why=" for value set (';'-separated replacements)")
    if model is ValueModel.DEGRADE:
        kw["ramp"] = rec.require("ramp", _float, why=" for value degrade")
        if kw["ramp"] == 0:
            raise rec.error("ramp", "ramp must be non-zero (relative error added per step)")
    with rec.at("value"):
        return ValueSpec(model, **kw)


def _position_spec(rec: _Record) -> PositionSpec:
    positions = rec.get("positions", lambda t, w: _positions(t.split(";"), w))
    default = PositionMode.EXPLICIT if positions else PositionMode.RANDOM
    mode = rec.get("position_mode", _choice(PositionMode, "position mode"), default=default)
    if mode is PositionMode.EXPLICIT and not positions:
        raise rec.error("positions", "position_mode explicit needs positions")
    if positions and mode is not PositionMode.EXPLICIT:
        raise rec.error("positions", f"positions are given but position_mode is {mode.value}")
    if rec.has("count") and mode is PositionMode.EXPLICIT:
        raise rec.error("count", "count does not apply to explicit positions")
    if rec.has("groups") and mode is not PositionMode.GROUPS:
        raise rec.error("groups", f"groups applies to position_mode groups, not {mode.value}")
    count = rec.get("count", _int, 1, MAX_INT, default=1)
    groups = rec.get("groups", _int, 1, MAX_INT, default=1)
    with rec.at("position_mode"):
        return PositionSpec(mode, indices=positions or (), count=count, groups=groups)


def _check_value_count(rec: _Record, v: ValueSpec, p: PositionSpec) -> None:
    """SET needs one replacement, or one per element hit (when that number is fixed)."""
    if v.model is not ValueModel.SET or len(v.values) == 1:
        return
    n = len(v.values)
    if p.mode is PositionMode.EXPLICIT and n != len(p.indices):
        raise rec.error("values", f"{n} values for {len(p.indices)} positions "
                                  f"(give 1 or {len(p.indices)})")
    if p.mode in (PositionMode.RANDOM, PositionMode.CONSECUTIVE) and n != p.count:
        raise rec.error("values", f"{n} values for {p.count} positions (give 1 or {p.count})")
    if p.mode is PositionMode.GROUPS:
        raise rec.error("values", "position_mode groups hits a random number of elements: "
                                  "give exactly one value")


# --- writing -------------------------------------------------------------------------------------

def _num(x: float) -> str:
    return repr(float(x))  # shortest text that reads back to the same float; nan, inf, -inf


def format_columnar(trials: Iterable[Trial]) -> str:
    """A columnar CSV campaign that :func:`parse_columnar` reads back to the same trials.

    Every workload setting and each fault's seed is written explicitly (used by `plan`)."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(COLUMNS)
    for t in trials:
        _trial_id(t.trial_id, "trial")
        cfg = t.workload
        if cfg.options:
            raise SpecError(f"trial {t.trial_id}: workload options cannot be written to a "
                            f"columnar campaign")
        base = {"trial": t.trial_id, "framework": cfg.framework.value, "workload": cfg.workload,
                "lr": _num(cfg.lr), "dataset": cfg.dataset,
                "horizon": "" if t.horizon is None else str(t.horizon)}
        for col in _WORKLOAD_INTS:
            base[col] = str(getattr(cfg, col))
        for f in t.faults or (None,):
            row = dict(base)
            if f is not None:
                row.update(_fault_cells(f, cfg))
            w.writerow([row.get(c, "") for c in COLUMNS])
    return out.getvalue()


def _fault_cells(f: FaultSpec, cfg: WorkloadConfig) -> dict[str, str]:
    v, p, d = f.value, f.positions, f.duration
    row = {"site": f.site.value, "layer": f.layer or "", "tensor": f.tensor or "",
           "replica": str(f.replica), "epoch": str(f.step // cfg.steps_per_epoch),
           "step": str(f.step % cfg.steps_per_epoch), "value": v.model.value,
           "layout": v.layout.value, "position_mode": p.mode.value,
           "duration": d.kind.value, "fault_seed": str(f.seed)}
    if v.bit is not None:
        row["bit"] = str(v.bit)
    if v.model is ValueModel.BITFLIP and v.bit is None:
        row["bits"] = str(v.bits)
    if v.model is ValueModel.STUCK_AT:
        row["stuck"] = str(v.stuck)
    if v.model is ValueModel.SCALE:
        row["factor"] = _num(v.factor)
    if v.model is ValueModel.SET:
        row["values"] = ";".join(_num(x) for x in v.values)
    if v.model is ValueModel.DEGRADE:
        row["ramp"] = _num(v.ramp)
    if p.mode is PositionMode.EXPLICIT:
        row["positions"] = ";".join("/".join(map(str, ix)) for ix in p.indices)
    else:
        row["count"] = str(p.count)
    if p.mode is PositionMode.GROUPS:
        row["groups"] = str(p.groups)
    if d.kind is DurationKind.STEPS:
        row["duration_steps"] = str(d.steps)
    if d.kind is DurationKind.INTERMITTENT:
        row["probability"] = _num(d.probability)
    return row


__all__ = ["Campaign", "load_campaign", "parse_campaign", "parse_isca", "parse_columnar",
           "detect_format", "decode", "campaign_digest", "format_columnar", "COLUMNS",
           "ISCA_KEYS", "MAX_FILE_BYTES"]
