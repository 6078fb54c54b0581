"""faultlab's import rule: only the backend folders (faultlab/backends/<framework>/) import a
framework. Everything else imports with torch, TensorFlow and Keras absent, and importing a
backend package is free: its modules import the framework when they are first used.

Three checks: every module outside the backend folders imports in a process where the
frameworks are blocked (``sys.modules[name] = None``, the trick tests/core/test_results.py uses for
pandas); no file outside them has an import statement of a framework at any level (an
``ast`` walk, so function-local imports count too) or names TensorFlow's runtime module;
importing a backend package leaves its framework unimported."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import faultlab
from faultlab import backends

PACKAGE = Path(faultlab.__file__).resolve().parent
ROOT = PACKAGE.parent
FRAMEWORKS = ("torch", "tensorflow", "keras")
#: the backend folders, the only place a framework may be imported
BACKEND_DIRS = [PACKAGE / "backends" / e.module.rsplit(".", 1)[-1] for e in backends.REGISTRY]
#: TensorFlow's runtime module (it configures TF as it imports it), under its old and new names
TF_RUNTIME = ("tfruntime", "backends.tf.runtime", "backends.tf import runtime")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def framework_free_files() -> list[Path]:
    """Every .py file under faultlab/ outside the backend folders."""
    return sorted(p for p in PACKAGE.rglob("*.py")
                  if not any(d in p.parents for d in BACKEND_DIRS))


def framework_free_modules() -> list[str]:
    return [_module_name(p) for p in framework_free_files() if p.stem != "__main__"]


def _run(code: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


_IMPORT_BLOCKED = """
import sys
for name in {frameworks!r}:
    sys.modules[name] = None          # `import name` raises ImportError from now on
import importlib, json, traceback
failed = {{}}
for name in {modules!r}:
    try:
        importlib.import_module(name)
    except BaseException as e:
        failed[name] = traceback.format_exception_only(type(e), e)[-1].strip()
print(json.dumps(failed))
"""


def test_every_module_outside_the_backends_imports_without_any_framework():
    modules = framework_free_modules()
    assert "faultlab.cli" in modules and "faultlab.backends" in modules
    # the backend packages themselves are cheap to import, so they belong here too
    modules += [e.module for e in backends.REGISTRY]
    failed = _run(_IMPORT_BLOCKED.format(frameworks=FRAMEWORKS, modules=modules))
    assert failed == {}, "\n".join(f"{m}: {e}" for m, e in sorted(failed.items()))


def _framework_imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, statement) of every import of a framework, at any depth, plus
    importlib.import_module / __import__ calls with a framework's name as a literal."""
    def is_framework(mod: str | None) -> bool:
        return bool(mod) and mod.split(".")[0] in FRAMEWORKS

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if is_framework(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and is_framework(node.module):
            found.append((node.lineno, f"from {node.module} import ..."))
        elif isinstance(node, ast.Call) and node.args:
            fn = node.func
            called = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
            arg = node.args[0]
            if (called in ("import_module", "__import__") and isinstance(arg, ast.Constant)
                    and isinstance(arg.value, str) and is_framework(arg.value)):
                found.append((node.lineno, f"{called}({arg.value!r})"))
    return found


def test_no_file_outside_the_backends_imports_a_framework_or_the_tf_runtime():
    files = framework_free_files()
    assert files
    bad = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(ROOT)
        bad += [f"{rel}:{line}: {stmt}" for line, stmt in _framework_imports(ast.parse(text))]
        bad += [f"{rel}:{n}: mentions {name}" for n, line in enumerate(text.splitlines(), 1)
                for name in TF_RUNTIME if name in line]
    assert bad == [], "\n".join(bad)


def test_the_static_check_finds_local_and_dynamic_imports():
    code = ("import os\nfrom faultlab import torch\ndef f():\n    import torch.nn as nn\n"
            "def g():\n    from tensorflow.python import x\n    import keras\n"
            "importlib.import_module('torch.distributed')\n")
    assert [line for line, _ in _framework_imports(ast.parse(code))] == [4, 6, 7, 8]


_IMPORT_BACKEND = """
import importlib, json, sys
mod = importlib.import_module({module!r})
mod.BACKEND.name, dict(mod.BACKEND.checkpointers), dict(mod.BACKEND.crash_loops)
print(json.dumps(sorted(n for n in {frameworks!r} if n in sys.modules)))
"""


@pytest.mark.parametrize("entry", backends.REGISTRY, ids=lambda e: e.name)
def test_importing_a_backend_package_does_not_import_its_framework(entry):
    loaded = _run(_IMPORT_BACKEND.format(module=entry.module, frameworks=FRAMEWORKS))
    assert loaded == [], f"importing {entry.module} imported {loaded}"
