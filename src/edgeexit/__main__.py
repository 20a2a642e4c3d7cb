"""`python -m edgeexit ...` (and `torchrun -m edgeexit ...`): the same as the `edgeexit` command."""

from __future__ import annotations

import sys

from edgeexit.cli import main

if __name__ == "__main__":
    sys.exit(main())
