"""PyTorch-only tests (what the conformance suite in tests/backends/ does not cover for every
backend). Without the torch extra, the whole directory is skipped with the reason shown."""

import pytest

pytest.importorskip("torch", reason="torch tests need the torch extra: pip install -e '.[torch]'")
