"""Shared fixtures and the `framework` marker. Nothing here is autouse: tests opt in by naming
a fixture; a test marked ``@pytest.mark.framework("torch")`` is skipped, with a pip hint,
where that framework is not installed (framework-free folders stay runnable without any)."""

import pytest

from faultlab import backends


def pytest_runtest_setup(item):
    _distinct_collective_keys()
    for marker in item.iter_markers("framework"):
        for name in marker.args:
            if not backends.installed(name):
                e = backends.entry(name)
                pytest.skip(f"needs {e.package}: pip install '{e.extra}'")


def _distinct_collective_keys() -> None:
    """Give the MirroredStrategies each test builds collective keys of their own.

    Every tf.distribute.MirroredStrategy over the same devices starts its collective group and
    instance keys at the same numbers, so two tests' strategies in one pytest worker share
    (group, instance 100) for their first all-reduce, and TF's collective resolver then
    compared one test's gradient pack with another's ("Shape mismatch in the collective
    instance 100 ... expected shape [155] but another member ... [195]"), failing whichever test
    came second, depending on how xdist spread the tests. TensorFlow offers
    `_collective_key_base` for exactly this ("Only set this in tests"). TensorFlow is not
    imported here: only a worker that already uses it is touched."""
    import sys
    tf = sys.modules.get("tensorflow")
    if tf is not None and hasattr(tf, "distribute"):
        tf.distribute.MirroredStrategy._collective_key_base += 10_000


@pytest.fixture(scope="session")
def faultlab_cache(tmp_path_factory):
    """A FAULTLAB_CACHE directory shared by the whole test session, so that a golden run (keyed
    by its workload configuration) is recorded once and reused by every test that needs it.
    Tests pass it to the processes they start; the test process's own environment is left
    alone."""
    return tmp_path_factory.mktemp("faultlab-cache")
