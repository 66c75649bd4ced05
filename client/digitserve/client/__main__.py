"""``python -m digitserve.client``."""

import sys

from digitserve.client.cli import main

sys.exit(main())
