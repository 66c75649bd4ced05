"""The load tester's connection rebuilt on python-hyper's ``h2`` library, to measure against its
own framing (``digitserve.loadtest.http2``) under the same load:

    pip install h2
    python -m bench.call_cost client --target 127.0.0.1:50051 --data-dir data --framing h2lib
    python -m bench.h2lib      # 5 calls in flight when a gRPC server stops gracefully, each framing

``Connection`` here has the interface of ``http2.Connection`` (same pre-serialized unary calls,
same flow control, stream limit, deadlines and errors); ``h2`` does the framing, HPACK, settings
and flow-control bookkeeping, with its header validation and normalization turned off (the
cheapest configuration it has). ``install()`` makes the load tester's ``http2.Channel`` open these
connections for the rest of the process. Not part of the product: one caveat alone would keep it
out — ``h2`` closes a connection's state machine at GOAWAY, so the frames that still come for calls
in flight raise ``ProtocolError`` (python-hyper/h2 issue 1181) and the calls fail, where the load
tester's own framing lets them finish, as HTTP/2 allows and ``--max-connection-age`` relies on;
``python -m bench.h2lib`` shows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

from digitserve.loadtest import http2

MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65_535
SWEEP_SECONDS = 0.1


class _Stream:
    __slots__ = ("body", "deadline", "future", "http_status", "message", "pending", "refused")

    def __init__(self, future: asyncio.Future[bytes], message: bytes, refused: int,
                 deadline: float) -> None:
        self.future = future
        self.message = message
        self.refused = refused
        self.deadline = deadline
        self.body: list[bytes] = []
        self.http_status = 0
        self.pending: bytes | None = None


class Connection(asyncio.Protocol):
    """One HTTP/2 connection carrying unary calls to one method, framed by ``h2``."""

    def __init__(self, path: str, authority: str, timeout: float,
                 metadata: Iterable[tuple[str, str]] = ()) -> None:
        self._e = h2.events
        self._errors: tuple[type[Exception], ...] = (h2.exceptions.ProtocolError, ValueError)
        self._loop = asyncio.get_running_loop()
        config = h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=False,
            normalize_outbound_headers=False, validate_inbound_headers=False,
            normalize_inbound_headers=False)
        self._h2 = h2.connection.H2Connection(config)
        self._h2.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: MAX_WINDOW})
        fields = [(":method", "POST"), (":scheme", "http"), (":path", path),
                  (":authority", authority), ("content-type", "application/grpc"),
                  ("te", "trailers"), ("user-agent", "mnist-client-loadtest")]
        if timeout is not None:
            fields.append(("grpc-timeout", f"{max(1, min(99_999_999, round(timeout * 1000)))}m"))
        fields.extend(metadata)
        self._headers = [(k.encode(), v.encode()) for k, v in fields]
        self._timeout = timeout
        self._transport: asyncio.Transport | None = None
        self._flushing = False
        self._streams: dict[int, _Stream] = {}
        self._blocked: dict[int, _Stream] = {}
        self._queued: deque[tuple[asyncio.Future[bytes], bytes, int, float]] = deque()
        self._closed: str | None = None
        self._idle_close = False
        self._sweeper: asyncio.TimerHandle | None = None
        self.ready: asyncio.Future[None] = self._loop.create_future()

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def close_when_idle(self) -> None:
        self._idle_close = True
        if not self._streams:
            self.close()

    def _room(self) -> bool:
        limit: int = self._h2.remote_settings.max_concurrent_streams
        return len(self._streams) < limit

    def unary(self, message: bytes) -> asyncio.Future[bytes]:
        future: asyncio.Future[bytes] = self._loop.create_future()
        if self._closed is not None:
            future.set_exception(http2.CallError(grpc.StatusCode.UNAVAILABLE, self._closed,
                                                 unsent=True))
        elif self._queued or not self._room():
            self._queued.append((future, message, 0, self._loop.time() + self._timeout))
        else:
            self._start(future, message, 0, self._loop.time() + self._timeout)
        return future

    def _start(self, future: asyncio.Future[bytes], message: bytes, refused: int,
               deadline: float) -> None:
        sid = self._h2.get_next_available_stream_id()
        stream = _Stream(future, message, refused, deadline)
        self._streams[sid] = stream
        self._h2.send_headers(sid, self._headers)
        stream.pending = b"\x00" + len(message).to_bytes(4, "big") + message
        self._pump(sid, stream)
        self._flush_soon()

    def _pump(self, sid: int, stream: _Stream) -> None:
        data = stream.pending
        while data is not None:
            n = min(len(data), self._h2.local_flow_control_window(sid), self._h2.max_outbound_frame_size)
            if n <= 0:
                self._blocked[sid] = stream
                break
            last = n == len(data)
            self._h2.send_data(sid, data if last and n == len(data) else data[:n], end_stream=last)
            data = None if last else data[n:]
        stream.pending = data
        if data is None:
            self._blocked.pop(sid, None)

    def _flush_soon(self) -> None:
        if not self._flushing:
            self._flushing = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        data = self._h2.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            with contextlib.suppress(*self._errors):
                self._h2.close_connection()
            self._flush()
            self._transport.close()
        self._shut("connection closed by the client")
        self._fail_all(grpc.StatusCode.CANCELLED, "connection closed by the client")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._h2.initiate_connection()
        self._h2.increment_flow_control_window(MAX_WINDOW - DEFAULT_WINDOW)
        self._flush()
        self._sweeper = self._loop.call_later(SWEEP_SECONDS, self._sweep)

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f"connection lost: {exc}" if exc else "connection closed by the server"
        self._shut(reason)
        self._fail_all(grpc.StatusCode.UNAVAILABLE, reason)
        if self._sweeper is not None:
            self._sweeper.cancel()
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason))

    def data_received(self, data: bytes) -> None:
        e = self._e
        try:
            events: list[Any] = self._h2.receive_data(data)
        except self._errors as exc:
            self._protocol_error(f"malformed frames from the server: {exc!r}")
            return
        for event in events:
            kind = type(event)
            if kind is e.DataReceived:
                self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream.body.append(event.data)
                    if event.stream_ended is not None:
                        self._end(event.stream_id, http2.CallError(
                            grpc.StatusCode.INTERNAL, "the server ended the stream without trailers"))
            elif kind is e.ResponseReceived:
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    for name, value in event.headers:
                        if name == b":status":
                            stream.http_status = int(value)
                    if event.stream_ended is not None:  # trailers-only
                        self._end(event.stream_id, self._outcome(stream, event.headers))
            elif kind is e.TrailersReceived:
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    self._end(event.stream_id, self._outcome(stream, event.headers))
            elif kind is e.StreamReset:
                self._on_reset(event.stream_id, int(event.error_code))
            elif kind is e.WindowUpdated:
                if event.stream_id == 0:
                    for sid, blocked in list(self._blocked.items()):
                        self._pump(sid, blocked)
                elif (stream := self._streams.get(event.stream_id)) is not None and stream.pending:
                    self._pump(event.stream_id, stream)
            elif kind is e.RemoteSettingsChanged:
                for sid, blocked in list(self._blocked.items()):
                    self._pump(sid, blocked)
                self._start_queued()
                if not self.ready.done():
                    self.ready.set_result(None)
            elif kind is e.ConnectionTerminated:
                self._on_goaway(event.last_stream_id or 0, int(event.error_code or 0))
        self._flush_soon()

    def _outcome(self, stream: _Stream, trailers: Any) -> bytes | http2.CallError:
        status = message = None
        for name, value in trailers:
            if name == b"grpc-status":
                status = int(value)
            elif name == b"grpc-message":
                message = urllib.parse.unquote(value.decode("utf-8", "replace"))
        if status is None:
            code = http2.STATUS_BY_HTTP.get(stream.http_status, grpc.StatusCode.UNKNOWN)
            return http2.CallError(code, f"HTTP status {stream.http_status} without grpc-status")
        if status != 0:
            return http2.CallError(http2.STATUS_BY_VALUE.get(status, grpc.StatusCode.UNKNOWN),
                                   message or "")
        body = stream.body[0] if len(stream.body) == 1 else b"".join(stream.body)
        if len(body) < 5 or body[0] != 0 or int.from_bytes(body[1:5], "big") != len(body) - 5:
            return http2.CallError(grpc.StatusCode.INTERNAL, "the answer is not one uncompressed "
                                   f"gRPC message ({len(body)} bytes)")
        return body[5:]

    def _end(self, sid: int, outcome: bytes | http2.CallError, *, reset: bool = False) -> None:
        stream = self._streams.pop(sid, None)
        if stream is None:
            return
        if self._blocked.pop(sid, None) is not None or stream.pending is not None or reset:
            with contextlib.suppress(*self._errors):
                self._h2.reset_stream(sid, http2.CANCEL)
            self._flush_soon()
        if not stream.future.done():
            if isinstance(outcome, http2.CallError):
                stream.future.set_exception(outcome)
            else:
                stream.future.set_result(outcome)
        self._start_queued()
        if self._idle_close and not self._streams:
            self.close()

    def _start_queued(self) -> None:
        while self._queued and self._closed is None and self._room():
            future, message, refused, deadline = self._queued.popleft()
            if not future.done():
                self._start(future, message, refused, deadline)

    def _on_reset(self, sid: int, error: int) -> None:
        stream = self._streams.get(sid)
        if (stream is not None and error == http2.REFUSED_STREAM and not stream.http_status
                and stream.refused < http2.REFUSED_RETRIES and self._closed is None):
            del self._streams[sid]
            self._blocked.pop(sid, None)
            self._queued.appendleft((stream.future, stream.message, stream.refused + 1,
                                     stream.deadline))
            if not self._streams:
                self._loop.call_later(http2.REFUSED_PAUSE, self._start_queued)
            return
        self._end(sid, http2.CallError(http2.STATUS_BY_RESET.get(error, grpc.StatusCode.INTERNAL),
                                       f"stream reset by the server (HTTP/2 error {error:#x})"))

    def _on_goaway(self, last: int, error: int) -> None:
        self._shut(f"the server is going away (GOAWAY, HTTP/2 error {error:#x})")
        for sid in [s for s in self._streams if s > last]:
            self._end(sid, http2.CallError(grpc.StatusCode.UNAVAILABLE, str(self._closed),
                                           unsent=True))

    def _shut(self, reason: str) -> None:
        if self._closed is None:
            self._closed = reason
        while self._queued:
            future = self._queued.popleft()[0]
            if not future.done():
                future.set_exception(http2.CallError(grpc.StatusCode.UNAVAILABLE, reason,
                                                     unsent=True))

    def _fail_all(self, code: grpc.StatusCode, reason: str) -> None:
        for sid in list(self._streams):
            self._end(sid, http2.CallError(code, reason))

    def _protocol_error(self, reason: str) -> None:
        self._shut(reason)
        self._fail_all(grpc.StatusCode.INTERNAL, reason)
        if self._transport is not None:
            self._transport.abort()

    def _sweep(self) -> None:
        now = self._loop.time()
        for future, _, _, deadline in self._queued:
            if deadline <= now and not future.done():
                future.set_exception(http2.CallError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                                     f"no answer within {self._timeout:g}s"))
        for sid, stream in list(self._streams.items()):
            if stream.deadline <= now:
                self._end(sid, http2.CallError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                               f"no answer within {self._timeout:g}s"), reset=True)
        if self._closed is None or self._streams:
            self._sweeper = self._loop.call_later(SWEEP_SECONDS, self._sweep)


async def connect(target: str, path: str, *, timeout: float, connect_timeout: float,
                  metadata: Iterable[tuple[str, str]] = ()) -> Connection:
    """As ``http2.connect``, with an ``h2`` connection."""
    host, port = http2.split_target(target)
    loop = asyncio.get_running_loop()

    async def opened() -> Connection:
        _, conn = await loop.create_connection(
            lambda: Connection(path, target, timeout, metadata), host, port)
        await conn.ready
        return conn

    return await asyncio.wait_for(opened(), connect_timeout)


def install() -> None:
    """From now on, the load tester's channels open ``h2`` connections."""
    setattr(http2, "connect", connect)  # noqa: B010 (Channel looks ``connect`` up at each call)


async def _graceful_stop(connect: Callable[..., Awaitable[Any]]) -> list[str]:
    """Five calls of 0.3 s in flight on one connection when a grpc.aio server stops with a grace
    period: what became of each."""
    active = 0

    async def echo(message: bytes, context: grpc.aio.ServicerContext) -> bytes:
        nonlocal active
        active += 1
        await asyncio.sleep(0.3)
        return message

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}),))
    target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    conn = await connect(target, "/bench.Echo/Echo", timeout=10, connect_timeout=10)
    calls = [conn.unary(bytes([i])) for i in range(5)]
    while active < 5:
        await asyncio.sleep(0.01)
    stopping = asyncio.ensure_future(server.stop(5))
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    await stopping
    conn.close()
    return ["answered" if isinstance(o, bytes) else str(o) for o in outcomes]


def main() -> int:
    for name, opener in (("own framing", http2.connect), ("h2", connect)):
        outcomes = asyncio.run(_graceful_stop(opener))
        answered = outcomes.count("answered")
        failures = sorted({o for o in outcomes if o != "answered"})
        print(f"{name}: {answered} of 5 calls in flight answered at a graceful stop"
              + (f"; failed: {'; '.join(failures)}" if failures else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
