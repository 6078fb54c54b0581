"""The conformance suite: one run per registered framework, as Keras runs one suite per backend.

Every test here takes the ``backend`` fixture, parametrised over ``faultlab.backends.names()``:
the same test checks the same contract of each framework (kernels equal the NumPy reference,
a fault site hits one replica only, a fault-free trial reproduces the golden run, the
checkpoint adapter round-trips through the engine). A framework that is not installed is
skipped, with the pip command that installs it as the reason (shown by ``-ra``).

What differs between frameworks (how to run a kernel on a NumPy array, how to build an
instrumented two-replica network, a small training session for the adapter) lives in one
small module per framework in tests/helpers, ``_<name>_backend.py``, with the same names in
each; the ``backend`` fixture is that module. Adding a framework to the registry makes this
suite ask for its module.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from faultlab import backends

HELPERS = Path(__file__).resolve().parents[1] / "helpers"


@pytest.fixture(scope="session")
def bitcases():
    """tests/helpers/_bitcases.py: the framework-free kernel inputs (dtypes, special values, tensors,
    hypothesis settings)."""
    return importlib.import_module("_bitcases")


@pytest.fixture(scope="session", params=backends.names())
def backend(request):
    """The conformance adapter of one framework (its ``_<name>_backend.py`` module), whose
    ``BACKEND`` is the registry's backend; skipped when the framework is not installed."""
    name = request.param
    if not backends.installed(name):
        e = backends.entry(name)
        pytest.skip(f"{e.package} not installed: pip install '{e.extra}'")
    if not (HELPERS / f"_{name}_backend.py").exists():
        pytest.fail(f"framework {name!r} is registered but has no conformance adapter: "
                    f"write tests/helpers/_{name}_backend.py (see _torch_backend.py)")
    module = importlib.import_module(f"_{name}_backend")
    assert module.BACKEND is backends.load_backend(name)
    return module
