"""``python -m digitserve.server``."""

import sys

from digitserve.server.cli import main

sys.exit(main())
