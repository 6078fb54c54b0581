"""`python -m faultlab`: the same as the `faultlab` command."""

import sys

from .cli import main

sys.exit(main())
