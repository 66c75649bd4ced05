"""Pictures over the wire: a PNG or a JPEG sent as bytes (``Image.encoded``, a V2 ``BYTES`` input)
is preprocessed by the server with the code the client runs (digitserve.pictures), so every path
gets the same probabilities; every picture that cannot be used is INVALID_ARGUMENT naming it; the
decoding runs on the picture threads, bounded, never on the event loop."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from digitserve import pictures
from digitserve.client.cli import main
from digitserve.client.client import DigitClient
from digitserve.oip import grpc_predict_v2_pb2 as oip
from digitserve.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from digitserve.v1 import digit_service_pb2 as pb
from digitserve.v1 import digit_service_pb2_grpc as pb_grpc
from tests.servers import ServerThread
from tests.support import assert_mnist_geometry, digit_photo, wait_for

INVALID = grpc.StatusCode.INVALID_ARGUMENT
BLANK = "the picture is blank (no ink stands out of the background); expected a digit"


def v2_request(items: list[bytes], raw: bool, shape: list[int] | None = None) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name="tiny")
    tensor = request.inputs.add(name="images", datatype="BYTES", shape=shape or [len(items)])
    if raw:  # the protocol's BYTES layout: each element a little-endian uint32 length, then it
        request.raw_input_contents.append(b"".join(len(b).to_bytes(4, "little") + b for b in items))
    else:
        tensor.contents.bytes_contents.extend(items)
    return request


def v2_probabilities(response: oip.ModelInferResponse) -> npt.NDArray[np.float32]:
    out = next(i for i, t in enumerate(response.outputs) if t.name == "probabilities")
    tensor = response.outputs[out]
    if response.raw_output_contents:
        values = np.frombuffer(response.raw_output_contents[out], "<f4")
    else:
        values = np.asarray(tensor.contents.fp32_contents, np.float32)
    return values.reshape(list(tensor.shape))


def probabilities(response: pb.PredictResponse) -> npt.NDArray[np.float32]:
    return np.array([p.probabilities for p in response.predictions], np.float32)


def test_a_png_and_a_jpeg_get_the_cli_s_answer_over_every_path(
    start_server: Callable[..., ServerThread], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny_server = start_server(http_port=0)
    photos = {fmt: digit_photo(fmt) for fmt in ("PNG", "JPEG")}
    expected = {}
    for fmt, data in photos.items():  # the CLI, preprocessing the file here (its default)
        path = tmp_path / f"two.{fmt.lower()}"
        path.write_bytes(data)
        assert main(["--target", tiny_server.target, "predict", "--image", str(path), "--json"]) == 0
        expected[fmt] = np.asarray(json.loads(capsys.readouterr().out)["probabilities"], np.float32)
        assert main(["--target", tiny_server.target, "predict", "--image", str(path), "--json",
                     "--preprocess", "server"]) == 0
        by_server = np.asarray(json.loads(capsys.readouterr().out)["probabilities"], np.float32)
        np.testing.assert_allclose(by_server, expected[fmt], rtol=0, atol=1e-6)
    both = np.stack([expected["PNG"], expected["JPEG"]])
    pixels = pictures.from_bytes(photos["PNG"])
    for data in photos.values():
        assert_mnist_geometry(pictures.from_bytes(data))
    with grpc.insecure_channel(tiny_server.target) as channel:
        stub = pb_grpc.DigitServiceStub(channel)  # type: ignore[no-untyped-call]
        # Our API: the two pictures as Image.encoded, with the PNG's pixels beside them.
        response = stub.Predict(pb.PredictRequest(images=[
            pb.Image(encoded=photos["PNG"]), pb.Image(uint8=pixels.tobytes()),
            pb.Image(encoded=photos["JPEG"])]), timeout=30)
        np.testing.assert_allclose(probabilities(response), both[[0, 0, 1]], rtol=0, atol=1e-6)
        # The V2 protocol: a BYTES input, typed contents and raw.
        v2 = oip_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        for raw in (False, True):
            answer = v2.ModelInfer(v2_request([photos["PNG"], photos["JPEG"]], raw), timeout=30)
            np.testing.assert_allclose(v2_probabilities(answer), both, rtol=0, atol=1e-6)
        answer = v2.ModelInfer(v2_request([photos["JPEG"]], raw=False, shape=[1, 1]), timeout=30)
        np.testing.assert_allclose(v2_probabilities(answer), both[1:], rtol=0, atol=1e-6)
    # The V2 protocol's REST binding: a BYTES input whose JSON elements are base64 strings.
    body = json.dumps({"inputs": [{
        "name": "images", "datatype": "BYTES", "shape": [2],
        "data": [base64.b64encode(photos[fmt]).decode() for fmt in ("PNG", "JPEG")]}]}).encode()
    connection = http.client.HTTPConnection("127.0.0.1", tiny_server.app.http_port, timeout=30)
    try:
        connection.request("POST", "/v2/models/tiny/infer", body=body,
                           headers={"Content-Type": "application/json"})
        answer = connection.getresponse()
        status, document = answer.status, json.loads(answer.read())
    finally:
        connection.close()
    assert status == 200, document
    output = next(o for o in document["outputs"] if o["name"] == "probabilities")
    np.testing.assert_allclose(np.asarray(output["data"], np.float32).reshape(output["shape"]), both,
                               rtol=0, atol=1e-6)
    with DigitClient(tiny_server.target) as client:  # the library: bytes or paths, either side
        for preprocess in ("client", "server"):
            result = client.predict([photos["PNG"], tmp_path / "two.jpeg"], preprocess=preprocess)
            np.testing.assert_allclose(result.probabilities, both, rtol=0, atol=1e-6)
        np.testing.assert_allclose(client.predict(tmp_path / "two.png").probabilities,
                                   both[:1], rtol=0, atol=1e-6)


@pytest.fixture
def bounded(start_server: Callable[..., ServerThread]) -> ServerThread:
    return start_server(max_picture_bytes=100_000, max_picture_request_bytes=120_000,
                        max_picture_pixels=1_000_000, max_queued_pictures=4, picture_threads=1)


GIF = b"GIF89a\x01\x00\x01\x00\x80\x00\x00"


def _big_header() -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2000, 1000, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes(100))) + chunk(b"IEND", b""))


def _blank_png() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("L", (64, 48), 210).save(out, format="PNG")
    return out.getvalue()


JPEG = digit_photo("JPEG")
PNG = digit_photo("PNG")  # 135 kB: over the bounded server's 100,000 bytes per picture
V1_ERRORS: list[tuple[str, list[pb.Image], str]] = [
    ("not-an-image", [pb.Image(encoded=JPEG), pb.Image(encoded=GIF)],
     f"images[1].encoded: not a PNG, JPEG or WebP image (it starts with {GIF[:8]!r})"),
    ("truncated", [pb.Image(encoded=JPEG[: len(JPEG) // 2])],
     "images[0].encoded: corrupt or truncated JPEG data (image file is truncated (25 bytes not "
     "processed))"),
    ("too-many-pixels", [pb.Image(encoded=_big_header())],
     "images[0].encoded: 2000×1000 pixels exceed the limit of 1000000 pixels per picture"),
    ("too-many-bytes", [pb.Image(uint8=bytes(784)), pb.Image(encoded=PNG)],
     f"images[1].encoded: {len(PNG)} bytes exceed the limit of 100000 bytes per picture"),
    ("request-bytes", [pb.Image(encoded=bytes(50_000))] * 3,
     "images: 3 pictures of 150000 bytes exceed the limit of 120000 bytes of pictures per request"),
    ("too-many-pictures", [pb.Image(encoded=JPEG)] * 5,
     "images: 5 pictures exceed the limit of 4 per request"),
    ("blank", [pb.Image(encoded=_blank_png())], f"images[0].encoded: {BLANK}"),
    ("empty", [pb.Image(encoded=b"")], "images[0].encoded: empty; expected the bytes of a PNG, JPEG "
     "or WebP picture"),
]


def _field(error: Any) -> str:
    status = rpc_status.from_call(error)
    assert status is not None
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    return str(bad_request.field_violations[0].field)


@pytest.mark.parametrize(("images", "message"), [case[1:] for case in V1_ERRORS],
                         ids=[case[0] for case in V1_ERRORS])
def test_a_picture_that_cannot_be_used_is_invalid_argument_naming_it(
    bounded: ServerThread, images: list[pb.Image], message: str
) -> None:
    with grpc.insecure_channel(bounded.target) as channel:
        stub = pb_grpc.DigitServiceStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(pb.PredictRequest(images=images), timeout=30)
        assert (info.value.code(), info.value.details()) == (INVALID, message)
        assert _field(info.value) == message.split(": ")[0]
        # Evaluate reads its images the same way, naming the message of the stream.
        with pytest.raises(grpc.RpcError) as info:
            stub.Evaluate(iter([pb.EvaluateRequest(images=images, labels=[0] * len(images))]),
                          timeout=30)
        assert (info.value.code(), info.value.details()) == (INVALID, "requests[0]." + message)
        assert stub.Predict(pb.PredictRequest(images=[pb.Image(encoded=JPEG)]), timeout=30)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert bounded.app.pictures.queued == 0


V2_ERRORS: list[tuple[str, oip.ModelInferRequest, str]] = [
    ("not-an-image", v2_request([JPEG, b"hello, world"], raw=False),
     "inputs[0].contents.bytes_contents[1]: not a PNG, JPEG or WebP image (it starts with b'hello, w')"),
    ("not-an-image-raw", v2_request([GIF], raw=True),
     f"raw_input_contents[0].element[0]: not a PNG, JPEG or WebP image (it starts with {GIF[:8]!r})"),
    ("blank", v2_request([_blank_png()], raw=False),
     f"inputs[0].contents.bytes_contents[0]: {BLANK}"),
    ("shape", v2_request([JPEG, JPEG], raw=False, shape=[1, 2]),
     "inputs[0].shape: [1, 2] is not accepted for BYTES (one PNG or JPEG picture per element); "
     "expected [N] or [N, 1]"),
    ("count", v2_request([JPEG, JPEG], raw=False, shape=[3]),
     "inputs[0].contents.bytes_contents: got 2 elements, expected 3 (one picture per element of "
     "shape [3])"),
    ("raw-count", v2_request([JPEG], raw=True, shape=[2]),
     "raw_input_contents[0]: holds 1 elements, expected 2 (one picture per element of shape [2])"),
    ("too-many-bytes", v2_request([PNG], raw=False),
     f"inputs[0].contents.bytes_contents[0]: {len(PNG)} bytes exceed the limit of 100000 bytes per "
     "picture"),
    ("too-many-pictures", v2_request([JPEG] * 5, raw=True),
     "inputs[0]: 5 pictures exceed the limit of 4 per request"),
]


def _overrun() -> oip.ModelInferRequest:
    request = v2_request([], raw=True, shape=[1])
    request.raw_input_contents[0] = (1000).to_bytes(4, "little") + b"\xff\xd8"
    return request


V2_ERRORS.append(("raw-length", _overrun(), "raw_input_contents[0].element[0]: its length 1000 runs "
                  "past the end of the tensor's 6 bytes"))


@pytest.mark.parametrize(("request_", "message"), [case[1:] for case in V2_ERRORS],
                         ids=[case[0] for case in V2_ERRORS])
def test_a_v2_bytes_input_that_cannot_be_used_is_invalid_argument_naming_it(
    bounded: ServerThread, request_: oip.ModelInferRequest, message: str
) -> None:
    with grpc.insecure_channel(bounded.target) as channel:
        v2 = oip_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as info:
            v2.ModelInfer(request_, timeout=30)
        assert (info.value.code(), info.value.details()) == (INVALID, message)
        assert v2.ModelInfer(v2_request([JPEG], raw=True), timeout=30)
    assert bounded.app.pictures.queued == 0


def test_pictures_are_decoded_on_the_picture_threads_never_on_the_event_loop(
    tiny_server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[str] = []
    decode = pictures.from_bytes

    def recorded(*args: Any, **kwargs: Any) -> npt.NDArray[np.uint8]:
        threads.append(threading.current_thread().name)
        return decode(*args, **kwargs)

    monkeypatch.setattr(pictures, "from_bytes", recorded)
    loop_thread = tiny_server.thread.name
    with grpc.insecure_channel(tiny_server.target) as channel:
        stub = pb_grpc.DigitServiceStub(channel)  # type: ignore[no-untyped-call]
        stub.Predict(pb.PredictRequest(images=[pb.Image(encoded=JPEG)] * 3), timeout=30)
        v2 = oip_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        v2.ModelInfer(v2_request([PNG], raw=False), timeout=30)
    assert len(threads) == 4 and all(name.startswith("pictures") for name in threads), threads
    assert loop_thread not in threads


def test_a_full_decoder_refuses_at_once_and_an_expired_call_is_not_decoded(
    bounded: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoder = bounded.app.pictures
    decoded: list[int] = []
    decode = pictures.from_bytes

    def counted(*args: Any, **kwargs: Any) -> npt.NDArray[np.uint8]:
        decoded.append(1)
        return decode(*args, **kwargs)

    monkeypatch.setattr(pictures, "from_bytes", counted)
    release = threading.Event()
    # The decoder's one thread held, and 3 of its 4 places: a call of 2 pictures does not fit.
    held = asyncio.run_coroutine_threadsafe(decoder.run(3, lambda: release.wait(30)), bounded.loop)
    wait_for(lambda: decoder.queued == 3, 10, "the held work to be queued")
    with grpc.insecure_channel(bounded.target) as channel:
        stub = pb_grpc.DigitServiceStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(pb.PredictRequest(images=[pb.Image(encoded=JPEG)] * 2), timeout=30)
        assert (info.value.code(), info.value.details()) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "server overloaded: 3 pictures are waiting to be decoded, limit 4; retry with backoff")
        # One picture fits, but waits behind the held work past its deadline: never decoded.
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(pb.PredictRequest(images=[pb.Image(encoded=JPEG)]), timeout=0.5)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        release.set()
        held.result(10)
        wait_for(lambda: decoder.queued == 0, 10, "the decoder to empty")
        assert decoded == []
        assert stub.Predict(pb.PredictRequest(images=[pb.Image(encoded=JPEG)]), timeout=30)
        assert decoded == [1]


def test_get_model_info_says_the_low_confidence_threshold(
    start_server: Callable[..., ServerThread],
) -> None:
    server = start_server(low_confidence=0.7)
    with DigitClient(server.target) as client:
        assert client.get_model_info().low_confidence_threshold == pytest.approx(0.7)
        assert client.low_confidence_threshold() == pytest.approx(0.7)
