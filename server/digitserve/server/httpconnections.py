"""The HTTP edge's connections: who may open one (--http-max-connections in all,
--http-max-connections-per-peer from one address), which idle ones are closed to make room, and
how a refused one is told (503, then a half-close, so that the answer arrives, not a reset)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, cast

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

logger = logging.getLogger(__name__)

# Above this share of --http-max-connections, each new connection closes the oldest idle one.
HIGH_WATER = 0.75
# Only a connection idle this long is closed to make room: a new one has time to send its request.
MIN_IDLE = 0.25
# A refused connection is read (and what it sends dropped) this long after its 503, so that the
# kernel does not answer its request with a reset before the client has read the 503.
REFUSAL_LINGER = 1.0
# Refused connections lingering at once; past that, one more is closed right after its 503.
MAX_LINGERING = 512


def peer_of(transport: asyncio.BaseTransport) -> tuple[str, str]:
    """(host, ``ipv4:127.0.0.1:5555``): the address connections are counted by, and the peer as
    grpc writes it, so access lines read alike."""
    address = transport.get_extra_info("peername")
    if not address:
        return "unknown", "unknown"
    host, port = str(address[0]), address[1]
    return host, f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


class Connection(RequestHandler):
    """One HTTP connection: aiohttp's protocol, plus what the edge needs to know of it: its peer,
    whether a request is being answered (``busy``) or arriving, and since when it is idle."""

    def __init__(self, manager: web.Server, table: ConnectionTable, read_timeout: float,
                 on_slow: Callable[[Connection], None], **kwargs: Any) -> None:
        self.event_loop = asyncio.get_running_loop()
        super().__init__(manager, loop=self.event_loop, **kwargs)
        self.table = table
        self.read_timeout = read_timeout
        self.on_slow = on_slow
        self.busy = False
        self.host = self.peer = "unknown"
        self.idle_since = time.monotonic()
        self.header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.host, self.peer = peer_of(transport)
        self.table.add(self)
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_timer()
        self.table.discard(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if data and not self.busy and self.header_timer is None:
            self.header_timer = self.event_loop.call_later(self.read_timeout, self._too_slow)
        super().data_received(data)

    @property
    def idle(self) -> bool:
        """No request being answered, none arriving, none waiting: closing it loses nothing."""
        return not self.busy and self.header_timer is None and not self._messages

    def _stop_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _too_slow(self) -> None:
        self.header_timer = None
        if not self.busy:
            self.on_slow(self)
            self.force_close()

    def begin(self) -> None:
        """A request's headers are in: it is being answered."""
        self.busy = True
        self._stop_timer()

    def end(self) -> None:
        self.busy = False
        self.idle_since = time.monotonic()


def refusal(message: str) -> bytes:
    """A whole 503 answer with ``{"error": message}``, ``Connection: close`` and ``Retry-After``."""
    body = orjson.dumps({"error": message}) + b"\n"
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nRetry-After: 1\r\nContent-Length: " + str(len(body)).encode()
            + b"\r\n\r\n" + body)


class ConnectionTable:
    """The open connections, by peer address. ``admit`` decides for a new one: served, after
    closing an idle one to make room (the peer's own oldest idle one when the peer is at its
    limit; the oldest idle one of any peer above HIGH_WATER of the limit), or refused ("peer" or
    "limit", the reason counted)."""

    def __init__(self, max_connections: int, max_per_peer: int,
                 on_refused: Callable[[str], None], on_reclaimed: Callable[[], None]) -> None:
        self.max_connections = max_connections
        self.max_per_peer = max_per_peer or max_connections
        self.high_water = max(1, int(max_connections * HIGH_WATER))
        self.on_refused = on_refused
        self.on_reclaimed = on_reclaimed
        self.opened: set[Connection] = set()
        self.per_peer: dict[str, int] = {}
        self.lingering = 0
        self._limit_refusal = refusal(
            f"too many connections: this server answers at most {max_connections} at once "
            "(--http-max-connections); retry later")

    def add(self, connection: Connection) -> None:
        self.opened.add(connection)
        self.per_peer[connection.host] = self.per_peer.get(connection.host, 0) + 1

    def discard(self, connection: Connection) -> None:
        if connection in self.opened:
            self.opened.discard(connection)
            left = self.per_peer[connection.host] - 1
            if left:
                self.per_peer[connection.host] = left
            else:
                del self.per_peer[connection.host]

    def admit(self, host: str) -> bytes | None:
        """None when a connection from ``host`` may be served now (an idle one closed for it if
        need be); else the 503 answer to send it."""
        if self.per_peer.get(host, 0) >= self.max_per_peer and not self._reclaim(host):
            self.on_refused("peer")
            logger.debug("HTTP connection from %s refused: %d open from it "
                         "(--http-max-connections-per-peer)", host, self.per_peer[host])
            return refusal(f"too many connections from {host}: this server answers at most "
                           f"{self.max_per_peer} at once from one address "
                           "(--http-max-connections-per-peer); retry later")
        if len(self.opened) >= self.high_water and not self._reclaim(None) \
                and len(self.opened) >= self.max_connections:
            self.on_refused("limit")
            logger.debug("HTTP connection refused: %d open (--http-max-connections)", len(self.opened))
            return self._limit_refusal
        return None

    def _reclaim(self, host: str | None) -> bool:
        """Closes the connection idle the longest (at least MIN_IDLE; of ``host``, or of anyone);
        whether there was one."""
        since = time.monotonic() - MIN_IDLE
        idle = [c for c in self.opened
                if c.idle and c.idle_since <= since and (host is None or c.host == host)]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c.idle_since)
        logger.debug("HTTP connection from %s closed after %.1fs idle, to make room for a new one",
                     oldest.peer, time.monotonic() - oldest.idle_since)
        self.on_reclaimed()
        self.discard(oldest)  # counted out now: its connection_lost comes later
        oldest.force_close()
        return True

    def idle_ones(self) -> list[Connection]:
        return [c for c in self.opened if c.idle]


class Gate(asyncio.Protocol):
    """What a new connection first meets: once its peer is known, the table admits it (then
    ``make`` builds its Connection, which takes the transport over) or it is refused: answered a
    503, its write side closed, what it sends read and dropped until it closes or REFUSAL_LINGER
    passes (closing at once, its request unread, makes the kernel send a reset that can reach the
    client before it reads the 503)."""

    def __init__(self, table: ConnectionTable, make: Callable[[], Connection]) -> None:
        self.table = table
        self.make = make
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport: asyncio's, or uvloop's (which does not subclass asyncio.Transport).
        transport = cast(asyncio.Transport, transport)
        answer = self.table.admit(peer_of(transport)[0])
        if answer is None:
            protocol = self.make()
            transport.set_protocol(protocol)
            protocol.connection_made(transport)
            return
        transport.write(answer)
        if self.table.lingering >= MAX_LINGERING or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self.table.lingering += 1
        self.timer = asyncio.get_running_loop().call_later(REFUSAL_LINGER, transport.close)

    def data_received(self, data: bytes) -> None:
        pass  # the request of a refused connection, which will not be answered: dropped

    def eof_received(self) -> bool:
        return False  # the client read the answer and closed: close our side too

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
            self.table.lingering -= 1
