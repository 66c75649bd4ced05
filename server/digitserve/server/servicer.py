"""The gRPC edge of ``digitserve.v1``: each method hands its request to server.v1codec, the
converter to and from the neutral request; domain errors become status codes in server.status."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError

from digitserve.server import v1codec
from digitserve.server.models import Router
from digitserve.server.status import Undecodable, deadline, mapped_errors
from digitserve.server.wire import PackedPredictRequest, parse_predict_request
from digitserve.v1 import digit_service_pb2 as pb
from digitserve.v1 import digit_service_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

# Requests read by something faster than protobuf (digitserve.server.wire), by message type.
_PARSERS: dict[str, Callable[[bytes], Any]] = {
    pb.PredictRequest.DESCRIPTOR.full_name: parse_predict_request,
}


def tolerant_deserializer(message_class: Any) -> Callable[[bytes], Any]:
    """A request deserializer that never raises: gRPC would answer UNKNOWN (unary) or the method
    would see an unexpected exception (streams) for bytes that do not parse."""
    type_name = message_class.DESCRIPTOR.full_name
    from_string = _PARSERS.get(type_name, message_class.FromString)

    def parse(data: bytes) -> Any:
        try:
            return from_string(data)
        except DecodeError:
            return Undecodable(type_name)

    return parse


def _serializer(message_class: Any) -> Callable[[Any], bytes]:
    """Serializes a response message; a method may also answer bytes it serialized itself."""

    def serialize(response: Any) -> bytes:
        if isinstance(response, bytes):
            return response
        data: bytes = message_class.SerializeToString(response)
        return data

    return serialize


def add_to_server(servicer: Any, server: Any, service: ServiceDescriptor | None = None) -> None:
    """Registers ``servicer``'s methods for ``service`` (DigitService by default) like the generated
    ``add_*Servicer_to_server``, but with request deserializers that never raise, so that
    undecodable bytes become INVALID_ARGUMENT in server.status.mapped_errors. ``server``: a grpc.aio.Server or
    server.calls.Services."""
    service = service or pb.DESCRIPTOR.services_by_name["DigitService"]
    factories = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    handlers = {
        method.name: factories[(method.client_streaming, method.server_streaming)](
            getattr(servicer, method.name),
            request_deserializer=tolerant_deserializer(message_factory.GetMessageClass(method.input_type)),
            response_serializer=_serializer(message_factory.GetMessageClass(method.output_type)),
        )
        for method in service.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


class DigitServicer(pb_grpc.DigitServiceServicer):
    """digitserve.v1.DigitService over the data planes of the models served (server.v1codec)."""

    def __init__(self, router: Router) -> None:
        self._router = router

    @mapped_errors
    async def Predict(self, request: pb.PredictRequest | PackedPredictRequest,
                      context: grpc.aio.ServicerContext) -> bytes:
        """Answers a serialized PredictResponse (see add_to_server's serializer). The request
        comes as server.wire read it when its images are uniformly packed."""
        return await v1codec.predict(self._router, request, deadline(context))

    @mapped_errors
    async def Evaluate(self, request_iterator: AsyncIterator[pb.EvaluateRequest],
                       context: grpc.aio.ServicerContext) -> pb.EvaluateResponse:
        return await v1codec.evaluate(self._router, request_iterator, deadline(context))

    @mapped_errors
    async def GetModelInfo(self, request: pb.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> pb.GetModelInfoResponse:
        return v1codec.model_info(self._router, request)

    @mapped_errors
    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        return v1codec.list_models(self._router, request)
