"""Where each array of a state goes inside a slot, and which pieces make up each chunk.

The data region of a slot is the arrays' bytes (C order) one after another, each starting at a
multiple of ALIGN so that arrays read back are well aligned. The region is cut into chunks of
`chunk_bytes`; a chunk may hold pieces of several arrays. Pure functions, no I/O.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from faultlab.errors import CheckpointError
from faultlab.checkpointing.format import (MAX_DEPTH, TENSOR_ALIGN, TensorEntry, dtype_to_json,
                                           json_depth)

ALIGN = TENSOR_ALIGN               # array start alignment within a slot (a cache line)
INT64 = (-(1 << 63), (1 << 63) - 1)


@dataclass(frozen=True)
class Piece:
    """Bytes [src, src+length) of array `tensor` go to [dst, dst+length) of a chunk buffer."""

    tensor: int
    src: int
    dst: int
    length: int


@dataclass(frozen=True)
class Layout:
    tensors: tuple[TensorEntry, ...]
    data_bytes: int
    chunk_bytes: int
    chunks: tuple[tuple[Piece, ...], ...]      # pieces of each chunk, in order

    def chunk_length(self, i: int) -> int:
        return min(self.chunk_bytes, self.data_bytes - i * self.chunk_bytes)


def normalize_state(state: Mapping) -> list[tuple[str, np.ndarray]]:
    """Validate a state (name -> numpy array) and return C-contiguous arrays in dict order.

    Non-contiguous arrays are copied once here; contiguous ones are used in place.
    """
    if not isinstance(state, Mapping):
        raise CheckpointError(f"state must be a mapping of name -> numpy array, "
                              f"got {type(state).__name__}")
    out = []
    for name, value in state.items():
        if not isinstance(name, str):
            raise CheckpointError(f"state names must be strings, got {name!r}")
        if not isinstance(value, (np.ndarray, np.generic)):
            raise CheckpointError(f"state[{name!r}] is a {type(value).__name__}, "
                                  "not a numpy array")
        arr = np.asarray(value, order="C")     # (ascontiguousarray would make 0-d 1-d)
        if arr.dtype.hasobject:
            raise CheckpointError(f"state[{name!r}] has dtype {arr.dtype}, which holds Python "
                                  "objects and cannot be checkpointed")
        if (arr.dtype.names or arr.dtype.subdtype) \
                and json_depth(dtype_to_json(arr.dtype)) > MAX_DEPTH - 4:
            raise CheckpointError(f"state[{name!r}] has a structured dtype nested more than "
                                  f"{MAX_DEPTH - 4} levels deep")
        out.append((name, arr))
    return out


def encode_meta(meta) -> dict:
    """Check that meta is a JSON object; return it as it will read back."""
    if meta is None:
        return {}
    if not isinstance(meta, Mapping):
        raise CheckpointError(f"meta must be a dict, got {type(meta).__name__}")
    try:
        doc = json.loads(json.dumps(dict(meta), allow_nan=False))
    except (TypeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"meta is not JSON-serialisable: {e}") from None
    # the manifest holds meta two levels down: {"meta": {...}}
    if json_depth(doc) > MAX_DEPTH - 1:
        raise CheckpointError(f"meta nests more than {MAX_DEPTH - 1} levels deep")
    return doc


def check_step(step) -> int:
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)) \
            or not INT64[0] <= int(step) <= INT64[1]:
        raise CheckpointError(f"step must be a 64-bit integer, got {step!r}")
    return int(step)


def plan(arrays: list[tuple[str, np.ndarray]], chunk_bytes: int) -> Layout:
    """Lay the arrays out one after another and cut the region into chunks."""
    entries, pos = [], 0
    for name, arr in arrays:
        pos = -(-pos // ALIGN) * ALIGN
        entries.append(TensorEntry(name, arr.dtype, tuple(arr.shape), pos, arr.nbytes))
        pos += arr.nbytes
    data_bytes = pos
    n_chunks = math.ceil(data_bytes / chunk_bytes) if data_bytes else 0
    chunks: list[list[Piece]] = [[] for _ in range(n_chunks)]
    for i, t in enumerate(entries):
        done = 0
        while done < t.nbytes:
            at = t.offset + done
            c, within = divmod(at, chunk_bytes)
            length = min(t.nbytes - done, chunk_bytes - within)
            chunks[c].append(Piece(i, done, within, length))
            done += length
    return Layout(tuple(entries), data_bytes, chunk_bytes, tuple(tuple(c) for c in chunks))


def byte_view(arr: np.ndarray) -> np.ndarray:
    """The bytes of a C-contiguous array as a flat uint8 view (no copy)."""
    return arr.reshape(-1).view(np.uint8)


def stage_chunk(layout: Layout, i: int, sources: list[np.ndarray], buf: np.ndarray) -> int:
    """Copy chunk i into buf (zeroing the alignment gaps); return its length."""
    n = layout.chunk_length(i)
    pos = 0
    for p in layout.chunks[i]:
        if p.dst > pos:
            buf[pos:p.dst] = 0
        buf[p.dst:p.dst + p.length] = sources[p.tensor][p.src:p.src + p.length]
        pos = p.dst + p.length
    if pos < n:
        buf[pos:n] = 0
    return n
