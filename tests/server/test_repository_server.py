"""One process serves every model of the repository (issue 15): each model answers its own
predictions under its own name, models that appear are served and models that disappear stop
being served, version labels move under load without losing a call, a canary weight splits
unpinned calls, and the model config file is read again when it changes (a broken change keeps
the previous config and says why). Real models over a real channel on 127.0.0.1."""

from __future__ import annotations

import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from digitserve.client.client import encode_images
from digitserve.inference import load_version, read_check_set
from digitserve.repository import ModelRepository
from digitserve.v1 import digit_service_pb2 as pb
from digitserve.v1 import digit_service_pb2_grpc as pb_grpc
from tests.server.test_server import images_u8
from tests.servers import ServerThread
from tests.support import expect_error, publish_copy, scrape, wait_for


def publish_as(root: Path, source_dir: Path, name: str) -> int:
    """Publishes the version in ``source_dir`` as the next version of model ``name`` in the
    repository ``root``; returns the version."""
    return publish_copy(ModelRepository(root), source_dir, name)


@pytest.fixture
def two_models(tmp_path: Path, digits_dir: Path, bars_dir: Path) -> Path:
    """A repository of two different models: 'digits' (the tiny model) and 'bars' (a seed
    model trained on noisy bars)."""
    root = tmp_path / "two-models"
    root.mkdir()
    publish_as(root, digits_dir, "digits")
    publish_as(root, bars_dir, "bars")
    return root


def predict(stub: pb_grpc.DigitServiceStub, images: np.ndarray, **fields: Any) -> pb.PredictResponse:
    response: pb.PredictResponse = stub.Predict(
        pb.PredictRequest(images=encode_images(images), **fields), timeout=30)
    return response


def probabilities(response: pb.PredictResponse) -> np.ndarray:
    return np.array([list(p.probabilities) for p in response.predictions], dtype=np.float32)


@pytest.fixture
def channel_to() -> Iterator[Callable[[ServerThread], grpc.Channel]]:
    channels: list[grpc.Channel] = []

    def open_channel(server: ServerThread) -> grpc.Channel:
        channel = grpc.insecure_channel(server.target)
        channels.append(channel)
        return channel

    yield open_channel
    for channel in channels:
        channel.close()


def refused(call: Callable[[], object], code: grpc.StatusCode, message: str) -> None:
    """``call`` fails with exactly ``code`` and ``message``."""
    assert expect_error(call, code).details() == message


def health(channel: grpc.Channel, service: str = "") -> str:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10)
    except grpc.RpcError as error:
        return str(error.code().name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def test_one_process_serves_every_model_of_the_repository_each_its_own_predictions(
    two_models: Path, digits_dir: Path, bars_dir: Path, start_server: Callable[..., ServerThread],
    channel_to: Callable[[ServerThread], grpc.Channel],
) -> None:
    server = start_server(model_repo=two_models, model_name=())
    channel = channel_to(server)
    stub = pb_grpc.DigitServiceStub(channel)
    images = images_u8(16, seed=3)
    pixels = images.reshape(16, -1).astype(np.float32) / 255
    for name, version_dir in (("digits", digits_dir), ("bars", bars_dir)):
        answer = predict(stub, images, model_name=name)
        assert (answer.model_name, answer.model_version) == (name, 1)
        local = load_version(version_dir, check_set=read_check_set(version_dir)).predict(pixels)
        np.testing.assert_allclose(probabilities(answer), local, atol=1e-6)
    assert not np.allclose(probabilities(predict(stub, images, model_name="digits")),
                           probabilities(predict(stub, images, model_name="bars")), atol=1e-2)
    info = stub.GetModelInfo(pb.GetModelInfoRequest(model_name="bars"), timeout=10)
    assert (info.model_name, info.model_version) == ("bars", 1)

    refused(lambda: predict(stub, images), grpc.StatusCode.INVALID_ARGUMENT,
                 "model_name: empty, and this server serves 2 models ('bars', 'digits') and has no "
                 "default model; name one, or start the server with --default-model")
    refused(lambda: predict(stub, images, model_name="fashion"), grpc.StatusCode.NOT_FOUND,
                 "model 'fashion' is not served; this server serves 'bars', 'digits'")
    listed = stub.ListModels(pb.ListModelsRequest(), timeout=10)
    assert [(m.name, m.state, m.default_version) for m in listed.models] == [
        ("bars", pb.MODEL_STATE_SERVING, 1), ("digits", pb.MODEL_STATE_SERVING, 1)]
    assert [(v.version, v.state) for v in listed.models[0].versions] == [(1, pb.VERSION_STATE_SERVING)]
    assert listed.default_model == ""
    assert health(channel) == "SERVING"
    assert health(channel, "digitserve.v1.Model/bars") == "SERVING"
    metrics = scrape(server.app.metrics_port) if server.app.metrics_port else None
    assert metrics is None or metrics[("digitserve_model_request_seconds_count",
                                       frozenset({("model_name", "bars"), ("model_version", "1")}))] >= 1


def test_the_default_model_answers_requests_without_a_name(
    two_models: Path, start_server: Callable[..., ServerThread],
    channel_to: Callable[[ServerThread], grpc.Channel],
) -> None:
    server = start_server(model_repo=two_models, model_name=(), default_model="digits")
    stub = pb_grpc.DigitServiceStub(channel_to(server))
    assert predict(stub, images_u8(2)).model_name == "digits"
    assert stub.ListModels(pb.ListModelsRequest(), timeout=10).default_model == "digits"
    # Evaluate names its model in its first message; a later message may not name another.
    labels = [0, 1]
    batch = encode_images(images_u8(2))
    requests = iter([pb.EvaluateRequest(images=batch, labels=labels, model_name="bars"),
                     pb.EvaluateRequest(images=batch, labels=labels, model_name="digits")])
    refused(lambda: stub.Evaluate(requests, timeout=30), grpc.StatusCode.INVALID_ARGUMENT,
                 "requests[1].model_name: 'digits' differs from 'bars' named at the start of this stream")
    result = stub.Evaluate(iter([pb.EvaluateRequest(images=encode_images(images_u8(2)), labels=labels,
                                                    model_name="bars")]), timeout=30)
    assert (result.model_name, result.count) == ("bars", 2)


def test_a_model_added_while_serving_is_served_and_a_removed_one_stops(
    tmp_path: Path, digits_dir: Path, bars_dir: Path, start_server: Callable[..., ServerThread],
    channel_to: Callable[[ServerThread], grpc.Channel], capsys: pytest.CaptureFixture[str],
) -> None:
    root = tmp_path / "growing"
    root.mkdir()
    publish_as(root, digits_dir, "digits")
    interval = 0.2
    server = start_server(model_repo=root, model_name=(), reload_interval=interval,
                          removed_version_grace=0)
    channel = channel_to(server)
    stub = pb_grpc.DigitServiceStub(channel)
    images = images_u8(4)
    assert predict(stub, images).model_name == "digits"  # the only model is the default
    stop = threading.Event()
    outcomes: Counter[str] = Counter()

    def load() -> None:  # the other model is called all along
        while not stop.is_set():
            try:
                predict(stub, images, model_name="digits")
                outcomes["OK"] += 1
            except grpc.RpcError as error:
                outcomes[error.code().name] += 1

    caller = threading.Thread(target=load, daemon=True)
    caller.start()
    try:
        published = time.monotonic()
        publish_as(root, bars_dir, "bars")
        wait_for(lambda: _answers(stub, images, "bars"), 30, "model bars to be served")
        added = time.monotonic() - published
        assert health(channel, "digitserve.v1.Model/bars") == "SERVING"
        shutil.rmtree(root / "bars")
        removed_at = time.monotonic()
        wait_for(lambda: not _answers(stub, images, "bars"), 30, "model bars to stop being served")
        removed = time.monotonic() - removed_at
        refused(lambda: predict(stub, images, model_name="bars"), grpc.StatusCode.NOT_FOUND,
                     "model 'bars' is not served; this server serves 'digits'")
        assert health(channel, "digitserve.v1.Model/bars") == "NOT_SERVING"
    finally:
        stop.set()
        caller.join(10)
    assert outcomes["OK"] > 0 and set(outcomes) == {"OK"}, outcomes
    with capsys.disabled():
        print(f"\nmodel added: served {added:.2f}s after publishing (watch interval {interval}s); "
              f"removed: NOT_FOUND {removed:.2f}s after its directory went; the other model "
              f"answered {outcomes['OK']} calls meanwhile, 0 failed")
    assert added < 10 * interval + 5


def _answers(stub: pb_grpc.DigitServiceStub, images: np.ndarray, name: str) -> bool:
    try:
        return predict(stub, images, model_name=name).model_name == name
    except grpc.RpcError as error:
        if error.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
            return False
        raise


def write_config(path: Path, text: str) -> None:
    """Replaces the config file at once (as an editor or a ConfigMap update does), with a new
    modification time even within the file system's time resolution."""
    staged = path.with_suffix(".tmp")
    staged.write_text(text)
    stamp = time.time_ns() + 1_000_000_000 * (1 + (path.stat().st_mtime_ns if path.exists() else 0) % 7)
    import os

    os.utime(staged, ns=(stamp, stamp))
    staged.replace(path)


@pytest.fixture
def three_versions(tmp_path: Path, digits_dir: Path) -> Path:
    """Model 'digits' with versions 1, 2 and 3 (the same weights: only the version differs)."""
    root = tmp_path / "versions"
    root.mkdir()
    for _ in range(3):
        publish_as(root, digits_dir, "digits")
    return root


def test_labels_switched_under_load_lose_no_call(
    three_versions: Path, tmp_path: Path, start_server: Callable[..., ServerThread],
    channel_to: Callable[[ServerThread], grpc.Channel], capsys: pytest.CaptureFixture[str],
) -> None:
    config = tmp_path / "models.toml"
    write_config(config, '[models.digits]\nlabels = { stable = 1 }\n')
    server = start_server(model_repo=three_versions, model_name=(), model_config=config,
                          reload_interval=0.1)
    stub = pb_grpc.DigitServiceStub(channel_to(server))
    images = images_u8(1)
    assert predict(stub, images, version_label="stable").model_version == 1
    assert predict(stub, images).model_version == 1  # unpinned calls go to the stable version
    stop = threading.Event()
    seen: list[Counter[str]] = [Counter(), Counter()]

    def load(index: int, fields: dict[str, Any]) -> None:
        channel = grpc.insecure_channel(server.target)
        caller = pb_grpc.DigitServiceStub(channel)
        try:
            while not stop.is_set():
                try:
                    seen[index][str(predict(caller, images, **fields).model_version)] += 1
                except grpc.RpcError as error:
                    seen[index][error.code().name] += 1
        finally:
            channel.close()

    callers = [threading.Thread(target=load, args=(0, {"version_label": "stable"}), daemon=True),
               threading.Thread(target=load, args=(1, {}), daemon=True)]
    for caller in callers:
        caller.start()
    switches = 0
    try:
        for version in (2, 3, 1, 3, 2):
            write_config(config, f'[models.digits]\nlabels = {{ stable = {version} }}\n')
            wait_for(lambda v=version: predict(stub, images, version_label="stable").model_version == v,
                     30, f"stable to name version {version}")
            switches += 1
        wait_for(lambda: sum(seen[0].values()) + sum(seen[1].values()) >= 1000, 60, "1,000 calls")
    finally:
        stop.set()
        for caller in callers:
            caller.join(10)
    calls = sum(seen[0].values()) + sum(seen[1].values())
    failed = {k: n for counts in seen for k, n in counts.items() if not k.isdigit()}
    with capsys.disabled():
        print(f"\nlabels switched {switches} times under load: {calls} calls, failed {failed or 0}; "
              f"by version: label {dict(seen[0])}, unpinned {dict(seen[1])}")
    assert not failed and calls >= 1000
    assert set(seen[0]) == {"1", "2", "3"}


def test_a_canary_weight_splits_unpinned_calls_and_metrics_tell_the_versions_apart(
    three_versions: Path, tmp_path: Path, start_server: Callable[..., ServerThread],
    channel_to: Callable[[ServerThread], grpc.Channel], capsys: pytest.CaptureFixture[str],
) -> None:
    config = tmp_path / "models.toml"
    weight = 0.1
    write_config(config, "[models.digits]\nlabels = { stable = 2, canary = 3 }\n"
                         f"canary_weight = {weight}\n")
    server = start_server(model_repo=three_versions, model_name=(), model_config=config,
                          metrics_port=0)
    stub = pb_grpc.DigitServiceStub(channel_to(server))
    images = images_u8(1)
    request = pb.PredictRequest(images=encode_images(images))
    calls = 5000
    versions = Counter(stub.Predict(request, timeout=30).model_version for _ in range(calls))
    share = versions[3] / calls
    with capsys.disabled():
        print(f"\ncanary weight {weight}: of {calls} unpinned calls version 3 (canary) answered "
              f"{versions[3]} ({share:.2%}), version 2 (stable) {versions[2]}")
    assert set(versions) == {2, 3}
    assert abs(share - weight) <= 0.02
    assert predict(stub, images, version_label="canary").model_version == 3
    pinned = pb.PredictRequest(images=encode_images(images), model_version=2)
    assert {stub.Predict(pinned, timeout=30).model_version for _ in range(200)} == {2}  # not split
    samples = scrape(server.app.metrics_port)
    for version in (2, 3):
        series = frozenset({("model_name", "digits"), ("model_version", str(version))})
        key = ("digitserve_model_request_seconds_count", series)
        assert samples[key] == versions[version] + (1 if version == 3 else 200)
    listed = stub.ListModels(pb.ListModelsRequest(model_name="digits"), timeout=10).models[0]
    assert dict(listed.labels) == {"stable": 2, "canary": 3}
    assert listed.canary_weight == pytest.approx(weight)
    assert listed.default_version == 2
    unpinned = {stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).model_version for _ in range(50)}
    assert unpinned == {2}  # GetModelInfo (and Evaluate) are not split: they describe stable
    info = stub.GetModelInfo(pb.GetModelInfoRequest(version_label="canary"), timeout=10)
    assert (info.model_version, list(info.version_labels)) == (3, ["canary"])
    refused(lambda: predict(stub, images, version_label="beta"), grpc.StatusCode.NOT_FOUND,
                 "model 'digits' has no version label 'beta' (labels: canary -> 3, stable -> 2)")
    refused(lambda: predict(stub, images, version_label="stable", model_version=2),
                 grpc.StatusCode.INVALID_ARGUMENT,
                 "version_label: 'stable' and model_version 2 both name a version; set one of them")


def test_a_broken_config_change_keeps_the_previous_config_and_says_why(
    three_versions: Path, tmp_path: Path, start_server: Callable[..., ServerThread],
    channel_to: Callable[[ServerThread], grpc.Channel],
) -> None:
    config = tmp_path / "models.toml"
    write_config(config, '[models.digits]\nlabels = { stable = 2 }\n')
    server = start_server(model_repo=three_versions, model_name=(), model_config=config,
                          reload_interval=0.1, metrics_port=0)
    stub = pb_grpc.DigitServiceStub(channel_to(server))
    write_config(config, '[models.digits]\nlabels = { stable = 2 }\ncanary_weight = 0.5\n')
    expected = (f"--model-config {config}: models.digits.canary_weight: 0.5 needs a 'canary' label "
                "naming the canary version (models.digits.labels)")
    wait_for(lambda: stub.ListModels(pb.ListModelsRequest(), timeout=10).config_error == expected, 30,
             "the error to be reported")
    listed = stub.ListModels(pb.ListModelsRequest(), timeout=10)
    assert listed.config_path == str(config)
    assert dict(listed.models[0].labels) == {"stable": 2}
    assert predict(stub, images_u8(1)).model_version == 2
    samples = scrape(server.app.metrics_port)
    assert samples[("digitserve_model_config_ok", frozenset())] == 0
    assert samples[("digitserve_model_config_errors_total", frozenset())] == 1
    # A label naming a version that is not published keeps its previous version, and says so.
    write_config(config, '[models.digits]\nlabels = { stable = 7 }\n')
    wait_for(lambda: stub.ListModels(pb.ListModelsRequest(), timeout=10).config_error == "", 30,
             "the fixed config to be applied")
    wait_for(lambda: "label stable" in stub.ListModels(pb.ListModelsRequest(), timeout=10).models[0].reason,
             30, "the label's problem to be reported")
    status = stub.ListModels(pb.ListModelsRequest(), timeout=10).models[0]
    assert status.reason == "label stable: version 7 is not published"
    assert dict(status.labels) == {"stable": 2}
    assert scrape(server.app.metrics_port)[("digitserve_model_config_ok", frozenset())] == 1


def test_a_server_on_an_empty_repository_serves_the_first_model_published(
    tmp_path: Path, digits_dir: Path, spawn: Any,
) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    server = spawn("--model-repo", str(root), "--reload-interval", "0.2", "--log-format", "text")
    channel = grpc.insecure_channel(server.target())
    try:
        assert health(channel) == "NOT_SERVING"
        stub = pb_grpc.DigitServiceStub(channel)
        assert list(stub.ListModels(pb.ListModelsRequest(), timeout=10).models) == []
        publish_as(root, digits_dir, "digits")
        wait_for(lambda: health(channel) == "SERVING", 60, "health SERVING")
        assert predict(stub, images_u8(1)).model_name == "digits"
    finally:
        channel.close()
    assert "waiting for a model in" in server.log


def test_one_models_refused_version_leaves_the_other_model_alone(
    two_models: Path, bars_dir: Path, start_server: Callable[..., ServerThread],
    channel_to: Callable[[ServerThread], grpc.Channel],
) -> None:
    server = start_server(model_repo=two_models, model_name=(), reload_interval=0.2)
    channel = channel_to(server)
    stub = pb_grpc.DigitServiceStub(channel)
    version = publish_as(two_models, bars_dir, "bars")
    flatbuffer = two_models / "bars" / str(version) / "model.tflite"
    flatbuffer.write_bytes(flatbuffer.read_bytes()[:-8] + b"\0" * 8)  # its checksum no longer holds
    wait_for(lambda: health(channel, "digitserve.v1.ModelUpdates/bars") == "NOT_SERVING", 30,
             "version 2 of bars to be refused")
    status = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
    refusal = status["bars"].versions[0]
    assert (refusal.version, refusal.state) == (2, pb.VERSION_STATE_REFUSED)
    assert refusal.reason.startswith(f"{flatbuffer}: sha256 "), refusal.reason
    assert [(v.version, v.state) for v in status["digits"].versions] == [(1, pb.VERSION_STATE_SERVING)]
    assert health(channel, "digitserve.v1.ModelUpdates/digits") == "SERVING"
    assert health(channel, "digitserve.v1.ModelUpdates") == "NOT_SERVING"  # some model is stale
    assert health(channel) == "SERVING"
    assert predict(stub, images_u8(1), model_name="bars").model_version == 1
    assert predict(stub, images_u8(1), model_name="digits").model_version == 1
