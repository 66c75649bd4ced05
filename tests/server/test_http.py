"""The HTTP/JSON edge (--http-port, the Open Inference Protocol's REST binding) over real HTTP
connections on 127.0.0.1: every route, each error status with its exact JSON body (the same message
as the V2 gRPC edge for the same fault), the token, the limits (body, headers, slow clients,
connections), readiness before the load and during a drain, the binary-data extension, and
tritonclient.http (in a subprocess) against the tiny model served from its repository."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import http.client
import json
import logging
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest

from digitserve.client.client import DigitClient
from digitserve.oip import grpc_predict_v2_pb2 as oip
from digitserve.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from digitserve.server.security import INVALID_TOKEN, MISSING_TOKEN
from tests.servers import ServerThread
from tests.support import require_module, require_tool, tiny_litert, wait_for

D = 784
INFER = "/v2/models/tiny/infer"
SHUTTING_DOWN = "the server is shutting down; send the request to another replica"


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def call(port: int, method: str, path: str, body: bytes | dict[str, Any] | list[Any] | None = None,
         headers: dict[str, str] | None = None, timeout: float = 30) -> Answer:
    """One request on a connection of its own."""
    if isinstance(body, dict | list):
        body = json.dumps(body).encode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()


def images_u8(n: int, seed: int = 0) -> npt.NDArray[np.uint8]:
    return np.random.default_rng(seed).integers(0, 256, size=(n, D), dtype=np.uint8)


def scaled(images: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    return images.astype(np.float32) / np.float32(255)


def fp32_body(pixels: npt.NDArray[np.float32], **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "images", "shape": list(pixels.shape), "datatype": "FP32",
                        "data": pixels.ravel().tolist()}], **extra}


@pytest.fixture
def server(start_server: Callable[..., ServerThread]) -> ServerThread:
    """The tiny model from its repository, as mnist-serve serves it, with --http-port 0."""
    return start_server(http_port=0, max_images_per_request=8)


def port_of(server: ServerThread) -> int:
    assert server.app.http_port
    return server.app.http_port


# --- every route ---------------------------------------------------------------------------------

def test_every_route_answers_json(server: ServerThread, tiny_repo: Path) -> None:
    port = port_of(server)
    assert call(port, "GET", "/v2/health/live").json == {"live": True}
    ready = call(port, "GET", "/v2/health/ready")
    assert (ready.status, ready.json) == (200, {"ready": True})
    assert ready.headers["content-type"] == "application/json"
    meta = call(port, "GET", "/v2").json
    assert meta["name"] == "digitserve"
    assert meta["extensions"] == ["binary_tensor_data", "model_configuration", "statistics",
                                  "model_repository"]
    platform = {"litert": "litert_tflite", "tensorflow": "tensorflow_keras"}[
        server.app.registry.model("tiny").served.inference_path]
    model = {"name": "tiny", "versions": ["1"], "platform": platform,
             "inputs": [{"name": "images", "datatype": "UINT8", "shape": [-1, D]}],
             "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
                         {"name": "class_index", "datatype": "INT64", "shape": [-1]},
                         {"name": "label", "datatype": "BYTES", "shape": [-1]}]}
    assert call(port, "GET", "/v2/models/tiny").json == model
    assert call(port, "GET", "/v2/models/tiny/versions/1").json == model
    assert call(port, "GET", "/v2/models/tiny/ready").json == {"name": "tiny", "ready": True}
    assert call(port, "GET", "/v2/models/tiny/versions/1/ready").json == {
        "name": "tiny", "version": "1", "ready": True}
    assert call(port, "HEAD", "/v2/health/ready").status == 200
    index = [{"name": "tiny", "version": "1", "state": "READY", "reason": "", "labels": []}]
    assert call(port, "POST", "/v2/repository/index").json == index
    assert call(port, "POST", "/v2/repository/index", {"ready": True}).json == index

    pixels = scaled(images_u8(3))
    expected = tiny_litert(tiny_repo).predict(pixels)
    for path in (INFER, "/v2/models/tiny/versions/1/infer"):
        answer = call(port, "POST", path, fp32_body(pixels, id="abc"))
        assert answer.status == 200, answer.body
        body = answer.json
        assert (body["model_name"], body["model_version"], body["id"]) == ("tiny", "1", "abc")
        outputs = {o["name"]: o for o in body["outputs"]}
        assert [o["name"] for o in body["outputs"]] == ["probabilities", "class_index", "label"]
        assert outputs["probabilities"]["shape"] == [3, 10] and outputs["probabilities"]["datatype"] == "FP32"
        probabilities = np.asarray(outputs["probabilities"]["data"], np.float32).reshape(3, 10)
        np.testing.assert_allclose(probabilities, expected, rtol=0, atol=1e-6)
        assert outputs["class_index"]["data"] == expected.argmax(axis=1).tolist()
        assert outputs["label"]["data"] == [str(i) for i in expected.argmax(axis=1)]
    # UINT8 pixels, nested arrays, one output asked for; the request id echoed in a header.
    u8 = images_u8(2, seed=4)
    nested = {"inputs": [{"name": "images", "shape": [2, 28, 28], "datatype": "UINT8",
                          "data": u8.reshape(2, 28, 28).tolist()}], "outputs": [{"name": "label"}]}
    answer = call(port, "POST", INFER, nested, headers={"X-Request-Id": "req-7"})
    assert answer.headers["x-request-id"] == "req-7"
    assert answer.json["outputs"] == [{"name": "label", "datatype": "BYTES", "shape": [2], "data": [
        str(i) for i in tiny_litert(tiny_repo).predict(scaled(u8)).argmax(axis=1)]}]
    metrics = call(port, "GET", "/metrics")
    assert metrics.status == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.body.decode()
    assert 'http_server_requests_total{code="200",method="POST",route="/v2/models/{name}/infer"} 2.0' in text
    assert ('http_server_requests_total{code="200",method="POST",route="/v2/models/{name}/versions/{version}/'
            'infer"} 1.0') in text
    assert 'digitserve_model_request_seconds_count{model_name="tiny",model_version="1"} 3.0' in text


def test_the_answers_equal_digitclient_and_the_v2_grpc_edge(server: ServerThread) -> None:
    pixels = images_u8(5, seed=9)
    with DigitClient(server.target, timeout=30) as client:
        ours = client.predict(pixels)
    answer = call(port_of(server), "POST", INFER, {"inputs": [
        {"name": "images", "shape": [5, D], "datatype": "UINT8", "data": pixels.ravel().tolist()}]})
    got = np.asarray(answer.json["outputs"][0]["data"], np.float32).reshape(5, 10)
    np.testing.assert_allclose(got, ours.probabilities, rtol=0, atol=1e-6)


# --- the binary data extension -------------------------------------------------------------------

def binary_request(pixels: npt.NDArray[Any], datatype: str, outputs: dict[str, bool] | None = None,
                   binary_output: bool | None = None) -> tuple[bytes, dict[str, str]]:
    raw = pixels.astype("<f4" if datatype == "FP32" else np.uint8).tobytes()
    header: dict[str, Any] = {"inputs": [{"name": "images", "shape": list(pixels.shape), "datatype": datatype,
                                          "parameters": {"binary_data_size": len(raw)}}]}
    if outputs is not None:
        header["outputs"] = [{"name": n, "parameters": {"binary_data": b}} for n, b in outputs.items()]
    if binary_output is not None:
        header["parameters"] = {"binary_data_output": binary_output}
    text = json.dumps(header).encode()
    return text + raw, {"Inference-Header-Content-Length": str(len(text)),
                        "Content-Type": "application/octet-stream"}


def split_binary(answer: Answer) -> tuple[dict[str, Any], dict[str, bytes]]:
    length = int(answer.headers["inference-header-content-length"])
    header = json.loads(answer.body[:length])
    blobs, offset = {}, length
    for output in header["outputs"]:
        size = output.get("parameters", {}).get("binary_data_size")
        if size is not None:
            blobs[output["name"]] = answer.body[offset:offset + size]
            offset += size
    assert offset == len(answer.body)
    return header, blobs


def test_binary_data_extension_in_and_out(server: ServerThread, tiny_repo: Path) -> None:
    port = port_of(server)
    pixels = scaled(images_u8(4, seed=3))
    expected = tiny_litert(tiny_repo).predict(pixels)
    body, headers = binary_request(pixels, "FP32", binary_output=True)
    answer = call(port, "POST", INFER, body, headers)
    assert answer.status == 200 and answer.headers["content-type"] == "application/octet-stream"
    header, blobs = split_binary(answer)
    got = np.frombuffer(blobs["probabilities"], "<f4").reshape(4, 10)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert np.frombuffer(blobs["class_index"], "<i8").tolist() == expected.argmax(axis=1).tolist()
    labels, offset = [], 0
    while offset < len(blobs["label"]):
        (size,) = struct.unpack_from("<I", blobs["label"], offset)
        labels.append(blobs["label"][offset + 4:offset + 4 + size].decode())
        offset += 4 + size
    assert labels == [str(i) for i in expected.argmax(axis=1)]
    # Binary input, one binary output and one JSON output.
    body, headers = binary_request(images_u8(4, seed=3), "UINT8",
                                   outputs={"probabilities": True, "class_index": False})
    header, blobs = split_binary(call(port, "POST", INFER, body, headers))
    assert header["outputs"][1] == {"name": "class_index", "datatype": "INT64", "shape": [4],
                                    "data": expected.argmax(axis=1).tolist()}
    got = np.frombuffer(blobs["probabilities"], "<f4").reshape(4, 10)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


# --- errors: the same message as gRPC, the right status, JSON ------------------------------------

def grpc_error(target: str, request: oip.ModelInferRequest) -> str:
    with grpc.insecure_channel(target) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=30)
    details: str = info.value.details()
    return details


def as_json_fields(message: str) -> str:
    """A gRPC message with its fields named as the JSON request names them."""
    for contents in ("fp32_contents", "uint_contents"):
        message = message.replace(f"inputs[0].contents.{contents}", "inputs[0].data")
    return message


def _tensor(datatype: str, shape: list[int], values: list[Any], name: str = "images") -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape, "data": values}


def _proto(datatype: str, shape: list[int], values: list[Any], name: str = "images",
           model: str = "tiny", version: str = "") -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name=model, model_version=version)
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
    if datatype == "FP32":
        tensor.contents.fp32_contents.extend(values)
    elif datatype == "UINT8":
        tensor.contents.uint_contents.extend(values)
    return request


def _pixels(n: int = 1) -> list[float]:
    return scaled(images_u8(n, seed=1)).ravel().tolist()


def same_as_grpc_cases() -> list[Any]:
    """(path, JSON body, the equivalent gRPC request, HTTP status): the HTTP message must be the
    gRPC one with the fields renamed."""
    negative = _pixels()
    negative[5] = -0.5
    high = _pixels()
    high[17] = 1.5
    u8 = images_u8(1).ravel().tolist()
    u8[3] = 256
    cases = [
        ("shape", INFER, [_tensor("FP32", [1, 785], _pixels())], _proto("FP32", [1, 785], _pixels()), 400),
        ("datatype", INFER, [_tensor("INT32", [1, D], [0] * D)], _proto("INT32", [1, D], []), 400),
        ("input name", INFER, [_tensor("FP32", [1, D], _pixels(), "x")],
         _proto("FP32", [1, D], _pixels(), "x"), 400),
        ("count", INFER, [_tensor("FP32", [2, D], _pixels())], _proto("FP32", [2, D], _pixels()), 400),
        ("negative", INFER, [_tensor("FP32", [1, D], negative)], _proto("FP32", [1, D], negative), 400),
        ("above 1", INFER, [_tensor("FP32", [1, D], high)], _proto("FP32", [1, D], high), 400),
        ("uint8 256", INFER, [_tensor("UINT8", [1, D], u8)], _proto("UINT8", [1, D], u8), 400),
        ("too many images", INFER, [_tensor("FP32", [9, D], _pixels(9))],
         _proto("FP32", [9, D], _pixels(9)), 400),
        ("empty batch", INFER, [_tensor("FP32", [0, D], [])], _proto("FP32", [0, D], []), 400),
        ("unknown version", "/v2/models/tiny/versions/7/infer", [_tensor("FP32", [1, D], _pixels())],
         _proto("FP32", [1, D], _pixels(), version="7"), 404),
        ("bad version", "/v2/models/tiny/versions/-1/infer", [_tensor("FP32", [1, D], _pixels())],
         _proto("FP32", [1, D], _pixels(), version="-1"), 400),
        ("unknown label", "/v2/models/tiny/versions/canary/infer", [_tensor("FP32", [1, D], _pixels())],
         _proto("FP32", [1, D], _pixels(), version="canary"), 404),
        ("unknown model", "/v2/models/nope/infer", [_tensor("FP32", [1, D], _pixels())],
         _proto("FP32", [1, D], _pixels(), model="nope"), 404),
    ]
    return [pytest.param(path, body, request, status, id=case) for case, path, body, request, status in cases]


@pytest.mark.parametrize(("path", "inputs", "request_", "status"), same_as_grpc_cases())
def test_errors_are_the_grpc_messages_with_their_http_status(
    server: ServerThread, path: str, inputs: list[Any], request_: oip.ModelInferRequest, status: int,
) -> None:
    answer = call(port_of(server), "POST", path, {"inputs": inputs})
    expected = as_json_fields(grpc_error(server.target, request_))
    assert (answer.status, answer.json) == (status, {"error": expected})
    assert answer.headers["content-type"] == "application/json"


def _two_inputs() -> dict[str, Any]:
    return {"inputs": [_tensor("FP32", [1, D], _pixels()), _tensor("FP32", [1, D], _pixels(), "b")]}


JSON_ERRORS = [
    ("malformed JSON", b'{"inputs": [', 400,
     'request body: not valid JSON (unexpected end of data at line 1 column 13); expected an inference '
     'request such as {"inputs": [{"name": "images", "shape": [1, 784], "datatype": "FP32", '
     '"data": [...]}]}'),
    ("not UTF-8", b'\xff\xfe{', 400, "request body: not UTF-8 text; expected an inference request in JSON"),
    ("an array", b"[1, 2]", 400, "request body: an array, expected an object"),
    ("NaN is not JSON", b'{"inputs": [{"data": [NaN]}]}', 400,
     'request body: not valid JSON (unexpected character, expected a JSON value at line 1 column 23); '
     'expected an inference request such as {"inputs": [{"name": "images", "shape": [1, 784], '
     '"datatype": "FP32", "data": [...]}]}'),
    ("no inputs", {"outputs": []}, 400, "inputs: null, expected an array of input tensors"),
    ("input not an object", {"inputs": [3]}, 400, "inputs[0]: a number, expected an object"),
    ("shape of strings", {"inputs": [_tensor("FP32", ["1", D], [])]}, 400,
     'inputs[0].shape: ["1", 784] is not an array of 64-bit integers'),
    ("no data", {"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, D]}]}, 400,
     "inputs[0].data: missing; expected the tensor's elements (or parameters.binary_data_size "
     "with the binary data extension)"),
    ("a string pixel", {"inputs": [_tensor("FP32", [1, D], [0.5, 0.5, "0.5"] + [0.0] * (D - 3))]}, 400,
     "inputs[0].data[2]: a string, expected a number (FP32)"),
    ("a null pixel", {"inputs": [_tensor("FP32", [1, D], [None] * D)]}, 400,
     "inputs[0].data[0]: null, expected a number (FP32)"),
    ("a float for UINT8", {"inputs": [_tensor("UINT8", [1, D], [0, 1.5] + [0] * (D - 2))]}, 400,
     "inputs[0].data[1]: a number, expected an integer (UINT8)"),
    ("a negative UINT8", {"inputs": [_tensor("UINT8", [1, D], [0, 0, -1] + [0] * (D - 3))]}, 400,
     "inputs[0].data[2]: -1 does not fit UINT8; expected 0..255"),
    ("data not an array", {"inputs": [_tensor("FP32", [1, D], 0.5)]}, 400,  # type: ignore[arg-type]
     "inputs[0].data: a number, expected an array of the tensor's elements"),
    ("two inputs", _two_inputs(), 400,
     "inputs: got 2 inputs; model 'tiny' takes one, 'images'"),
    ("unknown output", {"inputs": [_tensor("FP32", [1, D], _pixels())], "outputs": [{"name": "logits"}]},
     400, "outputs[0].name: 'logits' is not an output of model 'tiny'; expected one of "
     "['probabilities', 'class_index', 'label']"),
    ("shared memory", {"inputs": [{**_tensor("FP32", [1, D], _pixels()),
                                   "parameters": {"shared_memory_region": "r0"}}]}, 400,
     "inputs[0].parameters['shared_memory_region']: is not supported by this server"),
    ("id not a string", {"id": 3, "inputs": []}, 400, "id: a number, expected a string"),
]


@pytest.mark.parametrize(("body", "status", "message"),
                         [pytest.param(b, s, m, id=c) for c, b, s, m in JSON_ERRORS])
def test_json_faults_get_one_exact_line(server: ServerThread, body: Any, status: int, message: str) -> None:
    answer = call(port_of(server), "POST", INFER, body)
    assert (answer.status, answer.json) == (status, {"error": message})


def test_routes_methods_and_the_http_layer_refuse_in_json(start_server: Callable[..., ServerThread]) -> None:
    server = start_server(http_port=0, max_message_bytes=64 * 1024)
    port = port_of(server)
    answer = call(port, "GET", "/healthz")
    assert answer.status == 404 and answer.json["error"].startswith("no route GET /healthz; the Open "
                                                                     "Inference Protocol's routes are")
    answer = call(port, "GET", INFER)
    assert (answer.status, answer.json, answer.headers["allow"]) == (
        405, {"error": "GET is not allowed on /v2/models/tiny/infer; use POST"}, "POST")
    # A body over --max-message-bytes: declared (refused before it is read), or sent chunked.
    answer = call(port, "POST", INFER, b"x" * (64 * 1024 + 1))
    assert (answer.status, answer.json) == (413, {"error": (
        "request body: 65,537 bytes exceed the limit of 65,536 (--max-message-bytes); send fewer "
        "images per request, or pixels as the binary data extension")})
    chunked = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    chunked.request("POST", INFER, body=iter([b"y" * 40_000, b"y" * 40_000]), encode_chunked=True,
                    headers={"Transfer-Encoding": "chunked"})
    response = chunked.getresponse()
    assert (response.status, json.loads(response.read())) == (413, {"error": (
        "request body: more than 65,536 bytes exceed the limit of 65,536 (--max-message-bytes); "
        "send fewer images per request, or pixels as the binary data extension")})
    chunked.close()
    # gzip is inflated (no further than the limit); an encoding not supported is 415.
    body = json.dumps(fp32_body(scaled(images_u8(1)))).encode()
    assert call(port, "POST", INFER, gzip.compress(body), {"Content-Encoding": "gzip"}).status == 200
    bomb = gzip.compress(b" " * (10 * 1024 * 1024))
    answer = call(port, "POST", INFER, bomb, {"Content-Encoding": "gzip"})
    assert (answer.status, answer.json["error"].split(";")[0]) == (
        413, "request body: inflated to more than 65,536 bytes exceed the limit of 65,536 "
        "(--max-message-bytes)")
    answer = call(port, "POST", INFER, body, {"Content-Encoding": "br"})
    assert (answer.status, answer.json) == (415, {"error": "Content-Encoding 'br' is not supported; "
                                                           "send the body as is, or gzip or deflate it"})
    # Headers: a block over --max-metadata-bytes, one line over it.
    answer = call(port, "GET", "/v2", headers={f"x-h{i}": "v" * 200 for i in range(50)})
    assert answer.status == 431 and re.fullmatch(
        r"request headers: 10,\d{3} bytes exceed the limit of 8,192 \(--max-metadata-bytes\)",
        answer.json["error"]), answer.json
    answer = call(port, "GET", "/v2", headers={"x-big": "v" * 9000})
    assert answer.status == 431 and answer.json == {"error": (
        "request headers: a line longer than 8192 bytes or more than 64 headers (--max-metadata-bytes)")}
    # Not HTTP at all: 400, JSON, and no traceback logged.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(b"\x16\x03\x01 hello\r\n\r\n")
        reply = raw.recv(4096)
    assert reply.startswith((b"HTTP/1.0 400 ", b"HTTP/1.1 400 ")) and reply.rstrip().endswith(
        b'{"error":"request: not valid HTTP/1.1 (BadHttpMethod)"}')
    assert call(port, "GET", "/v2/health/ready").status == 200


def test_the_token_guards_every_route_but_health_and_metrics(
    start_server: Callable[..., ServerThread],
) -> None:
    server = start_server(http_port=0, auth_token="s3cret-token")
    port = port_of(server)
    body = fp32_body(scaled(images_u8(1)))
    for path, method in ((INFER, "POST"), ("/v2", "GET"), ("/v2/models/tiny", "GET"),
                         ("/v2/repository/index", "POST")):
        answer = call(port, method, path, body if method == "POST" else None)
        assert (answer.status, answer.json, answer.headers["www-authenticate"]) == (
            401, {"error": MISSING_TOKEN}, "Bearer")
        answer = call(port, method, path, body if method == "POST" else None,
                      {"Authorization": "Bearer wrong"})
        assert (answer.status, answer.json) == (401, {"error": INVALID_TOKEN})
    assert call(port, "POST", INFER, body, {"Authorization": "Bearer s3cret-token"}).status == 200
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/tiny/ready", "/metrics"):
        assert call(port, "GET", path).status == 200, path


# --- readiness: before the load, during a drain ----------------------------------------------------

def test_not_ready_until_the_model_is_loaded(start_server: Callable[..., ServerThread]) -> None:
    server = start_server(load=False, http_port=0)
    port = port_of(server)
    assert call(port, "GET", "/v2/health/live").status == 200
    answer = call(port, "GET", "/v2/health/ready")
    assert (answer.status, answer.json) == (503, {"ready": False, "error": "not ready: model tiny: loading"})
    assert (call(port, "GET", "/v2/models/tiny/ready").status,
            call(port, "GET", "/v2/models/tiny/ready").json) == (503, {"name": "tiny", "ready": False})
    assert (call(port, "GET", "/v2/models/nope/ready").status,
            call(port, "GET", "/v2/models/nope/ready").json) == (404, {
        "name": "nope", "ready": False, "error": "model 'nope' is not served; this server serves 'tiny'"})
    answer = call(port, "POST", INFER, fp32_body(scaled(images_u8(1))))
    assert (answer.status, answer.json) == (503, {"error": "no model is loaded yet; retry when health "
                                                           "reports SERVING"})
    server.load()
    assert call(port, "GET", "/v2/health/ready").json == {"ready": True}


class Held:
    """The served model, holding each call until released (on the model thread, never inline), so
    that a request can be in flight, or the queue full, on purpose."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.spec, self.metadata, self.inference_path = model.spec, model.metadata, model.inference_path
        self.inline = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def predict(self, images: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        if images.shape[0] == 1 and images[0, 0] == 0.0 and images[0, 1] == 1.0:  # the held ones
            self.entered.set()
            self.release.wait(30)
        result: npt.NDArray[np.float32] = self.model.predict(images)
        return result


def held_body(n: int = 1) -> dict[str, Any]:
    pixels = np.zeros((n, D), np.float32)
    pixels[:, 1] = 1.0
    return fp32_body(pixels)


def in_background(function: Callable[[], Answer]) -> tuple[threading.Thread, list[Answer]]:
    out: list[Answer] = []
    thread = threading.Thread(target=lambda: out.append(function()), daemon=True)
    thread.start()
    return thread, out


def test_readiness_is_false_from_the_first_moment_of_a_drain(
    start_server: Callable[..., ServerThread],
) -> None:
    server = start_server(http_port=0, wrap=Held)
    model = server.model
    assert isinstance(model, Held)
    port = port_of(server)
    try:
        thread, held = in_background(lambda: call(port, "POST", INFER, held_body()))
        assert model.entered.wait(30)
        stopping = asyncio.run_coroutine_threadsafe(server.app.stop(20), server.loop)
        wait_for(lambda: server.app.draining, 10, "the drain to begin")
        answer = call(port, "GET", "/v2/health/ready")
        assert (answer.status, answer.json) == (503, {"ready": False, "error": SHUTTING_DOWN})
        assert call(port, "GET", "/v2/models/tiny/ready").json == {"name": "tiny", "ready": False}
        answer = call(port, "POST", INFER, fp32_body(scaled(images_u8(1))))
        assert (answer.status, answer.json) == (503, {"error": SHUTTING_DOWN})
        assert call(port, "GET", "/v2/health/live").status == 200
    finally:
        model.release.set()
    thread.join(30)
    assert held and held[0].status == 200  # the request in flight finished
    stopping.result(30)
    with pytest.raises(OSError):
        call(port, "GET", "/v2/health/live", timeout=5)


def test_a_full_queue_is_429(start_server: Callable[..., ServerThread]) -> None:
    server = start_server(http_port=0, wrap=Held, max_images_per_request=1, max_queued_images=1)
    model = server.model
    assert isinstance(model, Held)
    port = port_of(server)
    try:
        first, _ = in_background(lambda: call(port, "POST", INFER, held_body()))
        assert model.entered.wait(30)
        second, _ = in_background(lambda: call(port, "POST", INFER, held_body()))
        wait_for(lambda: server.plane.batcher.queued_images == 1, 10, "one call queued")
        answer = call(port, "POST", INFER, held_body())
        assert (answer.status, answer.json) == (429, {"error": "server overloaded: 1 images queued, "
                                                               "limit 1; retry with backoff"})
    finally:
        model.release.set()
    first.join(30)
    second.join(30)


# --- encodings and Expect, as the edge answered them before aiohttp's own paths ---------------------

def raw_exchange(port: int, head: str, body: bytes, wait: float = 0.0) -> bytes:
    """``head`` (request line and headers, ``Connection: close`` added), ``wait`` seconds, then
    ``body`` on a connection of its own: everything the server sent, until it closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        request = f"{head}Host: x\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        if not wait:
            # One write: a body the server refuses unread is then in its buffer when it answers, not
            # arriving after it closed, which would reset the connection under its answer.
            sock.sendall(request + body)
            return b"".join(iter(lambda: sock.recv(65536), b""))
        sock.sendall(request)
        time.sleep(wait)
        with contextlib.suppress(OSError):  # a refusal may close the connection before the body
            sock.sendall(body)
        return b"".join(iter(lambda: sock.recv(65536), b""))


def test_encodings_and_expect_are_answered_as_before(
    start_server: Callable[..., ServerThread], caplog: pytest.LogCaptureFixture,
) -> None:
    """Data that is not gzip is 400 naming zlib's error, x-gzip is gzip, zstd is 415 like any
    encoding not supported; ``Expect: 100-continue`` gets its 100 only for a body that will be read
    (not before a 401 or a 413), and another Expect is ignored. No traceback logged."""
    server = start_server(http_port=0, auth_token="tok", max_message_bytes=64 * 1024)
    port = port_of(server)
    caplog.set_level(logging.INFO)
    body = json.dumps(fp32_body(scaled(images_u8(1)))).encode()
    token = "Authorization: Bearer tok\r\n"
    infer = f"POST {INFER} HTTP/1.1\r\n"
    answer = raw_exchange(port, infer + token + "Content-Encoding: gzip\r\n", b"not gzip at all")
    assert answer.startswith(b"HTTP/1.1 400 ") and answer.endswith(
        b'{"error":"request body: not valid gzip data (Error -3 while decompressing data: incorrect '
        b'header check)"}\n'), answer
    answer = raw_exchange(port, infer + token + "Content-Encoding: x-gzip\r\n", gzip.compress(body))
    assert answer.startswith(b"HTTP/1.1 200 ") and b'"model_name":"tiny"' in answer, answer
    answer = raw_exchange(port, infer + token + "Content-Encoding: zstd\r\n", b"xx")
    assert b" 415 " in answer.split(b"\r\n")[0] and answer.endswith(
        b'{"error":"Content-Encoding \'zstd\' is not supported; send the body as is, or gzip or '
        b'deflate it"}\n'), answer
    expect = "Expect: 100-continue\r\n"
    for head, data, status in ((infer + expect, body, b"401"),
                               (infer + token + expect, b"x" * (64 * 1024 + 1), b"413"),
                               (infer + token + expect, body, b"200")):
        answer = raw_exchange(port, head, data, wait=0.5)
        continued = answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        final = answer.removeprefix(b"HTTP/1.1 100 Continue\r\n\r\n")
        assert (continued, final.split(b" ")[1]) == (status == b"200", status), (head, answer[:300])
    answer = raw_exchange(port, infer + token + "Expect: something\r\n", body)
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert [r.getMessage() for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING] == []


# --- slow and too many connections ---------------------------------------------------------------

def test_slow_clients_are_bounded(start_server: Callable[..., ServerThread]) -> None:
    """(More connections than the limits: test_http_attacks.)"""
    server = start_server(http_port=0, http_read_timeout=0.5)
    port = port_of(server)
    # Headers that never end: closed after the read timeout, nothing answered.
    slow = socket.create_connection(("127.0.0.1", port), timeout=10)
    slow.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n")
    started = time.monotonic()
    assert slow.recv(1024) == b""
    assert 0.4 <= time.monotonic() - started <= 5
    slow.close()
    # A body that never comes: 408 after the read timeout.
    late = socket.create_connection(("127.0.0.1", port), timeout=10)
    late.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    reply = late.recv(4096)
    late.close()
    assert reply.startswith(b"HTTP/1.1 408 ") and reply.rstrip().endswith(
        b'{"error":"request body: not received within 0.5s (--http-read-timeout; 1 bytes came)"}')
    wait_for(lambda: call(port, "GET", "/v2/health/ready").status == 200, 10, "a new client served")
    metrics = call(port, "GET", "/metrics").body.decode()
    assert 'http_server_refused_connections_total{reason="slow"} 1.0' in metrics


def test_a_taken_http_port_is_one_line_naming_the_flag(spawn: Any, tiny_repo: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = spawn("--model-repo", str(tiny_repo), "--http-port", str(port), "--log-format", "text")
        assert server.wait(120) == 2
    assert f"cannot start: --http-port {port}: 127.0.0.1:{port} is in use (another mnist-serve?); " \
           "choose another --http-port" in server.log, server.log


def test_workers_share_one_http_port(spawn: Any, tiny_repo: Path) -> None:
    server = spawn("--model-repo", str(tiny_repo), "--workers", "2", "--http-port", "0",
                   "--log-format", "text")
    server.target()
    wait_for(lambda: re.search(r"HTTP on port (\d+), shared too", server.log) is not None, 60,
             "the pool's line")
    match = re.search(r"HTTP on port (\d+), shared too", server.log)
    assert match
    port = int(match.group(1))
    wait_for(lambda: server.log.count("Open Inference Protocol REST) on http://127.0.0.1:"
                                      f"{port}/v2") == 2, 120, "both workers on the port")
    wait_for(lambda: server.log.count("serving model tiny version 1 from") == 2, 120, "both serving")
    answers = [call(port, "POST", INFER, fp32_body(scaled(images_u8(1)))) for _ in range(20)]
    assert {a.status for a in answers} == {200}


# --- tritonclient.http -----------------------------------------------------------------------------

TRITON_HTTP = r"""
import json, sys
import numpy as np
import tritonclient.http as tc
from tritonclient.utils import InferenceServerException

url, model, images_path, out_path = sys.argv[1:]
pixels = np.load(images_path)
client = tc.InferenceServerClient(url)
report = {
    "live": client.is_server_live(), "ready": client.is_server_ready(),
    "model_ready": client.is_model_ready(model), "server": client.get_server_metadata(),
    "metadata": client.get_model_metadata(model), "index": client.get_model_repository_index(),
}
probabilities = {}
for key, datatype, binary, array in (
        ("UINT8-binary", "UINT8", True, pixels.reshape(-1, 28, 28)),
        ("FP32-binary", "FP32", True, pixels.astype(np.float32) / np.float32(255)),
        ("FP32-json", "FP32", False, pixels.astype(np.float32) / np.float32(255))):
    tensor = tc.InferInput("images", list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    outputs = [tc.InferRequestedOutput(n, binary_data=binary)
               for n in ("probabilities", "class_index", "label")]
    result = client.infer(model, [tensor], outputs=outputs, request_id=key)
    probabilities[key] = result.as_numpy("probabilities")
    report[key] = {"id": result.get_response()["id"],
                   "class_index": result.as_numpy("class_index").tolist(),
                   "label": [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("label")]}
try:
    client.infer("no-such-model", [tensor])
except InferenceServerException as exc:
    report["unknown_model"] = [exc.status(), exc.message()]
np.savez(out_path, **probabilities)
print(json.dumps(report))
"""


def test_tritonclient_http_gets_the_probabilities_of_our_client(
    server: ServerThread, synthetic_data_dir: Path, tmp_path: Path
) -> None:
    for module in ("tritonclient.http", "geventhttpclient"):
        require_module(module, "tritonclient[http] is in the dev extra: pip install -e '.[dev]'")
    from digitserve.idx import read_idx

    pixels = read_idx(synthetic_data_dir / "t10k-images-idx3-ubyte.gz")[:8].reshape(8, -1)
    np.save(tmp_path / "images.npy", pixels)
    proc = subprocess.run(
        [sys.executable, "-c", TRITON_HTTP, f"127.0.0.1:{port_of(server)}", "tiny",
         str(tmp_path / "images.npy"), str(tmp_path / "triton.npz")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["live"] and report["ready"] and report["model_ready"]
    assert report["server"]["name"] == "digitserve"
    assert report["metadata"]["name"] == "tiny" and report["metadata"]["versions"] == ["1"]
    assert report["index"] == [{"name": "tiny", "version": "1", "state": "READY", "reason": "", "labels": []}]
    assert report["unknown_model"][1] == "model 'no-such-model' is not served; this server serves 'tiny'"
    with DigitClient(server.target, timeout=30) as client:
        ours = client.predict(pixels)
    with np.load(tmp_path / "triton.npz") as triton:
        for key in ("UINT8-binary", "FP32-binary", "FP32-json"):
            np.testing.assert_allclose(triton[key], ours.probabilities, rtol=0, atol=1e-6)
            assert report[key]["id"] == key
            assert report[key]["class_index"] == ours.class_indices
            assert report[key]["label"] == ours.labels


# --- the curl lines of the docs, as written --------------------------------------------------------

def curl_blocks_of(path: Path, marker: str) -> list[str]:
    """The ```sh blocks of a doc holding ``marker`` (a curl line)."""
    blocks = re.findall(r"```sh\n(.*?)```", path.read_text(), re.S)
    return [b for b in blocks if marker in b]


def curl_blocks(path: Path) -> list[str]:
    """The ```sh blocks of a doc that call the HTTP edge's V2 routes with curl."""
    return curl_blocks_of(path, "curl -s localhost:8080/v2")


@pytest.mark.parametrize("doc", ["README.md", "docs/interoperability.md"])
def test_the_curl_lines_of_the_docs_work_as_written(
    start_server: Callable[..., ServerThread], tiny_repo: Path, tmp_path: Path, doc: str
) -> None:
    require_tool("curl", "a system package: apt-get install curl")
    from tests.support import REPO_ROOT

    server = start_server(http_port=0)
    blocks = curl_blocks(REPO_ROOT / doc)
    assert blocks, f"no curl block in {doc}"
    for block in blocks:
        # As written, but for the address and the model's name (the tests' model is "tiny").
        script = block.replace("localhost:8080", f"127.0.0.1:{port_of(server)}").replace(
            "/models/mnist", "/models/tiny")
        done = subprocess.run(["bash", "-e", "-c", script], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        answers = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
        assert answers[0] == {"ready": True}
        assert answers[1]["name"] == "tiny" and answers[1]["versions"] == ["1"]
        assert answers[2]["model_name"] == "tiny" and len(answers[2]["outputs"]) == 3
        assert answers[2]["outputs"][0]["shape"] == [1, 10]
