"""Every method the server serves needs the bearer token, health alone excepted; refused calls are
counted UNAUTHENTICATED. The methods come from the server itself (the handlers handed to the
grpc.aio server and what reflection advertises), so a method added later cannot slip through;
synchronous handlers included."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from digitserve.server.calls import CallInterceptor
from digitserve.server.security import INVALID_TOKEN, MISSING_TOKEN, TokenAuth
from digitserve.server.telemetry import Telemetry
from tests.servers import ServerThread
from tests.support import scrape

TOKEN = "coverage-t0ken"
GOOD = (("authorization", f"Bearer {TOKEN}"),)
WRONG = (("authorization", "Bearer not-the-token"),)
HEALTH = "/grpc.health.v1.Health/"  # open on purpose: probes send no token
Method = tuple[str, bool, bool]  # (path, request streaming, response streaming)
Codes = dict[tuple[str, str, str], float]  # (service, method, code) -> calls counted


@pytest.fixture
def handed_to_server(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every handler given to any grpc.aio server from now on, however it was given."""
    given: list[Any] = []
    server_class = grpc.aio._server.Server
    generic = server_class.add_generic_rpc_handlers

    def add_generic(self: Any, handlers: Any) -> None:
        given.extend(handlers)
        generic(self, handlers)

    monkeypatch.setattr(server_class, "add_generic_rpc_handlers", add_generic)
    if hasattr(server_class, "add_registered_method_handlers"):
        registered = server_class.add_registered_method_handlers

        def add_registered(self: Any, service: str, handlers: Any) -> None:
            given.append(grpc.method_handlers_generic_handler(service, handlers))
            registered(self, service, handlers)

        monkeypatch.setattr(server_class, "add_registered_method_handlers", add_registered)
    return given


def served_methods(handlers: list[Any]) -> set[Method]:
    """The methods of the handlers the server was given. A generic handler that does not say
    which methods it serves cannot be checked: the test refuses it (register services by name)."""
    methods: set[Method] = set()
    for handler in handlers:
        assert isinstance(handler, grpc.ServiceRpcHandler), (
            f"{handler!r} does not name its service and methods; its methods could escape this test")
        for path in handler._method_handlers:  # grpc's DictionaryGenericHandler: path -> handler
            method = handler.service(_Details(path))
            assert method is not None, path
            methods.add((path, method.request_streaming, method.response_streaming))
    return methods


class _Details(grpc.HandlerCallDetails):  # type: ignore[misc]
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


def reflected_methods(channel: grpc.Channel) -> set[Method]:
    """Every method of every service that reflection advertises (asked with the token)."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    def ask(request: reflection_pb2.ServerReflectionRequest) -> reflection_pb2.ServerReflectionResponse:
        return next(stub.ServerReflectionInfo(iter([request]), timeout=10, metadata=GOOD))

    services = [s.name for s in ask(reflection_pb2.ServerReflectionRequest(
        list_services="")).list_services_response.service]
    methods: set[Method] = set()
    for service in services:
        response = ask(reflection_pb2.ServerReflectionRequest(file_containing_symbol=service))
        found = False
        for data in response.file_descriptor_response.file_descriptor_proto:
            proto = descriptor_pb2.FileDescriptorProto.FromString(data)
            for described in proto.service:
                if f"{proto.package}.{described.name}".lstrip(".") == service:
                    found = True
                    methods.update((f"/{service}/{m.name}", m.client_streaming, m.server_streaming)
                                   for m in described.method)
        assert found, f"reflection lists {service} but does not describe it"
    return methods


def outcome(channel: grpc.Channel, method: Method,
            metadata: tuple[tuple[str, str], ...]) -> tuple[grpc.StatusCode, str]:
    """Calls ``method`` with one empty message (a valid message of any type): its status and
    details, or (OK, "") once the first response arrives (a server stream such as health's Watch
    may never end)."""
    path, request_streaming, response_streaming = method
    identity: Callable[[bytes], bytes] = lambda data: data  # noqa: E731
    kind = {(False, False): channel.unary_unary, (True, False): channel.stream_unary,
            (False, True): channel.unary_stream, (True, True): channel.stream_stream}
    stub = kind[(request_streaming, response_streaming)](
        path, request_serializer=identity, response_deserializer=identity)
    request: Any = iter([b""]) if request_streaming else b""
    try:
        answer = stub(request, timeout=10, metadata=metadata)
        if response_streaming:
            try:
                next(answer)
            finally:
                answer.cancel()
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def handled(port: int) -> Codes:
    """grpc_server_handled_total from the metrics endpoint, by (service, method, code)."""
    codes: Codes = {}
    for (name, labels), value in scrape(port).items():
        if name == "grpc_server_handled_total":
            by = dict(labels)
            codes[(by["grpc_service"], by["grpc_method"], by["grpc_code"])] = value
    return codes


def test_every_served_method_but_health_needs_the_token(
    handed_to_server: list[Any], start_server: Callable[..., ServerThread]
) -> None:
    server = start_server(auth_token=TOKEN, metrics_port=0)
    assert server.app.metrics_port
    served = served_methods(handed_to_server)
    with grpc.insecure_channel(server.target) as channel:
        reflected = reflected_methods(channel)
        # What is served is what is advertised: DigitService, the V2 protocol, health, reflection.
        assert served == reflected, (served ^ reflected)
        services = {path.split("/")[1] for path, _, _ in served}
        assert {"digitserve.v1.DigitService", "inference.GRPCInferenceService",
                "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
        open_methods = set()
        for method in sorted(served):
            code, details = outcome(channel, method, ())
            if code != grpc.StatusCode.UNAUTHENTICATED:
                open_methods.add(method[0])
                continue
            assert details == MISSING_TOKEN, method
            assert outcome(channel, method, WRONG) == (grpc.StatusCode.UNAUTHENTICATED, INVALID_TOKEN)
            # With the token the method runs (whatever it makes of an empty message).
            code, details = outcome(channel, method, GOOD)
            assert code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED), (
                method, code, details)
        # Exactly the health service is open (Check and Watch answer; grpcio's List may not).
        assert open_methods == {path for path, _, _ in served if path.startswith(HEALTH)}
        assert {HEALTH + "Check", HEALTH + "Watch"} <= open_methods
        for path in (HEALTH + "Check", HEALTH + "Watch"):
            assert outcome(channel, next(m for m in served if m[0] == path), ()) == (
                grpc.StatusCode.OK, "")
    counted = handled(server.app.metrics_port)
    for path, _, _ in served:
        service, name = path.lstrip("/").split("/")
        expected = 0 if path in open_methods else 2  # the missing and the wrong token
        assert counted.get((service, name, "UNAUTHENTICATED"), 0) == expected, path
    refused = sum(v for (_, _, code), v in counted.items() if code == "UNAUTHENTICATED")
    print(f"\n{len(served)} methods served, {len(served) - len(open_methods)} need the token, "
          f"{int(refused)} refused calls counted UNAUTHENTICATED; open: {sorted(open_methods)}")


# --- synchronous handlers ------------------------------------------------------------------------

def _sync_service(ran: list[str]) -> dict[str, grpc.RpcMethodHandler]:
    """An echo service of plain (synchronous) functions, one per kind of method."""

    def unary(request: bytes, context: Any) -> bytes:
        ran.append("Unary")
        return b"u:" + request

    def client_stream(requests: Iterator[bytes], context: Any) -> bytes:
        ran.append("ClientStream")
        return b"c:" + b"+".join(requests)

    def server_stream(request: bytes, context: Any) -> Iterator[bytes]:
        ran.append("ServerStream")
        yield b"s1:" + request
        yield b"s2:" + request

    def bidi(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        ran.append("Bidi")
        for request in requests:
            yield b"b:" + request

    return {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
    }


def test_synchronous_handlers_need_the_token_and_are_counted() -> None:
    """grpc.aio runs a plain function in a thread; registered by name, or in a generic handler of
    no registered service, it must still need the token and be counted (the server's interceptor)."""
    ran: list[str] = []
    telemetry = Telemetry()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(interceptors=(CallInterceptor(telemetry, TokenAuth([TOKEN.encode()])),))
        server.add_registered_method_handlers("test.Sync", _sync_service(ran))
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("test.Generic", _sync_service(ran)),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            for service in ("test.Sync", "test.Generic"):
                _sync_calls(channel, service, ran)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
    counted = {(s.labels["grpc_service"], s.labels["grpc_method"], s.labels["grpc_code"]): s.value
               for family in telemetry.registry.collect() for s in family.samples
               if s.name == "grpc_server_handled_total"}
    for service in ("test.Sync", "test.Generic"):
        for name in ("Unary", "ClientStream", "ServerStream", "Bidi"):
            assert counted.get((service, name, "UNAUTHENTICATED")) == 2, (service, name)
            assert counted.get((service, name, "OK")) == 1, (service, name)


def _sync_calls(channel: grpc.Channel, service: str, ran: list[str]) -> None:
    identity: Callable[[bytes], bytes] = lambda data: data  # noqa: E731

    def stub(kind: Any, name: str) -> Any:
        return kind(f"/{service}/{name}", request_serializer=identity, response_deserializer=identity)

    unary = stub(channel.unary_unary, "Unary")
    client_stream = stub(channel.stream_unary, "ClientStream")
    server_stream = stub(channel.unary_stream, "ServerStream")
    bidi = stub(channel.stream_stream, "Bidi")
    attempts: list[Callable[[Any], Any]] = [
        lambda md: unary(b"x", metadata=md, timeout=10),
        lambda md: client_stream(iter([b"a", b"b"]), metadata=md, timeout=10),
        lambda md: list(server_stream(b"x", metadata=md, timeout=10)),
        lambda md: list(bidi(iter([b"a", b"b"]), metadata=md, timeout=10)),
    ]
    for metadata, details in (((), MISSING_TOKEN), (WRONG, INVALID_TOKEN)):
        for attempt in attempts:
            with pytest.raises(grpc.RpcError) as info:
                attempt(metadata)
            assert (info.value.code(), info.value.details()) == (grpc.StatusCode.UNAUTHENTICATED, details)
    assert ran == []  # refused calls never reached the functions
    answers = [attempt(GOOD) for attempt in attempts]
    assert answers == [b"u:x", b"c:a+b", [b"s1:x", b"s2:x"], [b"b:a", b"b:b"]]
    assert ran == ["Unary", "ClientStream", "ServerStream", "Bidi"]
    ran.clear()
