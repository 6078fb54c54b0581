"""Kill points: where in a checkpoint's life cycle a crash campaign SIGKILLs a training
process (a phase and which occurrence of it), and seeded random plans of them."""

from __future__ import annotations

import random
from dataclasses import dataclass

from faultlab.checkpointing.api import Phase
from faultlab.errors import FaultlabError

#: occurrences a random plan draws from, per phase (points of that phase per checkpoint vary
#: by engine: the engine's writing points are its chunks, its committing points four syncs
#: and writes; a baseline's are its file writes and its fsync / rename)
MAX_OCCURRENCE = {Phase.STAGING: 6, Phase.WRITING: 12, Phase.COMMITTING: 8, Phase.IDLE: 6}


@dataclass(frozen=True)
class KillPoint:
    """Kill the training process at the `occurrence`-th point of `phase` it reaches (counted
    from its start). hold: it stops there and is killed while stopped (an exact instant);
    otherwise it is killed when the parent reads its announcement (a random instant after)."""

    phase: Phase
    occurrence: int = 1
    hold: bool = True

    def __post_init__(self):
        object.__setattr__(self, "phase", Phase(self.phase))
        if not isinstance(self.occurrence, int) or self.occurrence < 1:
            raise FaultlabError(f"kill point occurrence must be >= 1, got {self.occurrence!r}")

    def to_json(self) -> dict:
        return {"phase": self.phase.value, "occurrence": self.occurrence, "hold": self.hold}

    def __str__(self) -> str:
        return f"{self.phase.value}#{self.occurrence}{'' if self.hold else ' (race)'}"


def random_kill_points(rng: random.Random, n: int, hold_ratio: float = 0.75) -> list[KillPoint]:
    """n kill points drawn uniformly over the phases (seeded)."""
    out = []
    for _ in range(n):
        phase = rng.choice(list(Phase))
        out.append(KillPoint(phase, rng.randint(1, MAX_OCCURRENCE[phase]),
                             rng.random() < hold_ratio))
    return out
