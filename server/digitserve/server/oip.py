"""The Open Inference Protocol (KServe V2) gRPC edge: inference.GRPCInferenceService over the same
data plane as our own API, so Triton and KServe clients can call the server. A request names its
model (the protocol has no default model); its versions are our integer versions as text, or a
version label ("stable"), "" meaning the default version. server.oipcodec converts."""

from __future__ import annotations

import grpc

from digitserve.oip import grpc_predict_v2_pb2 as oip
from digitserve.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from digitserve.server import oipcodec
from digitserve.server.decoding import PictureDecoder
from digitserve.server.errors import NotServedError
from digitserve.server.infer import SERVER_NAME, model_metadata, model_ready, server_version
from digitserve.server.registry import Registry
from digitserve.server.status import deadline, mapped_errors
from digitserve.server.tritonconfig import EXTENSIONS, model_config

SERVICE = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"]


class InferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService over the data planes of the models served."""

    def __init__(self, router: Registry, pictures: PictureDecoder, instances: int = 1) -> None:
        self._router = router
        self._pictures = pictures
        self._instances = instances  # the model's copies at this address (--workers)
        self._version = server_version()

    @mapped_errors
    async def ServerLive(self, request: oip.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    @mapped_errors
    async def ServerReady(self, request: oip.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=self._router.ready)

    @mapped_errors
    async def ModelReady(self, request: oip.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> oip.ModelReadyResponse:
        """Triton's answer: ``ready: false`` for a model, version or label not served, not an
        error (tritonclient's is_model_ready returns False, as over HTTP)."""
        try:
            ready = model_ready(self._router, request.name, request.version)
        except NotServedError:
            ready = False
        return oip.ModelReadyResponse(ready=ready)

    @mapped_errors
    async def ServerMetadata(self, request: oip.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(name=SERVER_NAME, version=self._version, extensions=EXTENSIONS)

    @mapped_errors
    async def ModelMetadata(self, request: oip.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> oip.ModelMetadataResponse:
        return oipcodec.metadata(model_metadata(self._router, request.name, request.version))

    @mapped_errors
    async def ModelInfer(self, request: oip.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> oip.ModelInferResponse:
        return await oipcodec.model_infer(self._router, self._pictures, request, deadline(context))

    @mapped_errors
    async def ModelConfig(self, request: oip.ModelConfigRequest,
                          context: grpc.aio.ServicerContext) -> oip.ModelConfigResponse:
        config = model_config(self._router, request.name, request.version, self._instances)
        return oipcodec.model_config(config)
