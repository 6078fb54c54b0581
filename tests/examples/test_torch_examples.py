"""The tests of the PyTorch own-loop examples (examples/word_lm.py, examples/cnn_loop.py),
collected here because pytest's testpaths is tests/: CI runs them with the suite. They live in
examples/ beside the code they check (run them there: python -m pytest -q examples/); this
file only imports them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="needs torch: pip install 'faultlab[torch]'")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from test_cnn_loop import *  # noqa: E402,F401,F403
from test_word_lm import *  # noqa: E402,F401,F403
from test_word_lm_crash import *  # noqa: E402,F401,F403
