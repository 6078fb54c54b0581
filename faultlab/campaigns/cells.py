"""The closed grammar of campaign cells (each parser: (text, what) -> value or a SpecError) and
the record parts both formats share; :class:`Record` places errors at file, row and column."""

from __future__ import annotations

import hashlib
import math
import re
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

from faultlab.errors import CampaignError, SpecError, printable
from faultlab.faults import (ISCA_FMODELS, ISCA_STAGES, Duration, DurationKind, Framework,
                             parse_enum)
from faultlab.workloads.allow import check_allowed
from faultlab.workloads.base import (BUILTINS, WorkloadConfig, check_options, default_config,
                                     is_user_workload, parse_options)
from faultlab.workloads.data import check_dataset
from faultlab.workloads.estimate import check_fits, check_processes

MAX_INT = 2**31 - 1          # counts, sizes, steps, indices
MAX_SEED = 2**63 - 1         # seeds fit a signed 64-bit integer (torch and tf both take it)
MAX_DIMS = 8                 # dimensions of a position
MAX_NAME = 200               # characters of a layer, workload, dataset or trial name

#: model names of the ISCA'23 artifact that faultlab does not build in
ISCA_ARTIFACT_MODELS = ("resnet18_sgd", "resnet18_nobn", "effnet", "densenet", "nfnet")

#: integer workload settings: allowed range
WORKLOAD_INTS = {"replicas": (1, 65536), "processes": (1, 65536), "nodes": (1, 65536),
                 "per_replica_batch": (1, MAX_INT),
                 "width": (1, MAX_INT), "input_size": (1, MAX_INT),
                 "steps_per_epoch": (1, MAX_INT), "epochs": (1, MAX_INT),
                 "eval_samples": (1, MAX_INT), "checkpoint_every": (0, MAX_INT),
                 "seed": (0, MAX_SEED)}

_INT_RE = re.compile(r"[+-]?[0-9]+")
_FLOAT_RE = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_NONFINITE_RE = re.compile(r"[+-]?(?:nan|inf|infinity)", re.IGNORECASE)
_LAYER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:/\[\]-]*")
_DATASET_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_TRIAL_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]*")
_USER_WORKLOAD_RE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*", re.ASCII)


# --- reading cells -------------------------------------------------------------------------------

def show(text: str, limit: int = 40) -> str:
    """A user's text quoted for a one-line message: control characters escaped, clipped."""
    s = printable(str(text)[:limit + 1])
    return repr(s[:limit] + ("..." if len(s) > limit or len(str(text)) > limit else ""))


def parse_int(text: str, what: str, lo: int = 0, hi: int = MAX_INT) -> int:
    t = text.strip()
    if not _INT_RE.fullmatch(t):
        raise SpecError(f"{what} must be an integer, got {show(t)}")
    if len(t.lstrip("+-").lstrip("0")) > 24:   # before int(): no giant conversions
        raise SpecError(f"{what} {show(t)} is out of range {lo}..{hi}")
    n = int(t)
    if not lo <= n <= hi:
        raise SpecError(f"{what} {n} is out of range {lo}..{hi}")
    return n


def parse_float(text: str, what: str, finite: bool = True) -> float:
    t = text.strip()
    if _FLOAT_RE.fullmatch(t):
        x = float(t)
        if finite and not math.isfinite(x):
            raise SpecError(f"{what} {show(t)} overflows a float")
        return x
    if _NONFINITE_RE.fullmatch(t):
        if finite:
            raise SpecError(f"{what} must be a finite number, got {show(t)}")
        return float(t)
    raise SpecError(f"{what} must be a number, got {show(t)}")


def parse_name(text: str, what: str, pattern: re.Pattern, hint: str) -> str:
    t = text.strip()
    if len(t) > MAX_NAME or not pattern.fullmatch(t):
        raise SpecError(f"{what} {show(t)} is not a valid name ({hint})")
    return t


def parse_layer(text: str, what: str) -> str:
    return parse_name(text, what, _LAYER_RE, "letters, digits and _ . : / - [ ]")


def parse_offload_cell(text: str, what: str) -> str:
    """An `offload` cell: "window:N" (canonical form) or "" (none, off)."""
    from faultlab.workloads.base import parse_offload
    return parse_offload(text)


def parse_dataset(text: str, what: str) -> str:
    return parse_name(text, what, _DATASET_RE, "letters, digits and _ . -")


def parse_trial_id(text: str, what: str) -> str:
    return parse_name(text, what, _TRIAL_RE, "letters, digits and _ . : -")


def parse_workload_name(text: str, what: str) -> str:
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
        raise SpecError(f"user workload {show(t)} must be written module.path:function")
    try:
        default_config(t)
    except SpecError as e:
        raise SpecError(str(e).replace(repr(t), show(t))) from None
    return t  # an installed workload's name (entry point group faultlab.workloads)


def choice_parser(enum_cls, what: str):
    def parse(text: str, _what: str):
        t = text.strip()
        try:
            return enum_cls(t.lower())
        except ValueError:
            raise SpecError(f"unknown {what} {show(t)} (expected one of: "
                            f"{', '.join(m.value for m in enum_cls)})") from None
    return parse


def parse_positions(parts: Iterable[str], what: str) -> tuple[tuple[int, ...], ...]:
    out: list[tuple[int, ...]] = []
    seen: set[tuple[int, ...]] = set()
    for part in parts:
        p = part.strip()
        if not p:
            raise SpecError(f"{what}: empty position")
        dims = p.split("/")
        if len(dims) > MAX_DIMS:
            raise SpecError(f"{what}: position {show(p)} has {len(dims)} dimensions "
                            f"(at most {MAX_DIMS})")
        try:
            ix = tuple(parse_int(d, "index", 0, MAX_INT) for d in dims)
        except SpecError as e:
            raise SpecError(f"{what}: position {show(p)}: {e} (positions are "
                            f"non-negative indices a/b/c/d)") from None
        if out and len(ix) != len(out[0]):
            raise SpecError(f"{what}: position {show(p)} has {len(ix)} dimensions but "
                            f"{'/'.join(map(str, out[0]))} has {len(out[0])}")
        if ix in seen:
            raise SpecError(f"{what}: position {show(p)} is listed twice")
        seen.add(ix)
        out.append(ix)
    if not out:
        raise SpecError(f"{what}: no positions")
    return tuple(out)


def parse_floats(parts: Iterable[str], what: str, finite: bool = False) -> tuple[float, ...]:
    out = []
    for part in parts:
        if not part.strip():
            raise SpecError(f"{what}: empty value")
        out.append(parse_float(part, what, finite=finite))
    if not out:
        raise SpecError(f"{what}: no values")
    return tuple(out)


def framework_override(framework, path) -> str | None:
    if framework is None:
        return None
    try:
        return parse_enum(Framework, framework, "framework").value
    except SpecError as e:
        raise CampaignError(f"--framework: {e}", file=path, column="framework") from None


class Record:
    """Cells of one ISCA file or one CSV row: column -> (row, text); empty cells absent."""

    def __init__(self, path: str, cells: dict[str, tuple[int, str]], row: int | None):
        self.path, self.cells, self.row = path, cells, row

    def has(self, col: str) -> bool:
        return col in self.cells

    def row_of(self, col: str | None) -> int | None:
        return self.cells[col][0] if col in self.cells else self.row

    def place(self, col: str) -> str:
        """Where column `col` of this record is, as an error names it: "file:row: column 'col'"
        (the record's first row when the cell is empty)."""
        return CampaignError("", file=self.path, row=self.row_of(col), column=col).where

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

def data_lines(text: str, path: str) -> Iterator[tuple[int, str]]:
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


def read_workload(rec: Record, name_col: str, lr_col: str, framework: str | None,
              inherit: WorkloadConfig | None = None) -> WorkloadConfig:
    """The workload configuration a record describes; empty cells take `inherit`'s values
    (rows after the first of a trial) or the workload's defaults."""
    name = rec.require(name_col, parse_workload_name)
    kw: dict = {}
    for col, (lo, hi) in WORKLOAD_INTS.items():
        kw[col] = rec.get(col, parse_int, lo, hi)
    kw["lr"] = rec.get(lr_col, parse_positive_float)
    kw["dataset"] = rec.get("dataset", parse_dataset)
    kw["offload"] = rec.get("offload", parse_offload_cell)
    kw["options"] = rec.get("options", parse_options)
    file_fw = rec.get("framework", choice_parser(Framework, "framework"))
    kw["framework"] = framework or file_fw
    if kw["processes"] is not None and kw["processes"] > 1 and kw["replicas"] is None:
        kw["replicas"] = kw["processes"]        # one data-parallel replica per rank
    if inherit is not None and inherit.workload == name:
        for k, v in kw.items():
            if v is None and k != "framework":
                kw[k] = getattr(inherit, k)
        if kw["framework"] is None:
            kw["framework"] = inherit.framework
    procs = kw["processes"]
    if procs is not None and procs > 1 and kw["replicas"] not in (None, procs):
        raise rec.error("replicas" if rec.has("replicas") else "processes",
                        f"replicas {kw['replicas']} must equal processes {procs} (one "
                        f"data-parallel replica per rank)")
    try:
        cfg = default_config(name, **kw)
    except SpecError as e:         # a setting the configuration refuses, at its cell
        raise rec.error(e.field if e.field in rec.cells else name_col, str(e)) from None
    if inherit is not None and cfg == inherit:
        return cfg                      # checked on the trial's first row
    with rec.at("options" if rec.has("options") else name_col):
        check_options(cfg)              # keys the workload has, values faultlab can read
    try:
        check_dataset(cfg)              # one the workload can train on (workloads/data.py)
    except SpecError as e:
        raise rec.error("dataset" if rec.has("dataset") else name_col, str(e)) from None
    if is_user_workload(name):
        # nothing of it is imported unless allowed (faultlab/workloads/allow.py)
        with rec.at(name_col):
            check_allowed(name)
        try:
            check_processes(cfg)        # more ranks than this machine can run
        except SpecError as e:
            raise rec.error(e.field if e.field in rec.cells else name_col, str(e)) from None
    else:
        try:
            check_fits(cfg)             # sizes this machine cannot hold (workloads/estimate.py)
        except SpecError as e:
            raise rec.error(e.field if e.field in rec.cells or e.field in WORKLOAD_INTS
                            else name_col, str(e)) from None
    return cfg


def parse_positive_float(text: str, what: str) -> float:
    x = parse_float(text, what)
    if not x > 0:
        raise SpecError(f"{what} must be positive, got {show(text.strip())}")
    return x


def parse_probability(text: str, what: str) -> float:
    x = parse_float(text, what)
    if not 0.0 < x <= 1.0:
        raise SpecError(f"{what} {show(text.strip())} is out of range (0, 1]")
    return x


def read_duration(rec: Record) -> Duration:
    kind = rec.get("duration", choice_parser(DurationKind, "duration"), default=DurationKind.TRANSIENT)
    steps = rec.get("duration_steps", parse_int, 1, MAX_INT)
    prob = rec.get("probability", parse_probability)
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


def read_when(rec: Record, cfg: WorkloadConfig, replica_col: str, epoch_col: str, step_col: str,
          required: bool) -> tuple[int, int]:
    """(replica, global step) checked against the workload's replicas and length."""
    get = rec.require if required else rec.get
    kw = {} if required else {"default": 0}
    replica = get(replica_col, parse_int, 0, MAX_INT, **kw)
    epoch = get(epoch_col, parse_int, 0, MAX_INT, **kw)
    step = get(step_col, parse_int, 0, MAX_INT, **kw)
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


def default_fault_seed(seed: int, trial_id: str, index: int) -> int:
    """Deterministic fault seed from (workload seed, trial id, row index within the trial)."""
    digest = hashlib.sha256(f"{seed}\x1f{trial_id}\x1f{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & MAX_SEED


def parse_isca_stage(text: str, what: str) -> str:
    t = text.strip().lower()
    if t not in ISCA_STAGES:
        raise SpecError(f"unknown {what} {show(text.strip())} (expected one of: "
                        f"{', '.join(ISCA_STAGES)})")
    return t


def parse_isca_fmodel(text: str, what: str) -> str:
    t = text.strip().upper()
    if t not in ISCA_FMODELS:
        raise SpecError(f"unknown {what} {show(text.strip())} (expected one of: "
                        f"{', '.join(sorted(ISCA_FMODELS))})")
    return t

