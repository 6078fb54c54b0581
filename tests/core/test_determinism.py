"""The determinism fingerprint (framework-free): what it records, what changes it, portable
mode's checks, and shipped golden runs refused where the fingerprints differ."""

from __future__ import annotations

import json
import sys

import pytest
from hypothesis import given, strategies as st

from faultlab import determinism as det
from faultlab.determinism import DeterminismError, Fingerprint, fingerprint


@pytest.fixture(autouse=True)
def _native(monkeypatch):
    monkeypatch.delenv(det.PORTABLE_FLAG, raising=False)
    for k in list(__import__("os").environ):
        if k.startswith(det.DISPATCH_ENV_PREFIXES) and k != "OMP_NUM_THREADS":
            monkeypatch.delenv(k)


def test_it_records_versions_instruction_set_threads_and_device():
    fp = fingerprint("torch", 2)
    d = fp.to_dict()
    assert d["faultlab"] and d["python"] and d["numpy"]
    assert d["framework"].startswith("torch ")
    assert d["threads"] == 2 and d["device"] == "cpu" and d["portable"] is False
    vendor, flags = det.cpu_info()
    assert d["isa"].startswith(vendor)
    for f in ("avx2", "avx512f"):
        assert (f in d["isa"].split()) == (f in flags)
    assert Fingerprint.from_dict(json.loads(json.dumps(d))) == fp
    assert fingerprint("torch", 2).digest() == fp.digest()       # stable


def test_threads_framework_env_overrides_and_portable_mode_change_it(monkeypatch):
    base = fingerprint("torch", 1)
    assert fingerprint("torch", 2).digest() != base.digest()
    assert fingerprint("tf", 1).digest() != base.digest()
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    capped = fingerprint("torch", 1)
    assert capped.digest() != base.digest()
    assert "env: ATEN_CPU_CAPABILITY=- vs avx2" in base.diff(capped)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY")
    monkeypatch.setenv(det.PORTABLE_FLAG, "1")
    port = fingerprint("torch", 1)
    assert port.isa == det.PORTABLE_ISA and port.portable
    assert "isa:" in base.diff(port) and base.diff(base) == ""


@given(st.dictionaries(st.sampled_from(["isa", "framework", "device", "numpy"]),
                       st.text(min_size=1, max_size=12), min_size=1))
def test_any_changed_field_changes_the_digest_and_is_named_by_diff(changes):
    import dataclasses
    base = fingerprint("torch", 1)
    other = dataclasses.replace(base, **changes)
    if other == base:
        return
    assert other.digest() != base.digest()
    named = {part.split(":")[0] for part in base.diff(other).split("; ")}
    assert named == {k for k, v in changes.items() if getattr(base, k) != v}


def test_a_malformed_fingerprint_is_one_line():
    with pytest.raises(DeterminismError, match="malformed determinism fingerprint"):
        Fingerprint.from_dict({"isa": "x"})


def test_portable_mode_needs_avx2_and_fma(monkeypatch):
    det.cpu_info.cache_clear()
    monkeypatch.setattr(det, "cpu_info", lambda: ("GenuineIntel", frozenset({"sse4_2", "avx"})))
    with pytest.raises(DeterminismError, match=r"--portable needs an x86-64 CPU with AVX2 and "
                                               r"FMA; .* lacks AVX2, FMA"):
        det.check_portable_cpu()


@pytest.mark.framework("torch")
def test_portable_mode_is_refused_once_a_pinned_framework_is_imported():
    import subprocess
    if "avx2" not in det.cpu_info()[1]:
        pytest.skip("this CPU has no AVX2")
    code = ("import torch\n"
            "from faultlab.determinism import enter_portable, DeterminismError\n"
            "try:\n    enter_portable(['torch'])\nexcept DeterminismError as e:\n"
            "    print(e)\n    raise SystemExit(2)\n")
    env = {k: v for k, v in __import__("os").environ.items()
           if not k.startswith(det.DISPATCH_ENV_PREFIXES) or k == "OMP_NUM_THREADS"}
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert got.returncode == 2, got.stderr
    assert got.stdout.strip() == ("portable mode must be chosen before torch is imported in "
                                  "this process (its kernels are already chosen)")


def _fresh(code: str) -> str:
    """Run `code` in a fresh interpreter (no framework imported yet), without dispatch
    overrides in its environment; its stdout."""
    import os
    import subprocess
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(det.DISPATCH_ENV_PREFIXES) and k != det.PORTABLE_FLAG}
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert got.returncode == 0, got.stderr
    return got.stdout.strip()


def test_enter_portable_sets_the_environment_workers_inherit():
    if not {"avx2", "fma"} <= det.cpu_info()[1]:
        pytest.skip("this CPU has no AVX2 and FMA")
    out = _fresh(
        "import os, subprocess, sys\n"
        "from faultlab import determinism as det\n"
        "env = det.enter_portable(['torch'])\n"
        "assert det.portable_active() and det.fingerprint('torch', 1).isa == det.PORTABLE_ISA\n"
        "child = subprocess.run([sys.executable, '-c', 'import os; print(os.environ.get(\"%s\"))'"
        " % det.PORTABLE_FLAG], capture_output=True, text=True).stdout.strip()\n"
        "assert child == '1', child                  # a worker started now inherits it\n"
        "assert all(os.environ[k] == v for k, v in env.items())\n"
        "assert det.choose('native') is False and not det.portable_active()\n"
        "print('ok')\n")
    assert out == "ok"


def test_auto_mode_is_portable_where_the_cpu_allows_and_native_is_left_alone():
    out = _fresh(
        "from faultlab import determinism as det\n"
        "from faultlab.determinism import DeterminismError\n"
        "assert det.choose('native') is False and not det.portable_active()\n"
        "assert det.choose('auto') is det.portable_supported() is det.portable_active()\n"
        "try:\n    det.choose('fast')\nexcept DeterminismError as e:\n    print(e)\n")
    assert out == "unknown kernel mode 'fast' (portable, native or auto)"


def test_auto_mode_stays_native_where_the_cpu_cannot_be_portable():
    out = _fresh(
        "from faultlab import determinism as det\n"
        "det.cpu_info = lambda: ('GenuineIntel', frozenset({'sse4_2', 'avx'}))\n"
        "print(det.choose('auto'), det.portable_active())\n")
    assert out == "False False"


# shipped golden runs ----------------------------------------------------------------------

def _files(config, fp: Fingerprint) -> dict[str, bytes]:
    from faultlab.runner import golden
    meta = {"format": golden.FORMAT, "faultlab": fp.faultlab, "config": config.to_dict(),
            "loss": [], "acc": [], "evals": {}, "checkpoints": [], "wall_s": 0.0,
            "signals": [], "fingerprint": fp.to_dict()}
    return {"golden.json": json.dumps(meta).encode(), golden.CHECKPOINT_FILE: b""}


def test_a_golden_run_from_a_machine_with_another_fingerprint_is_refused(tmp_path, monkeypatch):
    import dataclasses

    from faultlab.runner import golden
    from faultlab.workloads.base import default_config
    monkeypatch.setenv("FAULTLAB_CACHE", str(tmp_path))
    cfg = default_config("mlp")
    ours = fingerprint(cfg.framework, 1)
    theirs = dataclasses.replace(ours, isa="GenuineIntel avx avx2 fma")   # another machine
    with pytest.raises(DeterminismError) as e:
        golden.install(cfg, 1, _files(cfg, theirs))
    msg = str(e.value)
    assert "\n" not in msg and "isa: GenuineIntel avx avx2 fma vs" in msg and "--portable" in msg
    assert not (tmp_path / "golden").exists() or not any((tmp_path / "golden").iterdir())
    run = golden.install(cfg, 1, _files(cfg, ours))                 # the same: installed
    assert run.fingerprint == ours and run.directory == golden.golden_dir(cfg, 1)
    assert golden.install(cfg, 1, _files(cfg, ours)).directory == run.directory  # idempotent
    with pytest.raises(DeterminismError, match="exactly the files"):
        golden.install(cfg, 1, {"golden.json": b"{}"})
    with pytest.raises(DeterminismError, match="another configuration"):
        golden.install(default_config("mlp", epochs=7), 1, _files(cfg, ours))
