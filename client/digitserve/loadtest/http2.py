"""gRPC unary calls over one plaintext HTTP/2 connection, framed by the load tester itself.

grpc.aio's client spends 230-270 µs of CPU per call on the 2-core machines here (``python -m
bench.call_cost client --engine grpc``); a load tester that
shares the machine with the server it measures takes that CPU from the server. This connection
sends requests serialized in advance: each call is a HEADERS frame whose header block is encoded
once (no dynamic-table entries, so the same bytes fit every call) and DATA frames holding one
length-prefixed gRPC message; answers are read back from DATA frames and the status from the
trailers. Frames are HTTP/2 (RFC 9113) packed with ``struct``; header blocks are coded by the
``hpack`` library (RFC 7541); messages and statuses follow gRPC's PROTOCOL-HTTP2.md.

Plaintext with prior knowledge (h2c), unary calls only, both flow-control directions honoured
(a 64-image float32 request is larger than the 64 KiB window a server starts with).

Why not python-hyper's ``h2`` (hpack's sister project): measured against the same calls framed
by it (``bench/h2lib.py``: this Connection with ``h2.H2Connection`` framing, header validation
and normalization off),
alternating, one load process with 64 calls in flight on 8 connections to one ``mnist-serve`` on
this shared 2-core machine (load average 3.5-8.7), 5 runs of 5 s each, twice::

    python -m bench.call_cost client --target 127.0.0.1:51731 --data-dir data [--framing h2lib]

this framing spent 152-275 µs of CPU per call (medians 173 and 180), ``h2`` 334-523 (medians 372
and 484): 2.1-2.7 times as much, in its frame objects, state machines and per-call HPACK coding.
With ``bench/h2lib.py`` this Connection with only the framing swapped (issue 22), against ``python
-m bench.null_server``, load average 12-17, 8 alternating runs of 5 s each: this framing 135-177 µs
(median 164), ``h2`` 320-592 (median 357), 2.2 times as much.
``h2`` also closes its connection state at GOAWAY (python-hyper/h2 issue 1181): when a gRPC server
stops gracefully, ``python -m bench.h2lib`` sees 0 of 5 calls in flight answered through ``h2``
(``ProtocolError`` on the frames that follow the GOAWAY), 5 of 5 through this framing.
"""

from __future__ import annotations

import asyncio
import struct
import urllib.parse
from collections import deque
from collections.abc import Iterable

import grpc
import hpack

from digitserve.client import errors

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Frame types and flags (RFC 9113 section 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, \
    CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
# Settings (section 6.5.2).
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE = range(1, 6)
DEFAULT_WINDOW = 65_535
DEFAULT_FRAME_SIZE = 16_384
MAX_WINDOW = MAX_STREAM_ID = 2**31 - 1
REFUSED_STREAM = 0x7
CANCEL = 0x8
# A stream the server refused (its stream limit; gRPC servers count a finished stream a little
# after its trailers) was not processed: it is sent again, as gRPC clients do, this many times.
REFUSED_RETRIES = 5
REFUSED_PAUSE = 0.01
# The 9-byte frame header: 24-bit length (as a byte and 16 bits), type, flags, stream id.
_FRAME = struct.Struct(">BHBBI")
_SETTING = struct.Struct(">HI")
SWEEP_SECONDS = 0.1
RECONNECT_PAUSE = 0.25
DECODED_BLOCKS = 64  # header blocks remembered (trailers with a request id differ every call)

STATUS_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}
# What a stream reset means to a gRPC client (PROTOCOL-HTTP2.md, "Errors").
STATUS_BY_RESET = {REFUSED_STREAM: grpc.StatusCode.UNAVAILABLE, CANCEL: grpc.StatusCode.CANCELLED,
                   0xB: grpc.StatusCode.RESOURCE_EXHAUSTED, 0xC: grpc.StatusCode.PERMISSION_DENIED}
# A reply without grpc-status (http-grpc-status-mapping.md).
STATUS_BY_HTTP = {400: grpc.StatusCode.INTERNAL, 401: grpc.StatusCode.UNAUTHENTICATED,
                  403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.UNIMPLEMENTED,
                  429: grpc.StatusCode.UNAVAILABLE, 502: grpc.StatusCode.UNAVAILABLE,
                  503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.UNAVAILABLE}


class CallError(errors.CallError):
    """A call that did not end with status OK (``code()`` and ``details()``). ``unsent``: the
    server never processed the call (it was not sent, or GOAWAY said it was not taken), so it
    may be sent again on another connection."""

    def __init__(self, code: grpc.StatusCode, details: str, *, unsent: bool = False) -> None:
        super().__init__(code, details)
        self.unsent = unsent


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _FRAME.pack(n >> 16, n & 0xFFFF, kind, flags, stream_id) + payload


def split_target(target: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port); a ValueError names anything else."""
    parsed = urllib.parse.urlsplit("//" + target)
    try:
        port = parsed.port
    except ValueError:
        port = None
    if not parsed.hostname or port is None or parsed.path or parsed.query or parsed.username:
        raise ValueError(f"target {target!r} is not host:port")
    return parsed.hostname, port


def header_block(path: str, authority: str, timeout: float | None,
                 metadata: Iterable[tuple[str, str]] = ()) -> bytes:
    """A request's header block with no dynamic-table entries: valid for every call."""
    fields = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", authority),
              ("content-type", "application/grpc"), ("te", "trailers"),
              ("user-agent", "mnist-client-loadtest")]
    if timeout is not None:
        fields.append(("grpc-timeout", f"{max(1, min(99_999_999, round(timeout * 1000)))}m"))
    fields.extend(metadata)
    block: bytes = hpack.Encoder().encode([hpack.NeverIndexedHeaderTuple(k, v) for k, v in fields])
    return block


def _integer(block: bytes, i: int, prefix_bits: int) -> tuple[int, int]:
    """An HPACK integer with an N-bit prefix starting at ``block[i]`` (RFC 7541 5.1): its value
    and the offset after it."""
    mask = (1 << prefix_bits) - 1
    value = block[i] & mask
    i += 1
    if value == mask:
        shift = 0
        while True:
            byte = block[i]
            i += 1
            value += (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
    return value, i


def keeps_table(block: bytes) -> bool:
    """Whether decoding a header block leaves the decoder's dynamic table as it was: it holds
    indexed fields and literals without (or never) indexing only, no literal with incremental
    indexing and no table size update (RFC 7541 section 6)."""
    i, n = 0, len(block)
    while i < n:
        first = block[i]
        if first & 0x80:  # indexed field
            _, i = _integer(block, i, 7)
        elif first & 0xC0 == 0x40 or first & 0xE0 == 0x20:  # incremental indexing; size update
            return False
        else:  # literal without indexing or never indexed: name index, [name], value
            name_index, i = _integer(block, i, 4)
            for _ in range(1 if name_index else 2):
                length, i = _integer(block, i, 7)
                i += length
    return i == n


class _Stream:
    __slots__ = ("answered", "body", "deadline", "future", "http_status", "message", "pending",
                 "refused", "send_window")

    def __init__(self, future: asyncio.Future[bytes], message: bytes, refused: int,
                 send_window: int, deadline: float) -> None:
        self.future, self.message, self.refused, self.deadline = future, message, refused, deadline
        self.body: list[bytes] = []
        self.answered = False  # response headers seen
        self.http_status = 0
        self.send_window = send_window
        self.pending: memoryview | None = None


class Connection(asyncio.Protocol):
    """One HTTP/2 connection carrying unary calls to one method; see :func:`connect`.

    The calls (streams, their queue above the server's stream limit, deadlines, outcomes, resets,
    GOAWAY) are kept here once; the framing is the ``_send_*`` methods and ``data_received``,
    which ``bench/h2lib.py`` overrides to measure the ``h2`` library's framing under the same
    calls."""

    def __init__(self, path: str, authority: str, timeout: float,
                 metadata: Iterable[tuple[str, str]] = ()) -> None:
        self._loop = asyncio.get_running_loop()
        self._block = header_block(path, authority, timeout, metadata)
        self._timeout = timeout
        self._decoder = hpack.Decoder()
        self._decoded: dict[bytes, list[tuple[bytes, bytes]]] = {}
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._out: list[bytes] = []
        self._flushing = False
        self._streams: dict[int, _Stream] = {}
        self._blocked: dict[int, _Stream] = {}
        self._queued: deque[tuple[asyncio.Future[bytes], bytes, int, float]] = deque()
        self._next_id = 1
        self._send_window = self._stream_window = DEFAULT_WINDOW
        self._max_frame = DEFAULT_FRAME_SIZE
        self._max_streams = 2**31
        self._received = 0
        self._continued: tuple[int, int, bytearray] | None = None
        self._closed: str | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._idle_close = False
        self.ready: asyncio.Future[None] = self._loop.create_future()

    @property
    def closed(self) -> bool:
        """No more calls start here (GOAWAY, a lost connection, close())."""
        return self._closed is not None

    def close_when_idle(self) -> None:
        """Closes once the calls still open here have ended (after GOAWAY, on replacement)."""
        self._idle_close = True
        if not self._streams:
            self.close()

    # --- calls ------------------------------------------------------------------------------

    def unary(self, message: bytes) -> asyncio.Future[bytes]:
        """Starts a call with a serialized request; the future gives the serialized answer or
        raises CallError."""
        future: asyncio.Future[bytes] = self._loop.create_future()
        if self._closed is not None:
            future.set_exception(CallError(grpc.StatusCode.UNAVAILABLE, self._closed, unsent=True))
        elif len(self._streams) >= self._max_streams or self._queued:
            self._queued.append((future, message, 0, self._loop.time() + self._timeout))
        else:
            self._start(future, message, 0, self._loop.time() + self._timeout)
        return future

    def _start(self, future: asyncio.Future[bytes], message: bytes, refused: int,
               deadline: float) -> None:
        sid = self._next_id
        if sid > MAX_STREAM_ID:
            self._shut("stream ids used up; open a new connection")
            future.set_exception(CallError(grpc.StatusCode.UNAVAILABLE, str(self._closed)))
            return
        self._next_id = sid + 2
        stream = _Stream(future, message, refused, self._stream_window, deadline)
        self._streams[sid] = stream
        self._send_headers(sid)
        stream.pending = memoryview(b"\x00" + len(message).to_bytes(4, "big") + message)
        self._pump(sid, stream)

    def _pump(self, sid: int, stream: _Stream) -> None:
        """Sends as much of the stream's message as the flow-control windows allow."""
        data = stream.pending
        while data is not None:
            n = min(len(data), self._send_room(sid, stream))
            if n <= 0:
                self._blocked[sid] = stream
                break
            last = n == len(data)
            self._send_data(sid, stream, data[:n], last)
            data = None if last else data[n:]
        stream.pending = data
        if data is None:
            self._blocked.pop(sid, None)

    def _pump_blocked(self) -> None:
        for sid, stream in list(self._blocked.items()):
            self._pump(sid, stream)

    def _write(self, data: bytes) -> None:
        """Queues bytes; everything queued in one turn of the event loop goes out in one write."""
        self._out.append(data)
        if not self._flushing:
            self._flushing = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Writes what is queued now."""
        self._flushing = False
        if self._out and self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"".join(self._out))
        self._out.clear()

    def close(self) -> None:
        """Says goodbye (GOAWAY, no error) and closes; calls still open end CANCELLED."""
        if self._transport is not None and not self._transport.is_closing():
            self._send_goaway()
            self.flush()
            self._transport.close()
        self._shut("connection closed by the client")
        self._fail_all(grpc.StatusCode.CANCELLED, "connection closed by the client")

    # --- the framing: what goes out -------------------------------------------------------------

    def _send_preface(self) -> None:
        settings = _SETTING.pack(ENABLE_PUSH, 0) + _SETTING.pack(INITIAL_WINDOW_SIZE, MAX_WINDOW)
        self._write(PREFACE + frame(SETTINGS, 0, 0, settings)
                    + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", MAX_WINDOW - DEFAULT_WINDOW)))

    def _send_headers(self, sid: int) -> None:
        n = len(self._block)
        self._write(_FRAME.pack(n >> 16, n & 0xFFFF, HEADERS, END_HEADERS, sid) + self._block)

    def _send_room(self, sid: int, stream: _Stream) -> int:
        """How many bytes of the stream's message may go in its next DATA frame."""
        return min(self._send_window, stream.send_window, self._max_frame)

    def _send_data(self, sid: int, stream: _Stream, data: memoryview, last: bool) -> None:
        n = len(data)
        self._write(_FRAME.pack(n >> 16, n & 0xFFFF, DATA, END_STREAM if last else 0, sid) + data)
        self._send_window -= n
        stream.send_window -= n

    def _send_reset(self, sid: int) -> None:
        self._write(frame(RST_STREAM, 0, sid, struct.pack(">I", CANCEL)))

    def _send_goaway(self) -> None:
        self._write(frame(GOAWAY, 0, 0, struct.pack(">II", 0, 0)))

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._send_preface()
        self._sweeper = self._loop.call_later(SWEEP_SECONDS, self._sweep)

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f"connection lost: {exc}" if exc else "connection closed by the server"
        self._shut(reason)
        self._fail_all(grpc.StatusCode.UNAVAILABLE, reason)
        if self._sweeper is not None:
            self._sweeper.cancel()
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason))

    # --- the framing: what comes in -------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        pos, end = 0, len(buffer)
        try:
            while end - pos >= 9:
                high, low, kind, flags, sid = _FRAME.unpack_from(buffer, pos)
                length = high << 16 | low
                if end - pos - 9 < length:
                    break
                payload = bytes(buffer[pos + 9:pos + 9 + length])
                pos += 9 + length
                self._on_frame(kind, flags, sid & MAX_STREAM_ID, payload)
        except (hpack.HPACKError, ValueError, struct.error) as exc:
            self._protocol_error(f"malformed frame from the server: {exc!r}")
            return
        del buffer[:pos]

    def _on_frame(self, kind: int, flags: int, sid: int, payload: bytes) -> None:
        if self._continued is not None and kind != CONTINUATION:
            raise ValueError("a header block was interrupted")
        if kind == DATA:
            self._received += len(payload)
            if self._received >= MAX_WINDOW // 2:  # give the connection window back in large steps
                self._write(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self._received)))
                self._received = 0
            if flags & PADDED:
                payload = payload[1:len(payload) - payload[0]]
            self._on_data(sid, payload, bool(flags & END_STREAM))
        elif kind == HEADERS:
            if flags & PADDED:
                payload = payload[1:len(payload) - payload[0]]
            if flags & PRIORITY_FLAG:
                payload = payload[5:]
            if flags & END_HEADERS:
                self._on_headers(sid, self._decode(payload), bool(flags & END_STREAM))
            else:
                self._continued = (sid, flags, bytearray(payload))
        elif kind == CONTINUATION:
            if self._continued is None or self._continued[0] != sid:
                raise ValueError("CONTINUATION without HEADERS")
            self._continued[2].extend(payload)
            if flags & END_HEADERS:
                sid, first_flags, block = self._continued
                self._continued = None
                self._on_headers(sid, self._decode(bytes(block)), bool(first_flags & END_STREAM))
        elif kind == WINDOW_UPDATE:
            increment = int.from_bytes(payload[:4], "big") & MAX_WINDOW
            if sid == 0:
                self._send_window += increment
                self._pump_blocked()
            elif (stream := self._streams.get(sid)) is not None:
                stream.send_window += increment
                if stream.pending is not None:
                    self._pump(sid, stream)
        elif kind == SETTINGS:
            if not flags & ACK:
                self._on_settings(payload)
        elif kind == PING:
            if not flags & ACK:
                self._write(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            self._on_reset(sid, int.from_bytes(payload[:4], "big"))
        elif kind == GOAWAY:
            last, error = struct.unpack_from(">II", payload)
            self._on_goaway(last & MAX_STREAM_ID, error)
        # PRIORITY, PUSH_PROMISE (disabled by our settings) and unknown types are ignored.

    def _decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """Always decoded (the decoder's table must follow every block), but a block that leaves
        the table as it was decodes to the same headers until one that may change it arrives:
        gRPC's repeated replies and trailers are such blocks."""
        headers = self._decoded.get(block)
        if headers is None:
            headers = [(bytes(k), bytes(v)) for k, v in self._decoder.decode(block, raw=True)]
            if keeps_table(block):
                if len(self._decoded) >= DECODED_BLOCKS:
                    self._decoded.clear()
                self._decoded[block] = headers
            else:
                self._decoded.clear()
        return headers

    def _on_settings(self, payload: bytes) -> None:
        for offset in range(0, len(payload) - len(payload) % 6, 6):
            key, value = _SETTING.unpack_from(payload, offset)
            if key == INITIAL_WINDOW_SIZE:
                delta, self._stream_window = value - self._stream_window, value
                for stream in self._streams.values():
                    stream.send_window += delta
            elif key == MAX_FRAME_SIZE:
                self._max_frame = value
            elif key == MAX_CONCURRENT_STREAMS:
                self._max_streams = value
        self._write(frame(SETTINGS, ACK, 0))
        self._settled()

    # --- what the frames mean to the calls --------------------------------------------------------

    def _settled(self) -> None:
        """The server's settings arrived (or changed): the connection is ready."""
        self._pump_blocked()
        self._start_queued()
        if not self.ready.done():
            self.ready.set_result(None)

    def _on_data(self, sid: int, payload: bytes, ended: bool) -> None:
        stream = self._streams.get(sid)
        if stream is not None:
            stream.body.append(payload)
            if ended:
                self._end(sid, CallError(grpc.StatusCode.INTERNAL, "the server ended the stream "
                                         "without trailers"))

    def _on_headers(self, sid: int, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        stream = self._streams.get(sid)
        if stream is None:
            return
        if not stream.answered:
            stream.answered = True
            for name, value in headers:
                if name == b":status":
                    stream.http_status = int(value)
            if not ended:
                return
        elif not ended:
            raise ValueError("trailers without END_STREAM")
        self._end(sid, self._outcome(stream, headers))

    def _outcome(self, stream: _Stream, trailers: list[tuple[bytes, bytes]]) -> bytes | CallError:
        status = message = None
        for name, value in trailers:
            if name == b"grpc-status":
                status = int(value)
            elif name == b"grpc-message":
                message = urllib.parse.unquote(value.decode("utf-8", "replace"))
        if status is None:
            code = STATUS_BY_HTTP.get(stream.http_status, grpc.StatusCode.UNKNOWN)
            return CallError(code, f"HTTP status {stream.http_status} without grpc-status")
        if status != 0:
            return CallError(STATUS_BY_VALUE.get(status, grpc.StatusCode.UNKNOWN), message or "")
        body = stream.body[0] if len(stream.body) == 1 else b"".join(stream.body)
        if len(body) < 5 or body[0] != 0 or int.from_bytes(body[1:5], "big") != len(body) - 5:
            return CallError(grpc.StatusCode.INTERNAL, f"the answer is not one uncompressed gRPC "
                             f"message ({len(body)} bytes)")
        return body[5:]

    def _end(self, sid: int, outcome: bytes | CallError, *, reset: bool = False) -> None:
        """Settles a call. ``reset`` (or a request not yet all sent, as when the server answers
        an error early) also cancels the stream."""
        stream = self._streams.pop(sid, None)
        if stream is None:
            return
        if self._blocked.pop(sid, None) is not None or stream.pending is not None or reset:
            self._send_reset(sid)
        if not stream.future.done():
            if isinstance(outcome, CallError):
                stream.future.set_exception(outcome)
            else:
                stream.future.set_result(outcome)
        self._start_queued()
        if self._idle_close and not self._streams:
            self.close()

    def _start_queued(self) -> None:
        while self._queued and len(self._streams) < self._max_streams and self._closed is None:
            future, message, refused, deadline = self._queued.popleft()
            if not future.done():
                self._start(future, message, refused, deadline)

    def _on_reset(self, sid: int, error: int) -> None:
        stream = self._streams.get(sid)
        if (stream is not None and error == REFUSED_STREAM and not stream.answered
                and stream.refused < REFUSED_RETRIES and self._closed is None):
            del self._streams[sid]
            self._blocked.pop(sid, None)
            self._queued.appendleft((stream.future, stream.message, stream.refused + 1,
                                     stream.deadline))
            if not self._streams:
                self._loop.call_later(REFUSED_PAUSE, self._start_queued)
            return
        self._end(sid, CallError(STATUS_BY_RESET.get(error, grpc.StatusCode.INTERNAL),
                                 f"stream reset by the server (HTTP/2 error {error:#x})"))

    def _on_goaway(self, last: int, error: int) -> None:
        self._shut(f"the server is going away (GOAWAY, HTTP/2 error {error:#x})")
        for sid in [s for s in self._streams if s > last]:  # not processed: may go elsewhere
            self._end(sid, CallError(grpc.StatusCode.UNAVAILABLE, str(self._closed), unsent=True))

    # --- endings ------------------------------------------------------------------------------

    def _shut(self, reason: str) -> None:
        """No new calls from now on; queued ones fail UNAVAILABLE."""
        if self._closed is None:
            self._closed = reason
        while self._queued:
            future = self._queued.popleft()[0]
            if not future.done():
                future.set_exception(CallError(grpc.StatusCode.UNAVAILABLE, reason, unsent=True))

    def _fail_all(self, code: grpc.StatusCode, reason: str) -> None:
        for sid in list(self._streams):
            self._end(sid, CallError(code, reason))

    def _protocol_error(self, reason: str) -> None:
        self._shut(reason)
        self._fail_all(grpc.StatusCode.INTERNAL, reason)
        if self._transport is not None:
            self._transport.abort()

    def _sweep(self) -> None:
        """Ends calls past their deadline (the server should have, from grpc-timeout)."""
        now, late = self._loop.time(), f"no answer within {self._timeout:g}s"
        for future, _, _, deadline in self._queued:
            if deadline <= now and not future.done():
                future.set_exception(CallError(grpc.StatusCode.DEADLINE_EXCEEDED, late))
        for sid, stream in list(self._streams.items()):
            if stream.deadline <= now:
                self._end(sid, CallError(grpc.StatusCode.DEADLINE_EXCEEDED, late), reset=True)
        if self._closed is None or self._streams:
            self._sweeper = self._loop.call_later(SWEEP_SECONDS, self._sweep)


async def connect(target: str, path: str, *, timeout: float, connect_timeout: float,
                  metadata: Iterable[tuple[str, str]] = (),
                  connection: type[Connection] = Connection) -> Connection:
    """Opens a connection to ``host:port`` for calls to ``path`` with ``timeout`` seconds each;
    returns once the server's settings have arrived. Raises OSError or TimeoutError."""
    host, port = split_target(target)
    loop = asyncio.get_running_loop()

    async def opened() -> Connection:
        _, conn = await loop.create_connection(
            lambda: connection(path, target, timeout, metadata), host, port)
        await conn.ready
        return conn

    return await asyncio.wait_for(opened(), connect_timeout)


class Channel:
    """Calls to one method over a connection that is replaced when the server says GOAWAY (as it
    does at ``--max-connection-age``) or the connection drops, as a gRPC channel reconnects; a call
    the server never processed is sent again on the new connection, once. While the server cannot
    be reached, calls fail UNAVAILABLE at once and a new connection is tried at most every
    ``RECONNECT_PAUSE`` seconds."""

    connection: type[Connection] = Connection
    """What each connection is (``bench/h2lib.py`` sets another framing)."""

    def __init__(self, target: str, path: str, *, timeout: float, connect_timeout: float,
                 metadata: Iterable[tuple[str, str]] = ()) -> None:
        self._target, self._path = target, path
        self._timeout, self._connect_timeout = timeout, connect_timeout
        self._metadata = tuple(metadata)
        self._conn: Connection | None = None
        self._opening: asyncio.Task[Connection] | None = None
        self._retry_at = 0.0
        self._failure = ""
        self.connections = 0
        """How many connections this channel has opened."""

    async def open(self) -> Channel:
        """The first connection (OSError or TimeoutError when there is none)."""
        self._conn = await self._connect()
        return self

    async def _connect(self) -> Connection:
        conn = await connect(self._target, self._path, timeout=self._timeout,
                             connect_timeout=self._connect_timeout, metadata=self._metadata,
                             connection=self.connection)
        self.connections += 1
        return conn

    async def unary(self, message: bytes) -> bytes:
        """The serialized answer to a serialized request; raises CallError."""
        for attempt in (0, 1):
            conn = self._conn
            if conn is None or conn.closed:
                conn = await self._replace(conn)
            try:
                return await conn.unary(message)
            except CallError as exc:
                if not exc.unsent or attempt:
                    raise
        raise AssertionError("unreachable")

    async def _replace(self, old: Connection | None) -> Connection:
        loop = asyncio.get_running_loop()
        if self._opening is None:
            if (pause := self._retry_at - loop.time()) > 0:
                await asyncio.sleep(pause)  # a failing call takes that long: no busy loop
                raise CallError(grpc.StatusCode.UNAVAILABLE, self._failure)
            self._opening = loop.create_task(self._connect())
        opening = self._opening
        try:
            conn = await asyncio.shield(opening)
        except (OSError, TimeoutError) as exc:
            if self._opening is opening:
                self._opening = None
                self._retry_at = loop.time() + RECONNECT_PAUSE
                self._failure = f"cannot reconnect to {self._target}: {exc!r}"
            raise CallError(grpc.StatusCode.UNAVAILABLE, self._failure) from None
        if self._opening is opening:
            self._opening = None
            self._conn = conn
            if old is not None:
                old.close_when_idle()
        return conn

    def close(self) -> None:
        if self._opening is not None:
            self._opening.cancel()
        if self._conn is not None:
            self._conn.close()
