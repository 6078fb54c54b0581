"""Process faults (framework-free): a training process (rank) killed or hung, or a whole node
killed, at a step of a multi-process run (WorkloadConfig.processes, torch.distributed).

A value fault (faults.py) corrupts a number; a process fault takes a rank away. The rank
runtime reads these fields; campaigns give them as columnar rows whose `site` is `kill`,
`hang` or `kill_node` (docs/formats.md, "Process faults").
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from faultlab.errors import SpecError
from faultlab.faults import parse_enum
from faultlab.workloads.base import WorkloadConfig


class ProcessKind(str, enum.Enum):
    """What happens to the process(es)."""

    KILL = "kill"              # the rank dies (SIGKILL): its memory is lost
    HANG = "hang"              # the rank stops making progress but stays alive
    KILL_NODE = "kill_node"    # every rank of the node dies, and the node's memory with them


class KillPhase(str, enum.Enum):
    """When within the step a kill fires."""

    STEP = "step"                # at the start of the step, before its forward pass
    STAGING = "staging"          # while the rank copies its state into its host-memory snapshot
    REPLICATING = "replicating"  # while the snapshot is being sent to peers
    PERSISTING = "persisting"    # while the disk checkpoint engine writes the step's data
    #: between the disk checkpoint's data being durable and its commit record
    COMMITTING = "committing"


#: the columnar `site` values that make a row a process fault
PROCESS_SITES = tuple(k.value for k in ProcessKind)


def _index(v, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise SpecError(f"{what} must be a non-negative integer, got {v!r}", what)
    return v


@dataclass(frozen=True)
class ProcessFault:
    """One process fault. `rank` names the process of a kill or hang, `node` the node of a
    kill_node (the other is None); `step` is the 0-based global training step at which it
    fires, `phase` where within that step (a hang fires only at the step's start)."""

    kind: ProcessKind
    step: int
    rank: int | None = None
    node: int | None = None
    phase: KillPhase = KillPhase.STEP

    def __post_init__(self):
        object.__setattr__(self, "kind", _parse(ProcessKind, self.kind, "process fault kind",
                                                "process"))
        object.__setattr__(self, "phase", _parse(KillPhase, self.phase, "kill phase", "phase"))
        _index(self.step, "step")
        if self.kind is ProcessKind.KILL_NODE:
            if self.rank is not None:
                raise SpecError("a kill_node fault names a node, not a rank", "rank")
            if self.node is None:
                raise SpecError("a kill_node fault needs a node", "node")
            _index(self.node, "node")
        else:
            if self.node is not None:
                raise SpecError(f"a {self.kind.value} fault names a rank, not a node", "node")
            if self.rank is None:
                raise SpecError(f"a {self.kind.value} fault needs a rank", "rank")
            _index(self.rank, "rank")
        if self.kind is ProcessKind.HANG and self.phase is not KillPhase.STEP:
            raise SpecError(f"a hang fires only at phase step (the start of the step), not "
                            f"{self.phase.value}", "phase")

    def ranks(self, config: WorkloadConfig) -> tuple[int, ...]:
        """The ranks this fault takes away in a run of `config`."""
        if self.kind is ProcessKind.KILL_NODE:
            return config.node_ranks(self.node)
        return (self.rank,)

    def to_dict(self) -> dict:
        """JSON-able: {"process": "kill", "rank": 1, "step": 7, "phase": "step"} (a kill_node
        has "node" instead of "rank")."""
        out: dict = {"process": self.kind.value}
        if self.kind is ProcessKind.KILL_NODE:
            out["node"] = self.node
        else:
            out["rank"] = self.rank
        out["step"] = self.step
        out["phase"] = self.phase.value
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "ProcessFault":
        """The fault :meth:`to_dict` describes."""
        if not isinstance(d, dict) or "process" not in d or "step" not in d:
            raise SpecError(f"not a process fault description: {d!r:.200}")
        return cls(d["process"], d["step"], rank=d.get("rank"), node=d.get("node"),
                   phase=d.get("phase", KillPhase.STEP))


def _parse(cls, value, what: str, field: str):
    try:
        return parse_enum(cls, value, what)
    except SpecError as e:
        raise SpecError(str(e), field) from None


def check_process_fault(f: ProcessFault, config: WorkloadConfig) -> None:
    """Check a process fault against the run it goes into: a one-line SpecError whose `field`
    (process, rank, node, step) names the part at fault."""
    if config.framework.value != "torch":
        raise SpecError(f"{f.kind.value} rows need framework torch: TensorFlow multi-worker "
                        f"training is out of scope", "process")
    if f.kind is ProcessKind.KILL_NODE:
        if config.nodes < 2:
            raise SpecError(f"kill_node needs nodes > 1 (the workload has {config.nodes} node;"
                            f" kill a rank with kill instead)", "node")
        if f.node >= config.nodes:
            raise SpecError(f"node {f.node} is out of range 0..{config.nodes - 1} "
                            f"({config.nodes} nodes)", "node")
    elif f.rank >= config.processes:
        n = config.processes
        raise SpecError(f"rank {f.rank} is out of range 0..{n - 1} ({n} "
                        f"process{'es' if n != 1 else ''})", "rank")
    if f.step >= config.total_steps:
        raise SpecError(f"step {f.step} is past the run's {config.total_steps} steps", "step")
