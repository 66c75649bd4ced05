"""The gRPC half of a SIGTERM drain: calls that arrive once it began are held, then refused UNAVAILABLE."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

logger = logging.getLogger(__name__)

# What a call that arrived during the drain is told (grpc retry policies retry UNAVAILABLE).
REFUSED = "server is shutting down (draining): this call was not run; retry on another replica"
QUIET = 0.2  # seconds without a new call after which every client's next call is held
MOST = 2.0  # seconds the drain waits for that at most, before grpc stops taking calls


class Drain:
    """grpc core cancels (CANCELLED, which no retry policy retries) every call it has received but
    grpc.aio has not yet taken when the server stops (``Server::KillPendingWorkLocked``), and
    under load that is most of the calls in flight: 14 of 16 per SIGTERM with 16 closed-loop
    clients. So the drain first holds each call that arrives (grpc.aio has taken it, and its
    client sends nothing more on that call's behalf) until no new one has come for QUIET seconds
    (at most MOST), then stops the server, whose GOAWAY moves the clients on, and only then
    refuses the held calls UNAVAILABLE. Calls that were running finish within the grace period.
    Health checks are never held (they answer NOT_SERVING)."""

    def __init__(self) -> None:
        self.started = False
        self.refused = 0
        self._last_arrival = 0.0
        self._released: asyncio.Event | None = None

    async def hold(self) -> None:
        """A call that arrived during the drain: returns once the server has stopped taking calls."""
        if self._released is None:
            self._released = asyncio.Event()
        self.refused += 1
        self._last_arrival = time.monotonic()
        await self._released.wait()

    async def run(self, stop: Callable[[], Awaitable[None]], gather: bool = True) -> None:
        """Begins the drain, lets the held calls gather (unless not ``gather``: a stop without
        grace cuts every call anyway), starts ``stop`` (grpc.aio's server.stop with the grace
        period), releases the held calls once grpc has stopped taking calls, and returns when
        ``stop`` does."""
        if self._released is None:
            self._released = asyncio.Event()
        self.started = True
        began = self._last_arrival = time.monotonic()
        while gather:
            now = time.monotonic()
            if now - self._last_arrival >= QUIET or now - began >= MOST:
                break
            await asyncio.sleep(min(QUIET, QUIET - (now - self._last_arrival)))
        stopping = asyncio.ensure_future(stop())
        # grpc.aio's stop calls grpc_server_shutdown_and_notify before its first suspension:
        # from then on grpc takes no call, and the GOAWAY is on its way.
        await asyncio.sleep(0)
        await asyncio.sleep(0.01)
        self._released.set()
        await stopping
        if self.refused:
            logger.info("drain: %d calls that arrived after the signal answered UNAVAILABLE", self.refused)
