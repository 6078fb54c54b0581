"""A trial: one workload configuration, the faults injected into it, and how long to watch."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from faultlab.faults import FaultSpec
from faultlab.process_faults import ProcessFault
from faultlab.workloads.base import WorkloadConfig


@dataclass(frozen=True)
class Trial:
    """One experiment. No faults, value or process = a fault-free control trial (it must match
    the golden run)."""

    trial_id: str
    workload: WorkloadConfig
    faults: tuple[FaultSpec, ...] = ()
    horizon: int | None = None     # steps to run after the first injection; None = to the end
    source: str = ""               # "file:row" the trial came from, for messages
    #: per fault, value faults then process faults: {field: "file:row: column 'x'"}
    locations: tuple = ()
    #: ranks killed or hung (faultlab/process_faults.py), besides the value faults
    process_faults: tuple[ProcessFault, ...] = ()

    def where(self, fault_index: int, field: str | None) -> str:
        """The file position that defines `field` of fault `fault_index` (for errors); the
        process faults are numbered after the value faults (see :meth:`process_where`)."""
        if field and fault_index < len(self.locations):
            return self.locations[fault_index].get(field, self.source)
        return self.source

    def process_where(self, index: int, field: str | None) -> str:
        """The file position that defines `field` of process fault `index`."""
        return self.where(len(self.faults) + index, field)

    @property
    def is_control(self) -> bool:
        """No fault of either kind: the trial must reproduce the golden run."""
        return not self.faults and not self.process_faults

    @property
    def inject_step(self) -> int | None:
        """The first step any fault, value or process, fires at (None for a control)."""
        return min([f.step for f in self.faults] + [p.step for p in self.process_faults],
                   default=None)

    @property
    def end_step(self) -> int:
        """Exclusive end of the trial's training (bounded by the run's length)."""
        total = self.workload.total_steps
        start = self.inject_step
        if start is None or self.horizon is None:
            return total
        return min(total, start + self.horizon + 1)

    def describe_faults(self) -> list[dict]:
        """JSON-able faults: the value faults (fault_to_dict), then the process faults
        (ProcessFault.to_dict, keyed "process")."""
        return ([fault_to_dict(f) for f in self.faults]
                + [p.to_dict() for p in self.process_faults])

    def digest(self) -> str:
        """Names the trial; a trial without process faults has the digest it had before they
        existed."""
        body = {"w": self.workload.to_dict(), "f": [fault_to_dict(f) for f in self.faults],
                "h": self.horizon}
        if self.process_faults:
            body["p"] = [p.to_dict() for p in self.process_faults]
        blob = json.dumps(body, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def fault_to_dict(f: FaultSpec) -> dict:
    """A JSON-able description of a fault (for results and --json)."""
    v, p, d = f.value, f.positions, f.duration
    out = {"site": f.site.value, "layer": f.layer, "replica": f.replica, "step": f.step,
           "value": v.model.value, "positions": p.mode.value, "duration": d.kind.value,
           "seed": f.seed}
    if f.tensor:
        out["tensor"] = f.tensor
    if p.indices:
        out["indices"] = ["/".join(map(str, ix)) for ix in p.indices]
    if p.mode.value != "explicit":
        out["count"] = p.count
    if v.bit is not None:
        out["bit"] = v.bit
    if v.model.value == "bitflip" and v.bit is None:
        out["bits"] = v.bits
    if v.model.value == "stuck_at":
        out["stuck"] = v.stuck
    if v.values:
        out["values"] = list(v.values)
    if v.model.value == "scale":
        out["factor"] = v.factor
    if v.model.value == "degrade":
        out["ramp"] = v.ramp
    if v.layout.value != "native":
        out["layout"] = v.layout.value
    if d.kind.value == "steps":
        out["duration_steps"] = d.steps
    if d.kind.value == "intermittent":
        out["probability"] = d.probability
    return out
