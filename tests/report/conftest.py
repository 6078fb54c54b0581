"""tests/report: the helpers beside these tests (_synthetic, _browser) importable by name
(pytest runs with --import-mode=importlib, which puts no test folder on sys.path)."""

import sys
from pathlib import Path

_here = str(Path(__file__).resolve().parent)
if _here not in sys.path:
    sys.path.insert(0, _here)
