"""A worker's slot in the ``--workers`` pool: what the arbiter (``workers``) and a worker's server
(``app``) share, so neither module imports the other."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from typing import Any

STARTING, SERVING = 0, 1  # written by the worker, cleared by the parent when it dies
HEARTBEAT_INTERVAL = 1.0  # seconds between a worker's heartbeats (WorkerSlot.beat)


@dataclass
class WorkerSlot:
    """What a worker knows of the pool: its index, every worker's shared state, its parent's pid."""

    index: int
    states: Any  # multiprocessing RawArray of STARTING/SERVING, one per worker
    parent_pid: int
    # multiprocessing RawArray of counters, one per worker: each worker's event loop bumps its own
    # every HEARTBEAT_INTERVAL seconds; the arbiter kills a worker whose counter stops moving.
    heartbeats: Any = None
    _beating: asyncio.Task[None] | None = field(default=None, repr=False, compare=False)

    def beat(self) -> None:
        """Tells the arbiter this worker's event loop still runs."""
        if self.heartbeats is not None:
            self.heartbeats[self.index] += 1

    def start_heartbeat(self) -> None:
        """Beats every HEARTBEAT_INTERVAL seconds on the running loop, so beats stop when it is
        blocked or stops."""
        async def beating() -> None:
            while True:
                self.beat()
                await asyncio.sleep(HEARTBEAT_INTERVAL)

        self._beating = asyncio.get_running_loop().create_task(beating(), name="heartbeat")

    def set_serving(self, serving: bool) -> None:
        self.states[self.index] = SERVING if serving else STARTING

    def serving(self) -> int:
        return sum(1 for state in self.states if state == SERVING)

    @property
    def total(self) -> int:
        return len(self.states)

    def orphaned(self) -> bool:
        return os.getppid() != self.parent_pid
