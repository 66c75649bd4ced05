"""The gRPC edge of ``digitserve.v1``: each method hands its request to server.v1codec, the
converter to and from the neutral request; domain errors become status codes in server.status."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from digitserve.server import v1codec
from digitserve.server.decoding import PictureDecoder
from digitserve.server.registry import Registry
from digitserve.server.status import deadline, mapped_errors
from digitserve.server.wire import PackedPredictRequest
from digitserve.v1 import digit_service_pb2 as pb
from digitserve.v1 import digit_service_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)


class DigitServicer(pb_grpc.DigitServiceServicer):
    """digitserve.v1.DigitService over the data planes of the models served (server.v1codec)."""

    def __init__(self, router: Registry, pictures: PictureDecoder) -> None:
        self._router = router
        self._pictures = pictures

    @mapped_errors
    async def Predict(self, request: pb.PredictRequest | PackedPredictRequest,
                      context: grpc.aio.ServicerContext) -> bytes:
        """Answers a serialized PredictResponse (see calls.CallInterceptor's serializer). The
        request comes as server.wire read it when its images are uniformly packed."""
        return await v1codec.predict(self._router, self._pictures, request, deadline(context))

    @mapped_errors
    async def Evaluate(self, request_iterator: AsyncIterator[pb.EvaluateRequest],
                       context: grpc.aio.ServicerContext) -> pb.EvaluateResponse:
        return await v1codec.evaluate(self._router, self._pictures, request_iterator,
                                      deadline(context))

    @mapped_errors
    async def GetModelInfo(self, request: pb.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> pb.GetModelInfoResponse:
        return v1codec.model_info(self._router, request)

    @mapped_errors
    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        return v1codec.list_models(self._router, request)
