"""go-grpc-prometheus' call and message counters (grpc_server_started_total,
grpc_server_msg_received_total, grpc_server_msg_sent_total), the series its dashboards chart,
checked against the calls and messages each test made, for the four kinds of method: unary
(Predict, ModelInfer), client stream (Evaluate), server stream (health Watch, which writes with
context.write) and bidirectional stream (reflection, which yields)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from digitserve.oip import grpc_predict_v2_pb2 as oip
from digitserve.server.telemetry import CALL_BUCKETS, MessageCounters
from digitserve.v1 import digit_service_pb2 as pb
from tests.servers import ServerThread
from tests.support import in_flight, scrape, wait_for

TOKEN = "counting-t0ken"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
DIGIT = "digitserve.v1.DigitService"
V2 = "inference.GRPCInferenceService"
HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1.ServerReflection"
identity: Callable[[bytes], bytes] = lambda data: data  # noqa: E731
SERIES = ("started", "received", "sent")


def counts(port: int, service: str, method: str) -> dict[str, float]:
    """The three counters, grpc_server_handled_total (all codes) and the calls in flight of one method."""
    names = {"grpc_server_started_total": "started", "grpc_server_msg_received_total": "received",
             "grpc_server_msg_sent_total": "sent", "grpc_server_handled_total": "handled",
             "grpc_server_in_flight_calls": "in_flight"}
    found = dict.fromkeys(names.values(), 0.0)
    for (name, labels), value in scrape(port).items():
        label = dict(labels)
        if name in names and (label["grpc_service"], label["grpc_method"]) == (service, method):
            found[names[name]] += value
    return found


def code_of(call: Callable[[], Any]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@pytest.fixture
def server(start_server: Callable[..., ServerThread]) -> ServerThread:
    return start_server(metrics_port=0, auth_token=TOKEN)


def test_unary_calls_count_one_message_in_and_one_out_when_ok(server: ServerThread) -> None:
    """Every call started is one message received; a message is sent only by a call that ends OK
    (go-grpc-prometheus' unary interceptor), refusals included: a bad request, an unknown model,
    no token."""
    port = server.app.metrics_port or 0
    image = pb.Image(uint8=np.arange(784, dtype=np.uint8).tobytes())
    good = pb.PredictRequest(images=[image]).SerializeToString()
    predict_calls = [(good, AUTH)] * 5 + [
        (b"\xff\xff\xff", AUTH),  # INVALID_ARGUMENT: does not parse
        (pb.PredictRequest(images=[pb.Image(uint8=b"\x01" * 5)]).SerializeToString(), AUTH),
        (pb.PredictRequest(model_name="nope", images=[image]).SerializeToString(), AUTH),  # NOT_FOUND
        (good, ()),  # UNAUTHENTICATED
    ]
    infer = oip.ModelInferRequest(model_name="tiny", inputs=[oip.ModelInferRequest.InferInputTensor(
        name="images", datatype="FP32", shape=[1, 784],
        contents=oip.InferTensorContents(fp32_contents=[0.5] * 784))]).SerializeToString()
    with grpc.insecure_channel(server.target) as channel:
        predict = channel.unary_unary(f"/{DIGIT}/Predict", request_serializer=identity,
                                      response_deserializer=identity)
        model_infer = channel.unary_unary(f"/{V2}/ModelInfer", request_serializer=identity,
                                          response_deserializer=identity)
        codes = [code_of(lambda r=request, m=md: predict(r, timeout=30, metadata=m))
                 for request, md in predict_calls]
        infer_codes = [code_of(lambda: model_infer(infer, timeout=30, metadata=AUTH)) for _ in range(3)]
    ok = codes.count(grpc.StatusCode.OK)
    assert ok == 5 and infer_codes == [grpc.StatusCode.OK] * 3, (codes, infer_codes)
    assert counts(port, DIGIT, "Predict") == {
        "started": 9, "received": 9, "sent": ok, "handled": 9, "in_flight": 0}
    assert counts(port, V2, "ModelInfer") == {
        "started": 3, "received": 3, "sent": 3, "handled": 3, "in_flight": 0}
    # Every method served appears at zero before its first call (as go-grpc-prometheus'
    # InitializeMetrics does), with its kind.
    samples = scrape(port)
    assert samples[("grpc_server_started_total", frozenset({
        "grpc_type": "unary", "grpc_service": DIGIT, "grpc_method": "ListModels"}.items()))] == 0
    assert samples[("grpc_server_msg_received_total", frozenset({
        "grpc_type": "client_stream", "grpc_service": DIGIT, "grpc_method": "Evaluate"}.items()))] == 0
    assert samples[("grpc_server_msg_sent_total", frozenset({
        "grpc_type": "server_stream", "grpc_service": HEALTH, "grpc_method": "Watch"}.items()))] == 0


def test_client_stream_counts_each_message_received(server: ServerThread) -> None:
    port = server.app.metrics_port or 0
    image = pb.Image(uint8=np.arange(784, dtype=np.uint8).tobytes())
    evaluate = pb.EvaluateRequest(images=[image], labels=[3]).SerializeToString()
    with grpc.insecure_channel(server.target) as channel:
        call = channel.stream_unary(f"/{DIGIT}/Evaluate", request_serializer=identity,
                                    response_deserializer=identity)
        for messages in (3, 2, 4):
            call(iter([evaluate] * messages), timeout=30, metadata=AUTH)
        # refused before the stream is read: its messages were never received
        assert code_of(lambda: call(iter([evaluate] * 2), timeout=30)) == grpc.StatusCode.UNAUTHENTICATED
    assert counts(port, DIGIT, "Evaluate") == {
        "started": 4, "received": 9, "sent": 3, "handled": 4, "in_flight": 0}


def test_bidi_stream_counts_each_message_both_ways(server: ServerThread) -> None:
    port = server.app.metrics_port or 0
    listing = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()
    symbol = reflection_pb2.ServerReflectionRequest(file_containing_symbol=DIGIT).SerializeToString()
    with grpc.insecure_channel(server.target) as channel:
        reflect = channel.stream_stream(f"/{REFLECTION}/ServerReflectionInfo", request_serializer=identity,
                                        response_deserializer=identity)
        answers = [list(reflect(iter(requests), timeout=30, metadata=AUTH))
                   for requests in ([listing, symbol, listing, symbol], [symbol], [])]
    assert [len(a) for a in answers] == [4, 1, 0]
    assert counts(port, REFLECTION, "ServerReflectionInfo") == {
        "started": 3, "received": 5, "sent": 5, "handled": 3, "in_flight": 0}


def test_server_stream_counts_each_message_written(server: ServerThread) -> None:
    """grpc_health's Watch writes its answers with context.write, not by yielding them: each is
    counted once written. A cancelled Watch is handled CANCELLED, having sent what it sent."""
    port = server.app.metrics_port or 0
    with grpc.insecure_channel(server.target) as channel:
        watch = channel.unary_stream(f"/{HEALTH}/Watch", request_serializer=identity,
                                     response_deserializer=identity)
        streams = [watch(b"", timeout=30), watch(health_pb2.HealthCheckRequest(
            service=DIGIT).SerializeToString(), timeout=30)]
        for stream in streams:
            assert health_pb2.HealthCheckResponse.FromString(next(stream)).status == 1  # SERVING
        wait_for(lambda: in_flight(port, "Watch") == 2, 30, "the streams to be in flight")
        assert counts(port, HEALTH, "Watch") == {
            "started": 2, "received": 2, "sent": 2, "handled": 0, "in_flight": 2}
        for stream in streams:
            stream.cancel()
    wait_for(lambda: in_flight(port, "Watch") == 0, 30, "the cancelled streams to end")
    assert counts(port, HEALTH, "Watch") == {
        "started": 2, "received": 2, "sent": 2, "handled": 2, "in_flight": 0}


def test_the_counters_read_as_prometheus_client_counters_would() -> None:
    """MessageCounters' plain numbers, exposed, against the stock Counter, Histogram and Gauge
    with the same names, help, labels and values: the same families, types and samples (not the
    stock metrics' ``_created`` series). Calls are fed to both: started, messages, the calls that
    finished with their codes and seconds (one on a bucket's bound, one beyond the last), and one
    still in flight."""
    ours = CollectorRegistry()
    counters = MessageCounters()
    ours.register(counters)
    stock = CollectorRegistry()
    labels_of_call = ("grpc_type", "grpc_service", "grpc_method")
    families = {name: Counter(name, help_text, labels_of_call, registry=stock)
                for name, help_text, _ in MessageCounters._FAMILIES}
    handled = Counter(*MessageCounters.HANDLED, (*labels_of_call, "grpc_code"), registry=stock)
    seconds = Histogram(*MessageCounters.SECONDS, labels_of_call, buckets=CALL_BUCKETS, registry=stock)
    in_flight = Gauge(*MessageCounters.IN_FLIGHT, labels_of_call, registry=stock)
    values = {("unary", "s.S", "A"): (4, 4, 2), ("bidi_stream", "s.S", "B"): (1, 7, 5),
              ("unary", "s.S", "C"): (0, 0, 0)}
    finished = {("unary", "s.S", "A"): [("OK", 0.0004), ("OK", 0.001), ("INVALID_ARGUMENT", 0.03)],
                ("bidi_stream", "s.S", "B"): [("CANCELLED", 45.0)]}
    for labels, numbers in values.items():
        mine = counters.of(*labels)
        mine.started, mine.received, mine.sent = numbers
        for family, number in zip(families.values(), numbers, strict=True):
            family.labels(*labels).inc(number)
        seconds.labels(*labels)  # (a method's histogram and gauge appear at zero, as ours)
        in_flight.labels(*labels).set(numbers[0] - len(finished.get(labels, [])))
        for code, took in finished.get(labels, []):
            mine.finish(code, took)
            handled.labels(*labels, code).inc()
            seconds.labels(*labels).observe(took)

    def exposed(registry: CollectorRegistry) -> list[tuple[str, str, str, list[Any]]]:
        return sorted((f.name, f.documentation, f.type, sorted(
            (s.name, sorted(s.labels.items()), s.value) for s in f.samples
            if not s.name.endswith("_created")))
            for f in text_string_to_metric_families(generate_latest(registry).decode())
            if not f.name.endswith("_created"))  # the stock metrics' creation times: not ours

    assert exposed(ours) == exposed(stock)
    assert len(exposed(ours)) == 6
    gauge = next(f for f in exposed(ours) if f[0] == "grpc_server_in_flight_calls")[3]
    in_flight_samples = {tuple(dict(labels)[k] for k in labels_of_call): value
                         for _, labels, value in gauge}
    assert in_flight_samples == {("unary", "s.S", "A"): 1.0, ("bidi_stream", "s.S", "B"): 0.0,
                                 ("unary", "s.S", "C"): 0.0}
