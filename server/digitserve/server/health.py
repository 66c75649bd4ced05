"""The gRPC health service and the names of its services: grpcio-health-checking's servicer,
whose Check of a service it does not know answers NOT_FOUND with empty details; this one says
which services it knows. The registry sets the statuses from the models' state."""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from digitserve.v1 import digit_service_pb2 as pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DigitService"].full_name  # and "": the server's
MODEL_SERVICE = "digitserve.v1.Model/{}"  # per model: SERVING while a version of it answers
# NOT_SERVING while a model has a newer version refused or its served version's files gone (per
# model: MODEL_UPDATES_SERVICE/NAME).
MODEL_UPDATES_SERVICE = "digitserve.v1.ModelUpdates"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthServicer(health_aio.HealthServicer):  # type: ignore[misc]  # grpc_health is untyped
    """``grpc_health``'s aio servicer; Check of an unknown service is NOT_FOUND with ``no such
    health service 'nope' (known: '', digitserve.v1.DigitService, ...)``."""

    def __init__(self) -> None:
        super().__init__()
        self.known: set[str] = {""}  # the base class starts with "" SERVING

    async def set(self, service: str,
                  status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        self.known.add(service)
        await super().set(service, status)

    async def Check(self, request: health_pb2.HealthCheckRequest,  # gRPC names it
                    context: Any) -> health_pb2.HealthCheckResponse | None:
        if request.service not in self.known:
            names = ", ".join(s or repr(s) for s in sorted(self.known))
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"no such health service {request.service!r} (known: {names})")
        response: health_pb2.HealthCheckResponse | None = await super().Check(request, context)
        return response
