"""The Open Inference Protocol (KServe V2) beside our own API: every RPC, every input encoding and
every error code with the fake model, and tritonclient (in a subprocess) against the tiny model
served from its repository, as mnist-serve serves it."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from digitserve.client.client import DigitClient
from digitserve.oip import grpc_predict_v2_pb2 as oip
from digitserve.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from digitserve.server.status import INTERNAL_MESSAGE
from tests.servers import ServerThread
from tests.support import FakeModel, expect_error, require_module

D = 784
Request = oip.ModelInferRequest
Tensor = oip.ModelInferRequest.InferInputTensor


def oip_stub(channel: grpc.Channel) -> oip_grpc.GRPCInferenceServiceStub:
    return oip_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]


@pytest.fixture
def stub(fake_server: ServerThread) -> Iterator[oip_grpc.GRPCInferenceServiceStub]:
    """A stub of the fake model's server, on purpose: every encoding's answer is compared with
    probabilities known without a model, its name ("fake") differs from the configured one, and
    an image crashes it (INTERNAL)."""
    with grpc.insecure_channel(fake_server.target) as channel:
        yield oip_stub(channel)


def images_u8(n: int, seed: int = 0) -> npt.NDArray[np.uint8]:
    return np.random.default_rng(seed).integers(0, 256, size=(n, D), dtype=np.uint8)


def scaled(images: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    return images.reshape(images.shape[0], -1).astype(np.float32) / np.float32(255)


def infer_request(
    images: npt.NDArray[Any], datatype: str, raw: bool, shape: list[int] | None = None,
    model_name: str = "fake", **fields: Any
) -> oip.ModelInferRequest:
    """A ModelInfer request (for the fake model unless named) with one input 'images' in the
    given encoding."""
    request = Request(model_name=model_name, **fields)
    tensor = request.inputs.add(name="images", datatype=datatype, shape=shape or list(images.shape))
    if raw:
        request.raw_input_contents.append(images.astype("<f4" if datatype == "FP32" else np.uint8).tobytes())
    elif datatype == "FP32":
        tensor.contents.fp32_contents.extend(images.ravel().tolist())
    else:
        tensor.contents.uint_contents.extend(images.ravel().tolist())
    return request


def output_arrays(response: oip.ModelInferResponse) -> dict[str, npt.NDArray[Any]]:
    """Each output as a numpy array of its shape, from raw or typed contents."""
    arrays: dict[str, npt.NDArray[Any]] = {}
    for i, tensor in enumerate(response.outputs):
        shape = list(tensor.shape)
        if response.raw_output_contents:
            data = response.raw_output_contents[i]
            if tensor.datatype == "BYTES":
                items, offset = [], 0
                while offset < len(data):
                    (length,) = struct.unpack_from("<I", data, offset)
                    items.append(data[offset + 4 : offset + 4 + length])
                    offset += 4 + length
                array: npt.NDArray[Any] = np.array(items, dtype=object)
            else:
                array = np.frombuffer(data, dtype={"FP32": "<f4", "INT64": "<i8"}[tensor.datatype])
        else:
            contents = tensor.contents
            if tensor.datatype == "FP32":
                array = np.array(contents.fp32_contents, dtype=np.float32)
            elif tensor.datatype == "INT64":
                array = np.array(contents.int64_contents, dtype=np.int64)
            else:
                array = np.array(list(contents.bytes_contents), dtype=object)
        arrays[tensor.name] = array.reshape(shape)
    return arrays



def test_server_live_ready_and_metadata(stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    assert stub.ServerLive(oip.ServerLiveRequest()).live
    assert stub.ServerReady(oip.ServerReadyRequest()).ready
    metadata = stub.ServerMetadata(oip.ServerMetadataRequest())
    assert metadata.name == "digitserve" and metadata.version


def test_model_metadata_describes_the_served_model(stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    for version in ("", "1"):
        metadata = stub.ModelMetadata(oip.ModelMetadataRequest(name="fake", version=version))
        assert metadata.name == "fake" and list(metadata.versions) == ["1"]
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
            ("images", "UINT8", [-1, D])]
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
            ("probabilities", "FP32", [-1, 10]), ("class_index", "INT64", [-1]), ("label", "BYTES", [-1]),
        ]


@pytest.mark.parametrize(
    ("name", "version", "ready", "code", "message"),
    [
        ("fake", "", True, None, None),
        ("fake", "1", True, None, None),
        # Not served: not ready, as Triton answers (HTTP: 404 with "ready": false and why).
        ("fake", "2", False, None, None),
        ("fake", "0", False, None, None),
        ("fake", "v1", False, None, None),
        ("fake", "1.5", None, grpc.StatusCode.INVALID_ARGUMENT,
         "version: '1.5' is not a version; expected an integer such as '1', a version label such "
         "as 'stable', or ''"),
        ("mnist", "", False, None, None),
        ("", "", False, None, None),
    ],
)
def test_model_ready(
    stub: oip_grpc.GRPCInferenceServiceStub, name: str, version: str, ready: bool | None,
    code: grpc.StatusCode | None, message: str | None,
) -> None:
    request = oip.ModelReadyRequest(name=name, version=version)
    if code is None:
        assert stub.ModelReady(request).ready is ready
    else:
        assert expect_error(lambda: stub.ModelReady(request), code).details() == message


def test_before_the_model_is_loaded(start_server: Callable[..., ServerThread]) -> None:
    server = start_server(load=False)  # the tiny model's repository, not loaded yet
    with grpc.insecure_channel(server.target) as channel:
        stub = oip_stub(channel)
        assert stub.ServerLive(oip.ServerLiveRequest()).live
        assert not stub.ServerReady(oip.ServerReadyRequest()).ready
        assert not stub.ModelReady(oip.ModelReadyRequest(name="tiny")).ready
        assert stub.ModelReady(oip.ModelReadyRequest(name="other")).ready is False
        request = infer_request(scaled(images_u8(1)), "FP32", raw=True, model_name="tiny")
        expect_error(lambda: stub.ModelInfer(request), grpc.StatusCode.UNAVAILABLE, "no model is loaded")
        expect_error(
            lambda: stub.ModelMetadata(oip.ModelMetadataRequest(name="tiny")), grpc.StatusCode.UNAVAILABLE
        )
        server.load()
        assert stub.ServerReady(oip.ServerReadyRequest()).ready
        assert stub.ModelReady(oip.ModelReadyRequest(name="tiny")).ready
        assert len(stub.ModelInfer(request).outputs) == 3


@pytest.mark.parametrize("datatype", ["FP32", "UINT8"])
@pytest.mark.parametrize("raw", [False, True], ids=["typed", "raw"])
@pytest.mark.parametrize("shape", ["flat", "image"])
def test_infer_every_encoding_gives_the_model_output(
    stub: oip_grpc.GRPCInferenceServiceStub, datatype: str, raw: bool, shape: str
) -> None:
    pixels = images_u8(3, seed=5)
    data: npt.NDArray[Any] = scaled(pixels) if datatype == "FP32" else pixels
    if shape == "image":
        data = data.reshape(3, 28, 28)
    response = stub.ModelInfer(infer_request(data, datatype, raw, id="req-7", model_version="1"))
    assert (response.model_name, response.model_version, response.id) == ("fake", "1", "req-7")
    assert len(response.raw_output_contents) == (3 if raw else 0)  # raw in, raw out (as Triton does)
    outputs = output_arrays(response)
    expected = FakeModel().predict(scaled(pixels))
    assert [t.name for t in response.outputs] == ["probabilities", "class_index", "label"]
    np.testing.assert_array_equal(outputs["probabilities"], expected)
    np.testing.assert_array_equal(outputs["class_index"], np.argmax(expected, axis=1))
    assert [b.decode() for b in outputs["label"]] == [str(k) for k in np.argmax(expected, axis=1)]


@pytest.mark.parametrize("raw", [False, True], ids=["typed", "raw"])
def test_infer_returns_only_the_requested_outputs_in_order(
    stub: oip_grpc.GRPCInferenceServiceStub, raw: bool
) -> None:
    pixels = images_u8(2, seed=9)
    request = infer_request(pixels, "UINT8", raw)
    request.outputs.add(name="label")
    request.outputs.add(name="class_index")
    response = stub.ModelInfer(request)
    assert [(t.name, t.datatype, list(t.shape)) for t in response.outputs] == [
        ("label", "BYTES", [2]), ("class_index", "INT64", [2]),
    ]
    outputs = output_arrays(response)
    expected = np.argmax(FakeModel().predict(scaled(pixels)), axis=1)
    np.testing.assert_array_equal(outputs["class_index"], expected)
    assert [b.decode() for b in outputs["label"]] == [str(k) for k in expected]


def test_infer_agrees_with_our_own_api(
    fake_server: ServerThread, stub: oip_grpc.GRPCInferenceServiceStub
) -> None:
    pixels = images_u8(4, seed=11)
    with DigitClient(fake_server.target, timeout=10) as client:
        ours = client.predict(pixels)
    outputs = output_arrays(stub.ModelInfer(infer_request(pixels, "UINT8", raw=True)))
    np.testing.assert_array_equal(outputs["probabilities"], ours.probabilities)
    assert outputs["class_index"].tolist() == ours.class_indices


def _with(
    request: oip.ModelInferRequest, change: Callable[[oip.ModelInferRequest], object]
) -> oip.ModelInferRequest:
    change(request)
    return request


def _two_inputs(r: oip.ModelInferRequest) -> None:
    r.inputs.add().CopyFrom(r.inputs[0])


def _set_pixel(value: float, index: int) -> Callable[[oip.ModelInferRequest], None]:
    def change(r: oip.ModelInferRequest) -> None:
        r.inputs[0].contents.fp32_contents[index] = value

    return change


def bad_requests() -> list[Any]:
    """pytest params: (request, expected code, fragments of the expected message), id = the case."""
    f32 = scaled(images_u8(2, seed=2))
    u8 = images_u8(2, seed=2)
    invalid = grpc.StatusCode.INVALID_ARGUMENT

    def typed() -> oip.ModelInferRequest:
        return infer_request(f32, "FP32", raw=False)

    def raw() -> oip.ModelInferRequest:
        return infer_request(f32, "FP32", raw=True)

    nan_raw = f32.copy()
    nan_raw[1, 3] = np.nan
    cases: list[tuple[str, oip.ModelInferRequest, grpc.StatusCode, tuple[str, ...]]] = [
        ("unknown model", _with(typed(), lambda r: setattr(r, "model_name", "mnist")),
         grpc.StatusCode.NOT_FOUND, ("model 'mnist' is not served", "'fake'")),
        ("unknown version", _with(typed(), lambda r: setattr(r, "model_version", "7")),
         grpc.StatusCode.NOT_FOUND, ("version 7 is not served",)),
        ("malformed version", _with(typed(), lambda r: setattr(r, "model_version", "-1")),
         invalid, ("model_version: '-1' is not a version",)),
        ("unknown label", _with(typed(), lambda r: setattr(r, "model_version", "latest")),
         grpc.StatusCode.NOT_FOUND, ("model 'fake' has no version label 'latest' (labels: none)",)),
        ("no inputs", _with(typed(), lambda r: r.ClearField("inputs")),
         invalid, ("inputs: got 0 inputs", "'images'")),
        ("two inputs", _with(typed(), _two_inputs), invalid, ("inputs: got 2 inputs",)),
        ("input name", _with(typed(), lambda r: setattr(r.inputs[0], "name", "x")),
         invalid, ("inputs[0].name: 'x' is not an input", "expected 'images'")),
        ("datatype", _with(typed(), lambda r: setattr(r.inputs[0], "datatype", "INT32")),
         invalid, ("inputs[0].datatype: 'INT32' is not accepted", "FP32", "UINT8")),
        ("shape", infer_request(f32, "FP32", raw=False, shape=[2, 28, 14, 2]),
         invalid, ("inputs[0].shape: [2, 28, 14, 2] is not accepted", "[N, 784] or [N, 28, 28]")),
        ("empty batch", infer_request(f32[:0], "FP32", raw=False, shape=[0, D]),
         invalid, ("inputs[0].shape: empty",)),
        ("too few values", infer_request(f32[:1], "FP32", raw=False, shape=[2, D]),
         invalid, ("inputs[0].contents.fp32_contents: got 784 values, expected 1568",)),
        ("contents of another type", Request(model_name="fake", inputs=[Tensor(
            name="images", datatype="UINT8", shape=[2, D],
            contents=oip.InferTensorContents(fp32_contents=f32.ravel().tolist()))]),
         invalid, ("inputs[0].contents.uint_contents: got 0 values, expected 1568",)),
        ("nan", _with(typed(), _set_pixel(float("nan"), D + 5)),
         invalid, ("inputs[0].contents.fp32_contents[789]: nan is not a finite number",)),
        ("above 1", _with(typed(), _set_pixel(1.5, 17)),
         invalid, ("inputs[0].contents.fp32_contents[17]: 1.5 is out of range",)),
        ("uint8 above 255", _with(infer_request(u8, "UINT8", raw=False),
                                  lambda r: r.inputs[0].contents.uint_contents.__setitem__(5, 256)),
         invalid, ("inputs[0].contents.uint_contents[5]: 256 does not fit UINT8",)),
        ("raw length", _with(raw(), lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 100)),
         invalid, ("raw_input_contents[0]: got 100 bytes, expected 6272",)),
        ("raw count", _with(raw(), lambda r: r.raw_input_contents.append(b"")),
         invalid, ("raw_input_contents: got 2 entries for 1 inputs",)),
        ("raw and typed", _with(raw(), lambda r: r.inputs[0].contents.fp32_contents.append(0.5)),
         invalid, ("inputs[0].contents: set together with raw_input_contents",)),
        ("raw nan", infer_request(nan_raw, "FP32", raw=True),
         invalid, ("raw_input_contents[0].element[787]: nan is not a finite number",)),
        ("raw uint8 count", _with(infer_request(u8, "UINT8", raw=True),
                                  lambda r: r.inputs[0].shape.__setitem__(0, 3)),
         invalid, ("raw_input_contents[0]: got 1568 bytes, expected 2352",)),
        ("output name", _with(typed(), lambda r: r.outputs.add(name="logits")),
         invalid, ("outputs[0].name: 'logits' is not an output", "probabilities")),
        ("classification", _with(typed(), lambda r: r.outputs.add(name="probabilities").parameters[
            "classification"].CopyFrom(oip.InferParameter(int64_param=3))),
         invalid, ("outputs[0].parameters['classification']: is not supported",)),
        ("shared memory", _with(typed(), lambda r: r.inputs[0].parameters["shared_memory_region"].CopyFrom(
            oip.InferParameter(string_param="region0"))),
         invalid, ("inputs[0].parameters['shared_memory_region']: is not supported",)),
    ]
    return [pytest.param(request, code, fragments, id=case) for case, request, code, fragments in cases]


@pytest.mark.parametrize(("request_", "code", "fragments"), bad_requests())
def test_bad_requests_get_exact_codes(
    stub: oip_grpc.GRPCInferenceServiceStub, request_: oip.ModelInferRequest,
    code: grpc.StatusCode, fragments: tuple[str, ...],
) -> None:
    expect_error(lambda: stub.ModelInfer(request_), code, *fragments)
    assert stub.ServerReady(oip.ServerReadyRequest()).ready  # the server keeps serving


def test_invalid_argument_carries_the_field_violation(stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    request = infer_request(images_u8(1), "UINT8", raw=False)
    request.inputs[0].datatype = "FP64"
    err = expect_error(lambda: stub.ModelInfer(request), grpc.StatusCode.INVALID_ARGUMENT)
    status = rpc_status.from_call(err)
    assert status is not None
    detail = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(detail)
    assert detail.field_violations[0].field == "inputs[0].datatype"


def test_too_many_images(start_server: Callable[..., ServerThread]) -> None:
    server = start_server(max_images_per_request=2)
    with grpc.insecure_channel(server.target) as channel:
        stub = oip_stub(channel)
        request = infer_request(images_u8(3), "UINT8", raw=True, model_name="tiny")
        expect_error(lambda: stub.ModelInfer(request), grpc.StatusCode.INVALID_ARGUMENT,
                     "inputs[0].shape: 3 images exceed the limit of 2 per request")


def test_model_crash_is_internal_without_details(stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    images = scaled(images_u8(1))
    images[0, 0] = FakeModel.CRASH_PIXEL
    err = expect_error(lambda: stub.ModelInfer(infer_request(images, "FP32", raw=True)),
                       grpc.StatusCode.INTERNAL)
    assert err.details() == INTERNAL_MESSAGE


def test_undecodable_request_is_invalid_argument(tiny_server: ServerThread) -> None:
    with grpc.insecure_channel(tiny_server.target) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        expect_error(lambda: call(b"\xff\xff\xff", timeout=10), grpc.StatusCode.INVALID_ARGUMENT)


def test_reflection_lists_the_inference_service(tiny_server: ServerThread) -> None:
    with grpc.insecure_channel(tiny_server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        responses = stub.ServerReflectionInfo(iter([request]))
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert "inference.GRPCInferenceService" in names


# tritonclient registers the same `inference.*` message names as our generated code in protobuf's
# default pool, so it cannot be imported in this process: it runs in a subprocess.
TRITON_SCRIPT = r"""
import json, sys
import numpy as np
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

url, model, images_path, out_path = sys.argv[1:]
pixels = np.load(images_path)
client = tc.InferenceServerClient(url)
report = {
    "live": client.is_server_live(), "ready": client.is_server_ready(),
    "model_ready": client.is_model_ready(model),
    "server": client.get_server_metadata(as_json=True),
    "metadata": client.get_model_metadata(model, as_json=True),
}
probabilities = {}
for datatype, array in (("UINT8", pixels.reshape(-1, 28, 28)),
                        ("FP32", pixels.astype(np.float32) / np.float32(255))):
    tensor = tc.InferInput("images", list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    outputs = [tc.InferRequestedOutput(n) for n in ("probabilities", "class_index", "label")]
    result = client.infer(model, [tensor], outputs=outputs, request_id=datatype, client_timeout=60)
    probabilities[datatype] = result.as_numpy("probabilities")
    report[datatype] = {
        "id": result.get_response().id,
        "class_index": result.as_numpy("class_index").tolist(),
        "label": [x.decode() for x in result.as_numpy("label")],
    }
try:
    client.infer("no-such-model", [tensor])
except InferenceServerException as exc:
    report["unknown_model"] = [exc.status(), exc.message()]
np.savez(out_path, **probabilities)
print(json.dumps(report))
"""


def test_tritonclient_gets_the_probabilities_of_our_client(
    tiny_server: ServerThread, synthetic_data_dir: Path, tmp_path: Path
) -> None:
    require_module("tritonclient.grpc", "it is in the dev extra: pip install -e '.[dev]'")
    from digitserve.idx import read_idx

    server = tiny_server
    pixels = read_idx(synthetic_data_dir / "t10k-images-idx3-ubyte.gz")[:16].reshape(16, -1)
    np.save(tmp_path / "images.npy", pixels)
    proc = subprocess.run(
        [sys.executable, "-c", TRITON_SCRIPT, server.target, "tiny", str(tmp_path / "images.npy"),
         str(tmp_path / "triton.npz")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["live"] and report["ready"] and report["model_ready"]
    assert report["server"]["name"] == "digitserve"
    assert report["metadata"]["name"] == "tiny" and report["metadata"]["versions"] == ["1"]
    platform = {"litert": "litert_tflite", "tensorflow": "tensorflow_keras"}[
        server.app.registry.model("tiny").served.inference_path]
    assert report["metadata"]["platform"] == platform
    assert report["unknown_model"][0] == "StatusCode.NOT_FOUND", report["unknown_model"]

    with DigitClient(server.target, timeout=30) as client:
        ours = client.predict(pixels)
    with np.load(tmp_path / "triton.npz") as triton:
        for datatype in ("UINT8", "FP32"):
            np.testing.assert_allclose(triton[datatype], ours.probabilities, rtol=0, atol=1e-6)
            assert report[datatype]["id"] == datatype
            assert report[datatype]["class_index"] == ours.class_indices
            assert report[datatype]["label"] == ours.labels
