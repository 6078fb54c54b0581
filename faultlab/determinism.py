"""Determinism across machines: the fingerprint of what makes a run's arithmetic what it is,
and portable mode.

A golden run reproduces bit for bit only where the same kernels do the same arithmetic in the
same order. CPU math libraries pick their kernels by instruction set when they start (torch's
ATen CPU capability, MKL's code path, oneDNN's JIT, TensorFlow's oneDNN), and the thread count
changes reduction order, so a golden run made on an AVX-512 machine is not the golden run of an
AVX2 one. The :class:`Fingerprint` names those inputs (library versions, the instruction-set
features the kernels dispatch on or the portable cap, the environment variables that override
dispatch, the thread count, the device); it is part of every golden run's key and is stored
with it, so a golden run is only ever compared with trials whose fingerprint is the same.

Portable mode (``faultlab run --portable``) pins every kernel family to AVX2 + FMA through each
backend's ``portable`` module (environment variables set before the framework is imported,
switches applied after): a golden run made in portable mode serves every x86-64 machine with
AVX2, and the fingerprint says ``x86-64-v3 (portable)`` instead of this CPU's features. What a
fingerprint cannot see (a library whose block sizes follow the cache sizes) the control trial
catches: see ``runner.session.Session.control``.

Framework-free: versions come from package metadata, features from /proc/cpuinfo.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import metadata

from faultlab import __version__
from faultlab.errors import FaultlabError

#: set (to "1") in every process of a portable run; workers inherit it
PORTABLE_FLAG = "FAULTLAB_PORTABLE"

#: CPU features math kernels dispatch on (x86: SSE4.2 / AVX / AVX2 / FMA / AVX-512 / AMX)
DISPATCH_FEATURES = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512dq", "avx512bw",
    "avx512vl", "avx512cd", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx512ifma",
    "avx512vbmi", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "sve2",
)
#: what portable mode needs of a CPU
PORTABLE_NEEDS = ("avx2", "fma")
PORTABLE_ISA = "x86-64-v3 (portable)"

#: environment variables that change which kernels run (recorded when set)
DISPATCH_ENV_PREFIXES = ("ATEN_CPU_CAPABILITY", "MKL_", "ONEDNN_", "DNNL_", "TF_ENABLE_ONEDNN",
                         "OMP_NUM_THREADS", "TF_DETERMINISTIC", "CUBLAS_WORKSPACE")

#: the distribution names a framework may be installed as (first one found is recorded)
_DISTS = {"torch": ("torch",), "tf": ("tensorflow-cpu", "tensorflow", "tensorflow-intel")}


class DeterminismError(FaultlabError):
    """A golden run and this machine do not compute the same arithmetic (a fingerprint that
    differs, or a control trial that is not bit-exact): one line, never a silently wrong
    outcome."""


@lru_cache(maxsize=None)
def cpu_info() -> tuple[str, frozenset]:
    """(vendor, features) of this machine's CPU: Linux /proc/cpuinfo; elsewhere the machine
    type and no features (such machines get native fingerprints that match only themselves)."""
    vendor, flags = platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("vendor_id", "CPU implementer") and vendor == platform.machine():
                    vendor = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return vendor, frozenset(flags)


def _dist_version(names) -> str:
    for n in names:
        try:
            return f"{n} {metadata.version(n)}"
        except metadata.PackageNotFoundError:
            continue
    return "absent"


def portable_active() -> bool:
    return os.environ.get(PORTABLE_FLAG) == "1"


@dataclass(frozen=True)
class Fingerprint:
    """What makes a run's arithmetic what it is. Equal fingerprints on two machines mean one
    golden run serves both (checked, in the end, by a control trial)."""

    faultlab: str
    python: str
    numpy: str
    framework: str           # "torch 2.13.0"
    machine: str             # x86_64
    isa: str                 # portable cap, or vendor + the dispatch features present
    env: tuple               # ((name, value), ...) dispatch overrides in effect
    threads: int
    device: str
    portable: bool

    def to_dict(self) -> dict:
        d = asdict(self)
        d["env"] = dict(self.env)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Fingerprint":
        try:
            d = dict(d)
            d["env"] = tuple(sorted((str(k), str(v)) for k, v in dict(d["env"]).items()))
            d["threads"] = int(d["threads"])
            d["portable"] = bool(d["portable"])
            return cls(**{k: d[k] for k in cls.__dataclass_fields__})
        except (KeyError, TypeError, ValueError) as e:
            raise DeterminismError(f"malformed determinism fingerprint ({e})") from None

    def digest(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def diff(self, other: "Fingerprint") -> str:
        """What differs, as 'field: this vs other; ...' (empty when equal)."""
        a, b = self.to_dict(), other.to_dict()
        parts = []
        for k in a:
            if a[k] != b[k]:
                if isinstance(a[k], dict):
                    keys = sorted(set(a[k]) | set(b[k]))
                    inner = ", ".join(f"{n}={a[k].get(n, '-')} vs {b[k].get(n, '-')}"
                                      for n in keys if a[k].get(n) != b[k].get(n))
                    parts.append(f"{k}: {inner}")
                else:
                    parts.append(f"{k}: {a[k]} vs {b[k]}")
        return "; ".join(parts)

    def short(self) -> str:
        return f"{self.framework}, {self.isa}, {self.threads} thread(s), {self.device}"


def fingerprint(framework: str, threads: int, device: str = "cpu") -> Fingerprint:
    """This process's fingerprint for `framework` at `threads` threads (portable when this
    process runs in portable mode). Reads no framework: versions from package metadata."""
    import numpy
    framework = getattr(framework, "value", framework)
    vendor, flags = cpu_info()
    portable = portable_active()
    if portable:
        isa = PORTABLE_ISA
    else:
        isa = " ".join([vendor, *sorted(f for f in DISPATCH_FEATURES if f in flags)])
    env = tuple(sorted((k, v) for k, v in os.environ.items()
                       if k.startswith(DISPATCH_ENV_PREFIXES) and k != "OMP_NUM_THREADS"))
    return Fingerprint(faultlab=__version__, python=platform.python_version(),
                       numpy=numpy.__version__,
                       framework=_dist_version(_DISTS.get(framework, (framework,))),
                       machine=platform.machine(), isa=isa, env=env, threads=int(threads),
                       device=device, portable=portable)


def check_portable_cpu() -> None:
    """A one-line error where this CPU cannot run portable mode's kernels."""
    vendor, flags = cpu_info()
    missing = [f for f in PORTABLE_NEEDS if f not in flags]
    if platform.machine() not in ("x86_64", "AMD64") or missing:
        raise DeterminismError(
            f"--portable needs an x86-64 CPU with {' and '.join(n.upper() for n in PORTABLE_NEEDS)}; this "
            f"one ({platform.machine()}, {vendor}) lacks "
            f"{', '.join(missing).upper() or 'x86-64'}")


def portable_supported() -> bool:
    """Whether this CPU can run portable mode's kernels (x86-64 with AVX2 and FMA)."""
    try:
        check_portable_cpu()
    except DeterminismError:
        return False
    return True


def choose(mode: str, frameworks=None) -> bool:
    """Apply a run's kernel mode: "portable" (refused in one line where it cannot be had),
    "native", or "auto" (portable where the CPU has AVX2 and FMA and no pinned framework is
    imported in this process yet, native otherwise). Returns whether portable mode is on."""
    if mode == "native":
        os.environ.pop(PORTABLE_FLAG, None)     # an inherited flag; overrides stay recorded
        return False
    if mode == "portable":
        enter_portable(frameworks)
        return True
    if mode != "auto":
        raise DeterminismError(f"unknown kernel mode {mode!r} (portable, native or auto)")
    if not portable_supported():
        return False
    try:
        enter_portable(frameworks)
    except DeterminismError:        # a framework already started here: its kernels stay
        return portable_active()
    return True


def portable_env(frameworks=None) -> dict[str, str]:
    """The environment a process needs to run in portable mode: the flag and every installed
    backend's settings (or those of `frameworks`)."""
    from faultlab.backends import installed, load_backend, names
    env = {PORTABLE_FLAG: "1"}
    for name in frameworks or [n for n in names() if installed(n)]:
        env.update(load_backend(name).portable_env())
    return env


def enter_portable(frameworks=None) -> dict[str, str]:
    """Switch this process (and the workers it starts) to portable mode: checks the CPU, sets
    the environment; refuses in one line when a framework it pins is already imported here
    (its kernels were chosen when it started). Returns the environment it set."""
    check_portable_cpu()
    env = portable_env(frameworks)
    loaded = [m for m in ("torch", "tensorflow") if m in sys.modules]
    late = [m for m in loaded if any(os.environ.get(k) != v for k, v in env.items())]
    if late:
        raise DeterminismError(f"portable mode must be chosen before {late[0]} is imported "
                               f"in this process (its kernels are already chosen)")
    os.environ.update(env)
    return env


def configure(framework, threads: int) -> None:
    """Configure this process's runtime of `framework` for a run: threads, and portable
    mode's switches when it is on. Every worker calls this before it builds anything."""
    from faultlab.backends import load_backend
    backend = load_backend(framework)
    backend.configure(threads)
    if portable_active():
        backend.portable_apply()
