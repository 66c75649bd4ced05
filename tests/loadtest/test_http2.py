"""The load tester's own HTTP/2 framing (digitserve.loadtest.http2) against real gRPC servers on 127.0.0.1:
the same answers, codes and details as grpc's client, flow control both ways, the server's stream
limit, GOAWAY, deadlines, and a bare socket server for what gRPC servers do not do on demand."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable
from typing import Any, TypeVar

import grpc
import hpack
import numpy as np
import pytest

from digitserve.loadtest import PREDICT_METHOD, http2
from digitserve.v1 import digit_service_pb2 as pb
from tests.servers import ServerThread
from tests.support import wait_for_async

T = TypeVar("T")
ECHO = "/test.Echo/Echo"


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


def request(images: int, *, seed: int = 0, version: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).random((images, 784), dtype=np.float32)
    message = pb.PredictRequest(images=[pb.Image(float32=row.tobytes()) for row in pixels],
                                model_version=version)
    data: bytes = message.SerializeToString()
    return data


def grpc_answer(target: str, payload: bytes, method: str = PREDICT_METHOD) -> bytes:
    with grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 1 << 26)]) as ch:
        answer: bytes = ch.unary_unary(method)(payload, timeout=30)
        return answer


async def h2_calls(target: str, payloads: list[bytes], path: str = PREDICT_METHOD,
                   timeout: float = 30) -> list[bytes | BaseException]:
    conn = await http2.connect(target, path, timeout=timeout, connect_timeout=10)
    try:
        return await asyncio.gather(*(conn.unary(p) for p in payloads), return_exceptions=True)
    finally:
        conn.close()


def test_answers_equal_grpc_clients_from_one_image_to_megabytes(fake_server: ServerThread) -> None:
    # 1 image (3 KiB); 64 (200 KiB, above the 64 KiB window a connection starts with); 1000 (3 MiB
    # out, 70 KiB back: many frames and window updates).
    payloads = [request(1), request(64, seed=1), request(1000, seed=2), request(1, seed=3)]
    got = run(h2_calls(fake_server.target, payloads))
    for payload, answer in zip(payloads, got, strict=True):
        assert answer == grpc_answer(fake_server.target, payload)


def test_errors_carry_grpcs_code_and_details(fake_server: ServerThread) -> None:
    bad_size = pb.PredictRequest(images=[pb.Image(float32=b"\0" * 12)]).SerializeToString()
    cases = [(request(1, version=7), grpc.StatusCode.NOT_FOUND), (bad_size, grpc.StatusCode.INVALID_ARGUMENT)]
    got = run(h2_calls(fake_server.target, [payload for payload, _ in cases]))
    for (payload, code), error in zip(cases, got, strict=True):
        assert isinstance(error, http2.CallError)
        assert error.code() == code
        with pytest.raises(grpc.RpcError) as info:
            grpc_answer(fake_server.target, payload)
        assert error.details() == info.value.details() and error.details()
    [unknown] = run(h2_calls(fake_server.target, [b""], path="/digitserve.v1.DigitService/Nope"))
    assert isinstance(unknown, http2.CallError) and unknown.code() == grpc.StatusCode.UNIMPLEMENTED


class EchoServer:
    """A grpc.aio server answering /test.Echo/Echo with its request after a delay (the first byte of
    the request, in hundredths of a second), optionally with a stream limit."""

    def __init__(self, **options: Any) -> None:
        self.options = [(f"grpc.{k}", v) for k, v in options.items()]
        self.server: grpc.aio.Server | None = None
        self.target = ""
        self.active = 0
        self.most_active = 0

    async def echo(self, message: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        try:
            await asyncio.sleep(message[0] / 100 if message else 0)
            return message
        finally:
            self.active -= 1

    async def __aenter__(self) -> EchoServer:
        self.server = grpc.aio.server(options=self.options)
        handler = grpc.method_handlers_generic_handler(
            "test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(self.echo)})
        self.server.add_generic_rpc_handlers((handler,))
        self.target = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        await self.server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        await self.server.stop(0)


def test_calls_above_the_servers_stream_limit_wait_their_turn() -> None:
    async def main() -> tuple[list[bytes | BaseException], int]:
        async with EchoServer(max_concurrent_streams=3) as server:
            payloads = [bytes([1]) + i.to_bytes(4, "big") for i in range(40)]
            return await h2_calls(server.target, payloads, path=ECHO), server.most_active

    answers, most_active = run(main())
    assert answers == [bytes([1]) + i.to_bytes(4, "big") for i in range(40)]
    assert most_active <= 3


def test_goaway_lets_calls_in_flight_finish_and_refuses_new_ones() -> None:
    async def main() -> tuple[list[bytes | BaseException], BaseException | None]:
        async with EchoServer() as server:
            assert server.server is not None
            conn = await http2.connect(server.target, ECHO, timeout=10, connect_timeout=10)
            slow = [conn.unary(bytes([30, i])) for i in range(5)]  # 0.3 s each
            await wait_for_async(lambda: server.active == 5, 30, "the 5 calls to reach the server")
            stopping = asyncio.ensure_future(server.server.stop(5))
            await wait_for_async(lambda: conn.closed, 30, "the server's GOAWAY")
            late = conn.unary(b"\0late")
            finished = await asyncio.gather(*slow, return_exceptions=True)
            late_error = None
            try:
                await late
            except http2.CallError as exc:
                late_error = exc
            await stopping
            conn.close()
            return finished, late_error

    finished, late_error = run(main())
    assert finished == [bytes([30, i]) for i in range(5)]
    assert isinstance(late_error, http2.CallError)
    assert late_error.code() == grpc.StatusCode.UNAVAILABLE


def test_the_servers_deadline_comes_from_grpc_timeout() -> None:
    # 2.5 s asked of a 1 s deadline; the quick call has the whole second even on a loaded machine.
    async def main() -> list[bytes | BaseException]:
        async with EchoServer() as server:
            return await h2_calls(server.target, [bytes([250]), bytes([0])], path=ECHO, timeout=1.0)

    slow, quick = run(main())
    assert isinstance(slow, http2.CallError) and slow.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert quick == bytes([0])


class BareServer:
    """An HTTP/2 peer that sends its settings and a PING, records what arrives, and never answers a
    call (or closes the connection on its first request when ``hang_up``)."""

    def __init__(self, hang_up: bool = False, settings: bytes = b"",
                 early_answer: list[tuple[str, str]] | None = None) -> None:
        self.hang_up = hang_up
        self.settings = settings
        self.early_answer = early_answer
        self.received = bytearray()
        self.server: asyncio.base_events.Server | None = None
        self.target = ""
        self.writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        writer.write(http2.frame(http2.SETTINGS, 0, 0, self.settings)
                     + http2.frame(http2.PING, 0, 0, b"pingpong"))
        answered = False
        while data := await reader.read(65536):
            self.received += data
            if self.early_answer is not None and not answered and any(
                    f[0] == http2.HEADERS for f in frames(bytes(self.received))):
                block = hpack.Encoder().encode(self.early_answer)
                writer.write(http2.frame(http2.HEADERS, http2.END_HEADERS | http2.END_STREAM, 1,
                                         block))
                answered = True
            if self.hang_up and len(self.received) > len(http2.PREFACE) + 100:
                writer.close()
                return

    def got(self, frame: tuple[int, int, int, bytes]) -> bool:
        """Whether ``frame`` has arrived (as ``frames`` lists it)."""
        data = bytes(self.received)
        return data.startswith(http2.PREFACE) and frame in frames(data)

    async def __aenter__(self) -> BareServer:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.target = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        await self.server.wait_closed()


def cancel(sid: int) -> tuple[int, int, int, bytes]:
    """The RST_STREAM frame (CANCEL) that ends stream ``sid``, as ``frames`` lists it."""
    return (http2.RST_STREAM, 0, sid, struct.pack(">I", http2.CANCEL))


def frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    assert data.startswith(http2.PREFACE)
    pos, out = len(http2.PREFACE), []
    while pos + 9 <= len(data):
        high, low, kind, flags, sid = struct.unpack_from(">BHBBI", data, pos)
        length = high << 16 | low
        out.append((kind, flags, sid, data[pos + 9:pos + 9 + length]))
        pos += 9 + length
    return out


def test_a_silent_server_meets_the_clients_deadline_and_pings_are_answered() -> None:
    async def main() -> tuple[BaseException | bytes, bytes]:
        async with BareServer() as bare:
            [outcome] = await h2_calls(bare.target, [b"hello"], path=ECHO, timeout=0.3)
            await wait_for_async(lambda: bare.got(cancel(1)), 30, "the client's RST_STREAM")
            return outcome, bytes(bare.received)

    outcome, received = run(main())
    assert isinstance(outcome, http2.CallError)
    assert outcome.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    sent = frames(received)
    assert (http2.PING, http2.ACK, 0, b"pingpong") in sent
    assert (http2.SETTINGS, http2.ACK, 0, b"") in sent
    headers = [f for f in sent if f[0] == http2.HEADERS]
    assert len(headers) == 1 and headers[0][2] == 1
    decoded = dict(hpack.Decoder().decode(headers[0][3]))
    assert decoded[":path"] == ECHO and decoded["grpc-timeout"] == "300m"
    assert (http2.DATA, http2.END_STREAM, 1, b"\0\0\0\0\x05hello") in sent
    assert (http2.RST_STREAM, 0, 1, struct.pack(">I", http2.CANCEL)) in sent


def test_a_lost_connection_fails_calls_unavailable() -> None:
    async def main() -> tuple[BaseException | bytes, BaseException | bytes]:
        async with BareServer(hang_up=True) as bare:
            conn = await http2.connect(bare.target, ECHO, timeout=5, connect_timeout=5)
            first = await asyncio.gather(conn.unary(b"x" * 200), return_exceptions=True)
            after = await asyncio.gather(conn.unary(b"y"), return_exceptions=True)
            return first[0], after[0]

    first, after = run(main())
    for outcome in (first, after):
        assert isinstance(outcome, http2.CallError)
        assert outcome.code() == grpc.StatusCode.UNAVAILABLE


def test_no_server_is_an_os_error_and_targets_are_host_port() -> None:
    with pytest.raises(OSError):
        run(http2.connect("127.0.0.1:1", ECHO, timeout=1, connect_timeout=2))
    assert http2.split_target("127.0.0.1:50051") == ("127.0.0.1", 50051)
    assert http2.split_target("[::1]:7") == ("::1", 7)
    assert http2.split_target("localhost:8500") == ("localhost", 8500)
    for bad in ("dns:///localhost:50051", "unix:/tmp/socket", "localhost", "127.0.0.1:x", "a:1/b"):
        with pytest.raises(ValueError, match="is not host:port"):
            http2.split_target(bad)


def test_which_header_blocks_keep_the_decoders_table() -> None:
    encoder = hpack.Encoder()
    first = encoder.encode([("grpc-status", "0"), ("x-long", "v" * 300)])  # incremental indexing
    again = encoder.encode([("grpc-status", "0"), ("x-long", "v" * 300)])  # now indexed
    assert not http2.keeps_table(first) and http2.keeps_table(again)
    literal = encoder.encode([hpack.NeverIndexedHeaderTuple("grpc-message", "m" * 200)])
    assert http2.keeps_table(literal)
    assert http2.keeps_table(bytes.fromhex("be000c677270632d6d65737361676500"))  # gRPC trailers
    assert not http2.keeps_table(b"\x3f\xe1\x1f")  # dynamic table size update
    assert http2.keeps_table(http2.header_block("/a/B", "h:1", 1.5, [("authorization", "x")]))


def test_repeated_header_blocks_decode_from_a_bounded_cache(fake_server: ServerThread) -> None:
    decoded: list[list[tuple[bytes, bytes]]] = []
    original = hpack.Decoder.decode

    def recording(self: hpack.Decoder, data: bytes, raw: bool = False) -> Any:
        headers = list(original(self, data, raw))
        decoded.append(headers)
        return headers

    async def main() -> tuple[list[bytes | BaseException], int]:
        conn = await http2.connect(fake_server.target, PREDICT_METHOD, timeout=30,
                                   connect_timeout=10)
        answers = [await conn.unary(request(1, seed=s)) for s in range(200)]
        cached = len(conn._decoded)
        conn.close()
        return list(answers), cached

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hpack.Decoder, "decode", recording)
        answers, cached = run(main())
    assert all(isinstance(a, bytes) for a in answers)
    # The reply headers are the same block from the second call on (decoded again only when the
    # cache is emptied); each call's trailers carry its own x-request-id, so they are decoded
    # every time, and the cache stays bounded.
    replies = [h for h in decoded if (b":status", b"200") in h]
    trailers = [h for h in decoded if any(k == b"x-request-id" for k, _ in h)]
    assert len(replies) <= 2 + 200 // (http2.DECODED_BLOCKS - 2) and len(trailers) == 200
    assert len({dict(t)[b"x-request-id"] for t in trailers}) == 200
    assert cached <= http2.DECODED_BLOCKS


def test_an_answer_before_the_request_is_sent_ends_the_call_and_its_stream() -> None:
    # A window of 10 bytes holds the request back; the server answers at once, trailers only.
    tiny_window = struct.pack(">HI", http2.INITIAL_WINDOW_SIZE, 10)
    answer = [(":status", "200"), ("content-type", "application/grpc"), ("grpc-status", "3"),
              ("grpc-message", "images%5B0%5D: bad")]

    async def main() -> tuple[BaseException | bytes, bytes]:
        async with BareServer(settings=tiny_window, early_answer=answer) as bare:
            [outcome] = await h2_calls(bare.target, [b"x" * 1000], path=ECHO, timeout=5)
            await wait_for_async(lambda: bare.got(cancel(1)), 30, "the client's RST_STREAM")
            return outcome, bytes(bare.received)

    outcome, received = run(main())
    assert isinstance(outcome, http2.CallError)
    assert outcome.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert outcome.details() == "images[0]: bad"
    sent = frames(received)
    data = [f for f in sent if f[0] == http2.DATA]
    assert data == [(http2.DATA, 0, 1, b"\0\0\0\x03\xe8xxxxx")]  # 10 bytes, as the window allowed
    assert (http2.RST_STREAM, 0, 1, struct.pack(">I", http2.CANCEL)) in sent


def test_a_channel_moves_to_a_new_connection_at_goaway_without_failing_a_call() -> None:
    # The server closes each connection 0.3 s after it opens (as --max-connection-age does). The
    # callers go on until the channel has had three connections and 100 answers (counted, not
    # timed: a loaded machine answers fewer calls per second); 60 s at most.
    async def main() -> tuple[list[bytes], int]:
        async with EchoServer(max_connection_age_ms=300, max_connection_age_grace_ms=5000) as server:
            channel = await http2.Channel(server.target, ECHO, timeout=10, connect_timeout=10).open()
            answers: list[bytes] = []
            end = asyncio.get_running_loop().time() + 60

            def enough() -> bool:
                return len(answers) > 100 and channel.connections >= 3

            async def caller(c: int) -> None:
                k = 0
                while not enough() and asyncio.get_running_loop().time() < end:
                    message = bytes([0, c, k % 256])
                    assert await channel.unary(message) == message
                    answers.append(message)
                    k += 1

            await asyncio.gather(*(caller(c) for c in range(8)))
            channel.close()
            return answers, channel.connections

    answers, connections = run(main())
    assert len(answers) > 100 and connections >= 3


def test_a_channel_without_a_server_fails_unavailable_without_spinning() -> None:
    async def main() -> tuple[int, list[BaseException | bytes]]:
        async with EchoServer() as server:
            channel = await http2.Channel(server.target, ECHO, timeout=5, connect_timeout=1).open()
            assert await channel.unary(b"\0up") == b"\0up"
        # The server is gone: every call fails, and failing calls wait for the next attempt.
        # Counted from when the channel knows its connection is closed: a call that raced the
        # close would fail on the old connection, one more failure that is not a reconnect's.
        conn = channel._conn
        assert conn is not None
        await wait_for_async(lambda: conn.closed, 30, "the channel to see its connection closed")
        failures = 0
        outcomes: list[BaseException | bytes] = []
        end = asyncio.get_running_loop().time() + 0.6
        while asyncio.get_running_loop().time() < end:
            outcomes += await asyncio.gather(channel.unary(b"\0x"), return_exceptions=True)
            failures += 1
        channel.close()
        return failures, outcomes

    failures, outcomes = run(main())
    assert all(isinstance(o, http2.CallError) and o.code() == grpc.StatusCode.UNAVAILABLE
               for o in outcomes)
    # A refused attempt fails at once, the next call waits out the pause: two per pause at most.
    assert 1 <= failures <= 2 * (0.6 / http2.RECONNECT_PAUSE + 1)
