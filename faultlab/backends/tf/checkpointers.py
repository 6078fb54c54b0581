"""The TensorFlow checkpointers: tf.train.Checkpoint + CheckpointManager, synchronous
(``tf-sync``) or with TF's async option (``tf-async``), behind faultlab.checkpointing.api's
Checkpointer interface.

The arrays are assigned to CPU tf.Variables held by a tf.train.Checkpoint, so TF's own writer
writes them; a write callback fsyncs what TF wrote (TF does not) before the save counts as
durable. Each keeps the newest `keep` checkpoints, recovers the newest one that TF's reader
loads (it verifies every tensor's CRC32C), and calls its phase hook at the points a crash
campaign may kill it (faultlab.checkpointing.api.Phase).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from faultlab.backends.tf.runtime import tf
from faultlab.checkpointing.api import Loaded, Phase, PhaseHook, SaveFuture, no_hook
from faultlab.checkpointing.directory import (NATIVE_DTYPES, OneInFlight, from_payload,
                                              payload_parts, scan)
from faultlab.checkpointing.storage import fsync_dir, storage_error
from faultlab.errors import CheckpointError


def fsync_tf_checkpoint(prefix: Path, hook: PhaseHook = no_hook, step: int = -1) -> None:
    """fsync a written TF checkpoint `prefix` (data files, index) and its directory: TF's
    writer does neither, and the names it renamed or created must survive a power loss too."""
    hook(Phase.COMMITTING, "fsync", step)
    for path in (*prefix.parent.glob(f"{prefix.name}.data-*"),
                 prefix.with_name(prefix.name + ".index")):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    hook(Phase.COMMITTING, "dir-fsync", step)
    fsync_dir(prefix.parent)


def _write_point(hook: PhaseHook, step: list):
    """A trackable without tensors whose serialisation -- in the thread that writes, TF's
    async thread included -- is the "writing" point of the phase hook."""

    # not converted by autograph (TF's async copy runs in a tf.function): plain Python calls
    class WritePoint(tf.__internal__.tracking.Trackable):
        @tf.autograph.experimental.do_not_convert
        def _serialize_to_tensors(self):
            hook(Phase.WRITING, "serialize", step[0])
            return {}

        @tf.autograph.experimental.do_not_convert
        def _copy_trackable_to_cpu(self, object_map):     # async: nothing to copy
            object_map[self] = self

    return WritePoint()


class TFCheckpoint(OneInFlight):
    """tf.train.Checkpoint + tf.train.CheckpointManager (`DIR/ckpt-N.index`, `.data-*`): the
    arrays are assigned to CPU tf.Variables held by the checkpoint (the step, metadata and
    names in a string variable), so TF's own writer writes them. TF does not fsync: a write
    callback, run before the manager records the checkpoint and deletes old ones, fsyncs the
    new files and the directory; the save is durable then. TF renames the data file into place
    and then writes the index (in place: a kill can tear it, and TF's reader then refuses it).

    tf-sync: save() returns once the checkpoint is durable. tf-async:
    `CheckpointOptions(enable_async=True)`: save() waits for the previous write, copies the
    variables (TF's own CPU copy) and returns; TF's thread writes, then the callback fsyncs."""

    name = "tf-sync"
    framework = "tf"
    asynchronous = False
    _INDEX_RE = re.compile(r"^ckpt-(-?\d+)\.index$")
    _INFO_KEY = "info/.ATTRIBUTES/VARIABLE_VALUE"
    # TF stores a bool as 0 / 1: NumPy bools holding other bytes would not round-trip
    _NATIVE = NATIVE_DTYPES - {np.dtype(np.bool_)}

    def __init__(self, directory, *, keep: int = 2, phase_hook: PhaseHook | None = None):
        super().__init__(directory, keep=keep, phase_hook=phase_hook)
        self._bound: tuple | None = None        # (signature, checkpoint, manager, variables)
        self._info = None
        self._step = [0]                        # the step being written (for the hook)
        self._failure: CheckpointError | None = None
        self.extra_memory = 0

    def _bind(self, parts):
        """The checkpoint and manager for arrays of these dtypes and shapes (new ones when
        they change: TF's async helper binds the variables it found at the first save)."""
        signature = tuple((a.dtype.str, a.shape) for _, a in parts)
        if self._bound is None or self._bound[0] != signature:
            self._sync()
            with tf.device("/cpu:0"):
                variables = [tf.Variable(a, trainable=False) for _, a in parts]
                self._info = tf.Variable("", trainable=False)
            ckpt = tf.train.Checkpoint(info=self._info, tensors=variables,
                                       point=_write_point(self._hook, self._step))
            manager = tf.train.CheckpointManager(ckpt, str(self.directory), self.keep)
            self._bound = (signature, ckpt, manager, variables)
            self.extra_memory = sum(a.nbytes for _, a in parts) * (2 if self.asynchronous else 1)
        return self._bound[1:]

    def save(self, step, state, meta=None) -> SaveFuture:
        step, arrays, meta = self._check(step, state, meta)
        self._hook(Phase.STAGING, "save", step)
        self._raise_failure()
        parts, info = payload_parts(step, arrays, meta, self._NATIVE)
        ckpt, manager, variables = self._bind(parts)
        for (_, arr), var in zip(parts, variables):
            self._hook(Phase.STAGING, "assign", step)
            var.assign(arr)
        self._info.assign(json.dumps(info))
        fut = SaveFuture(step)
        options = tf.train.CheckpointOptions(enable_async=self.asynchronous,
                                             experimental_write_callbacks=[
                                                 lambda path: self._durable(fut, path)])
        prefix = self.directory / f"ckpt-{step}"
        try:
            self._step[0] = step      # TF's thread is done with the previous step by now
            manager.save(checkpoint_number=step, options=options)
        except Exception as e:          # TF's OpErrors, or a failure of the previous write
            self._fail(fut, e, prefix)
            raise fut.error from None
        if self.asynchronous:
            self._pending = self._unseen = fut
        elif not fut.done():
            fut.finish()
        return fut

    def _durable(self, fut: SaveFuture, path: str) -> None:
        """TF's write callback (in TF's writing thread): fsync, then the save is durable."""
        prefix = Path(path)
        try:
            fsync_tf_checkpoint(prefix, self._hook, fut.step)
        except OSError as e:
            self._fail(fut, e, prefix)
            raise
        fut.finish()

    def _fail(self, fut: SaveFuture, error: BaseException, prefix: Path) -> None:
        if isinstance(error, CheckpointError):
            err = error
        elif isinstance(error, OSError):
            err = storage_error(error, "write", str(prefix))
        else:
            err = CheckpointError(f"cannot write checkpoint {prefix}: {type(error).__name__}: "
                                  f"{' '.join(str(error).split())[:300]}")
        if self.asynchronous:
            self._failure = self._failure or err
        if not fut.done():
            fut.finish(error=err)

    def _sync(self) -> None:
        """Wait for TF's async write; a write that did not reach its callback failed."""
        fut = self._pending
        if self._bound is None or fut is None:
            return
        self._bound[1].sync()
        self._pending = None
        # TF keeps a failure of its thread for its next save, or re-raises it at exit with a
        # traceback: take it over (the thread has finished that write; nothing else reads it)
        helper = getattr(self._bound[1], "_async_checkpointer_impl", None)
        error = getattr(helper, "_async_error", None)
        if error is not None:
            helper._async_error = None
        if not fut.done():
            self._fail(fut, error or CheckpointError("TF's async writer failed"),
                       self.directory / f"ckpt-{fut.step}")

    def _raise_failure(self) -> None:
        self._sync()
        if self._failure is not None:
            raise CheckpointError(f"{self.name} checkpointer stopped after an earlier error: "
                                  f"{self._failure}")

    def _drain(self) -> None:
        self._sync()

    @classmethod
    def _entries(cls, directory: Path) -> list[tuple[int, Path]]:
        return scan(directory, cls._INDEX_RE, lambda m: f"ckpt-{m.group(1)}")

    @classmethod
    def _load(cls, prefix: Path) -> Loaded:
        """Read a checkpoint with TF's reader (it verifies every tensor's CRC32C)."""
        try:
            reader = tf.train.load_checkpoint(str(prefix))
            info = reader.get_tensor(cls._INFO_KEY).decode()
            tensors = {name: reader.get_tensor(f"tensors/{i}/.ATTRIBUTES/VARIABLE_VALUE")
                       for i, name in enumerate(json.loads(info)["names"])}
        except (tf.errors.OpError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{prefix}: corrupt or foreign checkpoint "
                                  f"({type(e).__name__}: {' '.join(str(e).split())[:200]})"
                                  ) from None
        return from_payload({"info": info, "tensors": tensors}, str(prefix))


class TFAsyncCheckpoint(TFCheckpoint):
    __doc__ = TFCheckpoint.__doc__
    name = "tf-async"
    asynchronous = True
