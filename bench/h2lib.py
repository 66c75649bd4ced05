"""The load tester's connection with python-hyper's ``h2`` library as its framing, to measure
against its own (``digitserve.loadtest.http2``) under the same calls:

    pip install h2
    python -m bench.call_cost client --target 127.0.0.1:50051 --data-dir data --framing h2lib
    python -m bench.h2lib      # 5 calls in flight when a gRPC server stops gracefully, each framing

``Connection`` here is ``http2.Connection`` (the same calls: pre-serialized, flow control, stream
limit, deadlines, errors) with its framing methods (``_send_*``, ``data_received``) done by
``h2.H2Connection``, its header validation and normalization turned off (the cheapest
configuration it has): frames, HPACK, settings and flow-control bookkeeping are ``h2``'s.
``install()`` makes the load tester's channels open these connections for the rest of the
process. Not part of the product: one caveat alone would keep it out — ``h2`` closes a
connection's state machine at GOAWAY, so the frames that still come for calls in flight raise
``ProtocolError`` (python-hyper/h2 issue 1181) and the calls fail, where the load tester's own
framing lets them finish, as HTTP/2 allows and ``--max-connection-age`` relies on;
``python -m bench.h2lib`` shows it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack

from digitserve.loadtest import http2

_ERRORS = (h2.exceptions.ProtocolError, ValueError)


class Connection(http2.Connection):
    """``http2.Connection`` framed by ``h2``."""

    def __init__(self, path: str, authority: str, timeout: float,
                 metadata: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(path, authority, timeout, metadata)
        self._h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=False,
            normalize_outbound_headers=False, validate_inbound_headers=False,
            normalize_inbound_headers=False))
        self._h2.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: http2.MAX_WINDOW})
        self._headers = hpack.Decoder().decode(self._block, raw=True)  # the same fields

    def flush(self) -> None:  # what h2 has to send goes out with the rest of this turn
        self._out.append(self._h2.data_to_send())
        super().flush()

    def _send_preface(self) -> None:
        self._h2.initiate_connection()
        self._h2.increment_flow_control_window(http2.MAX_WINDOW - http2.DEFAULT_WINDOW)
        self._write(b"")

    def _send_headers(self, sid: int) -> None:
        self._h2.send_headers(sid, self._headers)
        self._write(b"")

    def _send_room(self, sid: int, stream: Any) -> int:
        room: int = min(self._h2.local_flow_control_window(sid), self._h2.max_outbound_frame_size)
        return room

    def _send_data(self, sid: int, stream: Any, data: memoryview, last: bool) -> None:
        self._h2.send_data(sid, data.tobytes(), end_stream=last)

    def _send_reset(self, sid: int) -> None:
        with contextlib.suppress(*_ERRORS):
            self._h2.reset_stream(sid, http2.CANCEL)
        self._write(b"")

    def _send_goaway(self) -> None:
        with contextlib.suppress(*_ERRORS):
            self._h2.close_connection()

    def data_received(self, data: bytes) -> None:
        e = h2.events
        try:
            events: list[Any] = self._h2.receive_data(data)
        except _ERRORS as exc:
            self._protocol_error(f"malformed frames from the server: {exc!r}")
            return
        for event in events:
            kind = type(event)
            if kind is e.DataReceived:
                self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                self._on_data(event.stream_id, event.data, event.stream_ended is not None)
            elif kind is e.ResponseReceived or kind is e.TrailersReceived:
                self._on_headers(event.stream_id, event.headers, event.stream_ended is not None)
            elif kind is e.StreamReset:
                self._on_reset(event.stream_id, int(event.error_code))
            elif kind is e.WindowUpdated:
                self._pump_blocked()
            elif kind is e.RemoteSettingsChanged:
                self._max_streams = self._h2.remote_settings.max_concurrent_streams
                self._settled()
            elif kind is e.ConnectionTerminated:
                self._on_goaway(event.last_stream_id or 0, int(event.error_code or 0))
        self._write(b"")


def install() -> None:
    """From now on, the load tester's channels open ``h2`` connections."""
    http2.Channel.connection = Connection


async def _graceful_stop(connection: type[http2.Connection]) -> list[str]:
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
    conn = await http2.connect(target, "/bench.Echo/Echo", timeout=10, connect_timeout=10,
                               connection=connection)
    calls = [conn.unary(bytes([i])) for i in range(5)]
    while active < 5:
        await asyncio.sleep(0.01)
    stopping = asyncio.ensure_future(server.stop(5))
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    await stopping
    conn.close()
    return ["answered" if isinstance(o, bytes) else str(o) for o in outcomes]


def main() -> int:
    for name, connection in (("own framing", http2.Connection), ("h2", Connection)):
        outcomes = asyncio.run(_graceful_stop(connection))
        answered = outcomes.count("answered")
        failures = sorted({o for o in outcomes if o != "answered"})
        print(f"{name}: {answered} of 5 calls in flight answered at a graceful stop"
              + (f"; failed: {'; '.join(failures)}" if failures else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
