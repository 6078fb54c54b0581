"""Shared fixtures and the `framework` marker. Nothing here is autouse: tests opt in by naming
a fixture; a test marked ``@pytest.mark.framework("torch")`` is skipped, with a pip hint,
where that framework is not installed (framework-free folders stay runnable without any)."""

import pytest

from faultlab import backends


def pytest_runtest_setup(item):
    for marker in item.iter_markers("framework"):
        for name in marker.args:
            if not backends.installed(name):
                e = backends.entry(name)
                pytest.skip(f"needs {e.package}: pip install '{e.extra}'")


@pytest.fixture(scope="session")
def faultlab_cache(tmp_path_factory):
    """A FAULTLAB_CACHE directory shared by the whole test session, so that a golden run (keyed
    by its workload configuration) is recorded once and reused by every test that needs it.
    Tests pass it to the processes they start; the test process's own environment is left
    alone."""
    return tmp_path_factory.mktemp("faultlab-cache")
