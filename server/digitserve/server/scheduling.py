"""The Linux scheduling policy of a server process's threads (``--scheduler-policy``).

A call crosses three threads of one process: grpc's EventEngine threads read the socket, grpc.aio's
poller thread takes the completion and wakes the event loop with a byte on a socket, the loop runs
the call. Under SCHED_OTHER (the kernel's default) each wake-up preempts the thread running, so on
a busy core every completion is a context switch. Under SCHED_BATCH a woken thread waits for the
running one's time slice or its next wait (the loop's epoll) instead; the completions of several
calls are then taken in one go. Pinned to one core as ``bench.versus`` pins each server, SCHED_BATCH
took 10 % less CPU per 1-image V2 call (617 → 565 µs, 1.11× the calls a second) and 3 % less per
64-image call (1,183 → 1,120 µs), medians of 6 alternating rounds (``python -m bench.variants
--edge v2-grpc --shape 1x64 --variant "normal=--scheduler-policy normal" --variant
"batch=--scheduler-policy batch"``, and ``--shape 64x8``; BENCHMARKS.md). A thread woken on an idle
core runs at once under either policy: what changes is only who waits while the core is busy.

Unprivileged processes may choose SCHED_BATCH and SCHED_OTHER (sched(7)), in a container too;
where the call is missing (not Linux) or refused the threads keep their policy and the start-up
line says which they have."""

from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["POLICIES", "apply", "describe"]

logger = logging.getLogger(__name__)

# --scheduler-policy's values and the policy each names (os.SCHED_*).
POLICIES = {"batch": "SCHED_BATCH", "normal": "SCHED_OTHER"}
_TASKS = Path("/proc/self/task")


def apply(policy: str) -> None:
    """Sets the policy ``policy`` names on every thread of this process; threads started later
    inherit it from the thread that starts them. Refused or not available: one warning."""
    name = POLICIES[policy]
    value = getattr(os, name, None)
    if value is None or not hasattr(os, "sched_setscheduler"):
        logger.warning("--scheduler-policy %s: this platform has no %s; the threads keep their "
                       "policy", policy, name)
        return
    threads = [int(tid) for tid in os.listdir(_TASKS)] if _TASKS.is_dir() else [0]
    for tid in threads:
        try:
            os.sched_setscheduler(tid, value, os.sched_param(0))
        except ProcessLookupError:  # a thread that ended meanwhile
            continue
        except OSError as error:
            logger.warning("--scheduler-policy %s: the kernel refused %s (%s); the threads keep "
                           "their policy (%s)", policy, name, error.strerror or error, describe())
            return


def describe() -> str:
    """The calling thread's policy as the start-up line names it: 'SCHED_BATCH', 'SCHED_OTHER', ..."""
    if not hasattr(os, "sched_getscheduler"):
        return "default scheduling"
    current = os.sched_getscheduler(0)
    for name in ("SCHED_OTHER", "SCHED_BATCH", "SCHED_IDLE", "SCHED_FIFO", "SCHED_RR"):
        if getattr(os, name, None) == current:
            return name
    return f"scheduling policy {current}"
