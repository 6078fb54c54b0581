"""Portable mode for TensorFlow: pin TF's CPU kernels to AVX2 + FMA (x86-64-v3).

Importing this module imports no TensorFlow. :data:`ENV` is put into ``os.environ`` before
TensorFlow is imported in a process (``faultlab.determinism.enter_portable``); :func:`apply`
runs after the runtime is configured; :func:`kernels` reads back what this process's kernels
are (for the determinism fingerprint).

What each setting does (tensorflow-cpu 2.21, whose bundled oneDNN is v3.7.3 -- not torch's
3.12; checked on these versions):

``ONEDNN_MAX_CPU_ISA=AVX2`` (and the older name ``DNNL_MAX_CPU_ISA``, same value)
    caps TF's oneDNN JIT at AVX2. Necessary **in both** of TF's modes: with oneDNN's custom
    ops on, oneDNN runs the convolutions, matmuls and batch norms; with them off
    (``TF_ENABLE_ONEDNN_OPTS=0``) TF's Eigen kernels still hand every tensor contraction's
    inner GEMM (MatMul, and Conv2D through im2col) to oneDNN's ``dnnl_sgemm`` (TF's
    "mkldnn contraction kernel", visible as ``gemm_api`` in ONEDNN_VERBOSE), which JITs for the
    CPU. Measured: without the cap, native and the AVX2-capped environment end the reference
    ResNet-18 in different states with oneDNN opts on *and* off. So ``TF_ENABLE_ONEDNN_OPTS=0``
    alone does not make TF run "the same instructions on every machine".
``TF_ENABLE_ONEDNN_OPTS=1``
    fixes which of the two kernel families runs (TF's default on x86 Linux is on, but a user's
    environment may say 0, and the two give different bits: measured). On was chosen over
    off because it is the faster of the two on the reference step (``benchmarks/portable.py
    --extra`` times both) and both carry the same residual risk (below).
``ONEDNN_DEFAULT_FPMATH_MODE=STRICT``
    keeps oneDNN's f32 primitives in f32 on machines with bf16/AMX units (an input; with the
    AVX2 cap there is no bf16 path, so no experiment here triggers it).

Not pinned, and not pinnable by a setting: block sizes that follow the cache sizes. The Eigen
code compiled into the wheel is the same on every machine (the wheel is built for AVX without
FMA: TF's start-up notice lists AVX2 and FMA as not compiled in), but Eigen's contraction
blocking (``computeProductBlockingSizes``, which TF's contraction kernel starts from) and
oneDNN's implementation and blocking choices read the L1/L2/L3 sizes from CPUID. Two AVX2
machines with different caches may therefore still sum in a different order; one machine
cannot emulate that. Faultlab's control trial (a golden replay compared bit for bit) is what
catches it.

:func:`apply` disables TF32 (a GPU-only switch, pinned as an input; a no-op on CPU).
TensorFlow has no run-time switch for oneDNN's ISA (oneDNN's ``dnnl_set_max_cpu_isa`` is not
exported by the wheel), so everything else is environment.

Measured (2-core AMD EPYC with AVX-512, Dec 2026; each configuration a fresh process; 4 steps
of the reference ResNet-18 on 2 MirroredStrategy replicas, sha256 of the final state): native
vs capped to AVX2 differ; portable mode from native and from the capped environment are
bit-identical, and equal the capped run. Cost on the reference step (paired ratio to native,
``benchmarks/portable.py``): 1.04-1.08x; with oneDNN opts off instead, 1.25-1.29x.
"""

from __future__ import annotations

import os

ENV: dict[str, str] = {
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "DNNL_MAX_CPU_ISA": "AVX2",
    "ONEDNN_DEFAULT_FPMATH_MODE": "STRICT",
    "TF_ENABLE_ONEDNN_OPTS": "1",
}

# oneDNN's ISA names in increasing order, as ONEDNN_MAX_CPU_ISA takes them (x86 subset)
_ISA_ORDER = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
              "AVX512_CORE_VNNI", "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16",
              "AVX10_1_512_AMX", "AVX512_CORE_AMX", "AVX10_1_512_AMX_FP16",
              "AVX512_CORE_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2")


def apply() -> None:
    """Portable mode's run-time switches, once TensorFlow is imported (idempotent)."""
    from faultlab.backends.tf.runtime import tf
    try:
        tf.config.experimental.enable_tensor_float_32_execution(False)
    except Exception:       # an old TF without the switch: nothing to pin
        pass


def _cpu_best_isa() -> str:
    """The highest of oneDNN's x86 ISAs this CPU has (coarse: from /proc/cpuinfo flags)."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        return "unknown"
    best = "unknown"
    for isa, need in (("SSE41", {"sse4_1"}), ("AVX", {"avx"}), ("AVX2", {"avx2", "fma"}),
                      ("AVX512_CORE", {"avx512f", "avx512bw", "avx512vl", "avx512dq"}),
                      ("AVX512_CORE_VNNI", {"avx512_vnni"}), ("AVX512_CORE_BF16", {"avx512_bf16"}),
                      ("AVX512_CORE_AMX", {"amx_tile", "amx_bf16", "amx_int8"})):
        if need <= flags:
            best = isa
        elif isa not in ("AVX512_CORE_VNNI", "AVX512_CORE_BF16"):
            break
    return best


def kernels() -> dict[str, str]:
    """What this process's TF kernels are (imports TensorFlow): whether oneDNN's custom ops are
    on, read from TF (``IsMklEnabled``), and the ISA oneDNN's JIT runs at: the lower of this
    CPU's best and the cap oneDNN reads (``ONEDNN_MAX_CPU_ISA``, else ``DNNL_MAX_CPU_ISA``).
    TF exports no call that returns oneDNN's effective ISA and oneDNN's verbose mode is
    environment-only, so that one entry is derived, not read back."""
    from faultlab.backends.tf.runtime import tf
    try:
        from tensorflow.python.util import _pywrap_util_port
        opts = "on" if _pywrap_util_port.IsMklEnabled() else "off"
    except Exception:
        opts = "unknown"
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
           or "ALL").strip().upper()
    best = _cpu_best_isa()
    isa = best
    if cap in _ISA_ORDER and best in _ISA_ORDER and _ISA_ORDER.index(cap) < _ISA_ORDER.index(best):
        isa = cap
    return {"tensorflow": tf.__version__, "onednn_opts": opts, "onednn": isa,
            "onednn_cap": cap, "onednn_fpmath": os.environ.get("ONEDNN_DEFAULT_FPMATH_MODE",
                                                                "default")}
