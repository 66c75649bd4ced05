"""Server reflection in both versions (issue 14): grpcurl 1.8 and later, Postman and grpc-java's
tools ask ``grpc.reflection.v1``; older tools ``grpc.reflection.v1alpha``. The requests are
written here from the protocol's field numbers (grpc/reflection/v1/reflection.proto:
``file_containing_symbol`` = 4, ``list_services`` = 7), not with the server's own classes."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2

from tests.servers import ServerThread

LIST_SERVICES = b"\x3a\x00"  # field 7 (list_services), a string, empty


def containing_symbol(symbol: str) -> bytes:
    data = symbol.encode()
    return b"\x22" + bytes([len(data)]) + data  # field 4 (file_containing_symbol), a short string


def reflect(channel: grpc.Channel, version: str, request: bytes) -> reflection_pb2.ServerReflectionResponse:
    """One request on a ServerReflectionInfo stream of ``grpc.reflection.<version>``; the answer,
    read as v1alpha's message (the same fields in both versions)."""
    info: Callable[..., object] = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=lambda data: data,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    responses = info(iter([request]), timeout=10)
    return next(iter(responses))  # type: ignore[call-overload,no-any-return]


def described(response: reflection_pb2.ServerReflectionResponse) -> list[descriptor_pb2.FileDescriptorProto]:
    assert response.WhichOneof("message_response") == "file_descriptor_response", response
    return [descriptor_pb2.FileDescriptorProto.FromString(data)
            for data in response.file_descriptor_response.file_descriptor_proto]


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_both_reflection_versions_list_every_service(fake_server: ServerThread, version: str) -> None:
    with grpc.insecure_channel(fake_server.target) as channel:
        response = reflect(channel, version, LIST_SERVICES)
    assert {s.name for s in response.list_services_response.service} == {
        "digitserve.v1.DigitService", "inference.GRPCInferenceService", "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection",
    }


def test_v1_reflection_describes_the_digit_service(fake_server: ServerThread) -> None:
    with grpc.insecure_channel(fake_server.target) as channel:
        files = described(reflect(channel, "v1", containing_symbol("digitserve.v1.DigitService")))
    (api,) = [f for f in files if f.package == "digitserve.v1" and f.service]
    (service,) = api.service
    assert service.name == "DigitService"
    assert {m.name for m in service.method} >= {"Predict", "Evaluate", "GetModelInfo"}


def test_v1_reflection_describes_itself_as_v1(fake_server: ServerThread) -> None:
    with grpc.insecure_channel(fake_server.target) as channel:
        (file,) = described(reflect(channel, "v1", containing_symbol("grpc.reflection.v1.ServerReflection")))
    assert (file.name, file.package) == ("grpc/reflection/v1/reflection.proto", "grpc.reflection.v1")
    (method,) = file.service[0].method
    assert (method.name, method.input_type, method.output_type) == (
        "ServerReflectionInfo", ".grpc.reflection.v1.ServerReflectionRequest",
        ".grpc.reflection.v1.ServerReflectionResponse")
    # Every message of v1alpha is there, renamed.
    alpha = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(alpha)
    assert [m.name for m in file.message_type] == [m.name for m in alpha.message_type]
