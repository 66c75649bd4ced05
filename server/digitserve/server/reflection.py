"""gRPC server reflection in both versions of the protocol: ``grpc.reflection.v1alpha`` and
``grpc.reflection.v1`` (which grpcurl 1.8 and later, Postman and grpc-java's tools ask first).

grpcio-reflection serves only v1alpha (grpc/grpc#38576). The v1 protocol is v1alpha renamed: the
same messages, field for field, in package ``grpc.reflection.v1``. So v1 is grpcio-reflection's
own servicer registered a second time under v1's service name, its messages read and written by
v1alpha's classes (the bytes are the same), and v1's file descriptor, built from v1alpha's with
the package renamed, added to the descriptor pool, so that reflection describes v1 as well."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

V1ALPHA_SERVICE: str = reflection.SERVICE_NAME  # grpc.reflection.v1alpha.ServerReflection
V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE = f"{V1_PACKAGE}.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"
SERVICES = (V1_SERVICE, V1ALPHA_SERVICE)


def v1_file() -> descriptor_pb2.FileDescriptorProto:
    """``grpc/reflection/v1/reflection.proto``: v1alpha's file with v1's name and package (and no
    options: v1alpha's name its own Java and Go packages)."""
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = f".{reflection_pb2.DESCRIPTOR.package}.", f".{V1_PACKAGE}."
    proto.name, proto.package = V1_FILE, V1_PACKAGE
    proto.ClearField("options")
    for message in proto.message_type:
        for field in message.field:
            if field.type_name.startswith(old):
                field.type_name = new + field.type_name[len(old):]
    for service in proto.service:
        for method in service.method:
            method.input_type = new + method.input_type[len(old):]
            method.output_type = new + method.output_type[len(old):]
    return proto


def add_reflection(server: Any, service_names: Iterable[str]) -> None:
    """Serves reflection, v1 and v1alpha, on ``server`` (a grpc.aio.Server or calls.GenericOnly)
    for ``service_names`` (both reflection services are added to them): v1alpha by its generated
    registration, v1 as the same servicer registered the same way under v1's name, with v1's file
    added to the default descriptor pool."""
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(V1_FILE)
    except KeyError:
        pool.Add(v1_file())
    servicer = reflection.aio.ReflectionServicer((*service_names, *SERVICES), pool=pool)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    handlers = {"ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(V1_SERVICE, handlers),))
    server.add_registered_method_handlers(V1_SERVICE, handlers)
