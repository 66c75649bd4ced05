"""The load tester against the in-process fake server: counts, latencies, errors by code, accuracy
of the answers, and that under heavy concurrency every answer belongs to its own request."""

from __future__ import annotations

import importlib.util
import json
import pkgutil
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest

from digitserve.client.cli import main
from digitserve.idx import load_split, scale_pixels
from digitserve.loadtest import generator as loadtest
from digitserve.oip import grpc_predict_v2_pb2 as oip
from digitserve.v1 import digit_service_pb2 as pb
from tests.servers import ServerProcess, ServerThread
from tests.support import FakeModel, require_module


def fake_accuracy(images: npt.NDArray[np.uint8], labels: npt.NDArray[np.uint8]) -> float:
    probs = FakeModel().predict(scale_pixels(images.reshape(images.shape[0], -1)))
    return float(np.mean(probs.argmax(axis=1) == labels))


def run_cli(capsys: pytest.CaptureFixture[str], target: str, *args: str) -> tuple[int, dict[str, Any]]:
    code = main(["--target", target, "--timeout", "5", "loadtest", *args, "--json"])
    out = capsys.readouterr().out
    result: dict[str, Any] = json.loads(out)
    return code, result


def check_latencies(result: dict[str, Any]) -> None:
    assert 0 < result["p50_ms"] <= result["p90_ms"] <= result["p99_ms"] <= result["max_ms"]
    assert result["rps"] == pytest.approx(result["ok"] / result["duration_s"], rel=0.01)


@pytest.mark.parametrize("engine", loadtest.ENGINES)
def test_closed_loop_counts_latency_and_accuracy(
    fake_server: ServerThread, synthetic_data_dir: Path, capsys: pytest.CaptureFixture[str],
    engine: str,
) -> None:
    split = load_split(synthetic_data_dir, "t10k")
    n = split.images.shape[0]
    # 2n requests of one image: every test image exactly twice, so the accuracy is the model's.
    code, result = run_cli(capsys, fake_server.target, "--data-dir", str(synthetic_data_dir),
                           "--concurrency", "4", "--requests", str(2 * n), "--engine", engine)
    assert code == 0
    assert result["requests"] == result["ok"] == result["checked"] == 2 * n
    assert result["errors"] == {} and result["mismatches"] == 0
    assert result["accuracy"] == pytest.approx(fake_accuracy(split.images, split.labels), abs=1e-12)
    assert result["mode"] == "closed" and result["concurrency"] == 4 and result["batch"] == 1
    assert result["connections"] == loadtest.DEFAULT_CONNECTIONS  # one load process
    assert result["images_per_s"] == pytest.approx(result["rps"], rel=1e-5)
    check_latencies(result)


def test_open_loop_sends_on_schedule(
    fake_server: ServerThread, synthetic_data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    split = load_split(synthetic_data_dir, "t10k")
    n = split.images.shape[0]
    rate = n  # one second at n req/s: each image once
    code, result = run_cli(capsys, fake_server.target, "--data-dir", str(synthetic_data_dir),
                           "--rate", str(rate), "--duration", "1", "--encoding", "float32")
    assert code == 0
    assert result["mode"] == "open" and result["rate"] == rate and result["concurrency"] is None
    assert result["requests"] == result["ok"] == n and result["errors"] == {}
    assert result["accuracy"] == pytest.approx(fake_accuracy(split.images, split.labels), abs=1e-12)
    assert 0.9 <= result["duration_s"] <= 3.0
    check_latencies(result)


@pytest.mark.parametrize("engine", loadtest.ENGINES)
def test_errors_are_counted_by_status_code(
    fake_server: ServerThread, synthetic_data_dir: Path, capsys: pytest.CaptureFixture[str],
    engine: str,
) -> None:
    code = main(["--target", fake_server.target, "loadtest", "--data-dir", str(synthetic_data_dir),
                 "--concurrency", "4", "--duration", "0.5", "--model-version", "7", "--json",
                 "--engine", engine])
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert code == 1
    assert result["ok"] == 0 and result["requests"] > 0
    assert result["errors"] == {"NOT_FOUND": result["requests"]}
    assert result["accuracy"] is None and result["p50_ms"] is None
    assert "NOT_FOUND" in captured.err and captured.err.count("\n") == 1


def test_several_processes_and_batches(
    fake_server: ServerThread, synthetic_data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    split = load_split(synthetic_data_dir, "t10k")
    batch = 8
    per_pass = split.images.shape[0] // batch
    code, result = run_cli(capsys, fake_server.target, "--data-dir", str(synthetic_data_dir),
                           "--concurrency", "4", "--processes", "2", "--batch", str(batch),
                           "--requests", str(2 * per_pass))
    assert code == 0
    assert result["processes"] == 2 and result["batch"] == batch
    assert result["ok"] == 2 * per_pass and result["checked"] == 2 * per_pass * batch
    assert result["images_per_s"] == pytest.approx(batch * result["rps"], abs=batch * 0.01)
    used = per_pass * batch
    expected = fake_accuracy(split.images[:used], split.labels[:used])
    assert result["accuracy"] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("engine", loadtest.ENGINES)
def test_every_answer_is_its_own_under_heavy_concurrency(fake_server: ServerThread,
                                                         engine: str) -> None:
    rng = np.random.default_rng(11)
    images = rng.integers(0, 256, size=(3000, 784), dtype=np.uint8)  # all distinct
    labels = rng.integers(0, 10, size=3000)
    model = FakeModel()
    for batch in (1, 3, 100):  # 100 float32 images: 314 kB, above HTTP/2's first windows
        workload = loadtest.build_workload(images, labels, batch=batch, expected=model.predict,
                                           encoding="float32" if batch == 100 else "uint8")
        config = loadtest.LoadConfig(target=fake_server.target, concurrency=64, duration=1.0,
                                     timeout=10, connections=2, engine=engine)
        result = loadtest.run(config, workload)
        assert result.ok > 64 and result.errors == {}
        assert result.checked == result.ok * batch
        assert result.mismatches == 0


@pytest.mark.parametrize("engine", loadtest.ENGINES)
def test_v2_protocol_answers_are_checked_against_their_own_requests(
    fake_server: ServerThread, engine: str
) -> None:
    rng = np.random.default_rng(12)
    images = rng.integers(0, 256, size=(2000, 784), dtype=np.uint8)
    labels = rng.integers(0, 10, size=2000)
    model = FakeModel()
    for batch, encoding in ((1, "float32"), (100, "uint8")):
        workload = loadtest.build_workload(images, labels, batch=batch, encoding=encoding,
                                           expected=model.predict, protocol="oip", model_name="fake")
        assert workload.method == "/inference.GRPCInferenceService/ModelInfer"
        config = loadtest.LoadConfig(target=fake_server.target, concurrency=32, duration=0.8,
                                     timeout=10, connections=2, engine=engine)
        result = loadtest.run(config, workload)
        assert result.ok > 32 and result.errors == {} and result.mismatches == 0
        assert result.checked == result.ok * batch and result.to_dict()["protocol"] == "oip"


def test_v2_protocol_names_the_model_it_asks_for(
    fake_server: ServerThread, synthetic_data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, result = run_cli(capsys, fake_server.target, "--data-dir", str(synthetic_data_dir),
                           "--protocol", "oip", "--model-name", "fake", "--requests", "20")
    split = load_split(synthetic_data_dir, "t10k")
    assert code == 0 and result["ok"] == 20 and result["errors"] == {}
    assert result["accuracy"] == pytest.approx(
        fake_accuracy(split.images[:20], split.labels[:20]), abs=1e-12)
    code = main(["--target", fake_server.target, "loadtest", "--data-dir", str(synthetic_data_dir),
                 "--protocol", "oip", "--model-name", "other", "--requests", "5", "--json"])
    errors = json.loads(capsys.readouterr().out)["errors"]
    assert code == 1 and errors == {"NOT_FOUND": 5}


@pytest.mark.parametrize("engine", loadtest.ENGINES)
def test_connections_closed_by_max_connection_age_lose_no_call(
    start_server: Callable[..., ServerThread], engine: str
) -> None:
    server = start_server(FakeModel, max_connection_age=0.3)  # a fake: answers checked against its own
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, size=(500, 784), dtype=np.uint8)
    workload = loadtest.build_workload(images, rng.integers(0, 10, size=500),
                                       expected=FakeModel().predict)
    config = loadtest.LoadConfig(target=server.target, concurrency=16, duration=1.5, timeout=10,
                                 connections=2, engine=engine)
    result = loadtest.run(config, workload)
    assert result.ok > 100 and result.errors == {} and result.mismatches == 0


def test_a_wrong_answer_is_a_mismatch() -> None:
    images = np.arange(2 * 784, dtype=np.int64).reshape(2, 784).astype(np.uint8)
    model = FakeModel()
    workload = loadtest.build_workload(images, [0, 1], expected=model.predict)
    recorder = loadtest._Recorder(workload, True, loadtest._LocalCounter())

    def answer(probs: npt.NDArray[np.float32]) -> bytes:
        response = pb.PredictResponse()
        for row in probs:
            response.predictions.add(probabilities=row.tolist(), class_index=int(row.argmax()))
        data: bytes = response.SerializeToString()
        return data

    assert workload.expected is not None
    recorder.ok(0, answer(workload.expected[0]), 0.001)
    recorder.ok(1, answer(workload.expected[0]), 0.001)  # request 0's answer to request 1
    result = recorder.finish()
    assert result.ok == 2 and result.checked == 2 and result.mismatches == 1


def test_a_wrong_v2_answer_is_a_mismatch() -> None:
    images = np.arange(2 * 784, dtype=np.int64).reshape(2, 784).astype(np.uint8)
    workload = loadtest.build_workload(images, [0, 1], expected=FakeModel().predict, protocol="oip")
    recorder = loadtest._Recorder(workload, True, loadtest._LocalCounter())
    assert workload.expected is not None

    def answer(probs: npt.NDArray[np.float32], raw: bool = True, name: str = "probabilities") -> bytes:
        output = oip.ModelInferResponse.InferOutputTensor(name=name, datatype="FP32",
                                                          shape=list(probs.shape))
        response = oip.ModelInferResponse(model_name="fake", outputs=[output])
        if raw:
            response.raw_output_contents.append(probs.astype("<f4").tobytes())
        else:
            response.outputs[0].contents.fp32_contents.extend(probs.ravel().tolist())
        data: bytes = response.SerializeToString()
        return data

    recorder.ok(0, answer(workload.expected[0]), 0.001)
    recorder.ok(1, answer(workload.expected[1], raw=False), 0.001)  # typed contents read too
    recorder.ok(1, answer(workload.expected[0]), 0.001)  # request 0's answer to request 1
    recorder.ok(1, answer(workload.expected[1], name="logits"), 0.001)  # no probabilities
    recorder.ok(1, b"\xff\xff", 0.001)  # not a ModelInferResponse
    result = recorder.finish()
    assert result.ok == 5 and result.checked == 3 and result.mismatches == 3


def test_settings_out_of_range_are_one_line_errors(
    synthetic_data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["--target", "127.0.0.1:1", "loadtest", "--data-dir", str(synthetic_data_dir),
                 "--concurrency", "0"])
    err = capsys.readouterr().err
    assert code == 1 and "concurrency 0 must be at least 1" in err and err.count("\n") == 1


@pytest.mark.parametrize("engine", loadtest.ENGINES)
def test_no_server_is_a_connection_error(
    synthetic_data_dir: Path, capsys: pytest.CaptureFixture[str], engine: str
) -> None:
    # The command checks the target as every mnist-client command does (issue 14)...
    code = main(["--target", "127.0.0.1:1", "--timeout", "0.5", "loadtest", "--data-dir",
                 str(synthetic_data_dir), "--duration", "1", "--engine", engine])
    assert (code, capsys.readouterr().err) == (1, "mnist-client: error: cannot connect to 127.0.0.1:1: "
                                                  "connection refused (is mnist-serve running?)\n")
    # ...and the load tester's own processes, which connect on their own, still bound the wait.
    split = load_split(synthetic_data_dir, "t10k")
    workload = loadtest.build_workload(split.images[:8], split.labels[:8], batch=1)
    config = loadtest.LoadConfig(target="127.0.0.1:1", concurrency=2, duration=1.0, timeout=0.5,
                                 connect_timeout=0.5, processes=1, engine=engine)
    with pytest.raises(loadtest.LoadTestError, match=r"^127\.0\.0\.1:1: no connection within 0\.5s"):
        loadtest.run(config, workload, progress=False)


def test_the_h2_engine_takes_host_port_targets(
    synthetic_data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["--target", "dns:///localhost:50051", "loadtest", "--data-dir",
                 str(synthetic_data_dir), "--duration", "1"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert "target 'dns:///localhost:50051' is not host:port: engine h2 needs one" in err


def test_plot_draws_the_run(
    fake_server: ServerThread, synthetic_data_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    require_module("matplotlib", "the plot extra: pip install -e '.[plot]'")
    from PIL import Image

    plot = tmp_path / "load.png"
    code, result = run_cli(capsys, fake_server.target, "--data-dir", str(synthetic_data_dir),
                           "--concurrency", "2", "--requests", "150", "--plot", str(plot))
    assert code == 0 and result["ok"] == 150
    with Image.open(plot) as picture:
        width, height = picture.size
    assert width > 400 and height > 200


def test_the_load_tester_is_a_package_of_its_own_that_the_client_does_not_import() -> None:
    # Not part of the client library: digitserve.client holds no load tester, and importing the
    # library and its CLI loads neither the load tester nor what only it needs (hpack).
    import digitserve.client

    assert importlib.util.find_spec("digitserve.loadtest.generator") is not None
    library = {module.name for module in pkgutil.iter_modules(digitserve.client.__path__)}
    assert {"client", "cli"} <= library and not library & {"loadtest", "http2"}, library
    probe = ("import sys, digitserve.client, digitserve.client.cli; print(sorted(m for m in "
             "sys.modules if m.startswith(('digitserve.loadtest', 'hpack'))))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          check=True)
    assert done.stdout.strip() == "[]"


def test_distinct_errors_are_reported_with_the_servers_messages(fake_server: ServerThread) -> None:
    # One good request and three that fail three ways, in turn: each (code, message) pair is
    # counted with the server's own message, and a run with answers does not stop early.
    good = pb.PredictRequest(images=[pb.Image(uint8=bytes(784))]).SerializeToString()
    bad = [pb.PredictRequest(images=[pb.Image(uint8=bytes(784))], model_version=7),
           pb.PredictRequest(images=[pb.Image(uint8=bytes(784))], model_version=8),
           pb.PredictRequest(images=[pb.Image(uint8=bytes(12))])]
    payloads = (good, *(request.SerializeToString() for request in bad))
    workload = loadtest.Workload(payloads, tuple(np.zeros(1, dtype=np.int64) for _ in payloads),
                                 batch=1, encoding="uint8")
    stub = grpc.insecure_channel(fake_server.target)
    messages = []
    for payload in payloads[1:]:
        with pytest.raises(grpc.RpcError) as info:
            stub.unary_unary(loadtest.PREDICT_METHOD)(payload, timeout=10)
        messages.append((info.value.code().name, info.value.details()))
    stub.close()
    assert len(set(messages)) == 3 and all(message for _, message in messages)
    for engine in loadtest.ENGINES:
        config = loadtest.LoadConfig(target=fake_server.target, concurrency=4, requests=400,
                                     duration=60, connections=2, engine=engine)
        result = loadtest.run(config, workload)
        assert result.ok == 100 and not result.stopped_early
        assert result.errors == {"NOT_FOUND": 200, "INVALID_ARGUMENT": 100}
        assert sorted(result.error_messages) == sorted((code, message, 100)
                                                       for code, message in messages)
        text = loadtest.format_result(result)
        for code, message in messages:
            assert f"{100:>11} × {code}: {message}" in text.splitlines()
        summary = loadtest.error_summary(result)
        assert summary is not None and summary.startswith(
            "300 of 400 requests failed (INVALID_ARGUMENT 100, NOT_FOUND 200); ")


def test_a_model_the_server_lacks_stops_the_run_early_with_the_servers_message(
    spawn: type[ServerProcess], tiny_repo: Path, synthetic_data_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Issue 14: `loadtest --protocol oip --model-name resnet` against mnist-serve serving 'tiny'
    # said only `NOT_FOUND 3939`, after hammering the server for the whole --duration.
    server = spawn("--model-repo", str(tiny_repo), "--model-name", "tiny", "--metrics-port", "-1")
    target = server.target()
    assert main(["--target", target, "health", "--wait", "120"]) == 0
    capsys.readouterr()
    message = "model 'resnet' is not served; this server serves 'tiny'"
    for engine in loadtest.ENGINES:
        began = time.monotonic()
        code = main(["--target", target, "loadtest", "--data-dir", str(synthetic_data_dir),
                     "--protocol", "oip", "--model-name", "resnet", "--concurrency", "8",
                     "--duration", "120", "--engine", engine, "--json"])
        took = time.monotonic() - began
        captured = capsys.readouterr()
        result = json.loads(captured.out)
        n = result["requests"]
        assert code == 1 and result["ok"] == 0 and result["stopped_early"] is True
        assert 1 <= n <= loadtest.FAIL_FAST_CALLS + 8  # the 100th failure, or 1 s, stops it
        assert result["errors"] == {"NOT_FOUND": n}
        assert result["error_messages"] == [{"code": "NOT_FOUND", "message": message, "count": n}]
        assert took < 60, took  # not the 120 s asked for
        assert re.fullmatch(
            rf"mnist-client: error: stopped after \d+\.\d\d s: all {n} requests failed "
            rf"\(NOT_FOUND {n}\); most frequent: NOT_FOUND: {re.escape(message)}\n", captured.err)
    code = main(["--target", target, "loadtest", "--data-dir", str(synthetic_data_dir), "--protocol",
                 "oip", "--model-name", "resnet", "--concurrency", "8", "--duration", "120"])
    report = capsys.readouterr().out.splitlines()
    assert code == 1
    assert any(re.fullmatch(rf" +\d+ × NOT_FOUND: {re.escape(message)}", line) for line in report)
    assert any(line.startswith("stopped     early: all of the first ") for line in report)
