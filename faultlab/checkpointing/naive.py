"""A negative control: a checkpointer that overwrites one file in place (``naive``).

Kept to prove that the crash campaigns catch what it does wrong -- no fsync, no checksum,
nothing to fall back on -- by tearing and mixing its checkpoints.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from faultlab.checkpointing.api import Loaded, Phase, PhaseHook, SaveFuture, no_hook
from faultlab.checkpointing.format import dtype_from_json, dtype_to_json
from faultlab.checkpointing.layout import check_step, encode_meta, normalize_state
from faultlab.errors import CheckpointError


class NaiveInPlace:
    """What not to do, kept to prove that the crash campaign catches it: one file, rewritten
    in place on every save -- a JSON header first (naming the new step), then each array at
    its offset -- with no fsync, no checksum and nothing to fall back on. Recovery trusts
    whatever the file holds. The header is written first, so a crash mid-save yields a
    checkpoint that claims the new step while holding old (mixed) or half-written (torn) data.
    """

    name = "naive"
    framework = None
    loop_framework = None
    file_target = "naive.ckpt"
    default_settings: dict = {}
    settings_space: dict = {}
    _HEADER = 1 << 16

    def __init__(self, path: str | os.PathLike, *, phase_hook: PhaseHook | None = None):
        self.path = Path(path)
        self._hook = phase_hook or no_hook
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def save(self, step, state, meta=None) -> SaveFuture:
        step, arrays, meta = check_step(step), normalize_state(state), encode_meta(meta)
        self._hook(Phase.STAGING, "save", step)
        entries, pos = [], self._HEADER
        for name, arr in arrays:
            entries.append({"name": name, "descr": dtype_to_json(arr.dtype),
                            "shape": list(arr.shape), "offset": pos})
            pos += arr.nbytes
        header = json.dumps({"step": step, "meta": meta, "tensors": entries}).encode()
        if len(header) > self._HEADER:
            raise CheckpointError("naive checkpointer: header too large")
        os.pwrite(self._fd, header.ljust(self._HEADER, b" "), 0)
        for (name, arr), e in zip(arrays, entries):
            self._hook(Phase.WRITING, "write", step)
            os.pwrite(self._fd, arr.tobytes(), e["offset"])
        fut = SaveFuture(step)
        fut.finish()
        return fut

    def wait_all(self) -> None:
        """Nothing is ever in flight: every save is written before it returns."""

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def in_flight(self) -> int:
        return 0

    @staticmethod
    def recover(path) -> Loaded:
        path = Path(path)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise CheckpointError(f"no checkpoint file at {path}") from None
        try:
            head = json.loads(raw[:NaiveInPlace._HEADER].decode().rstrip())
            state = {}
            for e in head["tensors"]:
                dt = dtype_from_json(e["descr"])
                n = int(np.prod(e["shape"], dtype=np.int64)) * dt.itemsize
                chunk = raw[e["offset"]:e["offset"] + n].ljust(n, b"\0")
                state[e["name"]] = np.frombuffer(chunk, dtype=dt).reshape(e["shape"]).copy()
            return Loaded(int(head["step"]), state, head["meta"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable naive checkpoint ({e})") from None
