"""The client's errors are one tree under ``DigitServeError`` (issue 22): a caller catches every
failure of the library without importing grpc, each refusal of a real server arrives as the class
of its status code with the code and the server's own message, and what the library refuses before
sending (images, TLS files, load-test settings) is under the same root."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from digitserve.client import (
    CallError,
    ClientSecurityError,
    DigitClient,
    DigitServeError,
    ImageError,
    InvalidInputError,
    NotServedError,
    OverloadedError,
    UnauthenticatedError,
)
from digitserve.client.security import read_token
from digitserve.pictures import ImageError as PictureError
from digitserve.v1 import digit_service_pb2 as pb
from tests.servers import ServerThread
from tests.support import REPO_ROOT

IMAGE = np.zeros((28, 28), np.uint8)


def raw_refusal(target: str, request: pb.PredictRequest) -> grpc.RpcError:
    """What grpc's own client gets for ``request``: the oracle of code and message."""
    with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError) as info:
        channel.unary_unary("/digitserve.v1.DigitService/Predict")(request.SerializeToString(),
                                                                    timeout=10)
    return info.value


@pytest.mark.parametrize(("kwargs", "request_fields", "kind", "code"), [
    ({"model_version": 7}, {"model_version": 7}, NotServedError, grpc.StatusCode.NOT_FOUND),
    ({"model_name": "nope"}, {"model_name": "nope"}, NotServedError, grpc.StatusCode.NOT_FOUND),
    ({"model_version": 1, "label": "stable"}, {"model_version": 1, "version_label": "stable"},
     InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
], ids=["version", "model", "version-and-label"])
def test_a_refusal_is_the_class_of_its_code_with_the_servers_message(
        tiny_server: ServerThread, kwargs: dict[str, object], request_fields: dict[str, object],
        kind: type[CallError], code: grpc.StatusCode) -> None:
    raw = raw_refusal(tiny_server.target, pb.PredictRequest(
        images=[pb.Image(uint8=IMAGE.tobytes())], **request_fields))  # type: ignore[arg-type]
    with DigitClient(tiny_server.target) as client, pytest.raises(DigitServeError) as info:
        client.predict(IMAGE, **kwargs)  # type: ignore[arg-type]
    error = info.value
    assert type(error) is kind and isinstance(error, CallError)
    assert (error.code(), error.details()) == (code, raw.details()) == (raw.code(), raw.details())
    assert str(error) == f"{code.name}: {raw.details()}"


def test_an_overloaded_server_is_an_overloaded_error(
        start_server: Callable[..., ServerThread]) -> None:
    # 100-image calls queue (the tiny model runs up to 64 on the loop); 8 callers against a bound
    # of 200 queued images: some are refused RESOURCE_EXHAUSTED.
    server = start_server(max_queued_images=200, max_images_per_request=100)
    refused: list[BaseException] = []
    stop = threading.Event()

    def caller() -> None:
        with DigitClient(server.target, timeout=30) as client:
            for _ in range(200):
                if stop.is_set():
                    return
                try:
                    client.predict(np.zeros((100, 784), np.uint8))
                except DigitServeError as exc:
                    refused.append(exc)
                    stop.set()

    threads = [threading.Thread(target=caller, daemon=True) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert refused, "no call was refused"
    assert all(type(e) is OverloadedError and e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
               for e in refused), refused
    assert server.plane.batcher.stats.rejected >= len(refused)


def test_a_missing_token_is_an_unauthenticated_error(
        start_server: Callable[..., ServerThread]) -> None:
    server = start_server(auth_token="s3cret-token")
    with DigitClient(server.target) as client, pytest.raises(UnauthenticatedError) as info:
        client.model_info()
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and info.value.details()
    with DigitClient(server.target, token="s3cret-token") as client:
        assert client.model_info()["name"] == "tiny"


def test_what_the_library_refuses_itself_is_under_the_same_root(
        tiny_server: ServerThread, tmp_path: Path) -> None:
    with DigitClient(tiny_server.target) as client, pytest.raises(DigitServeError) as info:
        client.predict(b"not a picture")  # refused before any call
    assert type(info.value) is ImageError
    assert isinstance(info.value, ValueError) and isinstance(info.value, PictureError)
    assert str(info.value).startswith("not a PNG, JPEG or WebP image")
    (tmp_path / "token").write_text("\n\n")
    with pytest.raises(DigitServeError) as security:
        read_token(tmp_path / "token")
    assert type(security.value) is ClientSecurityError
    from digitserve import loadtest

    with pytest.raises(DigitServeError) as load:
        loadtest.LoadConfig(target="127.0.0.1:1", concurrency=0)
    assert type(load.value) is loadtest.LoadTestError
    assert str(load.value) == "concurrency 0 must be at least 1"


def test_a_caller_catches_every_failure_without_importing_grpc(tmp_path: Path) -> None:
    script = tmp_path / "caller.py"
    script.write_text(  # a caller that imports digitserve.client and nothing else
        "from digitserve.client import DigitClient, DigitServeError\n"
        "with DigitClient('127.0.0.1:1') as client:\n"
        "    try:\n"
        "        client.health()\n"
        "    except DigitServeError as exc:\n"
        "        print(type(exc).__name__, exc.code().name, exc)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": os.environ.get(
                              "PYTHONPATH", str(REPO_ROOT))})
    assert done.returncode == 0, done.stderr
    assert done.stdout == ("ConnectError UNAVAILABLE cannot connect to 127.0.0.1:1: connection "
                           "refused (is mnist-serve running?)\n")


def test_the_clients_errors_are_its_own_not_grpcs(tiny_server: ServerThread) -> None:
    """Not ``grpc.RpcError``s (the issue names that as a fault): ``except grpc.RpcError`` around a
    DigitClient call does not catch its refusal, ``except CallError`` does, with grpc's code and
    message."""
    from digitserve.client import ConnectError

    assert [c for c in ConnectError.__mro__ if c.__module__.startswith("grpc")] == []
    with DigitClient(tiny_server.target) as client, pytest.raises(CallError) as info:
        try:
            client.predict(IMAGE, model_version=7)
        except grpc.RpcError:  # never taken: not grpc's error
            pytest.fail("a DigitClient refusal was caught as grpc.RpcError")
    raw = raw_refusal(tiny_server.target, pb.PredictRequest(images=[pb.Image(uint8=IMAGE.tobytes())],
                                                             model_version=7))
    assert (info.value.code(), info.value.details()) == (raw.code(), raw.details())
