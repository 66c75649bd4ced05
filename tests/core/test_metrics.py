"""Prometheus metrics: known traffic to a server with the fake model, the endpoint scraped over
127.0.0.1 and every number checked against what the fake model must have answered."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from digitserve.server.settings import Settings
from digitserve.server.telemetry import CONFIDENCE_BUCKETS, BulkHistogram
from digitserve.server.workers import _with_metrics_port
from digitserve.v1 import digit_service_pb2 as pb
from digitserve.v1 import digit_service_pb2_grpc as pb_grpc
from tests.servers import ServerThread
from tests.support import FakeModel, Samples, scrape

D = 784
SERVICE = "digitserve.v1.DigitService"


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def matching(samples: Samples, name: str, **labels: str) -> dict[frozenset[tuple[str, str]], float]:
    """Samples called ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return {key: v for (n, key), v in samples.items() if n == name and wanted <= key}


def varied_images(n: int, seed: int) -> npt.NDArray[np.uint8]:
    """Images whose brightness spans 0 to 255, so the fake model's confidence spans 0.1 to 1:
    dim images give flat softmaxes (low confidence), bright ones peaked ones."""
    rng = np.random.default_rng(seed)
    peaks = rng.integers(0, 256, size=(n, 1))
    return (rng.random((n, D)) * peaks).astype(np.uint8)


def request(images: npt.NDArray[np.uint8], version: int = 0) -> pb.PredictRequest:
    return pb.PredictRequest(images=[pb.Image(uint8=row.tobytes()) for row in images],
                             model_version=version)


def test_known_traffic_gives_exact_counts(start_server: Callable[..., ServerThread]) -> None:
    # A fake on purpose: its confidence follows the images' brightness (varied_images), from
    # flat to peaked answers, and the figures are checked against its own answers.
    model = FakeModel()
    server = start_server(lambda: model, metrics_port=0, low_confidence=0.5)
    assert server.app.metrics_port
    sizes = [1, 3, 2, 5, 1, 4, 8, 1]
    batches = [varied_images(n, seed) for seed, n in enumerate(sizes)]
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.DigitServiceStub(channel)
        before = len(model.calls)
        for images in batches:
            stub.Predict(request(images))
        predict_calls = model.calls[before:]
        for bad in (pb.PredictRequest(), request(np.zeros((1, 5), np.uint8)), pb.PredictRequest()):
            with pytest.raises(grpc.RpcError) as info:
                stub.Predict(bad)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(request(batches[0], version=7))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        stub.GetModelInfo(pb.GetModelInfoRequest())
        evaluated = varied_images(6, 99)
        stub.Evaluate(iter([pb.EvaluateRequest(images=request(evaluated).images, labels=[1] * 6)]))
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    samples = scrape(server.app.metrics_port)

    def handled(method: str, code: str, service: str = SERVICE) -> float:
        return value(samples, "grpc_server_handled_total", grpc_service=service, grpc_method=method,
                     grpc_code=code, grpc_type="client_stream" if method == "Evaluate" else "unary")

    assert handled("Predict", "OK") == len(sizes)
    assert handled("Predict", "INVALID_ARGUMENT") == 3
    assert handled("Predict", "NOT_FOUND") == 1
    assert handled("GetModelInfo", "OK") == 1
    assert handled("Evaluate", "OK") == 1
    assert handled("Check", "OK", service="grpc.health.v1.Health") == 1
    predict = {"grpc_service": SERVICE, "grpc_method": "Predict", "grpc_type": "unary"}
    assert value(samples, "grpc_server_handling_seconds_count", **predict) == len(sizes) + 4
    assert value(samples, "grpc_server_in_flight_calls", **predict) == 0

    # Quality: exactly what the fake model answers for the Predict images (Evaluate not counted).
    probs = FakeModel().predict(np.concatenate(batches).astype(np.float32) / np.float32(255))
    top = probs.max(axis=1)
    expected_classes = np.bincount(probs.argmax(axis=1), minlength=10)
    low = int(np.count_nonzero(top < 0.5))
    assert 0 < low < len(top), "the traffic should hold confident and unconfident answers"
    model_labels = {"model_name": "fake", "model_version": "1"}
    counted = matching(samples, "digitserve_predictions_total", **model_labels)
    assert len(counted) == 10  # every class has a series, zero or not
    for k in range(10):
        assert value(samples, "digitserve_predictions_total", **model_labels, **{"class": str(k)}) \
            == expected_classes[k]
    assert value(samples, "digitserve_low_confidence_predictions_total", **model_labels) == low
    assert value(samples, "digitserve_low_confidence_threshold") == 0.5
    assert value(samples, "digitserve_prediction_confidence_count", **model_labels) == len(top)
    assert value(samples, "digitserve_prediction_confidence_sum", **model_labels) \
        == pytest.approx(float(top.astype(np.float64).sum()))
    for bound in CONFIDENCE_BUCKETS:
        assert value(samples, "digitserve_prediction_confidence_bucket", **model_labels,
                     le=repr(bound)) == np.count_nonzero(top <= bound)

    # Batching: one model call per sequential Predict, each of the request's size.
    assert predict_calls == sizes
    assert value(samples, "digitserve_batch_size_count") == len(sizes)
    assert value(samples, "digitserve_batch_size_sum") == sum(sizes)
    assert value(samples, "digitserve_batch_size_bucket", le="1.0") == sizes.count(1)
    assert value(samples, "digitserve_batch_queue_seconds_count") == len(sizes)
    assert value(samples, "digitserve_queued_images") == 0

    # The model: what is served, and how it got there.
    assert value(samples, "digitserve_model_info", preset="fake", inference="fake",
                 **model_labels) == 1
    assert value(samples, "digitserve_model_loads_total", model_name="fake", outcome="served") == 1
    assert value(samples, "digitserve_model_loads_total", model_name="fake", outcome="refused") == 0
    assert value(samples, "digitserve_model_reloads_total", model_name="fake", outcome="served") == 0


def test_servers_in_one_process_keep_their_own_counts(
    start_server: Callable[..., ServerThread],
) -> None:
    first = start_server(metrics_port=0)
    second = start_server(metrics_port=0)
    with grpc.insecure_channel(first.target) as channel:
        for _ in range(3):
            pb_grpc.DigitServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest())
    labels = {"grpc_service": SERVICE, "grpc_method": "GetModelInfo", "grpc_type": "unary",
              "grpc_code": "OK"}
    assert first.app.metrics_port and second.app.metrics_port
    assert value(scrape(first.app.metrics_port), "grpc_server_handled_total", **labels) == 3
    assert not matching(scrape(second.app.metrics_port), "grpc_server_handled_total", **labels)


def test_metrics_are_off_by_default(start_server: Callable[..., ServerThread]) -> None:
    assert start_server().app.metrics_port is None


def test_request_id_is_echoed_or_generated(tiny_server: ServerThread) -> None:
    with grpc.insecure_channel(tiny_server.target) as channel:
        stub = pb_grpc.DigitServiceStub(channel)
        _, call = stub.GetModelInfo.with_call(
            pb.GetModelInfoRequest(), metadata=(("x-request-id", "trace-42"),))
        assert ("x-request-id", "trace-42") in [tuple(m) for m in call.trailing_metadata()]
        with pytest.raises(grpc.RpcError) as info:  # an error echoes it too
            stub.Predict(pb.PredictRequest(), metadata=(("x-request-id", "trace-43"),))
        assert ("x-request-id", "trace-43") in [tuple(m) for m in info.value.trailing_metadata()]
        ids = set()
        for sent in (None, (("x-request-id", "bad id with spaces"),)):
            _, call = stub.GetModelInfo.with_call(pb.GetModelInfoRequest(), metadata=sent)
            (echoed,) = [m.value for m in call.trailing_metadata() if m.key == "x-request-id"]
            assert len(echoed) == 32 and int(echoed, 16) >= 0
            ids.add(echoed)
        assert len(ids) == 2


def test_bulk_histogram_equals_prometheus_histogram() -> None:
    buckets = (0.1, 0.25, 0.5, 0.9, 1.0)
    values = np.concatenate([np.random.default_rng(0).random(500), buckets, [0.0, 2.0]])
    native_registry, bulk_registry = CollectorRegistry(), CollectorRegistry()
    native = Histogram("h", "a histogram", ["v"], buckets=buckets, registry=native_registry)
    bulk = BulkHistogram("h", "a histogram", ["v"], buckets)
    bulk_registry.register(bulk)
    for part in np.array_split(values, 7):
        bulk.observe(("1",), part)
        for v in part.tolist():
            native.labels("1").observe(v)

    def parsed(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
        text = generate_latest(registry).decode()
        return {
            (s.name, s.labels.get("le", "")): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if not s.name.endswith("_created")
        }

    expected = parsed(native_registry)
    got = parsed(bulk_registry)
    assert got.keys() == expected.keys()
    for key, v in expected.items():
        assert got[key] == pytest.approx(v), key


@pytest.mark.parametrize(("given", "index", "expected"), [(9100, 2, 9102), (0, 3, 0), (-1, 1, -1)])
def test_each_worker_gets_its_own_metrics_port(given: int, index: int, expected: int) -> None:
    settings = Settings(model_repo=Path("."), metrics_port=given, workers=4)
    assert _with_metrics_port(settings, index).metrics_port == expected


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"metrics_port": -2}, "metrics port -2 is not in -1..65535"),
        ({"metrics_port": 65535, "workers": 2}, "metrics ports 65535+0..1 exceed 65535"),
        ({"low_confidence": 1.5}, "low confidence 1.5 is not in [0, 1]"),
        ({"log_format": "xml"}, "log format 'xml' is not one of auto, json, text"),
    ],
)
def test_bad_observability_settings_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("+", r"\+")):
        Settings(model_repo=Path("."), **overrides)  # type: ignore[arg-type]
