"""The HTTP listener of ``--http-port``: an aiohttp ``web.Application`` on the event loop grpc.aio
runs on. Its router holds server.rest's routes; aiohttp inflates gzip and deflate bodies (no
further than --max-message-bytes), answers ``Expect: 100-continue`` and bounds a header line and
the number of headers. One middleware gives each request what server.calls gives a gRPC call (a
request id, the bearer-token check with health and /metrics open, metrics, an access line), its
errors in JSON, and the limits on its header block and declared body; an abandoned body is a 499.

Hand-made where aiohttp has no equivalent: the listener (``loop.create_server``: ``TCPSite`` takes
no protocol factory) whose connections pass server.httpconnections' gate; malformed HTTP answered
in JSON without a traceback (``handle_error``, which no middleware sees); the drain, which answers
``Connection: close`` from its first moment and takes the clients already in the listen backlog
(``TCPSite.stop`` resets them).

Why aiohttp (python -m bench.http_stacks, figures in docs/interoperability.md): its server is made
to run on an event loop someone else owns and its protocol can be extended for the limits; it cost
less CPU per request than uvicorn under Starlette or FastAPI, a little more than uvicorn with a
bare ASGI callable, whose ``Server.serve()`` replaces the process's SIGTERM/SIGINT handlers."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, ContentEncodingError, LineTooLong
from aiohttp.typedefs import Handler
from prometheus_client import Counter, Gauge, Histogram

from digitserve.server import rest
from digitserve.server.errors import ServerError
from digitserve.server.httpconnections import MIN_IDLE, Connection, ConnectionTable, Gate
from digitserve.server.logs import access_log, current_request_id
from digitserve.server.security import TokenAuth
from digitserve.server.settings import Settings
from digitserve.server.status import HTTP_INTERNAL, INTERNAL_MESSAGE, http_status
from digitserve.server.telemetry import CALL_BUCKETS, REQUEST_ID_KEY, Telemetry, request_id_of

logger = logging.getLogger(__name__)

_NEVER = 365 * 86400.0  # an idle-connection limit of 0 means "never": aiohttp's timer gets a year
UNMATCHED = "(unmatched)"  # the route label of a request no route matched
MAX_HEADERS = 64  # headers in a request, at most
# Methods counted under their own name in metrics; any other is "other" (labels stay bounded).
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
# A request whose client closed the connection before its body was in: nginx's "client closed
# request", counted, never sent (the client is gone).
CLIENT_CLOSED = 499
# Once the requests in flight are answered, how long a drain waits for keep-alive connections to
# close after their Connection: close answer before it closes the idle ones (within the grace).
DRAIN_IDLE = 1.0


class HttpMetrics:
    """The HTTP edge's metrics, in the server's registry: requests by method, route (the
    pattern, not the path) and status; their latency; connections open and refused."""

    def __init__(self, telemetry: Telemetry, connections: Callable[[], float]) -> None:
        registry = telemetry.registry
        self.requests = Counter(
            "http_server_requests", "HTTP requests answered, by method, route pattern and status.",
            ("method", "route", "code"), registry=registry)
        self.seconds = Histogram(
            "http_server_request_duration_seconds",
            "Seconds from a request's headers to its answer, by method and route pattern.",
            ("method", "route"), buckets=CALL_BUCKETS, registry=registry)
        self.in_flight = Gauge("http_server_in_flight_requests", "HTTP requests being answered now.",
                               registry=registry)
        Gauge("http_server_connections", "HTTP connections open now.",
              registry=registry).set_function(connections)
        self.refused = Counter(
            "http_server_refused_connections",
            "HTTP connections closed at once, by reason: over --http-max-connections (limit), "
            "over --http-max-connections-per-peer (peer), or headers not received within "
            "--http-read-timeout (slow).", ("reason",), registry=registry)
        for reason in ("limit", "peer", "slow"):
            self.refused.labels(reason)
        self.reclaimed = Counter(
            "http_server_reclaimed_connections",
            "Idle HTTP keep-alive connections closed to make room for a new one (above three "
            "quarters of --http-max-connections, or at --http-max-connections-per-peer).",
            registry=registry)
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        children = self._children.get((method, route, status))
        if children is None:  # labels() costs a dozen calls: its children are kept (1,024 at most)
            if len(self._children) > 1024:
                self._children.clear()
            children = self._children[method, route, status] = (
                self.requests.labels(method, route, str(status)), self.seconds.labels(method, route))
        children[0].inc()
        children[1].observe(seconds)


def http_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """TLS for the HTTP port from --tls-cert/--tls-key (the gRPC port's certificate, already
    checked at start-up), client certificates required with --tls-client-ca; None without."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    if settings.tls_client_ca is not None:
        context.load_verify_locations(settings.tls_client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def json_error(status: int, message: str, close: bool = False) -> web.Response:
    """``{"error": message}`` with ``status``; ``close``: and the connection closed after it."""
    response = web.Response(body=orjson.dumps({"error": message}) + b"\n", status=status,
                            content_type=rest.JSON)
    if close:
        response.force_close()
    return response


class _EdgeConnection(Connection):
    """A connection of the edge: malformed HTTP answered in JSON (aiohttp's own answer is text,
    and it logs a traceback for each)."""

    def __init__(self, manager: web.Server, edge: HttpEdge, **kwargs: Any) -> None:
        super().__init__(manager, edge.connections, edge.read_timeout, edge.too_slow, **kwargs)
        self.edge = edge

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None, message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("the answer was sent already; cannot send an error after it")
        if isinstance(exc, ContentEncodingError):  # one aiohttp cannot inflate: zstd, say
            found = re.search(r"\((\w+)\)", str(exc))
            status, text = 415, rest.unsupported(found.group(1) if found else "?").text or ""
        elif isinstance(exc, LineTooLong) or "Too many headers" in str(message or ""):
            status, text = 431, (f"request headers: a line longer than {self.edge.max_line} bytes or "
                                 f"more than {MAX_HEADERS} headers (--max-metadata-bytes)")
        elif isinstance(exc, BadHttpMessage) or status == 400:
            kind = type(exc).__name__ if exc is not None else "bad request"
            status, text = 400, f"request: not valid HTTP/1.1 ({kind})"
        elif status == HTTP_INTERNAL:
            logger.error("unexpected error answering %s", self.peer, exc_info=exc)
            text = INTERNAL_MESSAGE
        else:
            text = f"request: {message or 'refused'}"
        logger.debug("HTTP request from %s refused with %d: %s", self.peer, status, text)
        self.edge.observe("-", "(invalid)", status, 0.0, self.peer, "")
        return json_error(status, text, close=True)


class HttpEdge:
    """The HTTP listener of one App: start() binds (SO_REUSEPORT only for --workers); drain()
    answers every request from its first moment with ``Connection: close``, waits for the
    requests in flight (within the grace period) and for the clients to see that, then closes
    every connection."""

    def __init__(self, settings: Settings, api: rest.RestApi, telemetry: Telemetry,
                 auth: TokenAuth | None) -> None:
        self.api = api
        self.auth = auth
        self.max_body = settings.max_message_bytes
        self.read_timeout = settings.http_read_timeout
        self.max_line = settings.max_metadata_bytes
        self.ssl = http_ssl_context(settings)
        self.in_flight = 0
        self.draining = False
        self.open_routes = {(r.method, r.label) for r in rest.ROUTES if r.open}
        self.connections = ConnectionTable(
            settings.http_max_connections, settings.http_max_connections_per_peer,
            lambda reason: self.metrics.refused.labels(reason).inc(),
            lambda: self.metrics.reclaimed.inc())
        self.metrics = HttpMetrics(telemetry, lambda: float(len(self.connections.opened)))
        app = web.Application(middlewares=[self._edge], client_max_size=self.max_body)
        app[rest.READ_TIMEOUT] = self.read_timeout
        rest.add_routes(app, api, self._expect)
        self._runner = web.AppRunner(app)
        self._protocol: dict[str, Any] = {
            "keepalive_timeout": settings.max_connection_idle or _NEVER, "access_log": None,
            "max_line_size": self.max_line, "max_field_size": self.max_line,
            "max_headers": MAX_HEADERS, "lingering_time": 1.0}
        self._listener: asyncio.Server | None = None  # at run time uvloop's Server on uvloop
        self._late: set[asyncio.Task[Any]] = set()  # connections taken from the backlog at the end

    @property
    def opened(self) -> set[Connection]:
        return self.connections.opened

    def too_slow(self, connection: Connection) -> None:
        logger.debug("HTTP connection from %s closed: no complete request headers within %gs "
                     "(--http-read-timeout)", connection.peer, self.read_timeout)
        self.metrics.refused.labels("slow").inc()

    def _gate(self) -> Gate:
        """A new connection's protocol: the gate, then an _EdgeConnection of the app's server."""
        server = self._runner.server
        assert server is not None
        return Gate(self.connections, lambda: _EdgeConnection(server, self, **self._protocol))

    async def start(self, host: str, port: int, reuse_port: bool = False) -> int:
        """Listens on host:port (0: a free port); returns the port. OSError if it cannot."""
        await self._runner.setup()
        self._listener = await asyncio.get_running_loop().create_server(
            self._gate, host.strip("[]") or None, port, reuse_port=reuse_port or None, ssl=self.ssl,
            ssl_handshake_timeout=self.read_timeout if self.ssl else None, backlog=1024)
        sockets = self._listener.sockets
        return int(sockets[0].getsockname()[1]) if sockets else port

    async def drain(self, grace: float) -> None:
        """From now on every answer says ``Connection: close`` (a client sends its next request
        elsewhere; readiness answers 503: RestApi's ``draining``). Within ``grace`` seconds: waits
        for the requests being answered, then DRAIN_IDLE for the clients to see their answers
        and leave, stops listening (a client that comes back is refused at connect, before it
        sends anything; one already in the backlog is taken and answered), waits for the
        connections accepted to be answered or idle for MIN_IDLE (a request on its way is not
        cut), and closes the rest."""
        self.draining = True
        loop = asyncio.get_running_loop()
        until = loop.time() + grace

        async def wait(done: Callable[[], bool], most: float = _NEVER) -> None:
            end = min(until, loop.time() + most)
            while not done() and loop.time() < end:
                await asyncio.sleep(0.01)

        await wait(lambda: not self.in_flight)
        await wait(lambda: not self.connections.opened, DRAIN_IDLE)
        self._stop_listening()
        if self._late:  # each connection taken from the backlog is in the table once it is done
            await asyncio.wait(self._late, timeout=max(0.001, until - loop.time()))
        # asyncio may have accepted sockets whose connections are not made yet: they get as long
        # as an idle connection has before it may be closed.
        await asyncio.sleep(max(0.0, min(MIN_IDLE, until - loop.time())))
        await wait(lambda: not self.in_flight and all(
            c.idle and time.monotonic() - c.idle_since >= MIN_IDLE for c in self.connections.opened))
        for connection in self.connections.idle_ones():
            connection.force_close()
        if self._runner.server is not None:
            await self._runner.server.shutdown(max(0.0, until - loop.time()))
            await self._runner.cleanup()
        self._listener = None

    def _stop_listening(self) -> None:
        """Closes the listener without resetting the connections the kernel already accepted for
        it (clients that sent a request into the backlog): those are taken first, from a copy of
        the socket that keeps it listening until the last one is out, and served as any other
        (a 503 and Connection: close, while draining)."""
        if self._listener is None:  # asyncio's Server, or uvloop's (not a subclass of it)
            return
        copies = [socket.socket(fileno=os.dup(s.fileno())) for s in self._listener.sockets]
        self._listener.close()
        loop = asyncio.get_running_loop()
        for copy in copies:
            with copy:
                copy.setblocking(False)
                while True:
                    try:
                        accepted, _ = copy.accept()
                    except OSError:  # BlockingIOError: none left
                        break
                    task = loop.create_task(loop.connect_accepted_socket(
                        self._gate, accepted, ssl=self.ssl,
                        ssl_handshake_timeout=self.read_timeout if self.ssl else None))
                    self._late.add(task)
                    task.add_done_callback(self._late.discard)
        logger.debug("HTTP: stopped listening; %d connections taken from the backlog, %d open",
                     len(self._late), len(self.connections.opened))

    # --- one request ------------------------------------------------------------------------------

    def observe(self, method: str, route: str, status: int, seconds: float, peer: str,
                request_id: str, target: str = "") -> None:
        self.metrics.observe(method, route, status, seconds)
        if access_log.enabled():
            access_log.write(f"{method} {target or route}", str(status), round(seconds * 1000, 3),
                             peer, request_id)

    def _refusal(self, request: web.Request, label: str) -> web.HTTPException | None:
        """Why a request for a route is refused before its body is read: headers over their
        limit, a body declared over its limit, no valid token (but for the open routes)."""
        length = request.content_length
        if length is not None and length > self.max_body:
            return rest.too_large(f"{length:,}", self.max_body)
        header_bytes = sum(len(k) + len(v) for k, v in request.raw_headers)
        if header_bytes > self.max_line:
            return web.HTTPRequestHeaderFieldsTooLarge(text=(
                f"request headers: {header_bytes:,} bytes exceed the limit of {self.max_line:,} "
                "(--max-metadata-bytes)"))
        method = "GET" if request.method == "HEAD" else request.method
        if self.auth is not None and (method, label) not in self.open_routes:
            problem = self.auth.check((("authorization", request.headers["Authorization"]),)
                                      if "Authorization" in request.headers else ())
            if problem is not None:
                return web.HTTPUnauthorized(text=problem)
        return None

    async def _expect(self, request: web.Request) -> None:
        """``Expect: 100-continue`` answered (as aiohttp does) only for a body that will be read:
        a POST's, not refused first; any other ``Expect`` is ignored."""
        resource = request.match_info.route.resource
        if request.method == "POST" and resource is not None and request.version >= (1, 1) \
                and request.headers.get("Expect", "").lower() == "100-continue" \
                and self._refusal(request, resource.canonical) is None:
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0

    async def _answer(self, request: web.Request, handler: Handler, label: str,
                      peer: str) -> web.StreamResponse:
        """The route's answer, or the error's in JSON."""
        try:
            refusal = None if label == UNMATCHED else self._refusal(request, label)
            if refusal is not None:
                raise refusal
            return await handler(request)
        except web.HTTPMethodNotAllowed as exc:  # the router's
            allowed = sorted(exc.allowed_methods - {"HEAD"})
            response = json_error(405, f"{request.method} is not allowed on {request.path[:200]}; "
                                       f"use {' or '.join(allowed)}")
            response.headers["Allow"] = ", ".join(allowed)
            return response
        except web.HTTPNotFound:  # the router's
            return json_error(404, f"no route {request.method} {request.path[:200]}; {rest.NO_ROUTE}")
        except web.HTTPUnauthorized as exc:
            logger.info("unauthenticated HTTP request %s %s from %s: %s", request.method, label,
                        peer, exc.text)
            response = json_error(401, exc.text or "")
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        except web.HTTPException as exc:  # the limits: the body is left unread, the connection closed
            return json_error(exc.status, exc.text or "", close=True)
        except ServerError as exc:
            return json_error(http_status(exc), str(exc))
        except ConnectionError:
            logger.debug("HTTP request %s %s from %s: the client closed the connection after %s "
                         "bytes of its body; nothing answered", request.method, label, peer,
                         f"{request.content.total_bytes:,}")
            return web.Response(status=CLIENT_CLOSED)  # written nowhere: the transport is gone
        except Exception:
            logger.exception("unexpected error in %s %s", request.method, label)
            return json_error(HTTP_INTERNAL, INTERNAL_MESSAGE)

    @web.middleware
    async def _edge(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """One request: its id, the answer (``Connection: close`` while draining), metrics and
        its access line."""
        started = time.perf_counter()
        connection = request.protocol
        peer = "unknown"
        if isinstance(connection, Connection):
            connection.begin()
            peer = connection.peer
        request_id = request_id_of(((REQUEST_ID_KEY, request.headers.get("X-Request-Id", "")),))
        token = current_request_id.set(request_id)
        self.in_flight += 1
        self.metrics.in_flight.inc()
        resource = request.match_info.route.resource
        label = UNMATCHED if resource is None else resource.canonical
        status = HTTP_INTERNAL
        try:
            response = await self._answer(request, handler, label, peer)
            status = response.status
            response.headers["X-Request-Id"] = request_id
            response.headers["Server"] = "digitserve"
            if self.draining or self.api.draining:  # the server's stop began
                response.force_close()
            return response
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()
            if isinstance(connection, Connection):
                connection.end()
            method = request.method if request.method in _METHODS else "other"
            self.observe(method, label, status, time.perf_counter() - started, peer, request_id,
                         request.raw_path[:200])
            try:  # noqa: SIM105  (contextlib.suppress costs more, on every request)
                current_request_id.reset(token)
            except ValueError:
                pass
