"""Server lifecycle: build the grpc.aio server, load the model, report health, drain on signals."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from digitserve.repository import RepositoryError
from digitserve.v1 import digit_service_pb2 as pb
from server.calls import CallWrapper, Services
from server.dataplane import DataPlane
from server.logs import access_log
from server.model import Model
from server.oip import SERVICE as OIP_SERVICE
from server.oip import InferenceServicer
from server.security import SecurityConfigError, ServerSecurity
from server.servicer import DigitServicer, add_to_server
from server.settings import Settings
from server.telemetry import Telemetry
from server.versions import ModelSource, RepositorySource, StaticSource

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DigitService"].full_name
ModelLoader = Callable[[], Model]


def server_options(settings: Settings, reuse_port: bool = False) -> list[tuple[str, int]]:
    """The grpc core channel arguments of every listener: message sizes, port sharing and the
    HTTP/2 limits (streams per connection, idle and age limits, keepalive, ping policing, header
    size)."""
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Only workers share a port; a lone server must not silently share one with a stranger.
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        # Advertised as SETTINGS_MAX_CONCURRENT_STREAMS: a connection's streams beyond it are
        # refused by grpc core, before any Python runs for them.
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
        # grpc's "overload protection" also counts streams that have ended but whose calls Python
        # has not yet released, so a grpc client that keeps to the limit (200 calls in flight on
        # one channel) had some of its calls refused: UNAVAILABLE "RST_STREAM with error code 7"
        # (tests/test_resilience.py). Without it the limit holds against the flood all the same
        # (tests/test_flood.py, with the flood's SETTINGS acknowledged or not).
        ("grpc.http.overload_protection", 0),
        # Soft and hard limit alike: grpc refuses header blocks between its soft limit and its
        # hard one at random.
        ("grpc.max_metadata_size", settings.max_metadata_bytes),
        ("grpc.absolute_max_metadata_size", settings.max_metadata_bytes),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout * 1000)),
        # Ping policing (GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS).
        ("grpc.http2.min_ping_interval_without_data_ms", int(settings.min_ping_interval * 1000)),
        ("grpc.http2.max_ping_strikes", settings.max_ping_strikes),
    ]
    # 0: never (grpc's own server default is a ping every 2 hours).
    options.append(("grpc.keepalive_time_ms", int(settings.keepalive_time * 1000) or 2**31 - 1))
    if settings.max_connection_idle > 0:
        options.append(("grpc.max_connection_idle_ms", int(settings.max_connection_idle * 1000)))
    if settings.max_connection_age > 0:
        options += [
            ("grpc.max_connection_age_ms", int(settings.max_connection_age * 1000)),
            ("grpc.max_connection_age_grace_ms", int(settings.grace_period * 1000)),
        ]
    return options


def settle_memory() -> None:
    """Collects garbage once and freezes what survives out of the cyclic collector's reach: with
    TensorFlow loaded (a version served through KerasModel) some 370,000 objects, which each full
    collection would otherwise walk, a pause of about 200 ms at a random moment under load
    (``python -m bench.call_cost gc --keras``; 25,000 objects for a version served from its
    flatbuffer).
    Called after each (re)load; unfreezing first lets a replaced model's reference cycles be
    collected."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


# SERVING while the served version is the newest published one; NOT_SERVING when a newer version
# was refused by the checks (GetModelInfo's refused_versions says why). Not a gate for traffic.
MODEL_UPDATES_SERVICE = "digitserve.v1.ModelUpdates"
ModelEvent = Callable[[str, int, str], None]  # (kind: load|reload, version, outcome: served|refused)


class App:
    """One server: start() binds and serves (health NOT_SERVING), load() makes it SERVING,
    stop() drains. With a repository source it also watches for new versions (hot reload)."""

    def __init__(
        self,
        settings: Settings,
        loader: ModelLoader | None = None,
        *,
        source: ModelSource | None = None,
        reuse_port: bool = False,
        freeze_gc: bool = False,
    ) -> None:
        self.settings = settings
        self.freeze_gc = freeze_gc  # settle_memory() after each (re)load: the mnist-serve process
        self.security = ServerSecurity.from_settings(settings)  # reads TLS and token files: fails first
        if source is None:
            source = (
                StaticSource(loader)
                if loader is not None
                else RepositorySource(
                    settings.model_repo, settings.model_name, settings.min_check_accuracy,
                    settings.inference,
                )
            )
        self.source = source
        self.model_events: list[ModelEvent] = []
        self.telemetry = Telemetry(low_confidence=settings.low_confidence)
        self.model_events.append(self.telemetry.on_model_event)
        self._watch_task: asyncio.Task[None] | None = None
        self.plane = DataPlane(
            settings.max_images_per_request,
            max_batch_size=settings.max_batch_size,
            max_queue_delay=settings.max_queue_delay_ms / 1000,
            max_queued_images=settings.max_queued_images,
            keep_versions=settings.keep_versions,
            observer=self.telemetry,
        )
        self.telemetry.watch_queue(lambda: self.plane.batcher.queued_images)
        self.health = health_aio.HealthServicer()
        self.server = grpc.aio.server(options=server_options(settings, reuse_port))
        # Every method of every service wrapped once: request id, token check, metrics, access line.
        services = Services(self.server, CallWrapper(self.telemetry, self.security.auth))
        add_to_server(DigitServicer(self.plane), services)  # bytes that do not parse: INVALID_ARGUMENT
        add_to_server(InferenceServicer(self.plane, settings.model_name), services, OIP_SERVICE)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, services)
        # What reflection.enable_server_reflection does for a grpc.aio.Server (which it tells by
        # isinstance, and Services is not one).
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection.aio.ReflectionServicer((
                SERVICE_NAME,
                OIP_SERVICE.full_name,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            )),
            services,
        )
        services.close()
        self.port = 0
        self.metrics_port: int | None = None

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def start(self) -> int:
        """Binds and starts serving; returns the bound port."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.settings.metrics_port >= 0:
            self.metrics_port = self.telemetry.serve(self.settings.host, self.settings.metrics_port)
            logger.info("metrics on http://%s:%d/metrics", self.settings.host, self.metrics_port)
        address = f"{self.settings.host}:{self.settings.port}"
        if self.security.credentials is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, self.security.credentials)
        await self.server.start()
        logger.info(
            "listening on %s:%d (model %s; %s)",
            self.settings.host, self.port, self.settings.model_name, self.security.description,
        )
        return self.port

    def _serve(self, model: Model) -> None:
        """Serves ``model`` from now on (DataPlane.set_model), then settles memory if asked."""
        self.plane.set_model(model)
        if self.freeze_gc:
            settle_memory()

    def _event(self, kind: str, version: int, outcome: str) -> None:
        for listener in self.model_events:
            listener(kind, version, outcome)

    async def _try_load(self, kind: str, version: int) -> Model | None:
        """Loads, checks and warms a version off the event loop (not on the model thread, so
        serving goes on meanwhile); None, logged and remembered, if it is refused."""
        try:
            model = await asyncio.get_running_loop().run_in_executor(None, self.source.load, version)
        except Exception as exc:  # any failure to load or check refuses the version
            self.plane.refused[version] = str(exc)
            logger.error("refused model %s version %d: %s", self.settings.model_name, version, exc)
            self._event(kind, version, "refused")
            return None
        self._event(kind, version, "served")
        return model

    async def load(self) -> Model:
        """Serves the newest version that passes the checks (an older one when newer ones fail),
        then reports SERVING and starts watching for new versions."""
        pinned = self.settings.model_version
        versions = (
            [pinned]
            if pinned
            else await asyncio.get_running_loop().run_in_executor(None, self.source.versions)
        )
        for version in sorted(versions, reverse=True):
            model = await self._try_load("load", version)
            if model is not None:
                break
        else:
            reasons = "; ".join(f"version {v}: {r}" for v, r in sorted(self.plane.refused.items()))
            raise RepositoryError(f"no servable version of model {self.settings.model_name!r} ({reasons})")
        self._serve(model)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        await self._set_updates_health()
        logger.info("serving model %s version %d from %s", model.spec.name, model.spec.version, self.source)
        if not pinned and self.settings.reload_interval > 0 and not isinstance(self.source, StaticSource):
            self._watch_task = asyncio.get_running_loop().create_task(self._watch(), name="watch")
        return model

    async def _set_updates_health(self) -> None:
        model = self.plane.model
        newer_refused = model is not None and any(v > model.spec.version for v in self.plane.refused)
        await self.health.set(
            MODEL_UPDATES_SERVICE,
            health_pb2.HealthCheckResponse.NOT_SERVING
            if newer_refused
            else health_pb2.HealthCheckResponse.SERVING,
        )

    async def reload_once(self) -> bool:
        """Loads the newest published version if it is newer than the served one and was not
        refused before; swaps it in when it passes the checks. True if the served model changed."""
        current = self.plane.model
        assert current is not None
        versions = await asyncio.get_running_loop().run_in_executor(None, self.source.versions)
        candidates = [v for v in versions if v > current.spec.version and v not in self.plane.refused]
        if not candidates:
            return False
        model = await self._try_load("reload", max(candidates))
        if model is not None:
            self._serve(model)
            logger.info(
                "hot reload: serving model %s version %d (was version %d)",
                model.spec.name,
                model.spec.version,
                current.spec.version,
            )
        await self._set_updates_health()
        return model is not None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reload_interval)
            try:
                await self.reload_once()
            except Exception:  # a listing error must not end the watch
                logger.exception("watching %s failed; trying again", self.source)

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING at once, refuse new calls, let in-flight ones finish within the grace."""
        grace = self.settings.grace_period if grace is None else grace
        if self._watch_task is not None:
            self._watch_task.cancel()
        await self.health.enter_graceful_shutdown()
        started = time.perf_counter()
        await self.server.stop(grace)
        await self.plane.close()
        await self.telemetry.close()
        access_log.flush()
        logger.info("stopped after draining for %.2fs", time.perf_counter() - started)


async def serve(settings: Settings, *, reuse_port: bool = False) -> int:
    """Runs until SIGTERM or SIGINT; returns the process exit code."""
    try:
        app = App(settings, reuse_port=reuse_port, freeze_gc=True)
    except SecurityConfigError as error:
        logger.error("cannot start: %s", error)
        return 1
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
