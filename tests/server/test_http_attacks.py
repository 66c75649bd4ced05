"""The HTTP edge under the attacks of issue 21, over real connections on 127.0.0.1: bodies the
client abandons (one DEBUG line, counted 499, no traceback), JSON bombs (refused before they are
parsed; big bodies parsed on a thread), one client's idle or slow connections (they cannot lock
another client out; a refused client reads its 503) and a drain (every request sent gets an
answer, none a reset)."""

from __future__ import annotations

import gzip
import http.client
import json
import logging
import re
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from digitserve.server import rest, restcodec
from tests.server.test_http import INFER, call, fp32_body, images_u8, scaled
from tests.servers import ServerThread
from tests.support import scrape, wait_for

OTHER_PEER = "127.0.0.2"  # all of 127.0.0.0/8 is this host: a second client address


def port_of(server: ServerThread) -> int:
    assert server.app.http_port
    return server.app.http_port


# --- item 14: bodies the client abandons -----------------------------------------------------------

def test_abandoned_bodies_are_a_debug_line_each_and_counted_499(
    start_server: Callable[..., ServerThread], caplog: pytest.LogCaptureFixture,
) -> None:
    server = start_server(http_port=0)
    port = port_of(server)
    caplog.set_level(logging.DEBUG, logger="digitserve")
    for _ in range(50):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100000"
                         b"\r\n\r\n" + b'{"inputs": [' + b"0.5, " * 100)
    wait_for(lambda: sum("closed the connection" in r.getMessage() for r in caplog.records) == 50,
             30, "50 lines of abandoned bodies")
    assert [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING] == []
    lines = [r for r in caplog.records if "closed the connection" in r.getMessage()]
    assert {r.levelno for r in lines} == {logging.DEBUG}
    assert re.fullmatch(r"HTTP request POST /v2/models/\{name\}/infer from ipv4:127\.0\.0\.1:\d+: the "
                        r"client closed the connection after [\d,]+ bytes of its body; nothing "
                        r"answered", lines[0].getMessage()), lines[0].getMessage()
    codes = {dict(labels)["code"]: value for (name, labels), value in scrape(port).items()
             if name == "http_server_requests_total" and dict(labels)["method"] == "POST"}
    assert codes == {"499": 50.0}
    answer = call(port, "POST", INFER, fp32_body(scaled(images_u8(1))))
    assert answer.status == 200, answer.body


# --- item 9: JSON bombs ------------------------------------------------------------------------------

@pytest.fixture
def parsed(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str]]:
    """(bytes, thread name) of every JSON body the REST routes parse from now on."""
    seen: list[tuple[int, str]] = []
    loads = orjson.loads

    class Counting:
        JSONDecodeError = orjson.JSONDecodeError

        @staticmethod
        def loads(data: Any) -> Any:
            seen.append((len(data), threading.current_thread().name))
            return loads(data)

        dumps = staticmethod(orjson.dumps)
        OPT_SERIALIZE_NUMPY = orjson.OPT_SERIALIZE_NUMPY
        OPT_APPEND_NEWLINE = orjson.OPT_APPEND_NEWLINE

    monkeypatch.setattr(rest, "orjson", Counting)
    monkeypatch.setattr(restcodec, "orjson", Counting)  # the inference requests' reader
    return seen


def test_a_json_bomb_is_refused_before_it_is_parsed(
    start_server: Callable[..., ServerThread], parsed: list[tuple[int, str]],
) -> None:
    """15.6 KB of gzip inflating to 16 MB of JSON (8 million numbers): refused by counting its
    values, never parsed; the server serves on."""
    server = start_server(http_port=0)  # --max-images-per-request 1024: 806,912 values at most
    port = port_of(server)
    bomb = (b'{"inputs":[{"name":"images","shape":[1,784],"datatype":"FP32","data":['
            + b"0," * 8_000_000 + b'0]}]}')
    packed = gzip.compress(bomb, 9)
    assert len(packed) < 20_000 and len(bomb) < 16 * 1024 * 1024
    for headers, body in (({"Content-Encoding": "gzip"}, packed), ({}, bomb)):
        answer = call(port, "POST", INFER, body, headers)
        assert (answer.status, answer.json) == (400, {"error": (
            "request body: up to 8,000,005 JSON values (8,000,004 commas), more than the 806,912 "
            "that 1024 images of 784 elements (--max-images-per-request) need; send fewer images "
            "per request, or pixels as the binary data extension")})
    assert [size for size, _ in parsed if size > 1_000_000] == []
    assert call(port, "POST", INFER, fp32_body(scaled(images_u8(1)))).status == 200


def test_big_bodies_are_parsed_on_a_thread(
    start_server: Callable[..., ServerThread], parsed: list[tuple[int, str]],
) -> None:
    server = start_server(http_port=0)
    port = port_of(server)
    loop_thread = server.thread.name
    small = json.dumps(fp32_body(scaled(images_u8(1)))).encode()
    big = json.dumps(fp32_body(scaled(images_u8(40, seed=3)))).encode()
    assert len(small) < rest.THREAD_BYTES < len(big)
    for body in (small, big):
        answer = call(port, "POST", INFER, body)
        assert answer.status == 200, answer.body
    threads = {size: name for size, name in parsed}
    assert threads[len(small)] == loop_thread
    assert threads[len(big)] != loop_thread


# --- item 10: one client's connections ------------------------------------------------------------

def ready_from(port: int, source: str) -> int | str:
    """A readiness check on a new connection from ``source``: its status, or what went wrong."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        connection.request("GET", "/v2/health/ready")
        response = connection.getresponse()
        response.read()
        return response.status
    except OSError as exc:
        return type(exc).__name__
    finally:
        connection.close()


def hold(port: int, count: int, first_bytes: bytes = b"") -> list[socket.socket]:
    """``count`` connections from 127.0.0.1, each sending ``first_bytes`` (nothing: idle)."""
    held = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.1", 0))
        if first_bytes:
            sock.sendall(first_bytes)
        held.append(sock)
    return held


def test_idle_connections_of_one_client_cannot_lock_out_another(
    start_server: Callable[..., ServerThread],
) -> None:
    """Idle connections are closed, oldest first, to make room above three quarters of the cap:
    60 idle ones from one client leave the cap of 40 open to the checks of another."""
    server = start_server(http_port=0, http_max_connections=40)
    port = port_of(server)
    held = hold(port, 60)
    try:
        time.sleep(0.5)  # all idle for longer than MIN_IDLE: they may be closed to make room
        assert [ready_from(port, OTHER_PEER) for _ in range(20)] == [200] * 20
        # Each check closed an idle one until three quarters of the cap were left.
        assert server.app.http is not None and len(server.app.http.opened) <= 30
    finally:
        for sock in held:
            sock.close()
    samples = scrape(port)
    assert samples[("http_server_reclaimed_connections_total", frozenset())] >= 10


def test_one_client_gets_at_most_its_share_of_connections(
    start_server: Callable[..., ServerThread],
) -> None:
    """Slow connections (headers never finished) cannot be closed to make room: one address
    holds at most --http-max-connections-per-peer of them, the next ones read a 503, and
    another address is served."""
    server = start_server(http_port=0, http_max_connections=40, http_max_connections_per_peer=8,
                          http_read_timeout=60)
    port = port_of(server)
    held = hold(port, 8, b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n")
    try:
        wait_for(lambda: len(server.app.http.opened) == 8 if server.app.http else False, 10, "8 open")
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", port), timeout=10,
                                          source_address=("127.0.0.1", 0)) as extra:
                extra.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
                reply = b"".join(iter(lambda: extra.recv(4096), b""))
            assert reply.startswith(b"HTTP/1.1 503 Service Unavailable\r\n") and reply.endswith(
                b'{"error":"too many connections from 127.0.0.1: this server answers at most 8 at '
                b'once from one address (--http-max-connections-per-peer); retry later"}\n'), reply
        assert [ready_from(port, OTHER_PEER) for _ in range(10)] == [200] * 10
    finally:
        for sock in held:
            sock.close()
    assert scrape(port)[("http_server_refused_connections_total", frozenset({("reason", "peer")}))] == 5


def test_a_refused_client_reads_its_503_not_a_reset(start_server: Callable[..., ServerThread]) -> None:
    """Over the cap, a client that sends its request (a 256 KB body) at once reads the whole 503:
    the refusal reads what it sends before closing, so the kernel sends no reset."""
    server = start_server(http_port=0, http_max_connections=10, http_read_timeout=60)
    port = port_of(server)
    held = hold(port, 10, b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n")
    request = (b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 262144\r\n\r\n"
               + b" " * 262144)
    outcomes: list[bytes | str] = []
    try:
        wait_for(lambda: len(server.app.http.opened) == 10 if server.app.http else False, 10, "10 open")
        for _ in range(20):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as extra:
                    extra.sendall(request)
                    outcomes.append(b"".join(iter(lambda: extra.recv(65536), b"")))
            except OSError as exc:
                outcomes.append(type(exc).__name__)
    finally:
        for sock in held:
            sock.close()
    expected = (b'{"error":"too many connections: this server answers at most 10 at once '
                b'(--http-max-connections); retry later"}\n')
    assert [o if isinstance(o, str) else o.startswith(b"HTTP/1.1 503 ") and o.endswith(expected)
            for o in outcomes] == [True] * 20, outcomes
    assert scrape(port)[("http_server_refused_connections_total", frozenset({("reason", "limit")}))] == 20


# --- item 15: the drain ------------------------------------------------------------------------------

def test_every_request_sent_during_a_drain_gets_an_answer(spawn: Any, tiny_repo: Path) -> None:
    """Keep-alive clients send requests in a loop while the server gets SIGTERM, and go on
    (reconnecting after ``Connection: close``, as http.client does) until the server stops
    listening: each request sent is answered, 200 or 503; none sees a reset or a connection
    closed without an answer, the drain's 503s say ``Connection: close``. Exit 0."""
    server = spawn("--model-repo", str(tiny_repo), "--http-port", "0", "--grace-period", "10",
                   "--log-format", "text")
    server.target()
    found = wait_for(lambda: re.search(r"REST\) on http://127\.0\.0\.1:(\d+)/v2", server.log), 60,
                     "the HTTP port")
    port = int(found.group(1))
    wait_for(lambda: ready_from(port, "127.0.0.1") == 200, 120, "readiness")
    body = json.dumps(fp32_body(scaled(images_u8(1)))).encode()
    results: list[list[Any]] = []

    def client() -> None:
        seen: list[Any] = []
        results.append(seen)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while True:
            try:
                connection.request("POST", INFER, body=body)
                response = connection.getresponse()
                response.read()
            except ConnectionRefusedError:  # nothing sent: the server stopped listening
                seen.append("refused")
                return
            except (OSError, http.client.HTTPException) as exc:
                seen.append(type(exc).__name__)
                return
            seen.append((response.status, response.getheader("Connection")))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(8)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(results) == 8 and all(len(r) >= 5 for r in results), 60, "load")
    server.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(60)
    assert server.wait(60) == 0
    for seen in results:
        assert seen[-1] == "refused" and {a[0] for a in seen[:-1]} <= {200, 503}, seen
        assert {a for a in seen[:-1] if a[0] == 503} <= {(503, "close")}, seen
    assert any((503, "close") in seen for seen in results), results  # the drain answered some
