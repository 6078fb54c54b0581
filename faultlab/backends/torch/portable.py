"""Portable mode for PyTorch: pin every CPU kernel family to AVX2 + FMA (x86-64-v3).

Importing this module imports no torch. :data:`ENV` is put into ``os.environ`` before torch is
imported in a process (``faultlab.determinism.enter_portable``); :func:`apply` runs right after
torch is imported and configured; :func:`kernels` reads back from torch what this process's
kernels actually are (for the determinism fingerprint).

What each setting does (torch 2.13.0+cpu, MKL 2024.2, oneDNN 3.12, checked on these versions):

``ATEN_CPU_CAPABILITY=avx2``
    ATen compiles its vectorised kernels (elementwise, reductions, Adam's foreach ops, batch
    norm, pooling) once per capability and picks one at start-up; ``avx2`` selects the AVX2 + FMA
    build on every machine (``torch.backends.cpu.get_cpu_capability()`` then says ``AVX2``).
    Necessary: leaving it out lets the AVX-512 kernels run, and the final state differs from an
    AVX2 machine's (measured for ``mlp`` and ``resnet18``).
``ONEDNN_MAX_CPU_ISA=AVX2`` (and the older name ``DNNL_MAX_CPU_ISA``, same value)
    caps oneDNN's JIT (convolutions, GELU and the other ops torch sends to oneDNN) at AVX2.
    ``ONEDNN_`` takes precedence over ``DNNL_`` in oneDNN 3.x; both are set so that a stray value
    of either cannot win. Necessary while ``torch.backends.mkldnn`` is enabled (resnet18
    differs without it); with mkldnn disabled it changes nothing measured.
``ONEDNN_DEFAULT_FPMATH_MODE=STRICT``
    keeps oneDNN's f32 primitives in f32 (a ``BF16``/``ANY`` value there would let an AVX-512
    BF16 or AMX machine compute f32 convolutions in lower precision). Not triggered by an
    experiment here (with the AVX2 cap there is no bf16 path); pinned because it is an input.
``MKL_CBWR=COMPATIBLE``
    MKL's conditional numerical reproducibility on its SSE2 branch without rcpps/rsqrtps: the
    one branch MKL documents as reproducible on Intel *and* non-Intel CPUs. The branch the name
    suggests, ``MKL_CBWR=AVX2``, is honoured on Intel CPUs only: on the AMD EPYC this was
    measured on, MKL_VERBOSE reports ``CNR:AUTO`` for ``MKL_CBWR=AVX2`` (and for ``AVX512``),
    as MKL's guide says it falls back to AUTO on non-Intel CPUs; an Intel AVX2 machine and an
    AMD one would then run different GEMM code. COMPATIBLE changes the GEMM bits (measured on
    ``mlp``). MKL does the fully connected layers (ATen's addmm / mm) and, with mkldnn off,
    the im2col GEMMs of convolutions. On the reference workloads its cost is within the noise
    (their GEMMs are small); for GEMM-heavy models it is the SSE2 speed of sgemm.
``MKL_ENABLE_INSTRUCTIONS=AVX2``
    MKL's dispatch cap outside CNR mode. Redundant while ``MKL_CBWR`` is set (CNR fixes the
    branch) and without effect on the AMD CPU measured here (MKL runs its own code path on AMD:
    AVX2, AVX512, SSE4_2 all gave the same bits); kept so a stray value cannot matter.

:func:`apply` (after import):

* ``torch.set_float32_matmul_precision("highest")``: no TF32 / bf16 shortcuts in f32 matmul
  (an input a user could change; a no-op at its default).
* ``torch.backends.mkldnn`` stays **enabled** (convolutions through oneDNN capped at AVX2).
  Disabling it (convolutions through ATen im2col + MKL GEMM, the only path with a documented
  cross-CPU guarantee under MKL CNR) made the ``ONEDNN_*`` settings unnecessary but cost
  2.2-2.3x the native step (``benchmarks/portable.py --extra``), over the 1.5x bound.
  What stays unpinned on the oneDNN path: oneDNN picks its convolution implementation and
  block sizes from the cache sizes it reads with CPUID, so two AVX2 machines with different
  caches may still sum in different orders. No setting fixes that; faultlab's control trial
  (a golden replay compared bit for bit) is what catches it.

Measured (2-core AMD EPYC with AVX-512, Dec 2026; each configuration a fresh process; 10 steps
of ``mlp``, 4 of the reference ``resnet18``, sha256 of the final state): native and
native-capped-to-AVX2 (the emulated AVX2 machine) end in different states for both; portable
mode started from native and from the capped environment end bit-identical, and equal to the
capped run (so a portable run here is what an AVX2 machine computes natively, as far as one
machine can emulate it). Leaving out ``ATEN_CPU_CAPABILITY`` or ``ONEDNN_MAX_CPU_ISA`` lets the
capped environment change the result. Cost on the reference ResNet-18 step (paired ratio to
native, ``benchmarks/portable.py``): 1.06-1.10x. ``MKL_CBWR=COMPATIBLE`` alone makes a large
SGEMM (1024^3, 1 thread) about 2.3x slower than MKL's own path on this CPU.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

ENV: dict[str, str] = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "DNNL_MAX_CPU_ISA": "AVX2",
    "ONEDNN_DEFAULT_FPMATH_MODE": "STRICT",
    "MKL_CBWR": "COMPATIBLE",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}

#: whether portable mode keeps torch's oneDNN (mkldnn) path on; see the module docstring
MKLDNN = True

_kernels: dict[str, str] | None = None


def apply() -> None:
    """Portable mode's run-time switches, once torch is imported (idempotent)."""
    import torch
    torch.set_float32_matmul_precision("highest")
    torch.backends.mkldnn.enabled = MKLDNN


@contextlib.contextmanager
def _capture_stdout():
    """What native code writes to fd 1 inside the block (MKL and oneDNN verbose print there)."""
    import ctypes
    libc = ctypes.CDLL(None)
    out: list[str] = []
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        try:
            yield out
        finally:
            libc.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)
            sink.seek(0)
            out.append(sink.read().decode(errors="replace"))


def kernels() -> dict[str, str]:
    """What this process's torch kernels are, read from torch (imports it): ATen's CPU
    capability, whether mkldnn (oneDNN) is enabled and the ISA oneDNN's JIT reports, and MKL's
    CNR mode as MKL_VERBOSE reports it on a small SGEMM. The probes run on constant tensors
    (no RNG is drawn); oneDNN prints its ISA once per process, so the result is cached."""
    global _kernels
    import torch
    info = {"torch": torch.__version__,
            "aten": str(torch.backends.cpu.get_cpu_capability()),
            "mkldnn": "on" if torch.backends.mkldnn.enabled else "off"}
    if _kernels is None:
        found = {"mkl_cbwr": "unknown", "onednn": "unknown"}
        try:
            with _capture_stdout() as out, torch.no_grad():
                if torch.backends.mkl.is_available():
                    a = torch.ones(64, 64)
                    with torch.backends.mkl.verbose(torch.backends.mkl.VERBOSE_ON):
                        torch.mm(a, a)
                if torch.backends.mkldnn.is_available():
                    x = torch.ones(4, 3, 8, 8)
                    w = torch.ones(4, 3, 3, 3)
                    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                        prev = torch.backends.mkldnn.enabled
                        torch.backends.mkldnn.enabled = True
                        try:
                            torch.nn.functional.conv2d(x, w)
                        finally:
                            torch.backends.mkldnn.enabled = prev
            text = "".join(out)
            m = re.search(r"CNR:(\S+)", text)
            if m:
                found["mkl_cbwr"] = m.group(1)
            m = re.search(r"isa:([^\n]+)", text)
            if m:
                found["onednn"] = m.group(1).strip()
        except Exception as e:      # a probe must never break a run
            found["error"] = f"{type(e).__name__}: {e}"
        _kernels = found
    info.update(_kernels)
    return info
