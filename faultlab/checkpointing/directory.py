"""What the directory-of-files checkpointers share, free of any framework.

The baselines that keep one file (or one directory) per checkpoint in a directory of their own
-- torch.save (``sync``, ``checkfreq``), torch.distributed.checkpoint (``dcp-async``) and
tf.train.CheckpointManager (``tf-sync``, ``tf-async``) -- derive from
:class:`DirectoryCheckpointer` (or :class:`OneInFlight`, with one save in flight), name their
checkpoints by step (:func:`scan`), recover the newest that loads (:func:`recover_newest`) and
carry the arrays in framework-native dtypes plus one JSON document (:func:`payload_parts` /
:func:`from_payload`, the ``faultlab-baseline/1`` payload).
"""

from __future__ import annotations

import abc
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from faultlab.checkpointing.api import Loaded, PhaseHook, SaveFuture, no_hook
from faultlab.checkpointing.format import dtype_from_json, dtype_to_json
from faultlab.checkpointing.layout import check_step, encode_meta, normalize_state
from faultlab.checkpointing.storage import storage_error
from faultlab.errors import CheckpointError

#: the "format" of a baseline payload's JSON info
BASELINE_FORMAT = "faultlab-baseline/1"

#: dtypes torch and TensorFlow both hold exactly (native byte order, no structure); others
#: travel as bytes with their NumPy description in the payload's info
NATIVE_DTYPES = frozenset(np.dtype(t) for t in (
    np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64,
    np.float16, np.float32, np.float64, np.complex64, np.complex128))


def payload_parts(step: int, arrays: list[tuple[str, np.ndarray]], meta: dict,
                  native: frozenset | set = NATIVE_DTYPES
                  ) -> tuple[list[tuple[str, np.ndarray]], dict]:
    """The arrays in framework-native dtypes (others viewed as bytes, no copy) and the JSON
    info that names them and carries step, metadata and the original dtypes."""
    parts, raw = [], {}
    for name, arr in arrays:
        if arr.dtype not in native:
            raw[name] = {"descr": dtype_to_json(arr.dtype), "shape": list(arr.shape)}
            arr = arr.reshape(-1).view(np.uint8)
        parts.append((name, arr))
    info = {"format": BASELINE_FORMAT, "step": step, "meta": meta, "raw": raw,
            "names": [n for n, _ in arrays]}
    return parts, info


def from_payload(payload, where: str) -> Loaded:
    """The inverse of payload_parts: payload = {"info": JSON text, "tensors": {name: tensor
    or array}} (anything np.asarray takes)."""
    try:
        info = json.loads(payload["info"])
        if info.get("format") != BASELINE_FORMAT:
            raise ValueError(f"format {info.get('format')!r}")
        tensors, raw = payload["tensors"], info["raw"]
        state = {}
        for name in info["names"]:
            arr = np.asarray(tensors[name])
            if name in raw:
                arr = arr.view(dtype_from_json(raw[name]["descr"])).reshape(raw[name]["shape"])
            state[name] = arr
        return Loaded(int(info["step"]), state, info["meta"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{where}: not a faultlab baseline checkpoint ({e})") from None


def scan(directory: Path, pattern: re.Pattern, name: Callable[[re.Match], str] | None = None
         ) -> list[tuple[int, Path]]:
    """(step, path) of the entries of a directory whose name matches `pattern` (group 1: the
    step), newest first; `name(match)` names the path (default: the entry itself)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(((int(m.group(1)), directory / (name(m) if name else n)) for n in names
                   if (m := pattern.match(n))), reverse=True)


def recover_newest(directory: Path, load: Callable[[Path], Loaded],
                   entries: list[tuple[int, Path]]) -> Loaded:
    """The first of `entries` (newest first) that loads and holds the step its name says;
    a one-line CheckpointError when none does."""
    reasons = []
    for step, path in entries:
        try:
            loaded = load(path)
        except CheckpointError as e:
            reasons.append(str(e))
            continue
        if loaded.step != step:
            reasons.append(f"{path}: holds step {loaded.step}")
            continue
        return loaded
    if not entries:
        raise CheckpointError(f"no committed checkpoint in {directory}")
    raise CheckpointError(f"no valid checkpoint in {directory}: {len(entries)} candidate(s) "
                          f"failed, newest: {reasons[0]}")


class DirectoryCheckpointer(abc.ABC):
    """A checkpointer keeping its checkpoints in a directory of its own (``file_target`` is
    None). Subclasses provide ``save()`` and the classmethods ``_entries(directory)`` ((step,
    path) newest first, committed or not) and ``_load(path)`` (-> Loaded) that ``recover()``
    is built from."""

    name = "?"
    framework: str | None = None
    loop_framework: str | None = None
    file_target = None
    default_settings = {"keep": 2}
    settings_space = {"keep": (1, 2, 3)}

    def __init__(self, directory: str | os.PathLike, *, keep: int = 2,
                 phase_hook: PhaseHook | None = None):
        if keep < 1:
            raise CheckpointError("keep must be at least 1")
        self.directory = Path(directory)
        self.keep = keep
        self._hook = phase_hook or no_hook
        self._closed = False
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise storage_error(e, "create", str(self.directory)) from None

    def _check(self, step, state, meta):
        if self._closed:
            raise CheckpointError(f"{self.name} checkpointer is closed")
        return check_step(step), normalize_state(state), encode_meta(meta)

    def wait_all(self) -> None:
        pass

    def close(self) -> None:
        if not self._closed:
            try:
                self.wait_all()
            finally:
                self._closed = True

    @property
    def in_flight(self) -> int:
        return 0

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        try:
            self.close()
        except CheckpointError:
            if exc_type is None:
                raise

    @classmethod
    @abc.abstractmethod
    def _entries(cls, directory: Path) -> list[tuple[int, Path]]:
        """Every checkpoint in `directory`, (step, path), newest first."""

    @classmethod
    @abc.abstractmethod
    def _load(cls, path: Path) -> Loaded:
        """One checkpoint, verified (CheckpointError when damaged or foreign)."""

    @classmethod
    def recover(cls, directory) -> Loaded:
        directory = Path(directory)
        return recover_newest(directory, cls._load, cls._entries(directory))


class OneInFlight(DirectoryCheckpointer):
    """A checkpointer with at most one save in flight (`_pending`): wait_all() drains it and
    raises the failure of the newest save (`_unseen`) that nobody has waited for."""

    _pending: SaveFuture | None = None
    _unseen: SaveFuture | None = None

    @abc.abstractmethod
    def _drain(self) -> None:
        """Wait for the save in flight, if any."""

    def wait_all(self) -> None:
        self._drain()
        fut, self._unseen = self._unseen, None
        if fut is not None and fut.error is not None:
            raise fut.error

    @property
    def in_flight(self) -> int:
        fut = self._pending
        return int(fut is not None and not fut.done())
