"""The recovery point after a failure: pure functions of what every rank publishes.

After a restart each rank scans its node's memory (SnapshotStore.inventory), publishes it
(inventory_to_json through the rendezvous key/value store), reads everybody's
(inventory_from_json), and every rank computes the same :func:`recovery_plan`:

* memory: the newest step s such that EVERY owner 0..world-1 has a verified copy of step s
  with some (alive) holder, provided s >= the newest committed disk step. Each owner fetches
  its state from ``("local", owner)`` when it holds a copy itself, else from
  ``("peer", h)`` with h the lowest-numbered holder of that copy (deterministic, so every
  rank computes the same sender);
* disk: no complete memory step, or the newest disk step is newer: step = newest disk step,
  every fetch ``("disk", None)``;
* scratch: neither; step None, no fetches.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from faultlab.distributed.snapshots import SnapshotError, parse_json

MEMORY, DISK, SCRATCH = "memory", "disk", "scratch"
MAX_STEP = (1 << 63) - 1
_KEY = re.compile(r"0|[1-9][0-9]{0,18}")


@dataclass(frozen=True)
class RecoveryPlan:
    """Where the job restarts from. fetch: owner -> ("local", owner) | ("peer", holder) |
    ("disk", None); empty for scratch."""

    step: int | None
    source: str
    fetch: dict[int, tuple[str, int | None]] = field(default_factory=dict)

    def sends(self, holder: int) -> list[int]:
        """The owners whose copies `holder` must send to them (peer fetches), ascending."""
        return sorted(o for o, (kind, h) in self.fetch.items() if kind == "peer" and h == holder)


def _rank(v, what: str, world: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < world:
        raise SnapshotError(f"inventory: {what} {v!r} is not a rank from 0 to {world - 1}")
    return v


def _step(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_STEP:
        raise SnapshotError(f"inventory: {what} {v!r} is not a step from 0 to {MAX_STEP}")
    return v


def complete_steps(inventories: Mapping[int, Mapping[int, Iterable[int]]], world: int,
                   alive_holders: Iterable[int] | None = None) -> dict[int, dict[int, list[int]]]:
    """step -> owner -> ascending holders, for the steps every owner 0..world-1 has a copy of
    with some alive holder."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise SnapshotError(f"inventory: world {world!r} is not an integer >= 1")
    alive = None if alive_holders is None else {_rank(h, "alive holder", world)
                                               for h in alive_holders}
    holders: dict[int, dict[int, set[int]]] = {}
    for holder, inv in inventories.items():
        _rank(holder, "holder", world)
        if alive is not None and holder not in alive:
            continue
        if not isinstance(inv, Mapping):
            raise SnapshotError(f"inventory: holder {holder}'s inventory is not a mapping")
        for owner, steps in inv.items():
            _rank(owner, f"holder {holder}: owner", world)
            for s in steps:
                holders.setdefault(_step(s, f"holder {holder}: owner {owner}: step"),
                                   {}).setdefault(owner, set()).add(holder)
    return {s: {o: sorted(hs) for o, hs in sorted(by_owner.items())}
            for s, by_owner in sorted(holders.items()) if len(by_owner) == world}


def recovery_plan(inventories: Mapping[int, Mapping[int, Iterable[int]]], world: int,
                  disk_steps: Iterable[int] = (),
                  alive_holders: Iterable[int] | None = None) -> RecoveryPlan:
    """The recovery point (see the module docstring). `inventories`: holder rank -> owner ->
    verified steps it holds (a rank that lost its node reports {}); `disk_steps`: the steps
    the persistent engine holds committed for all ranks; `alive_holders`: the holders whose
    copies count (default: all that reported)."""
    complete = complete_steps(inventories, world, alive_holders)
    disk = [_step(s, "disk step") for s in disk_steps]
    newest_disk = max(disk) if disk else None
    if complete:
        step = max(complete)
        if newest_disk is None or step >= newest_disk:
            fetch: dict[int, tuple[str, int | None]] = {}
            for owner, hs in complete[step].items():
                fetch[owner] = ("local", owner) if owner in hs else ("peer", hs[0])
            return RecoveryPlan(step, MEMORY, fetch)
    if newest_disk is not None:
        return RecoveryPlan(newest_disk, DISK, {o: ("disk", None) for o in range(world)})
    return RecoveryPlan(None, SCRATCH, {})


def inventory_to_json(inventory: Mapping[int, Iterable[int]]) -> str:
    """One rank's inventory as compact JSON text: {"owner": [ascending steps], ...}."""
    doc = {}
    for owner, steps in sorted(inventory.items()):
        if isinstance(owner, bool) or not isinstance(owner, int) or owner < 0:
            raise SnapshotError(f"inventory: owner {owner!r} is not a rank")
        doc[str(owner)] = sorted({_step(s, f"owner {owner}: step") for s in steps})
    return json.dumps(doc, separators=(",", ":"))


def inventory_from_json(text: str | bytes) -> dict[int, list[int]]:
    """The inverse of inventory_to_json, strict: keys are decimal ranks, values ascending
    lists of distinct steps; SnapshotError (one line) otherwise."""
    if not isinstance(text, (str, bytes, bytearray)):
        raise SnapshotError(f"inventory: a {type(text).__name__} is not JSON text")
    doc = parse_json(text, "inventory")
    if not isinstance(doc, dict):
        raise SnapshotError("inventory: not a JSON object")
    out = {}
    for key, steps in doc.items():
        if not _KEY.fullmatch(key):
            raise SnapshotError(f"inventory: key {json.dumps(key)[:40]} is not a rank")
        if not isinstance(steps, list):
            raise SnapshotError(f"inventory: owner {key}: steps is not a list")
        for i, s in enumerate(steps):
            _step(s, f"owner {key}: steps[{i}]")
            if i and s <= steps[i - 1]:
                raise SnapshotError(f"inventory: owner {key}: steps[{i}] {s} is not above "
                                    f"steps[{i - 1}] {steps[i - 1]}")
        out[int(key)] = list(steps)
    return dict(sorted(out.items()))
