"""Triton's ModelStreamInfer (server.oipstream): tritonclient.grpc's stream with a callback gets
each request answered, with its id, a refused one with ModelInfer's own message and the stream
going on; the token is required; a client abandoning a stream leaves the server serving."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from digitserve.oip import grpc_predict_v2_pb2 as oip
from digitserve.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from tests.servers import ServerProcess, ServerThread
from tests.support import require_module, wait_for

TOKEN = "stream-t0ken"

# tritonclient registers the same `inference.*` message names as our generated code, so it runs
# in a subprocess (see test_oip.py).
SCRIPT = r"""
import json, queue, sys
import numpy as np
import tritonclient.grpc as tg
from tritonclient.utils import InferenceServerException

url, token = sys.argv[1:]
headers = {"authorization": f"Bearer {token}"}
client = tg.InferenceServerClient(url)
rng = np.random.default_rng(0)
answers = queue.Queue()
client.start_stream(callback=lambda result, error: answers.put((result, error)), headers=headers)
expected = {}  # request id -> what ModelInfer answers the same request: probabilities or message
for i in range(12):
    n = 1 + i % 3
    pixels = rng.random((n, 784), dtype=np.float32)
    if i % 4 == 3:
        pixels[0, i] = 2.0  # refused, its message naming element i
    model = "nope" if i == 5 else "tiny"
    tensor = tg.InferInput("images", [n, 784], "FP32")
    tensor.set_data_from_numpy(pixels)
    client.async_stream_infer(model, [tensor], request_id=f"r{i}")
    try:
        expected[f"r{i}"] = client.infer(model, [tensor], headers=headers).as_numpy("probabilities").tolist()
    except InferenceServerException as exc:
        expected[f"r{i}"] = exc.message()
client.stop_stream()  # half-closes, and returns once the server ended the stream
got = []
while not answers.empty():
    result, error = answers.get()
    if error is not None:
        got.append({"error": error.message()})
    else:
        got.append({"id": result.get_response().id,
                    "probabilities": result.as_numpy("probabilities").tolist()})
unauthenticated = queue.Queue()
client.start_stream(callback=lambda result, error: unauthenticated.put((result, error)))
try:
    client.async_stream_infer("tiny", [tensor], request_id="no-token")
except InferenceServerException:
    pass  # the stream was refused before this request went: the callback has why
result, error = unauthenticated.get(timeout=60)
client.stop_stream()
print(json.dumps({"expected": expected, "got": got,
                  "no_token": [result is None, str(error.status()), error.message()]}))
"""


def test_tritonclient_streams_get_each_request_answered_with_its_id_or_its_error(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    require_module("tritonclient.grpc", "it is in the dev extra: pip install -e '.[dev]'")
    server = start_server(auth_token=TOKEN)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, server.target, TOKEN], cwd=tmp_path,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    expected, got = report["expected"], report["got"]
    assert len(got) == 12  # one answer per request, and no error ending the stream
    answered = {a["id"]: a["probabilities"] for a in got if "id" in a}
    good = {k: v for k, v in expected.items() if isinstance(v, list)}
    assert sorted(answered) == sorted(good) == sorted(f"r{i}" for i in range(12) if i % 4 != 3 and i != 5)
    for key, probabilities in good.items():
        np.testing.assert_allclose(answered[key], probabilities, rtol=0, atol=1e-6)
    errors = sorted(a["error"] for a in got if "error" in a)
    assert errors == sorted(v for v in expected.values() if isinstance(v, str))
    assert len(errors) == 4
    assert "model 'nope' is not served; this server serves 'tiny'" in errors
    assert all("is out of range" in e for e in errors if "nope" not in e)
    assert report["no_token"][:2] == [True, "StatusCode.UNAUTHENTICATED"]


def request(model: str, pixels: np.ndarray, id: str) -> oip.ModelInferRequest:
    return oip.ModelInferRequest(
        model_name=model, id=id,
        inputs=[oip.ModelInferRequest.InferInputTensor(name="images", datatype="FP32",
                                                       shape=list(pixels.shape))],
        raw_input_contents=[pixels.astype("<f4").tobytes()])


def stub_of(channel: grpc.Channel) -> oip_grpc.GRPCInferenceServiceStub:
    return oip_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]


def test_a_refused_request_s_answer_carries_its_id_and_the_stream_goes_on(
    tiny_server: ServerThread,
) -> None:
    pixels = np.random.default_rng(1).random((2, 784), dtype=np.float32)
    bad = pixels.copy()
    bad[1, 3] = -0.5
    requests = [request("tiny", pixels, "a"), request("tiny", bad, "b"), request("tiny", pixels, "c")]
    with grpc.insecure_channel(tiny_server.target) as channel:
        answers = list(stub_of(channel).ModelStreamInfer(iter(requests), timeout=60))
        with pytest.raises(grpc.RpcError) as refused:
            stub_of(channel).ModelInfer(requests[1], timeout=60)
    by_id = {a.infer_response.id: a for a in answers}
    assert sorted(by_id) == ["a", "b", "c"]
    assert by_id["b"].error_message == refused.value.details()
    assert by_id["b"].error_message.startswith(
        "raw_input_contents[0].element[787]: -0.5 is out of range; expected a pixel intensity")
    assert by_id["a"].error_message == by_id["c"].error_message == ""
    assert by_id["a"].infer_response.model_name == "tiny"
    first, third = by_id["a"].infer_response, by_id["c"].infer_response
    assert first.raw_output_contents[0] == third.raw_output_contents[0]


@pytest.fixture
def process(spawn: type[ServerProcess], tiny_repo: Path) -> Iterator[ServerProcess]:
    yield spawn("--model-repo", str(tiny_repo), "--model-name", "tiny", "--reload-interval", "0")


def test_streams_abandoned_mid_way_leave_the_server_serving(process: ServerProcess) -> None:
    target = process.target()
    with grpc.insecure_channel(target) as channel:
        ready = oip.ModelReadyRequest(name="tiny")
        wait_for(lambda: stub_of(channel).ModelReady(ready, timeout=10).ready, what="model ready")
    pixels = np.random.default_rng(2).random((200, 784), dtype=np.float32)
    held = threading.Event()

    def forever() -> Iterator[oip.ModelInferRequest]:
        for i in range(50):
            yield request("tiny", pixels, f"q{i}")
        held.wait(60)  # the client sends no more and never half-closes

    for _ in range(3):
        with grpc.insecure_channel(target) as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
            stream = stub_of(channel).ModelStreamInfer(forever(), timeout=60)
            first = next(stream)
            assert first.error_message == "" and first.infer_response.id.startswith("q")
            stream.cancel()  # abandoned with answers still being computed
    with grpc.insecure_channel(target) as channel:  # a channel closed under a stream in flight
        stream = stub_of(channel).ModelStreamInfer(forever(), timeout=60)
        next(stream)
    held.set()
    with grpc.insecure_channel(target) as channel:
        answer = stub_of(channel).ModelInfer(request("tiny", pixels[:3], "after"), timeout=60)
        assert answer.id == "after" and len(answer.raw_output_contents) == 3
        answers = list(stub_of(channel).ModelStreamInfer(iter([request("tiny", pixels[:1], "s")]),
                                                         timeout=60))
        assert [a.infer_response.id for a in answers] == ["s"]
    assert "Traceback" not in process.log, process.log


def test_a_request_that_comes_on_a_stream_during_the_drain_is_refused_and_the_stream_ends_well(
    process: ServerProcess,
) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from digitserve.server.drain import REFUSED

    target = process.target()
    pixels = np.random.default_rng(3).random((2, 784), dtype=np.float32)
    outbox: queue.Queue[oip.ModelInferRequest | None] = queue.Queue()

    def requests() -> Iterator[oip.ModelInferRequest]:
        while (message := outbox.get(timeout=60)) is not None:
            yield message

    with grpc.insecure_channel(target) as channel:
        ready = oip.ModelReadyRequest(name="tiny")
        wait_for(lambda: stub_of(channel).ModelReady(ready, timeout=10).ready, what="model ready")
        stream = stub_of(channel).ModelStreamInfer(requests(), timeout=60)
        outbox.put(request("tiny", pixels, "before"))
        before = next(stream)
        assert (before.error_message, before.infer_response.id) == ("", "before")
        process.send_signal(signal.SIGTERM)
        health = health_pb2_grpc.HealthStub(channel)
        wait_for(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
                 == health_pb2.HealthCheckResponse.NOT_SERVING, what="the drain")
        outbox.put(request("tiny", pixels, "during"))
        during = next(stream)
        assert (during.error_message, during.infer_response.id) == (REFUSED, "during")
        outbox.put(None)  # half-closed: the stream ends, OK
        assert list(stream) == []
        assert stream.code() == grpc.StatusCode.OK
    assert process.wait(60) == 0


def test_a_flooding_stream_gets_each_request_answered_or_refused_overloaded(
    start_server: Callable[..., ServerThread],
) -> None:
    # A queue of 400 images: the stream's 64 requests at once, 200 images each, overflow it.
    server = start_server(max_queued_images=400, max_images_per_request=200)
    pixels = np.random.default_rng(4).random((200, 784), dtype=np.float32)
    requests = [request("tiny", pixels, f"f{i}") for i in range(150)]
    with grpc.insecure_channel(server.target) as channel:
        answers = list(stub_of(channel).ModelStreamInfer(iter(requests), timeout=120))
        after = stub_of(channel).ModelInfer(request("tiny", pixels[:1], "after"), timeout=60)
    assert sorted(a.infer_response.id for a in answers) == sorted(f"f{i}" for i in range(150))
    refused = [a.error_message for a in answers if a.error_message]
    assert refused and all(m.startswith("server overloaded: ") and m.endswith("limit 400; retry with backoff")
               for m in refused), set(refused)
    served = [a for a in answers if not a.error_message]
    assert served and all(len(a.infer_response.raw_output_contents) == 3 for a in served)
    assert after.id == "after"
    stats = server.plane.statistics.versions[1]
    assert stats.success_count == len(served) + 1 and stats.fail_count == len(refused)
