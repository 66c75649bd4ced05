"""Triton's model configuration extension (server.tritonconfig) on both bindings, the input
datatype the metadata declares (UINT8: every value a tool generates is an image), the extensions
ServerMetadata lists, ModelReady of a model not served (the same answer on both bindings) and
``GET /v2/``: real servers of the tiny model on 127.0.0.1, read by raw gRPC and HTTP and by
tritonclient (grpc and http, in a subprocess), as perf_analyzer reads them."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.json_format import MessageToDict

from digitserve.client.client import DigitClient
from digitserve.oip import grpc_predict_v2_pb2 as oip
from digitserve.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from digitserve.oip import model_config_pb2 as mc
from digitserve.repository import ModelRepository
from tests.server.test_repository_server import publish_as
from tests.servers import ServerThread
from tests.support import expect_error, require_module, wait_for

D = 784
EXTENSIONS = ["binary_tensor_data", "model_configuration", "statistics", "model_repository"]


def get(port: int, path: str) -> tuple[int, Any]:
    """GET ``path``: the status and the JSON body."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def stub_of(channel: grpc.Channel) -> oip_grpc.GRPCInferenceServiceStub:
    return oip_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]


def expected_config(*, max_batch_size: int, policy: dict[str, Any], platform: str, backend: str,
                    batching: dict[str, Any] | None, queued: int = 8192) -> dict[str, Any]:
    """The tiny model's configuration in Triton's JSON, written out by hand."""
    config: dict[str, Any] = {
        "name": "tiny", "platform": platform, "backend": backend, "version_policy": policy,
        "max_batch_size": max_batch_size,
        "input": [{"name": "images", "data_type": "TYPE_UINT8", "format": "FORMAT_NONE", "dims": [D]}],
        "output": [{"name": "probabilities", "data_type": "TYPE_FP32", "dims": [10]},
                   {"name": "class_index", "data_type": "TYPE_INT64", "dims": []},
                   {"name": "label", "data_type": "TYPE_STRING", "dims": []}],
        "instance_group": [{"name": "tiny", "count": 1, "kind": "KIND_CPU"}],
        "parameters": {"max_queued_images": {"string_value": str(queued)}},
    }
    if batching is not None:
        config["dynamic_batching"] = batching
    return config


def path_of(server: ServerThread) -> tuple[str, str]:
    """The served version's inference path and its V2 platform."""
    path = server.app.registry.model("tiny").served.inference_path
    return path, {"litert": "litert_tflite", "tensorflow": "tensorflow_keras"}[path]


def test_the_configuration_is_what_the_server_runs(start_server: Callable[..., ServerThread]) -> None:
    server = start_server(http_port=0, max_images_per_request=8, max_batch_size=4,
                          max_queue_delay_ms=2.5, max_queued_images=64)
    backend, platform = path_of(server)
    expected = expected_config(
        max_batch_size=8, policy={"latest": {"num_versions": 1}}, platform=platform, backend=backend,
        batching={"preferred_batch_size": [4], "max_queue_delay_microseconds": 2500}, queued=64)
    port = server.app.http_port
    assert port
    for path in ("/v2/models/tiny/config", "/v2/models/tiny/versions/1/config"):
        assert get(port, path) == (200, expected), path

    with grpc.insecure_channel(server.target) as channel:
        stub = stub_of(channel)
        for version in ("", "1"):
            config = stub.ModelConfig(oip.ModelConfigRequest(name="tiny", version=version)).config
            assert (config.name, config.platform, config.backend, config.max_batch_size) == (
                "tiny", platform, backend, 8)
            assert config.version_policy.WhichOneof("policy_choice") == "latest"
            assert config.version_policy.latest.num_versions == 1
            [tensor] = config.input
            assert (tensor.name, tensor.data_type, tensor.format, list(tensor.dims)) == (
                "images", mc.TYPE_UINT8, mc.ModelInput.FORMAT_NONE, [D])
            assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
                ("probabilities", mc.TYPE_FP32, [10]), ("class_index", mc.TYPE_INT64, []),
                ("label", mc.TYPE_STRING, [])]
            [group] = config.instance_group
            assert (group.count, group.kind) == (1, mc.ModelInstanceGroup.KIND_CPU)
            assert config.HasField("dynamic_batching")
            assert list(config.dynamic_batching.preferred_batch_size) == [4]
            assert config.dynamic_batching.max_queue_delay_microseconds == 2500
            assert config.parameters["max_queued_images"].string_value == "64"


def test_a_pinned_version_without_batching(start_server: Callable[..., ServerThread]) -> None:
    server = start_server(http_port=0, model_version=1, max_batch_size=1)
    backend, platform = path_of(server)
    expected = expected_config(max_batch_size=1024, policy={"specific": {"versions": [1]}},
                               platform=platform, backend=backend, batching=None)
    port = server.app.http_port
    assert port
    assert get(port, "/v2/models/tiny/config") == (200, expected)
    with grpc.insecure_channel(server.target) as channel:
        config = stub_of(channel).ModelConfig(oip.ModelConfigRequest(name="tiny")).config
    assert not config.HasField("dynamic_batching")
    assert config.version_policy.WhichOneof("policy_choice") == "specific"
    assert list(config.version_policy.specific.versions) == [1]


@pytest.mark.parametrize(("name", "version", "code", "status", "message"), [
    ("nope", "", grpc.StatusCode.NOT_FOUND, 404, "model 'nope' is not served; this server serves 'tiny'"),
    ("tiny", "7", grpc.StatusCode.NOT_FOUND, 404,
     "model 'tiny' version 7 is not served (serving version 1; loaded: 1)"),
    ("tiny", "canary", grpc.StatusCode.NOT_FOUND, 404,
     "model 'tiny' has no version label 'canary' (labels: none)"),
    ("tiny", "-1", grpc.StatusCode.INVALID_ARGUMENT, 400,
     "version: '-1' is not a version; expected an integer such as '1', a version label such as "
     "'stable', or ''"),
])
def test_an_unknown_model_or_version_is_refused_as_by_model_metadata(
    start_server: Callable[..., ServerThread], name: str, version: str, code: grpc.StatusCode,
    status: int, message: str,
) -> None:
    server = start_server(http_port=0)
    port = server.app.http_port
    assert port
    suffix = f"/versions/{version}" if version else ""
    for path in (f"/v2/models/{name}{suffix}", f"/v2/models/{name}{suffix}/config"):
        assert get(port, path) == (status, {"error": message}), path
    with grpc.insecure_channel(server.target) as channel:
        stub = stub_of(channel)
        for call in (lambda: stub.ModelMetadata(oip.ModelMetadataRequest(name=name, version=version)),
                     lambda: stub.ModelConfig(oip.ModelConfigRequest(name=name, version=version))):
            assert expect_error(call, code).details() == message


def test_model_ready_of_a_model_not_served_is_false_on_both_bindings(
    start_server: Callable[..., ServerThread],
) -> None:
    server = start_server(http_port=0)
    port = server.app.http_port
    assert port
    assert get(port, "/v2/models/nope/ready") == (404, {
        "name": "nope", "ready": False, "error": "model 'nope' is not served; this server serves 'tiny'"})
    assert get(port, "/v2/models/tiny/versions/7/ready") == (404, {
        "name": "tiny", "version": "7", "ready": False,
        "error": "model 'tiny' version 7 is not served (serving version 1; loaded: 1)"})
    with grpc.insecure_channel(server.target) as channel:
        stub = stub_of(channel)
        for name, version in (("nope", ""), ("tiny", "7"), ("tiny", "canary"), ("", "")):
            assert stub.ModelReady(oip.ModelReadyRequest(name=name, version=version)).ready is False
        assert stub.ModelReady(oip.ModelReadyRequest(name="tiny")).ready is True


def test_server_metadata_lists_the_extensions_served_and_v2_slash_answers(
    start_server: Callable[..., ServerThread],
) -> None:
    server = start_server(http_port=0)
    port = server.app.http_port
    assert port
    status, body = get(port, "/v2")
    assert status == 200 and body["extensions"] == EXTENSIONS
    assert get(port, "/v2/") == (200, body)
    with grpc.insecure_channel(server.target) as channel:
        metadata = stub_of(channel).ServerMetadata(oip.ServerMetadataRequest())
    assert (metadata.name, metadata.version, list(metadata.extensions)) == (
        body["name"], body["version"], EXTENSIONS)


# perf_analyzer's way, with tritonclient: the input's datatype from the metadata, its shape from
# the configuration (max_batch_size > 0: [batch, *dims]), random values of that datatype. Then
# 28×28 pixels, FP32 random bytes (refused with today's message) and readiness of a model not
# served. tritonclient.grpc registers protobuf's `inference.*` names: a subprocess.
TRITON_SCRIPT = r"""
import json, sys
import numpy as np
from tritonclient.utils import InferenceServerException

protocol, url, out_path = sys.argv[1:]
if protocol == "grpc":
    import tritonclient.grpc as tc
    client = tc.InferenceServerClient(url)
    metadata = client.get_model_metadata("tiny", as_json=True)
    config = client.get_model_config("tiny", as_json=True)["config"]
    dims = [int(d) for d in config["input"][0]["dims"]]
    max_batch_size = int(config["max_batch_size"])
else:
    import tritonclient.http as tc
    client = tc.InferenceServerClient(url)
    metadata = client.get_model_metadata("tiny")
    config = client.get_model_config("tiny")
    dims, max_batch_size = config["input"][0]["dims"], config["max_batch_size"]
datatype = metadata["inputs"][0]["datatype"]
rng = np.random.default_rng(7)
arrays, report = {}, {"datatype": datatype, "dims": dims, "max_batch_size": max_batch_size,
                      "config_datatype": config["input"][0]["data_type"]}
for key, shape in (("config", [4, *dims]), ("28x28", [3, 28, 28])):
    array = rng.integers(0, 256, size=shape, dtype=np.uint8)
    tensor = tc.InferInput("images", shape, datatype)
    tensor.set_data_from_numpy(array)
    result = client.infer("tiny", [tensor])
    arrays[key], arrays[key + "-probabilities"] = array, result.as_numpy("probabilities")
random_floats = np.frombuffer(rng.bytes(4 * 784), dtype=np.float32).reshape(1, 784)
random_floats = np.where(np.isfinite(random_floats) & (np.abs(random_floats) > 1), random_floats, 2.5)
tensor = tc.InferInput("images", [1, 784], "FP32")
tensor.set_data_from_numpy(random_floats.astype(np.float32))
try:
    client.infer("tiny", [tensor])
except InferenceServerException as exc:
    report["fp32"] = [str(exc.status()), exc.message(), float(random_floats[0, 0])]
report["ready"] = [client.is_model_ready("tiny"), client.is_model_ready("nope"),
                   client.is_model_ready("tiny", "7")]
np.savez(out_path, **arrays)
print(json.dumps(report))
"""


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_tritonclient_sends_what_the_metadata_and_the_configuration_declare(
    start_server: Callable[..., ServerThread], tmp_path: Path, protocol: str,
) -> None:
    require_module(f"tritonclient.{protocol}", "it is in the dev extra: pip install -e '.[dev]'")
    server = start_server(http_port=0)
    url = server.target if protocol == "grpc" else f"127.0.0.1:{server.app.http_port}"
    proc = subprocess.run([sys.executable, "-c", TRITON_SCRIPT, protocol, url, str(tmp_path / "out.npz")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert (report["datatype"], report["config_datatype"]) == ("UINT8", "TYPE_UINT8")
    assert (report["dims"], report["max_batch_size"]) == ([D], 1024)
    status, message, first = report["fp32"]
    assert status == ("StatusCode.INVALID_ARGUMENT" if protocol == "grpc" else "400")
    element = "raw_input_contents[0].element[0]" if protocol == "grpc" else "inputs[0].binary_data[0]"
    assert message == (f"{element}: {first!r} is out of range; expected a pixel intensity in [0, 1] "
                       "(byte / 255)")
    assert report["ready"] == [True, False, False]
    with np.load(tmp_path / "out.npz") as out, DigitClient(server.target, timeout=30) as client:
        for key in ("config", "28x28"):
            ours = client.predict(out[key].reshape(len(out[key]), D))
            np.testing.assert_allclose(out[key + "-probabilities"], ours.probabilities, rtol=0, atol=1e-6)


def test_the_instance_count_is_the_number_of_workers(spawn: Any, tiny_repo: Path) -> None:
    server = spawn("--model-repo", str(tiny_repo), "--workers", "2", "--log-format", "text")
    target = server.target()
    wait_for(lambda: server.log.count("serving model tiny version 1 from") == 2, 120, "both serving")
    with grpc.insecure_channel(target) as channel:
        stub = stub_of(channel)
        for _ in range(4):  # whichever worker answers: the two of them
            [group] = stub.ModelConfig(oip.ModelConfigRequest(name="tiny"), timeout=30).config.instance_group
            assert (group.count, group.kind) == (2, mc.ModelInstanceGroup.KIND_CPU)


@pytest.mark.parametrize(("flag", "expected"), [
    ("latest:2", {"latest": {"num_versions": 2}}),
    ("all", {"all": {}}),
    ("specific:1,3", {"specific": {"versions": [1, 3]}}),
])
def test_the_model_configuration_says_the_version_policy(
    tiny_repo: Path, tmp_path: Path, start_server: Callable[..., ServerThread], flag: str,
    expected: dict[str, object],
) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    for _ in range(3):
        publish_as(root, ModelRepository(tiny_repo).version_dir("tiny", 1), "digits")
    server = start_server(model_repo=root, model_name=("digits",), version_policy=flag, http_port=0)
    status, body = get(server.app.http_port, "/v2/models/digits/config")
    assert (status, body["version_policy"]) == (200, expected)
    with grpc.insecure_channel(server.target) as channel:
        config = stub_of(channel).ModelConfig(oip.ModelConfigRequest(name="digits")).config
    policy = MessageToDict(config.version_policy, preserving_proto_field_name=True)
    if "specific" in policy:  # protobuf's JSON writes int64 as strings
        policy["specific"]["versions"] = [int(v) for v in policy["specific"]["versions"]]
    assert policy == expected
