"""``python -m pyroflows``: the command line, also under ``torchrun -m pyroflows vae ...``."""

from __future__ import annotations

import sys

from pyroflows.cli import main

if __name__ == "__main__":
    sys.exit(main())
