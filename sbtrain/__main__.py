"""`python -m sbtrain ...` is the same as the `sbtrain` command (and what torchrun runs)."""

import sys

from cli.main import main

sys.exit(main())
