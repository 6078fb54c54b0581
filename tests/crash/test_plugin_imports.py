"""Loading the pytest plugin (every pytest session with faultlab installed does) is cheap: it
imports neither a framework nor the crash harness; the fixture imports them when first used."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _modules_after(code: str) -> dict:
    probe = textwrap.dedent(code) + textwrap.dedent("""
        import json, sys
        print(json.dumps({m: m in sys.modules for m in
                          ("torch", "tensorflow", "keras", "numpy", "faultlab.crash",
                           "faultlab.checkpointing", "faultlab.backends.torch.adapter")}))
    """)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_loading_the_plugin_imports_no_framework_and_not_the_harness():
    loaded = _modules_after("import faultlab.testing.plugin")
    assert not loaded["torch"] and not loaded["tensorflow"] and not loaded["keras"]
    assert not loaded["faultlab.crash"] and not loaded["faultlab.checkpointing"]


def test_the_testing_package_re_exports_lazily():
    loaded = _modules_after("import faultlab.testing")
    assert not any(loaded.values()), loaded
    loaded = _modules_after("from faultlab.testing import KillPoint, Verdict, CrashVerdict\n"
                            "assert Verdict is CrashVerdict")
    assert loaded["faultlab.crash"] and not loaded["torch"] and not loaded["tensorflow"]


@pytest.mark.framework("torch")
def test_every_public_name_of_faultlab_testing_resolves():
    import faultlab.testing as ft
    for name in ft.__all__:
        assert getattr(ft, name) is not None, name
    assert ft.Verdict is ft.CrashVerdict
