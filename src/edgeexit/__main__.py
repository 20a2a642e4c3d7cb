"""`python -m edgeexit ...` (and `torchrun -m edgeexit ...`): the same as the `edgeexit` command."""

from __future__ import annotations

from edgeexit.cli import entry

if __name__ == "__main__":
    entry()
