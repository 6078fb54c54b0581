"""Judging a recovery: state fingerprints, the uninterrupted reference run, and the verdicts
exact / mixed / torn / lost-committed / none."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np

from faultlab.checkpointing.format import digest

META_KEY = "__meta__"


def fingerprint(state: Mapping[str, np.ndarray], meta: Mapping) -> dict[str, str]:
    """name -> "dtype|shape|xxh3" of every array, plus the metadata's (order-insensitive)."""
    out = {}
    for name, arr in state.items():
        a = np.ascontiguousarray(arr)
        out[name] = f"{a.dtype.str}|{a.shape}|{digest(a.reshape(-1).view(np.uint8)):016x}"
    out[META_KEY] = f"{digest(json.dumps(meta, sort_keys=True).encode()):016x}"
    return out


@dataclass
class Reference:
    """Fingerprints of an uninterrupted run's state at every checkpoint step."""

    steps: dict[int, dict[str, str]]
    final_path: Path | None = None

    def __post_init__(self):
        self.index: dict[tuple[str, str], set[int]] = {}
        for step, fp in self.steps.items():
            for name, h in fp.items():
                self.index.setdefault((name, h), set()).add(step)

    def to_json(self) -> dict:
        return {"steps": {str(k): v for k, v in self.steps.items()}}

    @classmethod
    def from_json(cls, d: dict, final_path: Path | None = None) -> Reference:
        return cls({int(k): v for k, v in d["steps"].items()}, final_path)


class CrashVerdict(str, Enum):
    """What one recovery after a crash returned, judged against the reference run."""

    EXACT = "exact"              # every array and the meta equal the reference at that step
    MIXED = "mixed"              # every array equals the reference at some step, not one step
    TORN = "torn"                # some array equals the reference at no step at all
    LOST = "lost-committed"      # older than a checkpoint reported durable, or none at all
    NONE = "none"                # nothing recovered and nothing had been committed: correct

    @property
    def ok(self) -> bool:
        return self in (CrashVerdict.EXACT, CrashVerdict.NONE)


#: verdict values that are correct recoveries
OK_VERDICTS = (CrashVerdict.EXACT.value, CrashVerdict.NONE.value)


def classify(recovered, reference: Reference,
             newest_committed: int | None) -> tuple[CrashVerdict, str]:
    """Judge one recovery: `recovered` is (step, state, meta) or the CheckpointError raised."""
    if isinstance(recovered, BaseException):
        if newest_committed is None:
            return CrashVerdict.NONE, str(recovered)
        return CrashVerdict.LOST, f"recovery failed after step {newest_committed} was " \
                                  f"committed: {recovered}"
    step, state, meta = recovered
    fp = fingerprint(state, meta)
    want = reference.steps.get(step)
    if want is not None and fp == want:
        if newest_committed is not None and step < newest_committed:
            return CrashVerdict.LOST, f"recovered step {step} but step {newest_committed} " \
                                      "had been reported durable"
        return CrashVerdict.EXACT, ""
    matches = {name: reference.index.get((name, h), set()) for name, h in fp.items()
               if name != META_KEY}
    unknown = sorted(n for n, s in matches.items() if not s)
    if unknown or (want is not None and set(fp) != set(want)):
        return CrashVerdict.TORN, f"step {step}: arrays matching no saved state: {unknown[:5]}"
    return CrashVerdict.MIXED, f"step {step}: arrays from steps " \
                               f"{sorted(set().union(*matches.values()))[:8]}"


def save_state_npz(path: Path, state: Mapping[str, np.ndarray], meta: Mapping) -> None:
    """Write a state and its meta to one .npz file (atomically: a temporary file renamed)."""
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        np.savez(f, **{k.replace("/", "|"): np.asarray(v) for k, v in state.items()},
                 **{META_KEY: np.frombuffer(json.dumps(meta, sort_keys=True).encode(),
                                            dtype=np.uint8)})
    os.replace(tmp, path)


def load_state_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a file written by save_state_npz (the meta under META_KEY)."""
    with np.load(path, allow_pickle=False) as z:
        return {k.replace("|", "/"): z[k] for k in z.files}


def same_state(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> list[str]:
    """Names whose arrays differ in dtype, shape or any bit (empty: bit-identical)."""
    diff = sorted(set(a) ^ set(b))
    for name in set(a) & set(b):
        x, y = np.asarray(a[name]), np.asarray(b[name])
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            diff.append(name)
    return sorted(diff)
