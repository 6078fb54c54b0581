"""The checkpoint adapter interface: a training session's whole state <-> {name: array} + meta.

The engine and the other checkpointers store only flat NumPy states with a JSON meta. An
adapter turns one framework's training session (models, optimizers, schedulers, data
position, random generators, the step) into such a state and back, exactly. Each backend
provides one (``Backend.checkpoint_adapter()``: faultlab.backends.torch.adapter's
TorchCheckpointAdapter, faultlab.backends.tf.adapter's TFCheckpointAdapter), derived from
:class:`AdapterBase`, encoding nested values with faultlab.checkpointing.codec.

Call order (the contract training loops, the crash harness and the benchmarks rely on):

0. ``adapter = Adapter(model, optimizer, ...)`` (the torch adapter registers optimizer step
   hooks here).
1. ``adapter.capture(step, data_position=..., extra=...)`` -> ``(arrays, meta)``: the state
   after `step` steps. It first waits for an overlapped save still staging (``wait_staged``).
   Which arrays stay valid for how long is the adapter's own: torch CPU arrays are views of
   the live tensors (valid until training changes them), device tensors go through pinned
   buffers reused by the next capture; TF's are snapshots that training never changes
   (``immutable_capture``).
2. ``adapter.save(checkpointer, step, ...)`` = capture + ``checkpointer.save(step, arrays,
   meta)``; returns the checkpointer's SaveFuture (faultlab.checkpointing.api). Training may
   go on when it returns: every checkpointer copies or writes the arrays before its save()
   returns, except the borrowed saves that only the adapter makes -- an immutable capture
   (TF), or the torch adapter's ``cow=True`` (copy-on-write) -- and the torch adapter's
   ``overlap=True``, which returns at once and stages parameters and optimizer state in a
   background thread while the next forward and backward pass run.
3. ``adapter.wait_staged()``: block until an overlapped save has handed its state to the
   checkpointer (re-raising a staging failure). The torch adapter's optimizer pre-hook calls
   it before the optimizer changes the parameters; capture, save, restore and close call it
   too. Durability is the future's: ``future.wait()``.
4. ``adapter.close()``: wait_staged, then release what the adapter holds (the torch adapter's
   optimizer hooks and copy-on-write buffers). Checkpointers are closed by their owner.
5. ``adapter.resume(loader)``: ``loader()`` (e.g. ``lambda: recover(path)``) -> ``(step,
   state, meta)`` -> ``restore(state, meta)`` -> :class:`Resume` (step, data position,
   extras), or None when there is no checkpoint yet. ``restore`` checks that the whole state
   fits (adapter metadata, every array it names, names, shapes, dtypes) before it changes
   anything, then puts it back bit for bit.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

import numpy as np

from faultlab.errors import CheckpointError

#: the "faultlab_adapter" value of an adapter state's meta (with "framework" and "step")
ADAPTER_FORMAT = 1


class Resume(NamedTuple):
    """What a restore hands back to the training loop: where to go on from."""

    step: int
    data_position: Any
    extra: dict


class CheckpointAdapter(Protocol):
    """A framework's training session as a flat state (the interface every adapter has)."""

    def capture(self, step: int, *, data_position: Any = None,
                extra: Mapping | None = None) -> tuple[dict[str, np.ndarray], dict]:
        """The session's state after `step` steps, as (arrays, JSON meta)."""

    def restore(self, state: Mapping[str, np.ndarray], meta: Mapping) -> Resume:
        """Put a captured state back, bit for bit; return where training goes on."""


class AdapterBase:
    """What every adapter derives from its capture() / restore(): save(), resume() and the
    no-op wait_staged() / close() of an adapter that stages nothing in the background."""

    #: capture() returns snapshots that training never changes (TF's copy-on-write
    #: variables): a checkpointer that can write borrowed arrays gets them uncopied
    immutable_capture = False

    def save(self, checkpointer, step: int, *, data_position: Any = None,
             extra: Mapping | None = None):
        """capture() and checkpointer.save(); returns the checkpointer's handle."""
        state, meta = self.capture(step, data_position=data_position, extra=extra)
        if self.immutable_capture and getattr(checkpointer, "borrows", False):
            return checkpointer.save(step, state, meta, borrowed=True)
        return checkpointer.save(step, state, meta)

    def wait_staged(self) -> None:
        """Block until a save staging in the background has handed over its state."""

    def close(self) -> None:
        """Release what the adapter holds (wait_staged first)."""
        self.wait_staged()

    def resume(self, loader: Callable[[], Any]) -> Resume | None:
        """Restore from `loader()` (e.g. `lambda: recover(path)`), returning None when there
        is no checkpoint yet (a loader raising CheckpointError "no checkpoint file"/"no
        committed checkpoint" is treated as none; any other error propagates)."""
        try:
            restored = loader()
        except CheckpointError as e:
            if str(e).startswith(("no checkpoint file", "no committed checkpoint")):
                return None
            raise
        if restored is None:
            return None
        _, state, meta = restored
        return self.restore(state, meta)


def check_adapter_meta(meta, framework: str) -> None:
    """One-line CheckpointError unless `meta` is an adapter state of `framework`."""
    if not isinstance(meta, Mapping) or meta.get("faultlab_adapter") is None:
        raise CheckpointError("checkpoint was not written by a faultlab adapter "
                              "(no adapter metadata)")
    if meta["faultlab_adapter"] != ADAPTER_FORMAT or meta.get("framework") != framework:
        raise CheckpointError(f"checkpoint holds a {meta.get('framework')} adapter state "
                              f"of format {meta['faultlab_adapter']}, not {framework} format "
                              f"{ADAPTER_FORMAT}")


def check_meta_json(meta: dict) -> None:
    """One-line CheckpointError unless an adapter's meta is JSON (no NaN, no objects)."""
    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"adapter metadata is not JSON-serialisable: {e}") from None


def named(obj, kind: str) -> dict:
    """An adapter argument as {name: object}: None -> {}, a dict -> "kind/key" names, one
    object -> "kind"."""
    if obj is None:
        return {}
    if isinstance(obj, Mapping):
        return {f"{kind}/{k}": v for k, v in obj.items()}
    return {kind: obj}


def check_names(saved: Mapping, live: Mapping, kind: str) -> None:
    """One-line CheckpointError unless a checkpoint holds exactly the adapter's `kind`s."""
    if set(saved) != set(live):
        raise CheckpointError(f"checkpoint holds {kind}s {sorted(saved)} but the adapter has "
                              f"{sorted(live)}")
