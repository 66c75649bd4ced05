"""The server over a real channel on 127.0.0.1: every RPC, every bad input with its exact code,
health transitions and reflection. The RPCs' answers are checked on the fake model, on purpose
(its answers are known without a model, an image crashes it, it records its calls); what needs
no fake runs on the tiny model served from its repository."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from digitserve.client.client import encode_images
from digitserve.metrics import MetricsAccumulator
from digitserve.server.status import INTERNAL_MESSAGE
from digitserve.v1 import digit_service_pb2 as pb
from digitserve.v1 import digit_service_pb2_grpc as pb_grpc
from tests.servers import ServerThread
from tests.support import FakeModel, assert_metrics_match, expect_error

D = 784


@pytest.fixture
def channel(fake_server: ServerThread) -> Iterator[grpc.Channel]:
    """A channel to the fake model's server (on purpose: see the module's docstring)."""
    with grpc.insecure_channel(fake_server.target) as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.Channel) -> pb_grpc.DigitServiceStub:
    return pb_grpc.DigitServiceStub(channel)


def images_u8(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, D), dtype=np.uint8)



def test_predict_encodings_agree_and_match_the_model(stub: pb_grpc.DigitServiceStub) -> None:
    raw = images_u8(3)
    floats = raw.astype(np.float32) / np.float32(255)
    by_u8 = stub.Predict(pb.PredictRequest(images=[pb.Image(uint8=r.tobytes()) for r in raw]))
    by_f32 = stub.Predict(pb.PredictRequest(images=encode_images(floats)))
    by_list = stub.Predict(pb.PredictRequest(
        images=[pb.Image(floats=pb.FloatPixels(values=r.tolist())) for r in floats]))
    expected = FakeModel().predict(floats)
    for response in (by_u8, by_f32, by_list):
        assert response.model_name == "fake" and response.model_version == 1
        got = np.array([p.probabilities for p in response.predictions], dtype=np.float32)
        np.testing.assert_array_equal(got, expected)
        for p, row in zip(response.predictions, expected, strict=True):
            assert p.class_index == int(np.argmax(row))
            assert p.label == str(p.class_index)
            assert p.probability == pytest.approx(float(row.max()))


def test_mixed_encodings_in_one_request(stub: pb_grpc.DigitServiceStub) -> None:
    raw = images_u8(2, seed=3)
    request = pb.PredictRequest(images=[
        pb.Image(uint8=raw[0].tobytes()),
        pb.Image(float32=(raw[1].astype(np.float32) / np.float32(255)).tobytes()),
    ])
    got = np.array([p.probabilities for p in stub.Predict(request).predictions], dtype=np.float32)
    np.testing.assert_array_equal(got, FakeModel().predict(raw.astype(np.float32) / np.float32(255)))


def bad_requests() -> list[tuple[str, pb.PredictRequest, str]]:
    good = np.full(D, 0.5, dtype=np.float32)
    nan = good.copy()
    nan[17] = np.nan
    inf = good.copy()
    inf[3] = np.inf
    high = good.copy()
    high[5] = 1.5
    neg = good.copy()
    neg[9] = -0.25
    ok = pb.Image(float32=good.tobytes())
    return [
        ("empty", pb.PredictRequest(), "images: empty; expected at least 1 image"),
        ("short uint8", pb.PredictRequest(images=[ok, pb.Image(uint8=b"\x00" * 783)]),
         "images[1].uint8: got 783 bytes, expected 784"),
        ("long float32", pb.PredictRequest(images=[pb.Image(float32=b"\x00" * (4 * D + 4))]),
         "images[0].float32: got 3140 bytes, expected 3136"),
        ("ragged float32", pb.PredictRequest(images=[pb.Image(float32=b"\x00" * 10)]),
         "images[0].float32: got 10 bytes"),
        ("floats count", pb.PredictRequest(images=[pb.Image(floats=pb.FloatPixels(values=[0.5] * 10))]),
         "images[0].floats.values: got 10 pixels, expected 784"),
        ("no pixels", pb.PredictRequest(images=[ok, ok, pb.Image()]),
         "images[2]: no pixels; set one of floats, uint8, float32 or encoded"),
        ("nan", pb.PredictRequest(images=[ok, pb.Image(floats=pb.FloatPixels(values=nan.tolist()))]),
         "images[1].floats.values[17]: nan is not a finite number"),
        ("inf", pb.PredictRequest(images=[pb.Image(float32=inf.tobytes())]),
         "images[0].float32[3]: inf is not a finite number"),
        ("above 1", pb.PredictRequest(images=[pb.Image(float32=high.tobytes())]),
         "images[0].float32[5]: 1.5 is out of range; expected a pixel intensity in [0, 1]"),
        ("negative", pb.PredictRequest(images=[ok, ok, ok, pb.Image(float32=neg.tobytes())]),
         "images[3].float32[9]: -0.25 is out of range"),
        ("too many", pb.PredictRequest(images=[ok] * 1025),
         "images: 1025 images exceed the limit of 1024 per request"),
    ]


@pytest.mark.parametrize(("name", "request_", "message"), bad_requests(),
                         ids=[b[0] for b in bad_requests()])
def test_bad_predict_input_is_invalid_argument_and_server_keeps_serving(
    stub: pb_grpc.DigitServiceStub, name: str, request_: pb.PredictRequest, message: str
) -> None:
    err = expect_error(lambda: stub.Predict(request_), grpc.StatusCode.INVALID_ARGUMENT, message)
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None and status.message == err.details()
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    assert message.startswith(bad_request.field_violations[0].field + ": ")
    ok = stub.Predict(pb.PredictRequest(images=encode_images(images_u8(1))))
    assert len(ok.predictions) == 1


def test_unknown_version_is_not_found(stub: pb_grpc.DigitServiceStub) -> None:
    request = pb.PredictRequest(images=encode_images(images_u8(1)), model_version=7)
    expect_error(lambda: stub.Predict(request), grpc.StatusCode.NOT_FOUND,
                 "model 'fake' version 7 is not served (serving version 1; loaded: 1)")
    err = expect_error(lambda: stub.GetModelInfo(pb.GetModelInfoRequest(model_version=2)),
                       grpc.StatusCode.NOT_FOUND)
    assert err.details() == "model 'fake' version 2 is not served (serving version 1; loaded: 1)"
    pinned = stub.Predict(pb.PredictRequest(images=encode_images(images_u8(1)), model_version=1))
    assert pinned.model_version == 1


def test_unexpected_error_is_internal_with_fixed_message(stub: pb_grpc.DigitServiceStub) -> None:
    crash = np.zeros(D, dtype=np.float32)
    crash[0] = FakeModel.CRASH_PIXEL
    request = pb.PredictRequest(images=[pb.Image(float32=crash.tobytes())])
    expect_error(lambda: stub.Predict(request), grpc.StatusCode.INTERNAL)
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(request)
    assert info.value.details() == INTERNAL_MESSAGE  # nothing of the traceback leaks
    assert stub.Predict(pb.PredictRequest(images=encode_images(images_u8(2)))).predictions


def test_oversized_message_is_resource_exhausted(start_server: Callable[..., ServerThread]) -> None:
    server = start_server(max_message_bytes=64 * 1024)
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.DigitServiceStub(ch)
        request = pb.PredictRequest(images=encode_images(np.zeros((30, D), np.float32)))
        expect_error(lambda: stub.Predict(request), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert stub.Predict(pb.PredictRequest(images=encode_images(images_u8(1)))).predictions


def evaluate_requests(images: np.ndarray, labels: np.ndarray, batch: int,
                      version: int = 0) -> Iterator[pb.EvaluateRequest]:
    for start in range(0, len(images), batch):
        yield pb.EvaluateRequest(images=encode_images(images[start:start + batch]),
                                 labels=labels[start:start + batch].tolist(),
                                 model_version=version)


def test_evaluate_streams_batches_and_matches_local_metrics(
    stub: pb_grpc.DigitServiceStub, fake_server: ServerThread
) -> None:
    images = images_u8(250, seed=5)
    labels = np.random.default_rng(6).integers(0, 10, size=250)
    response = stub.Evaluate(evaluate_requests(images, labels, batch=100))
    model = FakeModel()
    probs = np.concatenate([model.predict(images[s:s + 100].astype(np.float32) / np.float32(255))
                            for s in range(0, 250, 100)])
    assert_metrics_match({
        "count": response.count, "accuracy": response.accuracy,
        "mean_cross_entropy": response.mean_cross_entropy,
        "confusion_matrix": [list(r.counts) for r in response.confusion_matrix],
        "per_class": [{"precision": c.precision, "recall": c.recall, "f1": c.f1,
                       "support": c.support} for c in response.per_class],
    }, labels, probs)
    assert list(response.labels) == [str(d) for d in range(10)]
    assert response.model_version == 1
    assert fake_server.model.calls[-3:] == [100, 100, 50]  # type: ignore[union-attr]


def test_metrics_of_a_tiny_set_by_hand() -> None:
    # 3 classes, 5 images, in two batches. True 0,0,1,2,2; predicted 0,1,1,2,0.
    probs = np.array([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.1, 0.8, 0.1],
                      [0.2, 0.2, 0.6], [0.5, 0.0, 0.5 - 1e-9]])
    accumulator = MetricsAccumulator(["a", "b", "c"])
    accumulator.update(np.array([0, 0]), probs[:2])
    accumulator.update(np.array([1, 2, 2]), probs[2:])
    result = accumulator.result()
    assert result.count == 5
    assert result.accuracy == pytest.approx(3 / 5)
    assert result.confusion_matrix == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    # Class a: 1 of 2 predicted a are right, 1 of 2 true a found; b: 1/2 and 1/1; c: 1/1 and 1/2.
    assert result.precision == pytest.approx([1 / 2, 1 / 2, 1.0])
    assert result.recall == pytest.approx([1 / 2, 1.0, 1 / 2])
    assert result.f1 == pytest.approx([1 / 2, 2 / 3, 2 / 3])
    assert result.support == [2, 1, 2]
    want_loss = -(np.log(0.7) + np.log(0.3) + np.log(0.8) + np.log(0.6) + np.log(0.5 - 1e-9)) / 5
    assert result.mean_cross_entropy == pytest.approx(want_loss, rel=1e-12)
    # A true class with probability 0 costs -log(1e-7), Keras's clipping, not infinity.
    zero = MetricsAccumulator(["a", "b"])
    zero.update(np.array([1]), np.array([[1.0, 0.0]]))
    assert zero.result().mean_cross_entropy == pytest.approx(-np.log(1e-7), rel=1e-12)
    assert zero.result().precision == [0.0, 0.0] and zero.result().f1 == [0.0, 0.0]


@pytest.mark.parametrize(("requests", "code", "message"), [
    (lambda: iter([]), grpc.StatusCode.INVALID_ARGUMENT,
     "images: the stream held no images; expected at least 1"),
    (lambda: iter([pb.EvaluateRequest(images=encode_images(images_u8(4)), labels=[1, 2, 12, 3])]),
     grpc.StatusCode.INVALID_ARGUMENT,
     "requests[0].labels[2]: 12 is not a class; expected a class index in 0..9"),
    (lambda: iter([pb.EvaluateRequest(images=encode_images(images_u8(4)), labels=[1, 2, 3, 4]),
                   pb.EvaluateRequest(images=encode_images(images_u8(4)), labels=[1, -1, 3, 4])]),
     grpc.StatusCode.INVALID_ARGUMENT, "requests[1].labels[1]: -1 is not a class"),
    (lambda: iter([pb.EvaluateRequest(images=encode_images(images_u8(4)), labels=[1, 2, 3])]),
     grpc.StatusCode.INVALID_ARGUMENT,
     "requests[0].labels: got 3 labels for 4 images; expected one per image"),
    (lambda: iter([pb.EvaluateRequest(images=encode_images(images_u8(2)), labels=[1, 2]),
                   pb.EvaluateRequest(labels=[])]),
     grpc.StatusCode.INVALID_ARGUMENT, "requests[1].images: empty"),
    (lambda: iter([pb.EvaluateRequest(images=[pb.Image(uint8=b"1")], labels=[1])]),
     grpc.StatusCode.INVALID_ARGUMENT, "requests[0].images[0].uint8: got 1 bytes, expected 784"),
    (lambda: iter([pb.EvaluateRequest(images=encode_images(images_u8(1)), labels=[1]),
                   pb.EvaluateRequest(images=encode_images(images_u8(1)), labels=[1],
                                      model_version=3)]),
     grpc.StatusCode.INVALID_ARGUMENT, "model_version: 3 differs from version 1"),
    (lambda: iter([pb.EvaluateRequest(images=encode_images(images_u8(1)), labels=[1],
                                      model_version=4)]),
     grpc.StatusCode.NOT_FOUND, "version 4 is not served"),
], ids=["empty-stream", "label-out-of-range", "negative-label-second-batch", "label-count",
        "empty-batch", "bad-image", "version-changes", "unknown-version"])
def test_bad_evaluate_input(stub: pb_grpc.DigitServiceStub, requests: Callable[[], Iterator[
        pb.EvaluateRequest]], code: grpc.StatusCode, message: str) -> None:
    expect_error(lambda: stub.Evaluate(requests()), code, message)
    assert stub.Predict(pb.PredictRequest(images=encode_images(images_u8(1)))).predictions


def test_model_info(stub: pb_grpc.DigitServiceStub) -> None:
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert (info.model_name, info.model_version, info.input_size) == ("fake", 1, 784)
    assert list(info.input_shape) == [28, 28]
    assert list(info.labels) == [str(d) for d in range(10)]
    assert info.input_scale == pytest.approx(1 / 255)
    assert info.test_accuracy == 0.5 and info.preset == "fake"
    assert info.max_images_per_request == 1024
    assert '"preset": "fake"' in info.metadata_json


def test_nothing_hard_codes_the_input_size_or_classes(
    start_server: Callable[..., ServerThread]
) -> None:
    # A fake on purpose: a model of another input shape and other classes than MNIST's.
    server = start_server(loader=lambda: FakeModel(input_shape=(8, 8), labels=("a", "b", "c")))
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.DigitServiceStub(ch)
        response = stub.Predict(pb.PredictRequest(images=encode_images(images_u8(2)[:, :64])))
        assert all(len(p.probabilities) == 3 and p.label in "abc" for p in response.predictions)
        expect_error(lambda: stub.Predict(pb.PredictRequest(images=encode_images(images_u8(1)))),
                     grpc.StatusCode.INVALID_ARGUMENT, "got 784 bytes, expected 64")
        evaluation = stub.Evaluate(iter([pb.EvaluateRequest(
            images=encode_images(images_u8(3)[:, :64]), labels=[0, 1, 2])]))
        assert len(evaluation.confusion_matrix) == 3 and list(evaluation.labels) == ["a", "b", "c"]


def health_status(channel: grpc.Channel, service: str = "") -> str:
    stub = health_pb2_grpc.HealthStub(channel)
    response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def test_unavailable_and_not_serving_until_the_model_is_loaded(
    start_server: Callable[..., ServerThread]
) -> None:
    release = threading.Event()

    def held(model: object) -> object:  # the load (past the gate) holds until released
        release.wait(30)
        return model

    server = start_server(wrap=held, load=False)
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.DigitServiceStub(ch)
        assert health_status(ch) == "NOT_SERVING"
        assert health_status(ch, "digitserve.v1.DigitService") == "NOT_SERVING"
        request = pb.PredictRequest(images=encode_images(images_u8(1)))
        expect_error(lambda: stub.Predict(request), grpc.StatusCode.UNAVAILABLE,
                     "no model is loaded yet")
        loading = threading.Thread(target=server.load, daemon=True)
        loading.start()
        release.set()
        loading.join(30)
        assert health_status(ch) == "SERVING"
        assert health_status(ch, "digitserve.v1.DigitService") == "SERVING"
        assert stub.Predict(request).model_version == 1
        expect_error(lambda: health_status(ch, "no.such.Service"), grpc.StatusCode.NOT_FOUND)


def test_health_turns_not_serving_on_shutdown(tiny_server: ServerThread) -> None:
    with grpc.insecure_channel(tiny_server.target) as ch:
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""))
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        tiny_server.call(tiny_server.app.health.enter_graceful_shutdown())
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()


def test_reflection_lists_the_services(tiny_server: ServerThread) -> None:
    with grpc.insecure_channel(tiny_server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            list_services="")]))
        names = {s.name for s in next(responses).list_services_response.service}
    assert {"digitserve.v1.DigitService", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
