"""The client pointed at a server's HTTP port (--http-port) instead of its gRPC port: one line
naming it, from the library (ConnectError) and the CLI (exit 1), against a real server."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import pytest

from digitserve.client import ConnectError
from digitserve.client.cli import main
from digitserve.client.client import DigitClient
from tests.servers import ServerThread

HINT = ("it answers HTTP/1, not gRPC: it looks like the server's --http-port; use the gRPC port "
        "(--port, default 50051)")


def test_the_http_port_is_named(start_server: Callable[..., ServerThread],
                                capsys: pytest.CaptureFixture[str]) -> None:
    server = start_server(http_port=0)
    target = f"127.0.0.1:{server.app.http_port}"
    started = time.monotonic()
    with DigitClient(target) as client, pytest.raises(ConnectError) as caught:
        client.predict([0] * 784)
    assert str(caught.value) == f"cannot connect to {target}: {HINT}"
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert main(["--target", target, "info"]) == 1
    assert capsys.readouterr().err == f"mnist-client: error: cannot connect to {target}: {HINT}\n"
    assert time.monotonic() - started < 30  # at once, not after deadlines
