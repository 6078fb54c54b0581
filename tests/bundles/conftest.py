"""Fixtures of the bundle tests (helpers: tests/helpers/_bundlehelpers.py)."""

import pytest

from _bundlehelpers import BundleServer


@pytest.fixture
def server():
    s = BundleServer()
    yield s
    s.close()
