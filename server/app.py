"""Server lifecycle: build the grpc.aio server, load the model, report health, drain on signals."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from digitserve.repository import ModelRepository
from digitserve.v1 import digit_service_pb2 as pb
from digitserve.v1 import digit_service_pb2_grpc as pb_grpc
from server.dataplane import DataPlane
from server.model import KerasModel, Model
from server.servicer import DigitServicer
from server.settings import Settings

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DigitService"].full_name
ModelLoader = Callable[[], Model]


def repository_loader(settings: Settings) -> ModelLoader:
    """Loads the configured version (or the newest) of the configured model."""

    def load() -> Model:
        repo = ModelRepository(settings.model_repo)
        version = settings.model_version or repo.latest(settings.model_name)
        return KerasModel.load(repo.version_dir(settings.model_name, version))

    return load


def server_options(settings: Settings, reuse_port: bool = False) -> list[tuple[str, int]]:
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Only workers share a port; a lone server must not silently share one with a stranger.
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ]
    if settings.max_connection_age > 0:
        options += [
            ("grpc.max_connection_age_ms", int(settings.max_connection_age * 1000)),
            ("grpc.max_connection_age_grace_ms", int(settings.grace_period * 1000)),
        ]
    return options


class App:
    """One server: start() binds and serves (health NOT_SERVING), load() makes it SERVING,
    stop() drains."""

    def __init__(
        self, settings: Settings, loader: ModelLoader | None = None, *, reuse_port: bool = False
    ) -> None:
        self.settings = settings
        self._loader = loader or repository_loader(settings)
        self.plane = DataPlane(
            settings.max_images_per_request,
            max_batch_size=settings.max_batch_size,
            max_queue_delay=settings.max_queue_delay_ms / 1000,
            max_queued_images=settings.max_queued_images,
        )
        self.health = health_aio.HealthServicer()
        self.server = grpc.aio.server(options=server_options(settings, reuse_port))
        pb_grpc.add_DigitServiceServicer_to_server(  # type: ignore[no-untyped-call]
            DigitServicer(self.plane), self.server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME),
            self.server,
        )
        self.port = 0

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def start(self) -> int:
        """Binds and starts serving; returns the bound port."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{self.settings.host}:{self.settings.port}"
        self.port = self.server.add_insecure_port(address)
        await self.server.start()
        logger.info("listening on %s:%d (model %s)", self.settings.host, self.port,
                    self.settings.model_name)
        return self.port

    async def load(self) -> Model:
        """Loads and warms the model off the event loop, then reports SERVING."""
        model = await self.plane.run(self._loader)
        self.plane.set_model(model)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        logger.info("serving model %s version %d", model.spec.name, model.spec.version)
        return model

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING at once, refuse new calls, let in-flight ones finish within the grace."""
        grace = self.settings.grace_period if grace is None else grace
        await self.health.enter_graceful_shutdown()
        started = time.perf_counter()
        await self.server.stop(grace)
        await self.plane.close()
        logger.info("stopped after draining for %.2fs", time.perf_counter() - started)


async def serve(settings: Settings, *, reuse_port: bool = False) -> int:
    """Runs until SIGTERM or SIGINT; returns the process exit code."""
    app = App(settings, reuse_port=reuse_port)
    await app.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    load = asyncio.ensure_future(app.load())
    waiter = asyncio.ensure_future(stop.wait())
    await asyncio.wait({load, waiter}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if load.done() and load.exception() is not None:
        exc = load.exception()
        logger.error("cannot load model %s: %s", settings.model_name, exc)
        code = 1
    else:
        await waiter
        logger.info("signal received: draining for up to %.1fs", settings.grace_period)
    load.cancel()
    waiter.cancel()
    await app.stop()
    return code
