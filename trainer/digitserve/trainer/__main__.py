"""Runs the ``mnist-train`` command line: ``python -m digitserve.trainer``."""

from __future__ import annotations

import sys

from digitserve.trainer.cli import main

if __name__ == "__main__":
    sys.exit(main())
