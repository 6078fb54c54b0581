"""The ISCA'23 key/value campaign format: one trial per file, read unmodified."""

from __future__ import annotations

from faultlab.campaigns.cells import (MAX_INT, MAX_SEED, Record, data_lines, framework_override,
                                      parse_floats, parse_int, parse_isca_fmodel,
                                      parse_isca_stage, parse_layer, parse_positions,
                                      read_duration, read_when, read_workload, show)
from faultlab.errors import CampaignError
from faultlab.faults import FaultSpec, isca_fault
from faultlab.trials import Trial

ISCA_REQUIRED = ("model", "stage", "fmodel", "target_worker", "target_layer", "target_epoch",
                 "target_step")
ISCA_OPTIONAL = ("inj_pos", "inj_values", "learning_rate", "seed")
ISCA_EXTENSIONS = ("framework", "replicas", "processes", "nodes", "offload", "per_replica_batch",
                   "width",
                   "input_size", "dataset", "steps_per_epoch", "epochs", "eval_samples",
                   "checkpoint_every", "horizon", "duration", "duration_steps", "probability",
                   "fault_seed")
ISCA_KEYS = ISCA_REQUIRED + ISCA_OPTIONAL + ISCA_EXTENSIONS
ISCA_LIST_KEYS = frozenset({"inj_pos", "inj_values"})


def parse_isca(text: str, path: str = "<campaign>", framework: str | None = None) -> list[Trial]:
    """One trial ("0") from an ISCA'23 key/value file (read unmodified; extensions optional)."""
    fw = framework_override(framework, path)
    cells: dict[str, tuple[int, str]] = {}
    lists: dict[str, tuple[int, list[str]]] = {}
    for row, line in data_lines(text, path):
        parts = [p.strip() for p in line.split(",")]
        while len(parts) > 1 and not parts[-1]:   # trailing commas of spreadsheet exports
            parts.pop()
        key = parts[0].lower()
        if key not in ISCA_KEYS:
            raise CampaignError(f"unknown key {show(parts[0])} (keys: {', '.join(ISCA_KEYS)})",
                                file=path, row=row, column=show(parts[0])[1:-1])
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
    rec = Record(path, cells, None)
    for key in ISCA_REQUIRED:
        if key not in cells:
            raise CampaignError(f"missing required key {key} (required: "
                                f"{', '.join(ISCA_REQUIRED)})", file=path, column=key)

    cfg = read_workload(rec, "model", "learning_rate", fw)
    stage = rec.get("stage", parse_isca_stage)
    fmodel = rec.get("fmodel", parse_isca_fmodel)
    layer = rec.get("target_layer", parse_layer)
    replica, step = read_when(rec, cfg, "target_worker", "target_epoch", "target_step", True)
    positions: tuple = ()
    values: tuple = ()
    if "inj_pos" in lists:
        with rec.at("inj_pos"):
            positions = parse_positions(lists["inj_pos"][1], "inj_pos")
    if "inj_values" in lists:
        with rec.at("inj_values"):
            values = parse_floats(lists["inj_values"][1], "inj_values")
        if not positions:
            raise rec.error("inj_values", "inj_values needs inj_pos (the positions they go to)")
        if len(values) not in (1, len(positions)):
            raise rec.error("inj_values", f"{len(values)} inj_values for {len(positions)} "
                                          f"positions (give 1 or {len(positions)})")
    with rec.at("target_layer"):
        site, base, vspec, pspec = isca_fault(fmodel, stage, layer, positions, values)
    horizon = rec.get("horizon", parse_int, 0, MAX_INT)
    duration = read_duration(rec)
    seed = rec.get("fault_seed", parse_int, 0, MAX_SEED, default=cfg.seed)
    with rec.at("fmodel"):
        fault = FaultSpec(site, vspec, pspec, layer=base, replica=replica, step=step,
                          duration=duration, seed=seed)
    first = min(r for r, _ in cells.values())
    source = CampaignError("", file=path, row=first).where

    def loc(key):
        return rec.place(key) if key in cells else source
    # where each field of the fault (a SpecError's field when it is checked against its
    # operand) is set; the fmodel fixes site, value, layout and bits
    where = {"layer": loc("target_layer"), "positions": loc("inj_pos"),
             "values": loc("inj_values"), "replica": loc("target_worker"),
             "step": loc("target_step"),
             **dict.fromkeys(("site", "value", "bit", "bits", "layout"), loc("fmodel"))}
    return [Trial("0", cfg, (fault,), horizon=horizon, source=source, locations=(where,))]

