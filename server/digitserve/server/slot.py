"""A worker's slot in the ``--workers`` pool: the one thing the arbiter (digitserve.server.workers) and a
worker's server (digitserve.server.app) share, so neither module imports the other."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

# A worker's slot in the shared array: written by the worker, cleared by the parent when it dies.
STARTING, SERVING = 0, 1


@dataclass
class WorkerSlot:
    """What a worker process knows of the pool: its index, the shared state of every worker and
    the pid of the parent that started it."""

    index: int
    states: Any  # multiprocessing RawArray of STARTING/SERVING, one per worker
    parent_pid: int

    def set_serving(self, serving: bool) -> None:
        self.states[self.index] = SERVING if serving else STARTING

    def serving(self) -> int:
        return sum(1 for state in self.states if state == SERVING)

    @property
    def total(self) -> int:
        return len(self.states)

    def orphaned(self) -> bool:
        return os.getppid() != self.parent_pid
