"""Shared fixtures. Nothing here is autouse: tests opt in by naming a fixture."""

import pytest


@pytest.fixture(scope="session")
def faultlab_cache(tmp_path_factory):
    """A FAULTLAB_CACHE directory shared by the whole test session, so that a golden run (keyed
    by its workload configuration) is recorded once and reused by every test that needs it.
    Tests pass it to the processes they start; the test process's own environment is left
    alone."""
    return tmp_path_factory.mktemp("faultlab-cache")
