"""Hostile connections against a real server process: a flood of data-less streams, an HTTP/2
rapid reset, idle connections past the file-descriptor limit, undecodable headers, and a
half-sent request to the metrics endpoint. Figures are printed (``pytest -s``)."""

from __future__ import annotations

import asyncio
import json
import resource
import signal
import socket
import struct
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import hpack
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from digitserve.server.telemetry import Telemetry
from digitserve.v1 import digit_service_pb2 as pb
from digitserve.v1 import digit_service_pb2_grpc as pb_grpc
from tests.servers import ServerProcess
from tests.support import expect_error, skip_or_fail, wait_for

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, GOAWAY, CONTINUATION = 0, 1, 3, 4, 7, 9
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
MAX_FRAME = 16384  # the HTTP/2 default; a grpc server does not raise it
PREDICT = "/digitserve.v1.DigitService/Predict"
HEALTH = "/grpc.health.v1.Health/Check"
TOKEN = "flood-test-token"


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", kind, flags, stream) + payload


class RawConnection:
    """An HTTP/2 client written by hand: sends the preface and an empty SETTINGS, and (unless
    ``ack``) never acknowledges the server's SETTINGS, so the limits it announces are not all in
    force (grpc applies the header-size limit only once acknowledged). Reads everything the
    server sends on a thread; ``ended`` holds the streams the server finished (a frame with
    END_STREAM, or RST_STREAM), ``statuses`` their grpc-status."""

    def __init__(self, port: int, ack: bool = False) -> None:
        self.port = port
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.ended: set[int] = set()
        self.statuses: dict[int, str] = {}
        self.closed = threading.Event()
        self.sock.sendall(PREFACE + frame(SETTINGS, 0, 0) + (frame(SETTINGS, ACK, 0) if ack else b""))
        threading.Thread(target=self._read, daemon=True).start()

    def request_headers(self, path: str, token: str | None = None) -> list[tuple[bytes, bytes]]:
        headers = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path.encode()),
                   (b":authority", f"127.0.0.1:{self.port}".encode()),
                   (b"content-type", b"application/grpc"), (b"te", b"trailers")]
        if token is not None:
            headers.append((b"authorization", f"Bearer {token}".encode()))
        return headers

    def headers_frames(self, stream: int, headers: Sequence[tuple[bytes, bytes]],
                       end_stream: bool = False) -> bytes:
        """HEADERS (+ CONTINUATION frames when the block is longer than a frame)."""
        block = self.encoder.encode(headers, huffman=False)
        chunks = [block[i:i + MAX_FRAME] for i in range(0, len(block), MAX_FRAME)] or [b""]
        out = []
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            flags = (END_HEADERS if last else 0) | (END_STREAM if i == 0 and end_stream else 0)
            out.append(frame(HEADERS if i == 0 else CONTINUATION, flags, stream, chunk))
        return b"".join(out)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _read(self) -> None:
        buffer = b""
        try:
            while chunk := self.sock.recv(1 << 16):
                buffer += chunk
                while len(buffer) >= 9:
                    length = int.from_bytes(buffer[:3], "big")
                    if len(buffer) < 9 + length:
                        break
                    kind, flags = buffer[3], buffer[4]
                    stream = int.from_bytes(buffer[5:9], "big") & 0x7FFF_FFFF
                    payload, buffer = buffer[9:9 + length], buffer[9 + length:]
                    if kind == HEADERS:
                        for key, value in self.decoder.decode(payload):
                            if key == "grpc-status":
                                self.statuses[stream] = value
                    if (kind in (HEADERS, DATA) and flags & END_STREAM) or kind == RST_STREAM:
                        self.ended.add(stream)
        except (OSError, hpack.HPACKError):
            pass
        finally:
            self.closed.set()

    def close(self) -> None:
        self.sock.close()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def wait_serving(target: str, timeout: float = 60) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + timeout
        while True:
            try:
                answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=5, wait_for_ready=True)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, "the server never became SERVING"
            time.sleep(0.1)


def start(spawn: Any, tiny_repo: Path, *args: str, env: dict[str, str] | None = None) -> tuple[Any, str]:
    server = spawn("--model-repo", str(tiny_repo), "--model-name", "tiny", "--log-format", "json",
                   *args, env=env)
    target = server.target()
    wait_serving(target)
    return server, target


def stop(server: ServerProcess) -> None:
    server.send_signal(signal.SIGTERM)
    assert server.wait(30) == 0, server.log


def assert_all_json(lines: Sequence[str]) -> None:
    for line in lines:
        try:
            json.loads(line)
        except ValueError:
            raise AssertionError(f"a line on the server's stderr is not JSON: {line[:300]!r}") from None


# --- the options every listener gets ------------------------------------------------------------

def test_every_listener_gets_the_http2_limits_from_flags_and_environment(tmp_path: Path) -> None:
    from digitserve.server.app import server_options
    from digitserve.server.settings import load_settings

    env = {"MNIST_MODEL_REPO": str(tmp_path), "MNIST_MAX_CONNECTION_IDLE": "30"}
    defaults = dict(server_options(load_settings([], {"MNIST_MODEL_REPO": str(tmp_path)})))
    assert {key: defaults[key] for key in (
        "grpc.max_concurrent_streams", "grpc.max_connection_idle_ms", "grpc.keepalive_time_ms",
        "grpc.keepalive_timeout_ms", "grpc.http2.min_ping_interval_without_data_ms",
        "grpc.http2.max_ping_strikes", "grpc.max_metadata_size", "grpc.absolute_max_metadata_size",
    )} == {
        "grpc.max_concurrent_streams": 100, "grpc.max_connection_idle_ms": 60_000,
        "grpc.keepalive_time_ms": 60_000, "grpc.keepalive_timeout_ms": 20_000,
        "grpc.http2.min_ping_interval_without_data_ms": 10_000, "grpc.http2.max_ping_strikes": 2,
        "grpc.max_metadata_size": 8192, "grpc.absolute_max_metadata_size": 8192,
    }
    options = dict(server_options(load_settings(
        ["--max-concurrent-streams", "8", "--keepalive-time", "0", "--max-metadata-bytes", "4096"], env)))
    assert options["grpc.max_concurrent_streams"] == 8
    assert options["grpc.max_connection_idle_ms"] == 30_000
    assert options["grpc.keepalive_time_ms"] == 2**31 - 1  # 0: no keepalive pings
    assert options["grpc.max_metadata_size"] == options["grpc.absolute_max_metadata_size"] == 4096
    off = dict(server_options(load_settings(["--max-connection-idle", "0"], env)))
    assert "grpc.max_connection_idle_ms" not in off
    # The rapid reset's guard, with a headroom for streams ended but not yet released, and the
    # handshake limit; the connection cap below the file limit, less the HTTP edge's connections.
    assert {key: defaults[key] for key in (
        "grpc.http.overload_protection", "grpc.http2.max_deallocating_streams",
        "grpc.server_handshake_timeout_ms")} == {
        "grpc.http.overload_protection": 1, "grpc.http2.max_deallocating_streams": 100,
        "grpc.server_handshake_timeout_ms": 10_000}
    files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if files != resource.RLIM_INFINITY:
        assert defaults["grpc.max_allowed_incoming_connections"] == max(16, files - 128)
        with_http = dict(server_options(load_settings(["--http-port", "0"], env)))
        assert with_http["grpc.max_allowed_incoming_connections"] == max(16, files - 128 - 512)
    options = dict(server_options(load_settings(
        ["--max-connections", "300", "--max-deallocating-streams", "7", "--handshake-timeout", "2.5"], env)))
    assert (options["grpc.max_allowed_incoming_connections"], options["grpc.http2.max_deallocating_streams"],
            options["grpc.server_handshake_timeout_ms"]) == (300, 7, 2500)
    with pytest.raises(ValueError) as bad:
        load_settings(["--max-connections", "-1", "--max-deallocating-streams", "-1",
                       "--handshake-timeout", "0"], env)
    assert str(bad.value) == (
        "max deallocating streams -1 is negative; handshake timeout 0.0 is not positive; "
        "max connections -1 is negative")
    with pytest.raises(ValueError) as bad:
        load_settings(["--max-concurrent-streams", "0", "--max-connection-idle", "-1",
                       "--keepalive-timeout", "0", "--max-metadata-bytes", "100"], env)
    assert str(bad.value) == (
        "max concurrent streams 0 is below 1; max connection idle -1.0 is negative; "
        "keepalive timeout 0.0 is not positive; max metadata bytes 100 is below 1024")


# --- a flood of data-less streams ---------------------------------------------------------------

FLOOD_SECONDS = 4.0
FLOOD_CONNECTIONS = 4
# 4 connections x 100 streams held open (the per-connection limit) cost a few MB of call state;
# the rest of the flood is refused by grpc core before any Python runs. On main the same 4 s
# grew the process by 270-300 MB (1 GB in the 30 s).
RSS_GROWTH_BOUND_MB = 48.0


def flood(port: int, stop_at: float, token: str | None, ack: bool, sent: list[int]) -> None:
    """HEADERS frames opening new Predict streams, 100 per write, never any DATA."""
    connection = RawConnection(port, ack)
    headers = connection.request_headers(PREDICT, token)
    send_bursts(connection, stop_at, sent, 1, 0, lambda stream: b"".join(
        connection.headers_frames(stream + 2 * i, headers) for i in range(100)))


def send_bursts(connection: RawConnection, stop_at: float, sent: list[int], stream: int, count: int,
                burst: Callable[[int], bytes]) -> None:
    """Writes ``burst(first stream id)`` (100 streams' frames) until ``stop_at`` or the server
    closes the connection; appends how many streams were opened to ``sent``, then closes."""
    try:
        while time.monotonic() < stop_at and not connection.closed.is_set():
            connection.send(burst(stream))
            stream += 200
            count += 100
    except OSError:
        pass
    finally:
        sent.append(count)
        connection.close()


@pytest.mark.parametrize(("token", "ack"), [(None, False), (TOKEN, True)],
                         ids=["open-settings-unacknowledged", "token-settings-acknowledged"])
def test_a_stream_flood_leaves_well_behaved_calls_ok_and_memory_bounded(
    spawn: Any, tiny_repo: Path, token: str | None, ack: bool
) -> None:
    env = {"MNIST_AUTH_TOKEN": token} if token else None
    server, target = start(spawn, tiny_repo, env=env)
    port = int(target.rsplit(":", 1)[1])
    before = rss_mb(server.proc.pid)
    stop_at = time.monotonic() + FLOOD_SECONDS
    sent: list[int] = []
    floods = [threading.Thread(target=flood, args=(port, stop_at, token, ack, sent), daemon=True)
              for _ in range(FLOOD_CONNECTIONS)]
    for thread in floods:
        thread.start()
    ok, failed = 0, []
    metadata = [("authorization", f"Bearer {token}")] if token else None
    request = pb.PredictRequest(images=[pb.Image(uint8=bytes(784))])
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.DigitServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < stop_at:
            for call in (lambda: stub.Predict(request, timeout=2, metadata=metadata),
                         lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=2)):
                try:
                    call()
                    ok += 1
                except grpc.RpcError as exc:
                    failed.append(exc.code())
            time.sleep(0.05)
    for thread in floods:
        thread.join(10)
    after = rss_mb(server.proc.pid)
    total = ok + len(failed)
    print(f"\nstream flood ({'token required' if token else 'no token'}, SETTINGS "
          f"{'acknowledged' if ack else 'never acknowledged'}): {sum(sent):,} streams "
          f"opened on {FLOOD_CONNECTIONS} connections in {FLOOD_SECONDS:.0f} s; well-behaved calls "
          f"{ok}/{total} OK ({100 * ok / max(total, 1):.1f} %), "
          f"failures {dict(Counter(code.name for code in failed))}; "
          f"RSS {before:.0f} -> {after:.0f} MB (+{after - before:.0f}, bound {RSS_GROWTH_BOUND_MB:.0f})")
    assert total >= 10
    assert ok >= 0.95 * total, failed
    assert after - before <= RSS_GROWTH_BOUND_MB
    wait_serving(target, timeout=10)
    stop(server)
    assert_all_json(server.lines)


# --- HTTP/2 rapid reset --------------------------------------------------------------------------

RESET_SECONDS = 8.0
RESET_CONNECTIONS = 2
CANCEL = struct.pack(">I", 8)  # RST_STREAM error code CANCEL


def rapid_reset(port: int, stop_at: float, sent: list[int]) -> None:
    """HTTP/2 rapid reset (CVE-2023-44487): HEADERS opening a Predict stream and RST_STREAM
    cancelling it at once, 100 pairs per write, no token, the server's SETTINGS acknowledged."""
    connection = RawConnection(port, ack=True)
    headers = connection.request_headers(PREDICT)
    first = connection.encoder.encode(headers, huffman=False)
    block = connection.encoder.encode(headers, huffman=False)  # indexed: the same bytes each time
    connection.send(frame(HEADERS, END_HEADERS, 1, first) + frame(RST_STREAM, 0, 1, CANCEL))
    send_bursts(connection, stop_at, sent, 3, 1, lambda stream: b"".join(
        frame(HEADERS, END_HEADERS, s, block) + frame(RST_STREAM, 0, s, CANCEL)
        for s in range(stream, stream + 200, 2)))


def test_a_rapid_reset_leaves_every_well_behaved_call_ok(spawn: Any, tiny_repo: Path) -> None:
    server, target = start(spawn, tiny_repo)
    port = int(target.rsplit(":", 1)[1])
    before = rss_mb(server.proc.pid)
    stop_at = time.monotonic() + RESET_SECONDS
    sent: list[int] = []
    attackers = [threading.Thread(target=rapid_reset, args=(port, stop_at, sent), daemon=True)
                 for _ in range(RESET_CONNECTIONS)]
    for thread in attackers:
        thread.start()
    codes: list[str] = []
    request = pb.PredictRequest(images=[pb.Image(uint8=bytes(784))])
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.DigitServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < stop_at:
            for call in (lambda: stub.Predict(request, timeout=5),
                         lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5)):
                try:
                    call()
                    codes.append("OK")
                except grpc.RpcError as exc:
                    codes.append(exc.code().name)
            time.sleep(0.05)
    for thread in attackers:
        thread.join(10)
    ended = time.monotonic()
    after = rss_mb(server.proc.pid)
    wait_serving(target, timeout=10)  # and it answers at once afterwards
    recovered = time.monotonic() - ended
    print(f"\nrapid reset: {sum(sent):,} HEADERS+RST_STREAM pairs on {RESET_CONNECTIONS} connections in "
          f"{RESET_SECONDS:.0f} s; well-behaved calls on another connection "
          f"{codes.count('OK')}/{len(codes)} OK "
          f"({dict(Counter(codes))}); health SERVING {recovered:.2f} s after; RSS {before:.0f} -> "
          f"{after:.0f} MB (bound +{RSS_GROWTH_BOUND_MB:.0f})")
    assert len(codes) >= 6  # the attackers share this process's GIL with the client
    assert codes.count("OK") == len(codes), Counter(codes)  # on 8aac2c8 most were CANCELLED
    assert after - before <= RSS_GROWTH_BOUND_MB
    stop(server)
    assert_all_json(server.lines)


# --- idle connections past the file-descriptor limit --------------------------------------------

IDLE_CONNECTIONS = 1100
FD_LIMIT = 1024
SETTINGS_FRAME = frame(SETTINGS, 0, 0)


@pytest.mark.parametrize(("speaks", "env", "limit"), [
    (False, {}, 10.0),  # TCP only: closed at the handshake timeout (--handshake-timeout, 10 s)
    (True, {"MNIST_MAX_CONNECTION_IDLE": "2"}, 2.0),  # HTTP/2 without calls: --max-connection-idle
], ids=["raw-tcp-defaults", "http2-idle-2s"])
def test_idle_connections_past_the_fd_limit_leave_room_for_a_new_client(
    spawn: Any, tiny_repo: Path, speaks: bool, env: dict[str, str], limit: float
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = IDLE_CONNECTIONS + 200
    if hard != resource.RLIM_INFINITY and hard < wanted:
        skip_or_fail(f"this process may open {hard} files, the test needs {wanted} "
                     f"(raise the hard limit: ulimit -Hn {wanted})")
    # systemd's default limit, for the server process only (as `prlimit --nofile=1024`), from its
    # start: the server sizes its connection cap by it.
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, hard))
    try:
        server, target = start(spawn, tiny_repo, env=env)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    resource.prlimit(server.proc.pid, resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))
    port = int(target.rsplit(":", 1)[1])
    idle = []
    codes: list[str] = []
    first_ok = None
    try:
        for _ in range(IDLE_CONNECTIONS):  # one client, all from 127.0.0.1
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            if speaks:
                sock.sendall(PREFACE + SETTINGS_FRAME + frame(SETTINGS, ACK, 0))
            idle.append(sock)
        started = time.monotonic()
        # A new client's health checks, each on a new channel, until 15 s after the limit.
        while time.monotonic() < started + limit + 15:
            with grpc.insecure_channel(target) as channel:
                try:
                    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
                    codes.append("OK")
                    if first_ok is None:
                        first_ok = time.monotonic() - started
                except grpc.RpcError as exc:
                    codes.append(exc.code().name)
            time.sleep(0.25)
    finally:
        for sock in idle:
            sock.close()
    stop(server)
    native = [json.loads(line) for line in server.lines if '"logger": "native"' in line]
    after = codes[next((i for i, code in enumerate(codes) if code == "OK"), len(codes)):]
    print(f"\nidle connections ({'HTTP/2' if speaks else 'TCP only'}): {IDLE_CONNECTIONS} from one client "
          f"against a {FD_LIMIT}-file limit: a new client's health checks "
          f"{codes.count('OK')}/{len(codes)} OK "
          f"({dict(Counter(codes))}), the first after {first_ok and round(first_ok, 1)} s "
          f"(limit {limit:.0f} s), "
          f"{after.count('OK')}/{len(after)} OK from then on; {len(native)} native records")
    assert first_ok is not None, f"no health check got in: {Counter(codes)}"
    assert first_ok <= limit + 10  # 10 s: a loaded test machine
    assert after.count("OK") == len(after) >= 10, Counter(after)
    assert_all_json(server.lines)
    # The connection cap (the file limit less the files the server needs) held: grpc never ran
    # out of files (on 8aac2c8 it logged this and new clients waited for an idle one to go).
    assert not [e for e in native if e["message"] == "File descriptor limit reached. Retrying."]


# --- headers that are not UTF-8 -----------------------------------------------------------------

BAD_CALLS = 100
BAD_VALUE = bytes([0xFF, 0xFE]) * 6000  # 12 KB, not UTF-8, under a key without -bin


def grpc_records(lines: Sequence[str]) -> list[str]:
    return [line for line in lines if '"logger": "digitserve.server.access"' not in line]


def test_undecodable_headers_cost_a_bounded_log_and_the_server_keeps_serving(
    spawn: Any, tiny_repo: Path
) -> None:
    server, target = start(spawn, tiny_repo)
    port = int(target.rsplit(":", 1)[1])
    wait_for(lambda: "serving model tiny version 1 from" in server.log, 30, "the last start-up line")
    before_lines = len(server.lines)
    connection = RawConnection(port)
    for i in range(BAD_CALLS):
        stream = 1 + 2 * i
        headers = [*connection.request_headers(HEALTH), (b"x-junk", BAD_VALUE)]
        empty_request = frame(DATA, END_STREAM, stream, b"\x00\x00\x00\x00\x00")
        connection.send(connection.headers_frames(stream, headers) + empty_request)
    deadline = time.monotonic() + 30
    while len(connection.ended) < BAD_CALLS and not connection.closed.is_set():
        assert time.monotonic() < deadline, f"{len(connection.ended)} of {BAD_CALLS} calls answered"
        time.sleep(0.05)
    connection.close()
    # grpc's records of the calls are written before their answers; the server's own lines come
    # out in order after them: wait for SIGHUP's, and count what came before.
    server.send_signal(signal.SIGHUP)
    wait_for(lambda: "SIGHUP reload: still serving version 1" in server.log, 30, "SIGHUP's lines")
    marker = next(i for i, line in enumerate(server.lines) if "SIGHUP received" in line)
    added = grpc_records(server.lines[before_lines:marker])
    added_bytes = sum(len(line) for line in added)
    print(f"\nundecodable headers: {BAD_CALLS} calls with a {len(BAD_VALUE):,}-byte header value that is "
          f"not UTF-8: {len(added)} log lines, {added_bytes:,} bytes beyond the access lines "
          f"({added_bytes / BAD_CALLS:.0f} bytes per call); e.g. {added[0][:200] if added else None}")
    assert len(connection.ended) == BAD_CALLS  # every call answered, the connection kept
    assert len(added) <= BAD_CALLS // 5  # rate-limited: not one record (or more) per call
    assert all(len(line) <= 1024 for line in added)  # one short line each, no traceback
    # A well-formed client (it acknowledges the server's SETTINGS, so the header limit is in
    # force) with a header of the same size: refused every time, before any Python runs.
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(20):
            expect_error(
                lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5,
                                     metadata=[("x-big", "a" * 12000)]),
                grpc.StatusCode.RESOURCE_EXHAUSTED, "received metadata size exceeds hard limit",
            )
        answer = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        predicted = pb_grpc.DigitServiceStub(channel).Predict(
            pb.PredictRequest(images=[pb.Image(uint8=bytes(784))]), timeout=5)
        assert len(predicted.predictions) == 1
    stop(server)
    assert_all_json(server.lines)


# --- the metrics endpoint ------------------------------------------------------------------------

def test_a_half_sent_metrics_request_is_dropped_after_the_read_timeout() -> None:
    telemetry = Telemetry()
    telemetry.metrics_read_timeout = 0.5
    port = telemetry.serve("127.0.0.1", 0)
    try:
        half = socket.create_connection(("127.0.0.1", port))
        half.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never the blank line
        started = time.monotonic()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            assert answer.status == 200 and b"digitserve_" in answer.read()
        half.settimeout(5)
        try:
            assert half.recv(1024) == b""  # closed by the server, nothing answered
        except TimeoutError:
            pytest.fail("a half-sent request still holds its connection (and a thread) after 5 s")
        dropped_after = time.monotonic() - started
        half.close()
        # More half-sent requests than the endpoint serves at once: it answers after the timeout.
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
        for sock in held:
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")
        time.sleep(1.0)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            assert answer.status == 200
        for sock in held:
            sock.close()
        print(f"\nmetrics endpoint: a half-sent request dropped after {dropped_after:.2f} s "
              f"(read timeout 0.5 s); /metrics answered meanwhile, and after 40 more half-sent ones")
        assert 0.4 <= dropped_after <= 5
    finally:
        asyncio.run(telemetry.close())
