"""faultlab's columnar CSV campaign format: the reader and the writer (`plan` uses it)."""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from faultlab.campaigns.cells import (MAX_INT, MAX_SEED, WORKLOAD_INTS, Record, choice_parser,
                                      data_lines, default_fault_seed, framework_override,
                                      parse_float, parse_floats, parse_int, parse_isca_fmodel,
                                      parse_isca_stage, parse_layer, parse_positions,
                                      parse_trial_id, read_duration, read_when, read_workload,
                                      show)
from faultlab.errors import CampaignError, FaultlabError, SpecError, printable
from faultlab.faults import (HOST_TENSORS, LAYOUT_BITS, UNSUPPORTED_SITES, BitLayout, DurationKind, FaultSpec,
                             PositionMode, PositionSpec, Site, ValueModel, ValueSpec,
                             isca_fault)
from faultlab.process_faults import (PROCESS_SITES, KillPhase, ProcessFault, ProcessKind,
                                     check_process_fault)
from faultlab.trials import Trial
from faultlab.workloads.base import WorkloadConfig, format_options

#: columns of a trial's workload (rows of one trial must agree on them)
WORKLOAD_COLUMNS = ("framework", "workload", "replicas", "processes", "nodes", "offload",
                    "per_replica_batch", "width", "input_size", "dataset", "steps_per_epoch",
                    "epochs", "eval_samples", "checkpoint_every", "lr", "seed", "options",
                    "horizon")
FAULT_COLUMNS = ("site", "layer", "tensor", "replica", "epoch", "step", "value", "bit", "bits",
                 "stuck", "factor", "values", "ramp", "layout", "positions", "position_mode",
                 "count", "groups", "duration", "duration_steps", "probability", "fault_seed",
                 "stage", "fmodel", "phase", "node")
COLUMNS = ("trial",) + WORKLOAD_COLUMNS + FAULT_COLUMNS
#: fault columns of value faults only: a process-fault row (site kill, hang, kill_node)
#: refuses them
VALUE_FAULT_COLUMNS = ("value", "bit", "bits", "stuck", "factor", "values", "ramp", "layout",
                       "positions", "position_mode", "count", "groups", "duration",
                       "duration_steps", "probability", "layer", "tensor", "fmodel", "stage",
                       "fault_seed")
#: fault columns of process faults only: a value-fault row refuses them
PROCESS_FAULT_COLUMNS = ("phase", "node")
#: the column that sets each field of a process fault (check_process_fault's SpecError.field)
_PROCESS_FIELD_COLUMNS = {"process": "site", "rank": "replica", "node": "node",
                          "phase": "phase", "step": "step"}

#: tensors a state site may name
_TENSORS = {Site.PARAM: ("weight", "bias"), Site.OPT_STATE: ("m", "v"),
            Site.HOST_STATE: HOST_TENSORS}

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
    locations: list[dict] = field(default_factory=list)
    process_faults: list[ProcessFault] = field(default_factory=list)
    process_locations: list[dict] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(self.faults) + len(self.process_faults)


def parse_columnar(text: str, path: str = "<campaign>",
                   framework: str | None = None) -> list[Trial]:
    """Trials from a columnar CSV campaign (header line; one trial per row or trial id)."""
    fw = framework_override(framework, path)
    lines = iter(data_lines(text, path))
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
            raise CampaignError(f"unknown column {show(raw[i].strip())} (columns: "
                                f"{', '.join(COLUMNS)})", file=path, row=header_row,
                                column=show(raw[i].strip())[1:-1])
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
        rec = Record(path, {n: (row, c.strip()) for n, c in zip(names, cells) if c.strip()},
                      row)
        explicit = rec.has("trial")
        tid = rec.get("trial", parse_trial_id, default=str(row))
        group = groups.get(tid)
        if group is not None and not (explicit and group.explicit):
            raise rec.error("trial", f"trial id {tid} of this row collides with the default id "
                                     f"(the row number) of row {group.row if explicit else row}")
        cfg = read_workload(rec, "workload", "lr", fw, inherit=group.cfg if group else None)
        horizon = rec.get("horizon", parse_int, 0, MAX_INT,
                          default=group.horizon if group else None)
        fault = _columnar_fault(rec, cfg, tid, group.rows if group else 0)
        if group is None:
            group = groups[tid] = _Group(row, explicit, cfg, horizon, [], fault is None)
        else:
            _agree(rec, tid, group, cfg, horizon)
            if group.control or fault is None:
                raise rec.error("trial", f"trial {tid} mixes a fault-free control row with "
                                         f"other rows (first on row {group.row}); a control "
                                         f"trial has exactly one row")
        if isinstance(fault, ProcessFault):
            group.process_faults.append(fault)
            group.process_locations.append(_process_locations(rec))
        elif fault is not None:
            group.faults.append(fault)
            group.locations.append(_fault_locations(rec))
    if not groups:
        raise CampaignError("no trials (only a header)", file=path, row=header_row)
    return [Trial(tid, g.cfg, tuple(g.faults), horizon=g.horizon,
                  source=CampaignError("", file=path, row=g.row).where,
                  locations=tuple(g.locations + g.process_locations),
                  process_faults=tuple(g.process_faults))
            for tid, g in groups.items()]


def _process_locations(rec: Record) -> dict[str, str]:
    """Where each field of a process fault (check_process_fault's `field`) is set."""
    return {k: rec.place(c) for k, c in _PROCESS_FIELD_COLUMNS.items()}


def _fault_locations(rec: Record) -> dict[str, str]:
    """Where each field of a row's fault (a SpecError's `field`, raised when the fault is
    checked against its operand) is set: "file:row: column 'name'" (cells.Record.place)."""
    if rec.has("fmodel") or rec.has("stage"):      # the fmodel fixes site, value and layout
        cols = dict.fromkeys(("site", "value", "bit", "bits", "layout"), "fmodel")
        cols["values"] = "values" if rec.has("values") else "fmodel"
        cols["positions"] = "positions" if rec.has("positions") else "fmodel"
    else:
        cols = {c: c for c in ("site", "value", "bit", "bits", "layout", "values")}
        cols["positions"] = next((c for c in ("positions", "count", "groups", "position_mode")
                                  if rec.has(c)), "positions")
    cols.update(layer="layer", replica="replica", step="step")
    return {k: rec.place(c) for k, c in cols.items()}


def _agree(rec: Record, tid: str, group: _Group, cfg: WorkloadConfig,
           horizon: int | None) -> None:
    """Rows of one trial must describe the same workload."""
    if cfg != group.cfg or horizon != group.horizon:
        # to_dict leaves processes and nodes out when they are 1: compare them always
        mine = dict(cfg.to_dict(), processes=cfg.processes, nodes=cfg.nodes, horizon=horizon)
        first = dict(group.cfg.to_dict(), processes=group.cfg.processes,
                     nodes=group.cfg.nodes, horizon=group.horizon)
        col = next(k for k in ("workload", "processes", "nodes") + tuple(mine)
                   if mine[k] != first[k])
        raise rec.error(col, f"rows of trial {tid} disagree on {col}: "
                             f"{show(str(mine[col]))} here, {show(str(first[col]))} on row "
                             f"{group.row}")


def _columnar_fault(rec: Record, cfg: WorkloadConfig, tid: str,
                    index: int) -> FaultSpec | ProcessFault | None:
    """The fault a row describes, a value or a process fault; None for a fault-free control
    row."""
    if rec.has("site") and rec.cells["site"][1].lower() in PROCESS_SITES:
        return _process_fault(rec, cfg)
    for col in PROCESS_FAULT_COLUMNS:
        if rec.has(col):
            raise rec.error(col, f"{col} applies only to process-fault rows (site "
                                 f"{', '.join(PROCESS_SITES)})")
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
    replica, step = read_when(rec, cfg, "replica", "epoch", "step", False)
    duration = read_duration(rec)
    seed = rec.get("fault_seed", parse_int, 0, MAX_SEED)
    if seed is None:
        seed = default_fault_seed(cfg.seed, tid, index)
    if isca:
        site, layer, vspec, pspec = _columnar_isca(rec)
        tensor = None
    else:
        site = rec.get("site", choice_parser(Site, "site"))
        if site in UNSUPPORTED_SITES and not cfg.offload:
            raise rec.error("site", f"site {site.value} needs an offloaded workload: set the "
                                    f"offload column (e.g. window:2) to keep "
                                    f"{cfg.workload}'s state in host memory, or use param or "
                                    f"opt_state for the device copy")
        layer = rec.require("layer", parse_layer)
        tensor = _tensor(rec, site)
        vspec = _value_spec(rec)
        pspec = _position_spec(rec)
        _check_value_count(rec, vspec, pspec)
    with rec.at("fmodel" if isca else "site"):
        return FaultSpec(site, vspec, pspec, layer=layer, tensor=tensor, replica=replica,
                         step=step, duration=duration, seed=seed)


def _process_fault(rec: Record, cfg: WorkloadConfig) -> ProcessFault:
    """A row whose site is kill, hang or kill_node: the rank (`replica`) or the node (`node`),
    the step (`epoch`, `step`) and the phase."""
    kind = ProcessKind(rec.cells["site"][1].lower())
    for col in VALUE_FAULT_COLUMNS:
        if rec.has(col):
            raise rec.error(col, f"a {kind.value} row takes no value-fault columns")
    if kind is ProcessKind.KILL_NODE:
        if rec.has("replica"):
            raise rec.error("replica", "a kill_node row names its node in column node, not a "
                                       "rank in column replica")
        node = rec.require("node", parse_int, 0, MAX_INT, why=" for a kill_node row")
        rank = None
    else:
        if rec.has("node"):
            raise rec.error("node", f"a {kind.value} row names its rank in column replica, "
                                    f"not a node")
        node = None
        rank = rec.get("replica", parse_int, 0, MAX_INT, default=0)
        if rank >= cfg.processes:
            n = cfg.processes
            raise rec.error("replica", f"replica {rank} is out of range 0..{n - 1}: a "
                                       f"{kind.value} row's replica is the rank, and the "
                                       f"workload has {n} process{'es' if n != 1 else ''}")
    _, step = read_when(rec, cfg, "replica", "epoch", "step", False)
    phase = rec.get("phase", choice_parser(KillPhase, "kill phase"), default=KillPhase.STEP)
    try:
        fault = ProcessFault(kind, step, rank=rank, node=node, phase=phase)
        check_process_fault(fault, cfg)
    except SpecError as e:
        raise rec.error(_PROCESS_FIELD_COLUMNS.get(e.field, "site"), str(e)) from None
    return fault


_NOT_WITH_FMODEL = ("tensor", "bit", "bits", "stuck", "factor", "ramp", "layout",
                    "position_mode", "count", "groups")


def _columnar_isca(rec: Record):
    for col in ("stage", "fmodel"):
        if not rec.has(col):
            raise rec.error(col, f"{col} is required with "
                                 f"{'fmodel' if col == 'stage' else 'stage'} (ISCA names)")
    for col in _NOT_WITH_FMODEL:
        if rec.has(col):
            raise rec.error(col, f"{col} does not apply to an ISCA fmodel row (the fmodel "
                                 f"fixes the value and positions)")
    stage = rec.get("stage", parse_isca_stage)
    fmodel = rec.get("fmodel", parse_isca_fmodel)
    layer = rec.require("layer", parse_layer)
    positions = rec.get("positions", lambda t, w: parse_positions(t.split(";"), w), default=())
    values = rec.get("values", lambda t, w: parse_floats(t.split(";"), w), default=())
    if values and not positions:
        raise rec.error("values", "values need positions (the positions they go to)")
    if len(values) not in (0, 1, len(positions)):
        raise rec.error("values", f"{len(values)} values for {len(positions)} positions "
                                  f"(give 1 or {len(positions)})")
    with rec.at("layer"):
        return isca_fault(fmodel, stage, layer, positions, values)


def _tensor(rec: Record, site: Site) -> str | None:
    if not rec.has("tensor"):
        return None
    allowed = _TENSORS.get(site)
    if allowed is None:
        raise rec.error("tensor", f"tensor applies to the state sites (param, opt_state, "
                                  f"host_state), "
                                  f"not {site.value}")
    t = rec.cells["tensor"][1].lower()
    if t not in allowed:
        raise rec.error("tensor", f"tensor of site {site.value} must be one of "
                                  f"{', '.join(allowed)}, got {show(rec.cells['tensor'][1])}")
    return t


#: value-model columns and the models they apply to
_VALUE_COLUMNS = {"bit": (ValueModel.BITFLIP, ValueModel.STUCK_AT), "bits": (ValueModel.BITFLIP,),
                  "stuck": (ValueModel.STUCK_AT,), "factor": (ValueModel.SCALE,),
                  "values": (ValueModel.SET,), "ramp": (ValueModel.DEGRADE,)}


def _value_spec(rec: Record) -> ValueSpec:
    model = rec.get("value", choice_parser(ValueModel, "value model"), default=ValueModel.BITFLIP)
    for col, models in _VALUE_COLUMNS.items():
        if rec.has(col) and model not in models:
            raise rec.error(col, f"{col} applies to value {' or '.join(m.value for m in models)}"
                                 f", not {model.value}")
    layout = rec.get("layout", choice_parser(BitLayout, "bit layout"), default=BitLayout.NATIVE)
    width = LAYOUT_BITS.get(layout, 64)
    kw: dict = {"layout": layout}
    kw["bit"] = rec.get("bit", parse_int, 0, width - 1)
    if rec.has("bits"):
        kw["bits"] = rec.get("bits", parse_int, 1, width)
        if kw["bit"] is not None and kw["bits"] != 1:
            raise rec.error("bits", "give either a chosen bit or a number of random bits, "
                                    "not both")
    if rec.has("stuck"):
        kw["stuck"] = rec.get("stuck", parse_int, 0, 1)
    if model is ValueModel.SCALE:
        kw["factor"] = rec.require("factor", parse_float, why=" for value scale")
    if model is ValueModel.SET:
        kw["values"] = rec.require("values", lambda t, w: parse_floats(t.split(";"), w),
                                   why=" for value set (';'-separated replacements)")
    if model is ValueModel.DEGRADE:
        kw["ramp"] = rec.require("ramp", parse_float, why=" for value degrade")
        if kw["ramp"] == 0:
            raise rec.error("ramp", "ramp must be non-zero (relative error added per step)")
    with rec.at("value"):
        return ValueSpec(model, **kw)


def _position_spec(rec: Record) -> PositionSpec:
    positions = rec.get("positions", lambda t, w: parse_positions(t.split(";"), w))
    default = PositionMode.EXPLICIT if positions else PositionMode.RANDOM
    mode = rec.get("position_mode", choice_parser(PositionMode, "position mode"), default=default)
    if mode is PositionMode.EXPLICIT and not positions:
        raise rec.error("positions", "position_mode explicit needs positions")
    if positions and mode is not PositionMode.EXPLICIT:
        raise rec.error("positions", f"positions are given but position_mode is {mode.value}")
    if rec.has("count") and mode is PositionMode.EXPLICIT:
        raise rec.error("count", "count does not apply to explicit positions")
    if rec.has("groups") and mode is not PositionMode.GROUPS:
        raise rec.error("groups", f"groups applies to position_mode groups, not {mode.value}")
    count = rec.get("count", parse_int, 1, MAX_INT, default=1)
    groups = rec.get("groups", parse_int, 1, MAX_INT, default=1)
    with rec.at("position_mode"):
        return PositionSpec(mode, indices=positions or (), count=count, groups=groups)


def _check_value_count(rec: Record, v: ValueSpec, p: PositionSpec) -> None:
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
        parse_trial_id(t.trial_id, "trial")
        cfg = t.workload
        if any(not k or "=" in k or ";" in k or ";" in v or k != k.strip() or v != v.strip()
               for k, v in cfg.options):
            raise SpecError(f"trial {t.trial_id}: workload options with '=' or ';' in a key, "
                            f"';' in a value or spaces around either cannot be written to a "
                            f"columnar campaign", "options")
        base = {"trial": t.trial_id, "framework": cfg.framework.value, "workload": cfg.workload,
                "lr": _num(cfg.lr), "dataset": cfg.dataset,
                "options": format_options(cfg.options), "offload": cfg.offload,
                "horizon": "" if t.horizon is None else str(t.horizon)}
        for col in WORKLOAD_INTS:
            base[col] = str(getattr(cfg, col))
        for f in t.faults or (() if t.process_faults else (None,)):
            row = dict(base)
            if f is not None:
                if f.site in UNSUPPORTED_SITES and not cfg.offload:  # the reader refuses it
                    raise SpecError(f"trial {t.trial_id}: site {f.site.value} is not "
                                    f"supported yet: no backend injects into it without "
                                    f"offload", "site")
                row.update(_fault_cells(f, cfg))
            w.writerow([row.get(c, "") for c in COLUMNS])
        for p in t.process_faults:
            row = dict(base)
            row.update(_process_cells(p, cfg))
            w.writerow([row.get(c, "") for c in COLUMNS])
    return out.getvalue()


def write_columnar(trials: Iterable[Trial], path: str | os.PathLike) -> Path:
    """Write :func:`format_columnar` of `trials` to `path` atomically (a temporary file beside
    it, then a rename); the path written."""
    out = Path(path)
    if out.exists() and out.is_dir():
        raise FaultlabError(f"{printable(out)}: is a directory")
    text = format_columnar(trials)
    tmp = out.with_name(out.name + ".tmp")
    try:
        tmp.write_text(text)
        tmp.replace(out)
    except OSError as e:     # a missing folder, no permission, a full disk: one line
        try:
            tmp.unlink()
        except OSError:
            pass
        raise FaultlabError(f"{printable(out)}: cannot write the campaign: "
                            f"{e.strerror or e}") from None
    return out


def _process_cells(p: ProcessFault, cfg: WorkloadConfig) -> dict[str, str]:
    row = {"site": p.kind.value, "epoch": str(p.step // cfg.steps_per_epoch),
           "step": str(p.step % cfg.steps_per_epoch), "phase": p.phase.value}
    if p.kind is ProcessKind.KILL_NODE:
        row["node"] = str(p.node)
    else:
        row["replica"] = str(p.rank)
    return row


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
