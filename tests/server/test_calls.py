"""calls.GenericOnly, the one hand-made path of the gRPC registration (every method served by its
service's generic handler), against grpc.aio's stock path (the generated code's registered
methods): two servers of the tiny model, one each way, answer the same calls alike — the same
answers, the same errors and trailing metadata, the same metrics — calls that end early included."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from digitserve.oip import grpc_predict_v2_pb2 as oip
from digitserve.server import app as app_module
from digitserve.v1 import digit_service_pb2 as pb
from tests.servers import ServerThread
from tests.support import in_flight, scrape, wait_for

TOKEN = "differential-t0ken"
DIGIT = "/digitserve.v1.DigitService/"
V2 = "/inference.GRPCInferenceService/"
REFLECTION = ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
              "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
identity: Callable[[bytes], bytes] = lambda data: data  # noqa: E731


def metadata(request_id: str, token: str | None = TOKEN) -> tuple[tuple[str, str], ...]:
    md = (("x-request-id", request_id),)
    return md if token is None else (*md, ("authorization", f"Bearer {token}"))


def unary(path: str, request: bytes, md: Any) -> Any:
    """A unary or client-stream call's outcome as comparable values: code, details, the answer's
    bytes, and the trailing metadata (the request id, grpc-status-details-bin)."""
    return lambda channel: _outcome(lambda: channel.unary_unary(
        path, request_serializer=identity, response_deserializer=identity).with_call(
        request, timeout=30, metadata=md))


def client_stream(path: str, requests: list[bytes], md: Any) -> Any:
    return lambda channel: _outcome(lambda: channel.stream_unary(
        path, request_serializer=identity, response_deserializer=identity).with_call(
        iter(requests), timeout=30, metadata=md))


def bidi(path: str, requests: list[bytes], md: Any) -> Any:
    def run(channel: grpc.Channel) -> Any:
        call = channel.stream_stream(path, request_serializer=identity, response_deserializer=identity)(
            iter(requests), timeout=30, metadata=md)
        try:
            answers = list(call)
        except grpc.RpcError as exc:
            return exc.code(), exc.details(), None, exc.trailing_metadata()
        return call.code(), call.details(), answers, call.trailing_metadata()
    return run


def _outcome(call: Callable[[], Any]) -> Any:
    try:
        answer, info = call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details(), None, exc.trailing_metadata()
    return info.code(), info.details(), answer, info.trailing_metadata()


def calls() -> list[tuple[str, Any]]:
    """Every kind of call and of refusal, each with its own request id."""
    image = pb.Image(uint8=np.arange(784, dtype=np.uint8).tobytes())
    predict = pb.PredictRequest(model_name="tiny", images=[image]).SerializeToString()
    evaluate = pb.EvaluateRequest(model_name="tiny", images=[image], labels=[3]).SerializeToString()
    infer = oip.ModelInferRequest(model_name="tiny", inputs=[oip.ModelInferRequest.InferInputTensor(
        name="images", datatype="FP32", shape=[1, 784],
        contents=oip.InferTensorContents(fp32_contents=[0.5] * 784))]).SerializeToString()
    listing = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()
    symbol = reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="digitserve.v1.DigitService").SerializeToString()
    cases = [
        ("predict", unary(DIGIT + "Predict", predict, metadata("a1"))),
        ("predict 3 images", unary(DIGIT + "Predict", pb.PredictRequest(
            images=[image] * 3).SerializeToString(), metadata("a2"))),
        ("predict undecodable", unary(DIGIT + "Predict", b"\xff\xff\xff", metadata("a3"))),
        ("predict wrong size", unary(DIGIT + "Predict", pb.PredictRequest(
            images=[pb.Image(uint8=b"\x01" * 5)]).SerializeToString(), metadata("a4"))),
        ("predict unknown model", unary(DIGIT + "Predict", pb.PredictRequest(
            model_name="nope", images=[image]).SerializeToString(), metadata("a5"))),
        ("predict no token", unary(DIGIT + "Predict", predict, metadata("a6", None))),
        ("predict wrong token", unary(DIGIT + "Predict", predict, metadata("a7", "wrong"))),
        ("model info", unary(DIGIT + "GetModelInfo", b"", metadata("a8"))),
        ("list models", unary(DIGIT + "ListModels", b"", metadata("a9"))),
        ("evaluate", client_stream(DIGIT + "Evaluate", [evaluate, evaluate], metadata("b1"))),
        ("evaluate undecodable", client_stream(DIGIT + "Evaluate", [evaluate, b"\xff\xff"], metadata("b2"))),
        ("evaluate empty", client_stream(DIGIT + "Evaluate", [], metadata("b3"))),
        ("v2 live", unary(V2 + "ServerLive", b"", metadata("c1"))),
        ("v2 infer", unary(V2 + "ModelInfer", infer, metadata("c2"))),
        ("v2 infer undecodable", unary(V2 + "ModelInfer", b"\x0a\xff", metadata("c3"))),
        ("v2 metadata", unary(V2 + "ModelMetadata", oip.ModelMetadataRequest(
            name="tiny").SerializeToString(), metadata("c4"))),
        ("health", unary("/grpc.health.v1.Health/Check", b"", metadata("d1", None))),
        ("health unknown", unary("/grpc.health.v1.Health/Check", health_pb2.HealthCheckRequest(
            service="nope").SerializeToString(), metadata("d2", None))),
        ("unknown method", unary(DIGIT + "Nope", b"", metadata("d3"))),
    ]
    for path in REFLECTION:
        cases.append((path, bidi(path, [listing, symbol], metadata("e1"))))
        cases.append((path + " no token", bidi(path, [listing], metadata("e2", None))))
    return cases


def handled(port: int) -> dict[tuple[str, str], float]:
    return {(dict(labels)["grpc_method"], dict(labels)["grpc_code"]): value
            for (name, labels), value in scrape(port).items() if name == "grpc_server_handled_total"}


def cancel_watch(server: ServerThread) -> None:
    """A health Watch, a stream the server holds open, cancelled by the client."""
    port = server.app.metrics_port
    assert port
    with grpc.insecure_channel(server.target) as channel:
        watch = channel.unary_stream("/grpc.health.v1.Health/Watch", request_serializer=identity,
                                     response_deserializer=identity)(b"", timeout=30)
        assert health_pb2.HealthCheckResponse.FromString(next(watch)).status == 1  # SERVING
        wait_for(lambda: in_flight(port, "Watch") == 1, 30, "the stream to be in flight")
        watch.cancel()
    wait_for(lambda: in_flight(port, "Watch") == 0, 30, "the cancelled stream to end")


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The services given to any grpc.aio server as registered methods from now on."""
    services: list[str] = []
    server_class = grpc.aio._server.Server
    register = server_class.add_registered_method_handlers

    def add(self: Any, service: str, handlers: Any) -> None:
        services.append(service)
        register(self, service, handlers)

    monkeypatch.setattr(server_class, "add_registered_method_handlers", add)
    return services


def test_generic_only_answers_as_the_registered_methods_do(
    start_server: Callable[..., ServerThread], registered: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    generic = start_server(auth_token=TOKEN, metrics_port=0)
    assert registered == []  # every method through a generic handler
    monkeypatch.setattr(app_module, "GenericOnly", lambda server: server)  # the stock path
    stock = start_server(auth_token=TOKEN, metrics_port=0)
    assert {"digitserve.v1.DigitService", "inference.GRPCInferenceService", "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= set(registered)
    outcomes: dict[str, list[Any]] = {}
    for server in (generic, stock):
        with grpc.insecure_channel(server.target) as channel:
            for name, call in calls():
                outcomes.setdefault(name, []).append(call(channel))
        cancel_watch(server)
    for name, (ours, theirs) in outcomes.items():
        assert ours == theirs, name
    codes = {name: ours[0].name for name, (ours, _) in outcomes.items()}
    # The battery covers answers and every kind of refusal.
    assert {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "UNAUTHENTICATED", "UNIMPLEMENTED"} <= set(codes.values())
    assert codes["predict"] == codes["evaluate"] == codes["v2 infer"] == "OK", codes
    assert handled(generic.app.metrics_port or 0) == handled(stock.app.metrics_port or 0)
    assert handled(generic.app.metrics_port or 0)[("Watch", "CANCELLED")] == 1
    print(f"\n{len(outcomes)} kinds of call answered alike both ways: {codes}")


def test_calls_to_methods_that_do_not_exist_leave_nothing_behind(
    start_server: Callable[..., ServerThread], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The interceptor keeps a wrapped handler per method served, never per method asked for: 2,000
    calls to made-up methods are UNIMPLEMENTED, counted nowhere, and keep nothing; the server then
    answers as before."""
    from digitserve.server.calls import CallInterceptor

    made: list[CallInterceptor] = []
    init = CallInterceptor.__init__

    def record(self: CallInterceptor, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(CallInterceptor, "__init__", record)
    server = start_server(metrics_port=0)
    (interceptor,) = made
    with grpc.insecure_channel(server.target) as channel:
        for i in range(2000):
            code = unary(f"/junk.S{i % 7}/M{i}", b"", ())(channel)[0]
            assert code == grpc.StatusCode.UNIMPLEMENTED
        assert unary(DIGIT + "Predict", pb.PredictRequest(images=[pb.Image(uint8=bytes(784))])
                     .SerializeToString(), ())(channel)[0] == grpc.StatusCode.OK
    assert list(interceptor._handlers) == [DIGIT + "Predict"]
    counted = handled(server.app.metrics_port or 0)
    assert counted == {("Predict", "OK"): 1}, counted


def test_a_handler_whose_request_parameter_is_misnamed_is_refused_when_decorated() -> None:
    # mapped_errors tells a streamed request from a message by the parameter's name, once: a
    # misnamed one would hand a stream to a unary handler's checks, or a message to _decoded.
    from digitserve.server.status import mapped_errors

    async def Predict(self: Any, message: Any, context: Any) -> None: ...

    with pytest.raises(TypeError, match=r"Predict: its second parameter is \['message'\]; name it "
                       r"request, or request_iterator when the request is a stream"):
        mapped_errors(Predict)
