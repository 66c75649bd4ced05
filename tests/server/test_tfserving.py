"""TF Serving's REST API (KServe's V1 protocol) on the HTTP edge: model status, metadata and
``:predict`` in the row (``instances``) and columnar (``inputs``) formats, over real HTTP on
127.0.0.1 against the tiny model, checked against the V2 route's answers for the same pixels;
errors as TF Serving's ``{"error": "..."}`` with their status; the token and the metrics."""

from __future__ import annotations

import base64
import io
import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from tests.server.test_http import call, curl_blocks_of, images_u8, port_of, scaled
from tests.servers import ServerThread
from tests.support import REPO_ROOT, require_tool

PREDICT = "/v1/models/tiny:predict"


@pytest.fixture
def server(start_server: Callable[..., ServerThread]) -> ServerThread:
    return start_server(http_port=0, max_images_per_request=8)


def v2_probabilities(port: int, u8: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """The V2 route's probabilities for the same pixels: the oracle."""
    body = {"inputs": [{"name": "images", "shape": list(u8.shape), "datatype": "UINT8",
                        "data": u8.ravel().tolist()}], "outputs": [{"name": "probabilities"}]}
    answer = call(port, "POST", "/v2/models/tiny/infer", body)
    assert answer.status == 200, answer.body
    return np.asarray(answer.json["outputs"][0]["data"], np.float32).reshape(len(u8), -1)


def test_predict_row_and_columnar_formats_answer_as_tf_serving(server: ServerThread) -> None:
    port = port_of(server)
    u8 = images_u8(3, seed=4)
    expected = v2_probabilities(port, u8)
    classes = expected.argmax(axis=1).tolist()
    bodies: list[tuple[dict[str, Any], bool]] = [
        ({"instances": u8.tolist()}, True),  # 784 bytes each
        ({"instances": scaled(u8).reshape(3, 28, 28).tolist()}, True),  # 28x28 intensities
        ({"signature_name": "serving_default", "instances": [{"images": row} for row in u8.tolist()]}, True),
        ({"inputs": u8.tolist()}, False),
        ({"inputs": {"images": scaled(u8).tolist()}}, False),
    ]
    for path in (PREDICT, "/v1/models/tiny/versions/1:predict"):
        for body, rows in bodies:
            answer = call(port, "POST", path, body)
            assert answer.status == 200, answer.body
            if rows:
                predictions = answer.json["predictions"]
                assert list(answer.json) == ["predictions"] and len(predictions) == 3
                for i, prediction in enumerate(predictions):
                    assert list(prediction) == ["probabilities", "class_index", "label"]
                    np.testing.assert_allclose(prediction["probabilities"], expected[i], atol=1e-6)
                    assert prediction["class_index"] == classes[i]
                    assert prediction["label"] == str(classes[i])
            else:
                outputs = answer.json["outputs"]
                assert list(answer.json) == ["outputs"]
                np.testing.assert_allclose(outputs["probabilities"], expected, atol=1e-6)
                assert outputs["class_index"] == classes
                assert outputs["label"] == [str(c) for c in classes]


def test_predict_takes_pictures_as_b64(server: ServerThread) -> None:
    pil = pytest.importorskip("PIL.Image")
    port = port_of(server)
    picture = io.BytesIO()
    stroke = np.zeros((28, 28), np.uint8)
    stroke[4:24, 12:16] = 255  # a "1"
    pil.fromarray(stroke).save(picture, format="PNG")
    encoded = base64.b64encode(picture.getvalue()).decode()
    answer = call(port, "POST", PREDICT, {"instances": [{"b64": encoded}, {"images": {"b64": encoded}}]})
    assert answer.status == 200, answer.body
    first, second = answer.json["predictions"]
    assert first == second and len(first["probabilities"]) == 10


def test_model_status_and_metadata(server: ServerThread) -> None:
    port = port_of(server)
    status = {"model_version_status": [{"version": "1", "state": "AVAILABLE",
                                        "status": {"error_code": "OK", "error_message": ""}}]}
    for path in ("/v1/models/tiny", "/v1/models/tiny/versions/1"):
        answer = call(port, "GET", path)
        assert (answer.status, answer.json) == (200, status)
    metadata = call(port, "GET", "/v1/models/tiny/metadata")
    assert metadata.status == 200
    assert metadata.json["model_spec"] == {"name": "tiny", "signature_name": "", "version": "1"}
    signature = metadata.json["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert signature["method_name"] == "tensorflow/serving/predict"
    assert signature["inputs"]["images"]["tensor_shape"]["dim"] == [
        {"size": "-1", "name": ""}, {"size": "784", "name": ""}]
    assert list(signature["outputs"]) == ["probabilities", "class_index", "label"]
    assert signature["outputs"]["probabilities"]["tensor_shape"]["dim"][1]["size"] == "10"
    assert call(port, "GET", "/v1/models/tiny/versions/1/metadata").json == metadata.json


ROW = images_u8(1).tolist()


@pytest.mark.parametrize(("method", "path", "body", "status", "error"), [  # V2's lines where shared
    ("POST", PREDICT, b"{", 400, "request body: not valid JSON (unexpected end of data at line 1 "
     'column 2); expected a predict request such as {"instances": [[...784 pixels...]]} or '
     '{"inputs": {"images": [[...]]}}'),
    ("POST", PREDICT, {"instances": ROW, "inputs": ROW}, 400, 'request body: expected one of '
     '"instances" (row format) or "inputs" (columnar format), not both, not neither'),
    ("POST", PREDICT, {}, 400, 'request body: expected one of "instances" (row format) or "inputs" '
     "(columnar format), not both, not neither"),
    ("POST", PREDICT, {"instances": []}, 400, "instances: expected a non-empty list, one entry per image"),
    ("POST", PREDICT, {"instances": ROW, "signature_name": "classify"}, 400,
     "signature_name: 'classify' is not a signature of model 'tiny'; expected 'serving_default' (or none)"),
    ("POST", PREDICT, {"instances": [{"pixels": ROW[0]}]}, 400,
     "instances[0]['pixels']: is not an input of this model; expected 'images'"),
    ("POST", PREDICT, {"instances": [[1] * 783]}, 400,
     "instances.shape: [1, 783] is not accepted; expected [N, 784] or [N, 28, 28]"),
    ("POST", PREDICT, {"instances": [[1] * 784, [1] * 783]}, 400,
     "instances: images of unequal shapes; expected each image as 784 numbers or 28 rows of 28"),
    ("POST", PREDICT, {"instances": [[300] + [0] * 783]}, 400,
     "instances[0] (pixel 0): 300 does not fit UINT8; expected 0..255"),
    ("POST", PREDICT, {"inputs": [[0.0] * 783 + [1.5]]}, 400,
     "inputs[0] (pixel 783): 1.5 is out of range; expected a pixel intensity in [0, 1] (byte / 255)"),
    ("POST", PREDICT, {"instances": [["a"] * 784]}, 400, "instances: holds values that are not "
     'numbers; expected each image as pixel numbers (0..255, or 0.0..1.0) or {"b64": ...}'),
    ("POST", PREDICT, {"instances": [[0] * 784] * 9}, 400,
     "instances: 9 images exceed the limit of 8 per request"),
    ("POST", "/v1/models/nope:predict", {"instances": ROW}, 404,
     "model 'nope' is not served; this server serves 'tiny'"),
    ("POST", "/v1/models/tiny/versions/7:predict", {"instances": ROW}, 404,
     "model 'tiny' version 7 is not served (serving version 1; loaded: 1)"),
    ("POST", "/v1/models/tiny/labels/canary:predict", {"instances": ROW}, 404,
     "model 'tiny' has no version label 'canary' (labels: none)"),
    ("POST", "/v1/models/tiny/labels/3:predict", {"instances": ROW}, 400,
     "label: '3' is not a version label; name a version number as /versions/VERSION"),
    ("GET", "/v1/models/tiny/versions/7", None, 404, "model 'tiny' version 7 is not served"),
    ("GET", "/v1/models/nope", None, 404, "model 'nope' is not served; this server serves 'tiny'"),
    ("GET", "/v1/models/tiny:predict", None, 405, "GET is not allowed on /v1/models/tiny:predict; use POST"),
])
def test_errors_are_tf_servings_shape(server: ServerThread, method: str, path: str, body: Any,
                                      status: int, error: str) -> None:
    answer = call(port_of(server), method, path, body)
    assert (answer.status, answer.json) == (status, {"error": error})


def test_predict_needs_the_token_and_is_counted(start_server: Callable[..., ServerThread]) -> None:
    server = start_server(http_port=0, auth_token="s3cret-token")
    port = port_of(server)
    body = {"instances": ROW}
    refused = call(port, "POST", PREDICT, body)
    assert refused.status == 401 and list(refused.json) == ["error"]
    auth = {"Authorization": "Bearer s3cret-token"}
    for _ in range(2):
        assert call(port, "POST", PREDICT, body, auth).status == 200
    assert call(port, "GET", "/v1/models/tiny").status == 401
    assert call(port, "GET", "/v1/models/tiny", headers=auth).status == 200
    text = call(port, "GET", "/metrics").body.decode()
    route = "/v1/models/{name}:predict"
    assert f'http_server_requests_total{{code="200",method="POST",route="{route}"}} 2.0' in text
    stats = call(port, "GET", "/v2/models/tiny/stats", headers=auth).json
    assert stats["model_stats"][0]["inference_stats"]["success"]["count"] == 2


def test_the_tf_serving_curl_lines_of_the_docs_work_as_written(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    require_tool("curl", "a system package: apt-get install curl")
    server = start_server(http_port=0)
    blocks = curl_blocks_of(REPO_ROOT / "docs/interoperability.md", "curl -s localhost:8080/v1")
    assert len(blocks) == 1, blocks
    script = blocks[0].replace("localhost:8080", f"127.0.0.1:{port_of(server)}").replace(
        "/models/mnist", "/models/tiny")
    done = subprocess.run(["bash", "-e", "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert len(answers) == 4, done.stdout
    assert answers[0]["model_version_status"][0]["state"] == "AVAILABLE"
    assert answers[1]["model_spec"]["name"] == "tiny"
    assert len(answers[2]["predictions"]) == 1 and len(answers[2]["predictions"][0]["probabilities"]) == 10
    outputs = answers[3]["outputs"]
    assert len(outputs["probabilities"]) == 1 and outputs["label"] == [str(outputs["class_index"][0])]
