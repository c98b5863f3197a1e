"""`python -m SlicerSAM ...`: the command-line interface (see SlicerSAM/cli.py)."""

from __future__ import annotations

import sys

from SlicerSAM.cli import main

if __name__ == "__main__":
    sys.exit(main())
