"""`python -m faultlab`: the same as the `faultlab` command."""

import sys

from faultlab.cli import main

sys.exit(main())
