"""TensorFlow's runtime for faultlab: a quiet import, and its configuration before it starts.

The only module of faultlab that imports TensorFlow itself; every TF module imports ``tf`` from
here. ``configure_runtime()`` (logical CPU devices, threads, op determinism) and
``configure_cpu_devices(n)`` are the one place TF's devices are set up.


TensorFlow 2.21 writes absl's "All log messages before absl::InitializeLog() ..." warning and
an informational oneDNN line straight to file descriptor 2 when it loads and again when its
runtime starts, before TF_CPP_MIN_LOG_LEVEL is honoured. faultlab's TF modules import
TensorFlow through this module, which hides fd 2 for exactly those two moments; anything
printed there is shown after all if the block fails."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@contextlib.contextmanager
def quiet_native_stderr():
    """Send what native code writes to fd 2 inside the block to a temporary file; replay it
    on stderr if the block raises."""
    try:
        saved = os.dup(2)
    except OSError:          # no fd 2 at all
        yield
        return
    with tempfile.TemporaryFile() as sink:
        sys.stderr.flush()
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


with quiet_native_stderr():
    import tensorflow as tf  # noqa: E402

__all__ = ["tf", "quiet_native_stderr", "configure_runtime", "configure_cpu_devices",
           "ArithmeticOff"]

_configured: int | None = None


def _split_cpu(n: int) -> None:
    try:
        cpus = tf.config.list_physical_devices("CPU")
        if len(tf.config.get_logical_device_configuration(cpus[0]) or ()) < n:
            tf.config.set_logical_device_configuration(
                cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(n)])
    except (RuntimeError, ValueError):
        pass  # TF was initialised before us: use the devices it has


def configure_cpu_devices(n: int = 8) -> int:
    """Split the host CPU into `n` logical devices so that MirroredStrategy can run n
    replicas on one machine. Must run before TensorFlow initialises (before the first op or
    device query); returns the number of logical CPU devices TensorFlow will have."""
    _split_cpu(n)
    with quiet_native_stderr():   # starts the runtime, which prints
        return len(tf.config.list_logical_devices("CPU"))


def configure_runtime() -> int:
    """Logical CPU devices (8, or ``$FAULTLAB_TF_CPU_DEVICES``), intra/inter-op threads from
    ``$OMP_NUM_THREADS`` when set (faultlab's workers set it; it is part of the golden key) and
    op determinism, before TF initialises; once per process. Returns the devices asked for."""
    global _configured
    if _configured is not None:
        return _configured
    want = max(8, int(os.environ.get("FAULTLAB_TF_CPU_DEVICES", "8") or 8))
    _split_cpu(want)
    threads = os.environ.get("OMP_NUM_THREADS", "").strip()
    if threads.isdigit() and int(threads) > 0:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(int(threads))
            tf.config.threading.set_inter_op_parallelism_threads(int(threads))
        except RuntimeError:
            pass  # TF's thread pools already exist: they keep their size
    tf.config.experimental.enable_op_determinism()
    with quiet_native_stderr():
        tf.config.list_logical_devices("CPU")   # starts the runtime (which prints)
    _configured = want
    return want


class ArithmeticOff:
    """A context manager: the tf.functions called inside it (in this thread) are optimized
    without Grappler's arithmetic optimizer, every other option as configured.

    Why: that optimizer rewrites floating-point expressions (reassociating products and sums
    to save broadcasts, hoisting common factors, regrouping additions) wherever the pattern it
    looks for is contiguous in the graph. An injection point (a Switch / Merge) in the middle
    of a pattern blocks the rewrite, so the same model computed with and without points
    rounded differently. With it off, the plain step and the instrumented step do the same
    arithmetic, bit for bit (docs/tensorflow.md, "What it costs"). Grappler runs once per
    (function, options), when the function is first called under them."""

    def __init__(self):
        from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
        from tensorflow.python.eager import context
        self._context = context
        base = context.context().function_call_options
        cp = config_pb2.ConfigProto()
        cp.ParseFromString(base.config_proto_serialized)
        cp.graph_options.rewrite_options.arithmetic_optimization = (
            rewriter_config_pb2.RewriterConfig.OFF)
        self.options = context.FunctionCallOptions(executor_type=base.executor_type,
                                                   config_proto=cp)
        self._prev = threading.local()

    def __enter__(self):
        ctx = self._context.context()
        stack = self._prev.__dict__.setdefault("stack", [])
        stack.append(ctx._thread_local_data.function_call_options)
        ctx.function_call_options = self.options
        return self

    def __exit__(self, *exc):
        self._context.context().function_call_options = self._prev.stack.pop()
        return False
