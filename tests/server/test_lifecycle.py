"""mnist-serve as a real process: settings, start-up failures, and a SIGTERM drain that loses no
in-flight call."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from digitserve.client.client import DigitClient, encode_images
from digitserve.idx import load_split
from digitserve.server.cli import main
from digitserve.server.settings import Settings, load_settings
from digitserve.v1 import digit_service_pb2 as pb
from digitserve.v1 import digit_service_pb2_grpc as pb_grpc
from tests.servers import ServerProcess
from tests.support import in_flight, wait_for


def test_settings_come_from_flags_then_environment(tmp_path: Path) -> None:
    env = {"MNIST_MODEL_REPO": str(tmp_path), "MNIST_PORT": "6000", "MNIST_GRACE_PERIOD": "2.5",
           "MNIST_MODEL_NAME": "digits"}
    settings = load_settings([], env)
    assert settings == Settings(model_repo=tmp_path, model_name="digits", port=6000,
                                grace_period=2.5)
    assert load_settings(["--port", "7000"], env).port == 7000


def test_bad_settings_are_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model-repo", str(tmp_path), "--port", "70000"]) == 2
    assert capsys.readouterr().err == "mnist-serve: error: port 70000 is not in 0..65535\n"
    with pytest.raises(SystemExit) as exit_info:
        load_settings([], {"MNIST_MODEL_REPO": str(tmp_path), "MNIST_PORT": "many"})
    assert exit_info.value.code == 2
    assert "argument --port: invalid int value: 'many'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load_settings([], {})
    assert "--model-repo" in capsys.readouterr().err


def test_missing_model_exits_2_with_a_clear_log_line(
    spawn: type[ServerProcess], tmp_path: Path
) -> None:
    # Before it listens (tests/server/test_start_errors.py has every case of a repository without it).
    server = spawn("--model-repo", str(tmp_path), "--model-name", "absent", "--exit-if-no-model")
    assert server.wait(60) == 2
    assert (f"cannot start: --model-repo {tmp_path}: the directory is empty: no model is published "
            f"there yet; publish one (mnist-train train --model-repo {tmp_path} --model-name absent)") \
        in server.log


def test_sigterm_drains_in_flight_calls_and_exits_0(
    spawn: type[ServerProcess], tiny_repo: Path, synthetic_data_dir: Path
) -> None:
    server = spawn("--model-repo", str(tiny_repo), "--model-name", "tiny", "--grace-period", "20",
                   "--metrics-port", "0")
    target = server.target()
    metrics_port = server.metrics_port()
    split = load_split(synthetic_data_dir, "t10k")
    images, labels = split.images.reshape(len(split.images), -1), split.labels
    with DigitClient(target, timeout=60) as client:
        assert client.wait_until_serving(60) == "SERVING"
        expected = client.evaluate(images, labels, batch_size=50)

    first_sent, resume = threading.Event(), threading.Event()

    def slow_stream() -> Iterator[pb.EvaluateRequest]:
        for start in range(0, len(images), 50):
            yield pb.EvaluateRequest(images=encode_images(images[start:start + 50]),
                                     labels=labels[start:start + 50].tolist())
            first_sent.set()
            resume.wait(30)

    results: dict[str, object] = {}
    with grpc.insecure_channel(target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stub = pb_grpc.DigitServiceStub(channel)
        future = stub.Evaluate.future(slow_stream(), timeout=60)
        assert first_sent.wait(30)
        wait_for(lambda: in_flight(metrics_port, "Evaluate") == 1, 30, "the call to be in flight")
        server.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        # A new call on a new connection is refused while the old call drains.
        with grpc.insecure_channel(target) as fresh:
            with pytest.raises(grpc.RpcError) as refused:
                pb_grpc.DigitServiceStub(fresh).Predict(
                    pb.PredictRequest(images=encode_images(images[:1])), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        resume.set()
        response = future.result(30)
        results["count"] = response.count
        results["accuracy"] = response.accuracy
    assert results == {"count": expected.count, "accuracy": expected.accuracy}
    assert server.wait(30) == 0
    assert time.monotonic() - started < 20
    assert "signal received: draining" in server.log and "stopped after draining" in server.log
    # JSON lines only (the default off a terminal), LiteRT's delegate notice included.
    for line in server.lines:
        assert isinstance(json.loads(line), dict), line


def test_unlabelled_predict_through_the_process(
    spawn: type[ServerProcess], tiny_repo: Path
) -> None:
    server = spawn(env={"MNIST_MODEL_REPO": str(tiny_repo), "MNIST_MODEL_NAME": "tiny",
                        "MNIST_ACCESS_LOG": "on"})
    with DigitClient(server.target(), timeout=30) as client:
        assert client.wait_until_serving(60) == "SERVING"
        result = client.predict(np.zeros((3, 784), dtype=np.uint8))
    assert result.probabilities.shape == (3, 10) and result.model_version == 1
    assert "loaded model tiny version 1 from" in server.log
    server.send_signal(signal.SIGINT)
    assert server.wait(30) == 0
    # The process writes its access lines itself, in batches, flushed at the latest on stop.
    access = [json.loads(line) for line in server.lines if '"logger": "digitserve.server.access"' in line]
    (predict,) = [e for e in access if e["method"] == "/digitserve.v1.DigitService/Predict"]
    assert predict["code"] == "OK" and predict["level"] == "INFO"
    assert re.fullmatch(r"[0-9a-f]{32}", predict["request_id"])
    assert str(predict["peer"]).startswith("ipv4:127.0.0.1:") and predict["latency_ms"] > 0
    assert predict["message"].startswith("/digitserve.v1.DigitService/Predict OK ")


def test_several_workers_share_the_port_and_drain_on_sigterm(
    spawn: type[ServerProcess], tiny_repo: Path
) -> None:
    server = spawn("--model-repo", str(tiny_repo), "--model-name", "tiny", "--workers", "2")
    target = server.target()
    pids = set()
    for _ in range(12):  # each channel is a new connection, which the kernel gives to a worker
        with DigitClient(target, timeout=60) as client:
            assert client.wait_until_serving(90) == "SERVING"
            assert client.predict(np.zeros(784, np.uint8)).model_version == 1
    # The other worker may still be loading its model.
    wait_for(lambda: server.log.count("serving model tiny version 1") >= 2, 90, "both workers serving")
    for line in server.lines:
        if "worker " in line and " starting" in line:
            pids.add(line.split("(pid ")[1].split(")")[0])
    assert len(pids) == 2
    assert server.log.count("serving model tiny version 1") == 2
    server.send_signal(signal.SIGTERM)
    assert server.wait(60) == 0
    assert server.log.count("stopped after draining") == 2
    assert "all workers stopped: exit codes [0, 0]" in server.log


def test_settle_memory_freezes_survivors_and_frees_a_replaced_model_s_cycles() -> None:
    import gc
    import weakref

    from digitserve.server.app import settle_memory

    class Node:
        pass

    model = Node()
    model.cycle = model  # type: ignore[attr-defined]  # like a Keras model's reference cycles
    ref = weakref.ref(model)
    try:
        settle_memory()
        assert gc.get_freeze_count() > 0
        del model  # replaced by a hot reload: only the cyclic collector can free it ...
        settle_memory()  # ... which the next settle lets in, by unfreezing first
        assert ref() is None
    finally:
        gc.unfreeze()
