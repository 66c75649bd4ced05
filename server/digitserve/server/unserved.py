"""The repository's directories the server does not serve, said in the log: once when first seen,
then every minute while they stay, so that a name the server cannot serve or a model without a
version is never silent (issue 24)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

REPORT_INTERVAL = 60.0  # seconds between two lines about the same directory


def no_version(root: Path, name: str) -> str:
    """Why the model directory ``name`` is not served: it holds no version yet."""
    return (f"no version directory (1, 2, …) in it yet; publish one (mnist-train train --model-repo "
            f"{root} --model-name {name})")


def bad_name(problem: str) -> str:
    """Why a directory whose name is no model's is not served (``problem``: model_name_error's)."""
    return f"{problem}; rename it to serve it"


class UnservedReport:
    """Logs ``not serving ROOT/NAME: WHY`` for each directory a look did not serve: at once, again
    when the reason changes, and every ``interval`` seconds while it stays; forgets those gone."""

    def __init__(self, root: Path, interval: float = REPORT_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.root = root
        self.interval = interval
        self.clock = clock
        self.said: dict[str, tuple[str, float]] = {}  # name: (why, when it was last said)

    def look(self, unserved: dict[str, str]) -> None:
        """One look's directories not served, each with why."""
        now = self.clock()
        for name in sorted(unserved):
            why = unserved[name]
            said = self.said.get(name)
            if said is None or said[0] != why or now - said[1] >= self.interval:
                logger.warning("not serving %s: %s", self.root / name, why)
                self.said[name] = (why, now)
        for name in set(self.said) - set(unserved):
            del self.said[name]
