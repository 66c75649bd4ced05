"""The Open Inference Protocol (KServe V2) gRPC edge: inference.GRPCInferenceService over the same
data plane as our own API, so Triton and KServe clients can call the server. A request names its
model (the protocol has no default model); its versions are our integer versions as text, or a
version label ("stable"), "" meaning the default version. server.oipcodec converts."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import grpc

from digitserve.oip import grpc_predict_v2_pb2 as oip
from digitserve.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from digitserve.server import oipcodec
from digitserve.server.decoding import PictureDecoder
from digitserve.server.errors import InvalidInputError, NotServedError
from digitserve.server.infer import (
    SERVER_NAME,
    model_metadata,
    model_ready,
    model_statistics,
    server_version,
)
from digitserve.server.modelcontrol import ModelControl, repository_index
from digitserve.server.oipstream import model_stream_infer
from digitserve.server.registry import Registry
from digitserve.server.status import Undecodable, deadline, mapped_errors
from digitserve.server.tritonconfig import EXTENSIONS, model_config

SERVICE = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"]


class InferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService over the data planes of the models served."""

    def __init__(self, router: Registry, pictures: PictureDecoder, instances: int = 1,
                 control: ModelControl | None = None,
                 draining: Callable[[], bool] = lambda: False) -> None:
        self._router = router
        self._draining = draining  # from the first moment of the server's stop
        self._pictures = pictures
        self._instances = instances  # the model's copies at this address (--workers)
        self._control = control if control is not None else ModelControl("none", router, None)
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
                         context: grpc.aio.ServicerContext) -> oip.ModelInferResponse | bytes:
        # (bytes: the answer serialized already; calls' serializer passes them through)
        return await oipcodec.model_infer(self._router, self._pictures, request, deadline(context),
                                          serialized=True)

    @mapped_errors
    async def ModelConfig(self, request: oip.ModelConfigRequest,
                          context: grpc.aio.ServicerContext) -> oip.ModelConfigResponse:
        config = model_config(self._router, request.name, request.version, self._instances)
        return oipcodec.model_config(config)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[oip.ModelInferRequest | Undecodable],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[oip.ModelStreamInferResponse]:
        """Each request answered as ModelInfer answers it, its error in the answer (oipstream)."""
        async for response in model_stream_infer(self._router, self._pictures, request_iterator,
                                                 deadline(context), self._draining):
            yield response

    @mapped_errors
    async def ModelStatistics(self, request: oip.ModelStatisticsRequest,
                              context: grpc.aio.ServicerContext) -> oip.ModelStatisticsResponse:
        return oipcodec.statistics(model_statistics(self._router, request.name, request.version))

    @mapped_errors
    async def RepositoryIndex(self, request: oip.RepositoryIndexRequest,
                              context: grpc.aio.ServicerContext) -> oip.RepositoryIndexResponse:
        _one_repository(request.repository_name)
        return oipcodec.repository_index(repository_index(self._router.model_infos(), request.ready))

    @mapped_errors
    async def RepositoryModelLoad(self, request: oip.RepositoryModelLoadRequest,
                                  context: grpc.aio.ServicerContext) -> oip.RepositoryModelLoadResponse:
        _one_repository(request.repository_name)
        for key in request.parameters:  # Triton's override a model's config or files
            raise InvalidInputError(f"parameters[{key!r}]", "is not supported by this server")
        await self._control.load(request.model_name)
        return oip.RepositoryModelLoadResponse()

    @mapped_errors
    async def RepositoryModelUnload(self, request: oip.RepositoryModelUnloadRequest,
                                    context: grpc.aio.ServicerContext) -> oip.RepositoryModelUnloadResponse:
        _one_repository(request.repository_name)
        await self._control.unload(request.model_name)
        return oip.RepositoryModelUnloadResponse()


def _one_repository(name: str) -> None:
    """The server has one repository, which "" names (as Triton's clients send it)."""
    if name:
        raise InvalidInputError("repository_name", f"{name!r}: this server has one repository; "
                                "send an empty repository_name")
