"""The conformance suite: one run per registered framework, as Keras runs one suite per backend.

Every test here takes the ``backend`` fixture, parametrised over ``faultlab.backends.names()``:
the same test checks the same contract of each framework (kernels equal the NumPy reference,
a fault site hits one replica only, a fault-free trial reproduces the golden run, the
checkpoint adapter round-trips through the engine). A framework that is not installed is
skipped, with the pip command that installs it as the reason (shown by ``-ra``).

What differs between frameworks (how to run a kernel on a NumPy array, how to build an
instrumented two-replica network, a small training session for the adapter) lives in one
small module per framework beside this file, ``_<name>_backend.py``, with the same names in
each; the ``backend`` fixture is that module. Adding a framework to the registry makes this
suite ask for its module. The modules are loaded by path, so the suite works under every
pytest import mode (``prepend`` and ``importlib``) without ``sys.path`` changes.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from faultlab import backends

HERE = Path(__file__).resolve().parent


def load_helper(path: Path, name: str):
    """Import the test helper module at `path` as `name` (once per session)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module        # dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


@pytest.fixture(scope="session")
def bitcases():
    """tests/helpers/_bitcases.py: the framework-free kernel inputs (dtypes, special values, tensors,
    hypothesis settings)."""
    return load_helper(HERE.parent / "helpers" / "_bitcases.py", "faultlab_tests_bitcases")


@pytest.fixture(scope="session", params=backends.names())
def backend(request):
    """The conformance adapter of one framework (its ``_<name>_backend.py`` module), whose
    ``BACKEND`` is the registry's backend; skipped when the framework is not installed."""
    name = request.param
    if not backends.installed(name):
        e = backends.entry(name)
        pytest.skip(f"{e.package} not installed: pip install '{e.extra}'")
    path = HERE / f"_{name}_backend.py"
    if not path.exists():
        pytest.fail(f"framework {name!r} is registered but has no conformance adapter: "
                    f"write {path.relative_to(HERE.parent.parent)} (see _torch_backend.py)")
    module = load_helper(path, f"faultlab_tests_{name}_backend")
    assert module.BACKEND is backends.load_backend(name)
    return module
