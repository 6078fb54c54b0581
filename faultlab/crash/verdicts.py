"""Judging a recovery: state fingerprints, the uninterrupted reference run, what a run's
training processes saved, and the verdicts exact / mixed / torn / incomplete-state /
lost-committed / none.

A checkpoint that differs from the uninterrupted run is *torn* (or *mixed*) only when its
bytes match no state the loop handed to the checkpointer; one that is bit for bit a state the
loop saved, but not the uninterrupted run's, is the loop's fault: its capture() / restore()
leave out part of what decides later steps (*incomplete-state*), and the verdict names the
arrays that differ after the resume."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np

from faultlab import jsonlines
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
    TORN = "torn"                # some array equals no state saved at any step
    INCOMPLETE = "incomplete-state"  # exactly a state the loop saved after a resume, but the
    #                              resumed run differs from the uninterrupted one: the loop's
    #                              capture() / restore() leave part of its state out
    LOST = "lost-committed"      # older than a checkpoint reported durable, or none at all
    NONE = "none"                # nothing recovered and nothing had been committed: correct

    @property
    def ok(self) -> bool:
        return self in (CrashVerdict.EXACT, CrashVerdict.NONE)


#: verdict values that are correct recoveries
OK_VERDICTS = (CrashVerdict.EXACT.value, CrashVerdict.NONE.value)


@dataclass(frozen=True)
class Saved:
    """One state a training process handed to the checkpointer: its step, the step that
    process had resumed from (0: a fresh start) and the state's fingerprint."""

    step: int
    resumed: int
    fp: dict[str, str]


def record_saved(path: str | os.PathLike, step: int, resumed: int,
                 fp: Mapping[str, str]) -> None:
    """Append one Saved line to a run's log (one write; the training process may be killed at
    any instant, read_saved skips a partial last line)."""
    jsonlines.append(path, {"step": step, "resumed": resumed, "fp": dict(fp)})


def read_saved(path: str | os.PathLike) -> list[Saved]:
    """The states a run's training processes saved, in the order they saved them."""
    out = []
    for d in jsonlines.read(path):
        try:
            out.append(Saved(int(d["step"]), int(d["resumed"]), dict(d["fp"])))
        except (ValueError, KeyError, TypeError):
            continue                 # not a Saved record
    return out


def differing(fp: Mapping[str, str], want: Mapping[str, str]) -> list[str]:
    """Names whose fingerprints differ between two states (missing or extra ones included;
    the metadata as "(metadata)")."""
    names = sorted(n for n in set(fp) | set(want) if fp.get(n) != want.get(n))
    return [("(metadata)" if n == META_KEY else n) for n in names]


def _names(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def incomplete_detail(step: int, resumed: int | None, names: list[str], *,
                      run: bool = False) -> str:
    """The one-line explanation of an incomplete-state verdict (run: of a whole run, whose
    recovered checkpoints were all exactly what the loop saved)."""
    after = f"after resuming at step {resumed}, " if resumed is not None else ""
    whole = ("every checkpoint recovered is exactly what the loop saved" if run else
             "the checkpoint is exactly what the loop saved")
    return (f"step {step}: {whole}, but {after}the "
            f"loop's state differs from the uninterrupted run's in {_names(names)}: the "
            "loop's state is incomplete, not the checkpoint (its capture() / restore() leave "
            "out something that decides later steps: optimizer state such as momentum, a "
            "random generator, the data position)")


def first_divergence(saved: Sequence[Saved], reference: Reference) -> Saved | None:
    """The first state a run saved that is not the uninterrupted run's at its step."""
    for s in saved:
        want = reference.steps.get(s.step)
        if want is not None and s.fp != want:
            return s
    return None


def classify(recovered, reference: Reference, newest_committed: int | None,
             saved: Sequence[Saved] = ()) -> tuple[CrashVerdict, str]:
    """Judge one recovery: `recovered` is (step, state, meta) or the CheckpointError raised.

    saved: the states this run's training processes handed to the checkpointer (read_saved).
    A recovered state equal to one of them at its step is whole: if it is not the reference's,
    the loop's state is incomplete (INCOMPLETE), not the checkpoint torn. Without `saved`,
    only the reference counts as saved."""
    if isinstance(recovered, BaseException):
        if newest_committed is None:
            return CrashVerdict.NONE, str(recovered)
        return CrashVerdict.LOST, f"recovery failed after step {newest_committed} was " \
                                  f"committed: {recovered}"
    step, state, meta = recovered
    fp = fingerprint(state, meta)
    want = reference.steps.get(step)
    exact = want is not None and fp == want
    whole = exact or next((s for s in saved if s.step == step and s.fp == fp), None)
    if whole and newest_committed is not None and step < newest_committed:
        return CrashVerdict.LOST, f"recovered step {step} but step {newest_committed} " \
                                  "had been reported durable"
    if exact:
        return CrashVerdict.EXACT, ""
    if whole:
        if want is None:             # a step the uninterrupted run did not save
            return CrashVerdict.INCOMPLETE, incomplete_detail(step, whole.resumed,
                                                              ["(the step itself)"])
        return CrashVerdict.INCOMPLETE, incomplete_detail(step, whole.resumed,
                                                          differing(fp, want))
    index = reference.index
    if saved:
        index = {k: set(v) for k, v in index.items()}
        for s in saved:
            for name, h in s.fp.items():
                index.setdefault((name, h), set()).add(s.step)
    matches = {name: index.get((name, h), set()) for name, h in fp.items()
               if name != META_KEY}
    unknown = sorted(n for n, s in matches.items() if not s)
    if unknown or (want is not None and set(fp) != set(want)):
        missing = sorted(set(want or ()) - set(fp))
        return CrashVerdict.TORN, (f"step {step}: the checkpoint's bytes match no state the "
                                   f"loop saved (arrays matching none: {unknown[:5]}"
                                   + (f"; missing: {missing[:5]}" if missing else "") + ")")
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
