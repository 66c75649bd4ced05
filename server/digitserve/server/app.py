"""Server lifecycle: build the grpc.aio server, load the model, report health, drain on signals."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import resource
import signal
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc

from digitserve.inference import Model
from digitserve.nativelog import native_stderr_logged
from digitserve.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from digitserve.repository import ModelNotFoundError, ModelRepository, RepositoryError
from digitserve.server.calls import CallInterceptor, GenericOnly
from digitserve.server.dataplane import DataPlane
from digitserve.server.decoding import PictureDecoder, PictureLimits
from digitserve.server.drain import Drain
from digitserve.server.errors import InvalidInputError
from digitserve.server.errors import ModelNotFoundError as NotServedError
from digitserve.server.health import HealthServicer
from digitserve.server.httpserver import HttpEdge, exposition
from digitserve.server.logs import access_log
from digitserve.server.modelconfig import ModelConfigError, ServingConfig, from_settings, read_settled
from digitserve.server.models import (
    MODEL_SERVICE,
    MODEL_UPDATES_SERVICE,
    NOT_SERVING,
    SERVING,
    WAIT_INTERVAL,
    ModelInfo,
    ModelServer,
    check_repository,
)
from digitserve.server.oip import SERVICE as OIP_SERVICE
from digitserve.server.oip import InferenceServicer
from digitserve.server.ports import ListenError, grpc_bind_error, listen_error, metrics_port_error
from digitserve.server.reflection import SERVICES as REFLECTION_SERVICES
from digitserve.server.reflection import add_reflection
from digitserve.server.rest import RestApi
from digitserve.server.security import SecurityConfigError, ServerSecurity
from digitserve.server.servicer import DigitServicer
from digitserve.server.settings import Settings
from digitserve.server.slot import WorkerSlot
from digitserve.server.telemetry import (
    ConfigMetrics,
    RepositoryMetrics,
    Telemetry,
    export_certificate_expiry,
    watch_workers,
)
from digitserve.server.versions import (
    GateRules,
    ModelSource,
    NothingPublishedError,
    RepositoryReads,
    RepositorySource,
    RepositoryTimeoutError,
    StaticSource,
    repository_error,
)
from digitserve.v1 import digit_service_pb2 as pb
from digitserve.v1 import digit_service_pb2_grpc as pb_grpc

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
        # grpc's "overload protection": a connection's streams that have ended but whose calls
        # Python has not yet released count against the stream limit too, beyond a headroom of
        # --max-deallocating-streams. Without it an HTTP/2 rapid reset (HEADERS then RST_STREAM
        # at once) hands Python dead calls faster than it releases them, and the calls of other
        # clients wait behind them until CANCELLED; without the headroom a grpc client keeping to
        # the limit (200 calls in flight on one channel) had about 4 in 10 of its calls refused
        # UNAVAILABLE "RST_STREAM with error code 7" (tests/server/test_flood.py,
        # tests/server/test_resilience.py).
        ("grpc.http.overload_protection", 1),
        ("grpc.http2.max_deallocating_streams", settings.max_deallocating_streams),
        # A connection that has not sent the HTTP/2 preface and SETTINGS by then is closed: an
        # idle socket holds a file only this long (grpc's default is 120 s).
        ("grpc.server_handshake_timeout_ms", int(settings.handshake_timeout * 1000)),
        # Soft and hard limit alike: grpc refuses header blocks between its soft limit and its
        # hard one at random.
        ("grpc.max_metadata_size", settings.max_metadata_bytes),
        ("grpc.absolute_max_metadata_size", settings.max_metadata_bytes),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout * 1000)),
        # Ping policing (GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS).
        ("grpc.http2.min_ping_interval_without_data_ms", int(settings.min_ping_interval * 1000)),
        ("grpc.http2.max_ping_strikes", settings.max_ping_strikes),
    ]
    cap = connection_cap(settings)
    if cap is not None:  # beyond it grpc closes a new connection at once, before it costs more
        options.append(("grpc.max_allowed_incoming_connections", cap))
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


FILES_RESERVED = 128  # files a server opens besides connections: models, logs, threads, metrics


def connection_cap(settings: Settings) -> int | None:
    """The most gRPC connections a process holds at once: --max-connections, or (0) its file limit
    less FILES_RESERVED and the HTTP edge's connections, at least 16; None when the file limit is
    unlimited. Past the file limit grpc's accept loop only logs "File descriptor limit reached.
    Retrying." and new clients wait for an idle connection to go; under the cap it closes the extra
    connection at once and the files a reload, the HTTP edge and the metrics need stay free."""
    if settings.max_connections:
        return settings.max_connections
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return None
    http = settings.http_max_connections if settings.http_port >= 0 else 0
    return max(16, soft - FILES_RESERVED - http)


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


Router = Callable[[str], ModelServer]


def grpc_server(options: list[tuple[str, int]], interceptor: CallInterceptor, digit: DigitServicer,
                oip: InferenceServicer, health: HealthServicer) -> grpc.aio.Server:
    """The grpc.aio server: every call through ``interceptor``; DigitService, the V2 protocol,
    health and reflection (v1 and v1alpha) added by their generated registration."""
    server = grpc.aio.server(options=options, interceptors=(interceptor,))
    services = GenericOnly(server)  # every method through its service's generic handler
    pb_grpc.add_DigitServiceServicer_to_server(digit, services)  # type: ignore[no-untyped-call]
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(oip, services)  # type: ignore[no-untyped-call]
    health_pb2_grpc.add_HealthServicer_to_server(health, services)
    served = (SERVICE_NAME, OIP_SERVICE.full_name, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
    add_reflection(services, served)
    pool = descriptor_pool.Default()
    interceptor.touch(pool.FindServiceByName(name) for name in (*served, *REFLECTION_SERVICES))
    return server


def _names(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names) if names else "no model yet"


class App:
    """One server: start() binds and serves (health NOT_SERVING), load() or load_or_wait() makes
    it SERVING, stop() drains. It serves every model of the repository (or those the flags or the
    model config file name), each a ModelServer with its own versions, gate, batcher and watch;
    its own watch finds models that appear or disappear and reads the model config again when it
    changes."""

    def __init__(
        self,
        settings: Settings,
        loader: ModelLoader | None = None,
        *,
        source: ModelSource | None = None,
        reuse_port: bool = False,
        freeze_gc: bool = False,
        worker_index: int = 0,
    ) -> None:
        self.settings = settings
        self.worker_index = worker_index  # --workers N: this process's index (its ports' lines say it)
        self.freeze_gc = freeze_gc  # settle_memory() after each (re)load: the mnist-serve process
        self.security = ServerSecurity.from_settings(settings)  # reads TLS and token files: fails first
        self.telemetry = Telemetry(low_confidence=settings.low_confidence)
        certificate = self.security.certificate  # TLS: its expiry as a metric
        export_certificate_expiry(self.telemetry, None if certificate is None else certificate.expires)
        self.models: dict[str, ModelServer] = {}
        # Every repository read in a daemon thread with a timeout (digitserve.server.versions).
        self.repository_metrics = RepositoryMetrics(
            self.telemetry.registry,
            hung_reads=lambda: self.reads.hung,
            served_missing=lambda: any(
                m.model is not None and m.model.spec.version in m.gone for m in self.models.values()),
        )
        self.reads = RepositoryReads(settings.repository_timeout, self.repository_metrics.on_timeout)
        self.health = HealthServicer()  # NOT_FOUND names the services it knows
        self.static = source is not None or loader is not None  # one model, no repository
        self.config_error = ""
        self._config_seen: tuple[int, int] | None = None  # the config file's (mtime_ns, size)
        self.config_metrics = ConfigMetrics(self.telemetry.registry) if settings.model_config else None
        if self.static:
            self.config = ServingConfig(None)
            name = settings.model_name[0] if settings.model_name else "mnist"
            self._add(name, source if source is not None else StaticSource(loader))  # type: ignore[arg-type]
        else:
            self.config = from_settings(settings)  # ModelConfigError: the file cannot be used
            if settings.model_config is not None:
                self._config_seen = self._config_stamp()
            for name in self._configured():
                self._add(name)
        self.removed: dict[str, float] = {}  # discovered models whose directory is gone: since when
        self.repository = ModelRepository(settings.model_repo)  # discovery's listing (_discover)
        self.unpublished = 0  # model directories found without a version, not served (yet)
        self._watch_task: asyncio.Task[None] | None = None
        self._model_tasks: set[asyncio.Task[Model]] = set()
        self._loading = False  # load_or_wait() started: models found later start loading at once
        self._serving = asyncio.Event()  # health "" became SERVING
        self._fatal: asyncio.Future[None] | None = None  # a first load failed (load_or_wait)
        self.telemetry.watch_queue(
            lambda: float(sum(m.plane.batcher.queued_images for m in list(self.models.values()))))
        self.draining = False  # stop() began: readiness is false over every protocol from now on
        self.reuse_port = reuse_port
        # Pictures (Image.encoded, V2 BYTES) are decoded on threads of their own, never the loop.
        self.pictures = PictureDecoder(settings.picture_threads, PictureLimits(
            settings.max_picture_bytes, settings.max_picture_request_bytes,
            settings.max_picture_pixels, settings.max_queued_pictures,
            settings.max_picture_decoded_bytes))
        self.oip = InferenceServicer(self)  # the V2 protocol, over gRPC and over HTTP
        self.drain = Drain()  # SIGTERM: calls that arrive are held, then refused UNAVAILABLE
        # Every call: request id, token check, metrics, access line; bytes that do not parse of
        # DigitService and the V2 protocol: INVALID_ARGUMENT.
        interceptor = CallInterceptor(self.telemetry, self.security.auth, self.drain,
                                      tolerant=(pb.DESCRIPTOR.services_by_name["DigitService"], OIP_SERVICE))
        self.server = grpc_server(server_options(settings, reuse_port), interceptor,
                                  DigitServicer(self), self.oip, self.health)
        self.port = 0
        self.metrics_port: int | None = None
        # --http-port: the V2 protocol's REST binding, on this loop, through the same data planes.
        self.http: HttpEdge | None = None
        self.http_port: int | None = None
        if settings.http_port >= 0:
            api = RestApi(self, self.oip, lambda: self.draining, partial(exposition, self.telemetry.registry))
            self.http = HttpEdge(settings, api, self.telemetry, self.security.auth)

    # --- the models -----------------------------------------------------------------------------

    def _configured(self) -> list[str]:
        """The models the config names (the default model included), without looking at disk."""
        names = list(self.config.models or ())
        if self.config.default_model and self.config.default_model not in names:
            names.append(self.config.default_model)
        return names

    def _add(self, name: str, source: ModelSource | None = None) -> ModelServer:
        if source is None:
            settings = self.settings
            source = RepositorySource(settings.model_repo, name, inference=settings.inference,
                                      allow_missing_check_set=settings.allow_missing_check_set)
        server = ModelServer(
            name, source, self.settings, self.config.policy_of(name), reads=self.reads,
            telemetry=self.telemetry, health=self.health, on_change=self._update_health,
            on_unload=self.repository_metrics.on_unload, freeze_gc=self.freeze_gc,
            settle=settle_memory)
        self.models[name] = server
        if not self.static:  # a loader's model is counted under its own name, once loaded
            self.telemetry.touch_model(name)
        return server

    @property
    def default_model(self) -> str:
        """The model a request without a name gets: --default-model (or the config file's, or the
        first --model-name), else the only model served; "" when there are several and none is
        named."""
        if self.config.default_model:
            return self.config.default_model
        if len(self.models) == 1:
            return next(iter(self.models))
        return ""

    def model(self, name: str) -> ModelServer:
        """The served model ``name`` ("" : the default model); NOT_FOUND naming those served."""
        if not name:
            name = self.default_model
            if not name:
                raise InvalidInputError(
                    "model_name", f"empty, and this server serves {len(self.models)} models "
                    f"({_names(sorted(self.models))}) and has no default model; name one, or start "
                    "the server with --default-model")
        server = self.models.get(name)
        if server is None:
            raise NotServedError(f"model {name!r} is not served; this server serves "
                                     f"{_names(sorted(self.models))}")
        return server

    def model_infos(self, name: str = "") -> list[ModelInfo]:
        """ListModels: every model (or ``name``'s), by name."""
        if name:
            return [self.model(name).info()]
        return [self.models[n].info() for n in sorted(self.models)]

    @property
    def config_path(self) -> str:
        return "" if self.settings.model_config is None else str(self.settings.model_config)

    @property
    def ready(self) -> bool:
        """What health "" says: the default model serves (with no default model, any one)."""
        default = self.default_model
        if default:
            server = self.models.get(default)
            return server is not None and server.serving
        return any(m.serving for m in self.models.values())

    # Compatibility with one-model callers (tests, embedding): the default model's parts.
    @property
    def plane(self) -> DataPlane:
        return self.model("").plane

    @property
    def source(self) -> ModelSource:
        return self.model("").source

    @source.setter
    def source(self, source: ModelSource) -> None:
        server = self.model("")
        server.source = source
        server.source.rules = server.policy.rules

    async def _update_health(self) -> None:
        """Health "" and DigitService from the models' state; ModelUpdates NOT_SERVING while any
        model has a newer version refused or its served version gone. A model whose loaded
        model has another name (a loader's) is known by that name from then on."""
        if self.static:
            for name, server in list(self.models.items()):
                if server.name != name:
                    del self.models[name]
                    self.models[server.name] = server
        status = SERVING if self.ready else NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)
        if any(m.serving for m in self.models.values()):
            stale = any(m.stale for m in self.models.values())
            await self.health.set(MODEL_UPDATES_SERVICE, NOT_SERVING if stale else SERVING)
        if status == SERVING:
            self._serving.set()

    # --- the repository and the config file -----------------------------------------------------

    def _config_stamp(self) -> tuple[int, int] | None:
        assert self.settings.model_config is not None
        try:
            stat = self.settings.model_config.stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size

    async def _check_config(self) -> bool:
        """Reads the model config file again if it changed; True when a new config is in force.
        A config that cannot be used keeps the previous one (logged once, counted, and reported
        by ListModels)."""
        path = self.settings.model_config
        if path is None or self.config_metrics is None:
            return False
        stamp = await self.reads.run("list config", f"looking at {path}", self._config_stamp)
        if stamp == self._config_seen:
            return False
        self._config_seen = stamp
        rules = GateRules(self.settings.min_check_accuracy, self.settings.max_regression)
        try:
            # Only once it holds still: a file rewritten in place is half-written for a moment.
            config, self._config_seen = await self.reads.run(
                "load config", f"reading {path}", partial(read_settled, path, rules))
        except ModelConfigError as error:
            if str(error) != self.config_error:
                logger.error("model config not applied, the previous one stays in force: %s", error)
            self.config_error = str(error)
            self.config_metrics.on_error()
            return False
        self.config_error = ""
        self.config_metrics.on_applied()
        if config == self.config:
            return False
        self.config = config
        logger.info("model config %s applied: %s", path, ", ".join(sorted(config.models or ())) or
                    "every model in the repository")
        for name, server in list(self.models.items()):
            if config.serves(name):
                await server.apply(config.policy_of(name))
        return True

    async def _discover(self) -> None:
        """Adds the models the config names or the repository holds that are not served yet,
        and removes those no longer named (at once) or whose directory has been gone for
        --removed-version-grace (after their in-flight calls)."""
        if self.static:
            return
        names = set(self._configured())
        if self.config.models is None:
            root = self.settings.model_repo
            found = await self.reads.run("list models", f"listing the models in {root}",
                                         self.repository.model_dirs)
            # A directory without a version costs this one listing per look and nothing else: no
            # ModelServer (batcher, watch, health services, metrics series) until a version
            # appears in it. One served already stays while its directory is there.
            names.update(n for n, published in found.items() if published or n in self.models)
            self.unpublished = sum(1 for n, published in found.items() if not published and n not in names)
        now = time.monotonic()
        grace = self.settings.removed_version_grace
        for name in sorted(names - set(self.models)):
            logger.info("model %s found in %s: serving it once a version passes the gate",
                        name, self.settings.model_repo)
            server = self._add(name)
            if self._loading:
                self._start_model(server)
        for name in sorted(set(self.models) - names):
            if self.config.models is None and name not in self.removed:
                self.removed[name] = now
                logger.warning("model %s is gone from %s; it is served for up to %gs more, then "
                               "removed", name, self.settings.model_repo,
                               self.settings.removed_version_grace)
            if self.config.models is not None or now - self.removed[name] >= grace:
                await self._remove(name)
        for name in [n for n in self.removed if n in names]:
            del self.removed[name]
            logger.info("model %s is back in %s", name, self.settings.model_repo)
        await self._update_health()

    async def _remove(self, name: str) -> None:
        server = self.models.pop(name)
        self.removed.pop(name, None)
        logger.warning("model %s is no longer served (%s); its calls in flight finish first", name,
                       "not in the model config" if self.config.models is not None
                       else "its directory is gone")
        await self.health.set(MODEL_SERVICE.format(name), NOT_SERVING)
        await server.close(self.settings.grace_period)

    async def refresh(self) -> None:
        """One look at the config file and the repository's models (the App's watch, SIGHUP)."""
        await self._check_config()
        await self._discover()

    async def reload_once(self) -> bool:
        """refresh(), then one look at each model's versions; True if a served version changed."""
        await self.refresh()
        changed = False
        for server in list(self.models.values()):
            changed |= await server.reload_once()
        return changed

    def _start_watch(self) -> None:
        watched = self.settings.model_config is not None or (self.config.models is None and not self.static)
        if self._watch_task is None and watched:
            self._watch_task = asyncio.get_running_loop().create_task(self._watch(), name="watch")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reload_interval or WAIT_INTERVAL)
            try:
                await self.refresh()
            except RepositoryTimeoutError:
                pass  # logged and counted where it timed out; the next look tries again
            except Exception:  # a listing error must not end the watch
                logger.exception("watching %s failed; trying again", self.settings.model_repo)

    async def check_repository(self) -> None:
        """Before listening: what the repository must hold (check_repository)."""
        if not self.static:
            await check_repository(self.settings, self.reads, self.config)

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> int:
        """Binds and starts serving; returns the bound port."""
        await self._update_health()
        for server in self.models.values():
            if not self.static:  # a loader's model is known by its own name once loaded
                await server.set_health()
        host = self.settings.host
        if self.settings.metrics_port >= 0:
            try:
                self.metrics_port = self.telemetry.serve(host, self.settings.metrics_port)
            except OSError as error:  # a worker's port is --metrics-port + its index
                index = self.worker_index
                first = self.settings.metrics_port - index if self.settings.metrics_port > 0 else 0
                raise metrics_port_error(host, first, index, error) from None
            logger.info("metrics on http://%s:%d/metrics", host, self.metrics_port)
        address = f"{host}:{self.settings.port}"
        # grpc reports a port it could not bind only as a RuntimeError without the reason, which
        # grpc core writes to stderr as a native line: caught here (a DEBUG record), and the
        # reason told in ListenError's one line.
        with native_stderr_logged(logger, logging.DEBUG) as native:
            try:
                if self.security.credentials is None:
                    self.port = self.server.add_insecure_port(address)
                else:
                    self.port = self.server.add_secure_port(address, self.security.credentials)
            except RuntimeError:
                self.port = 0
        if not self.port:
            raise grpc_bind_error("--port", host, self.settings.port, native)
        await self.server.start()
        if self.http is not None:
            try:
                self.http_port = await self.http.start(host, self.settings.http_port, self.reuse_port)
            except OSError as error:
                raise listen_error("--http-port", host, self.settings.http_port, error) from None
            scheme = "https" if self.http.ssl is not None else "http"
            logger.info("HTTP/JSON (Open Inference Protocol REST) on %s://%s:%d/v2", scheme, host,
                        self.http_port)
        served = ", ".join(sorted(self.models)) if self.static or self.config.models is not None \
            else f"every model in {self.settings.model_repo}"
        logger.info("listening on %s:%d (model %s; %s)", self.settings.host, self.port, served,
                    self.security.description)
        return self.port

    async def load(self) -> Model:
        """Serves every model (each its newest version that passes the checks), then starts the
        watches; returns the default model's version (or the first model's). RepositoryError
        when a model has no servable version."""
        await self._discover()
        if not self.models:
            error = repository_error(self.settings.model_repo)
            raise error if error is not None else ModelNotFoundError("no model to serve")
        for name in sorted(self.models):
            await self.models[name].load()
        self._loading = True  # models found from now on start loading at once
        self._start_watch()
        await self._update_health()
        served = self.models.get(self.default_model) or self.models[min(self.models)]
        assert served.model is not None
        return served.model

    def _start_model(self, server: ModelServer) -> None:
        task = asyncio.get_running_loop().create_task(
            server.load_or_wait(self.settings.exit_if_no_model), name=f"load {server.name}")
        self._model_tasks.add(task)

        def done(task: asyncio.Task[Model]) -> None:
            self._model_tasks.discard(task)
            if task.cancelled():
                return
            error = task.exception()
            if error is None:
                return
            server.failed = error
            if self._fatal is not None and not self._fatal.done():
                self._fatal.set_exception(error)
            else:
                logger.error("cannot serve model %s: %s", server.name, error)
        task.add_done_callback(done)

    async def load_or_wait(self) -> None:
        """Starts every model (each serves its first version or waits for one), then returns
        once health "" is SERVING. A model whose first load fails (a hung read; with
        --exit-if-no-model, no servable version) fails it."""
        self._fatal = asyncio.get_running_loop().create_future()
        try:
            await self._discover()  # what it finds is started below, once
        except RepositoryTimeoutError:
            raise
        except RepositoryError as error:
            logger.warning("cannot list the models of %s yet: %s", self.settings.model_repo, error)
        if not self.models:
            root = self.settings.model_repo
            why = await self.reads.run("list", f"listing {root}", partial(repository_error, root))
            unpublished = (f"{self.unpublished} model directories, none with a version yet"
                           if self.unpublished else "no model directory yet")
            logger.warning(
                "waiting for a model in %s (health NOT_SERVING; looking every %gs and at SIGHUP; "
                "--exit-if-no-model exits instead): %s", root,
                self.settings.reload_interval or WAIT_INTERVAL, why or unpublished)
        for server in list(self.models.values()):
            self._start_model(server)
        self._loading = True  # models found from now on start loading at once
        self._start_watch()
        serving = asyncio.ensure_future(self._serving.wait())
        waiters: set[asyncio.Future[Any]] = {serving, self._fatal}
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            serving.cancel()
        fatal, self._fatal = self._fatal, None
        if fatal.done():
            fatal.result()  # raises the first load's error
        else:
            fatal.cancel()

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING at once, refuse new calls, let in-flight ones finish within the grace."""
        grace = self.settings.grace_period if grace is None else grace
        self.draining = True
        if self._watch_task is not None:
            self._watch_task.cancel()
        for task in list(self._model_tasks):
            task.cancel()
        await self.health.enter_graceful_shutdown()
        started = time.perf_counter()
        stop_grpc = self.drain.run(partial(self.server.stop, grace), gather=grace > 0)
        if self.http is not None:
            await asyncio.gather(stop_grpc, self.http.drain(grace))
        else:
            await stop_grpc
        for server in list(self.models.values()):
            await server.close()
        self.pictures.close()
        await self.telemetry.close()
        access_log.flush()
        if self.port:  # not after a start that failed before it listened
            logger.info("stopped after draining for %.2fs", time.perf_counter() - started)


# A second SIGTERM/SIGINT during the drain stops at once: the calls still in flight are cut.
EXIT_STOPPED_AT_ONCE = 1
# What the flags name is not there: a port taken, a repository without the model (one line).
EXIT_USAGE = 2
WORKERS_SERVICE = "digitserve.v1.Workers"  # --workers N: SERVING while all N workers serve


async def serve(settings: Settings, *, reuse_port: bool = False, worker: WorkerSlot | None = None) -> int:
    """Runs until SIGTERM or SIGINT (a drain; a second one stops at once); SIGHUP looks for a new
    model version now. Returns the process exit code. ``worker``: this process is one of
    ``--workers N`` (digitserve.server.workers), whose state it shares."""
    if worker is not None:  # from the start: the arbiter kills a worker whose loop stops
        worker.start_heartbeat()
    try:
        app = App(settings, reuse_port=reuse_port, freeze_gc=True,
                  worker_index=0 if worker is None else worker.index)
    except SecurityConfigError as error:
        logger.error("cannot start: %s", error)
        return 1
    except ModelConfigError as error:  # the model config file cannot be read or used
        logger.error("cannot start: %s", error)
        return EXIT_USAGE
    # Before listening: the repository holds something to serve (one line saying what is missing
    # and what is there instead, exit 2), read in a thread with the repository timeout.
    try:
        await app.check_repository()
    except RepositoryTimeoutError as error:  # a hung volume: logged where it timed out
        logger.error("cannot load model %s: %s", ", ".join(app.models) or "(any)", error)
        await app.stop(0)
        return 1
    except NothingPublishedError as error:  # a repository to publish into: wait, unless told not to
        if settings.exit_if_no_model:
            logger.error("cannot start: %s", error)
            await app.stop(0)
            return EXIT_USAGE
    except RepositoryError as error:  # ModelNotFoundError, an invalid model name
        logger.error("cannot start: %s", error)
        await app.stop(0)
        return EXIT_USAGE
    try:
        await app.start()
    except ListenError as error:  # a port taken: one line naming its flag
        logger.error("cannot start: %s", error)
        await app.stop(0)
        return EXIT_USAGE
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    def on_stop(signum: int) -> None:
        name = signal.Signals(signum).name
        if not stop.is_set():
            logger.info("signal received: draining for up to %.1fs (%s)", settings.grace_period, name)
            stop.set()
            return
        logger.warning("%s received again during the drain: stopping at once (exit %d), cutting "
                       "the calls still in flight", name, EXIT_STOPPED_AT_ONCE)
        access_log.flush()
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(EXIT_STOPPED_AT_ONCE)

    def on_hup() -> None:
        task = loop.create_task(_reload_now(app))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop, sig)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    load = asyncio.ensure_future(app.load_or_wait())
    waiter = asyncio.ensure_future(stop.wait())
    await asyncio.wait({load, waiter}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if load.done() and load.exception() is not None:
        exc = load.exception()
        failed = next((m.name for m in app.models.values() if m.failed is exc), ", ".join(app.models))
        logger.error("cannot load model %s: %s", failed, exc)
        code = 1
    else:
        if worker is not None and load.done():
            worker.set_serving(True)
            watch = loop.create_task(_watch_workers(app, worker, stop))
            tasks.add(watch)
        await waiter
    if worker is not None:
        worker.set_serving(False)
    load.cancel()
    waiter.cancel()
    for task in tasks:
        task.cancel()
    await app.stop()
    # The drain is over: a late signal must not turn exit 0 into -15 while the loop closes.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)
    return code


async def _reload_now(app: App) -> None:
    """SIGHUP: one look at the model config, the repository's models and each model's versions
    at once (the watches look again at their interval)."""
    if not app.ready and not app.models:
        logger.info("SIGHUP received: looking for a first model now")
    else:
        logger.info("SIGHUP received: looking for a new model version now")
    try:
        changed = await app.reload_once()
    except Exception:
        logger.exception("SIGHUP reload of %s failed; still serving what was served",
                         app.settings.model_repo)
        return
    if not changed:
        served = ", ".join(f"{m.name} version {m.model.spec.version}" if len(app.models) > 1
                           else f"version {m.model.spec.version}"
                           for m in app.models.values() if m.model is not None)
        logger.info("SIGHUP reload: still serving %s", served or "nothing")


async def _watch_workers(app: App, worker: WorkerSlot, stop: asyncio.Event) -> None:
    """--workers N: health ``digitserve.v1.Workers`` SERVING while all N workers serve,
    NOT_SERVING while one is down or restarting ("" stays SERVING: this worker serves); the
    ``digitserve_workers_serving`` gauge; and a drain if the parent is gone (a backstop to
    PR_SET_PDEATHSIG)."""
    watch_workers(app.telemetry, worker.serving, worker.total)
    last = None
    while not stop.is_set():
        status = (health_pb2.HealthCheckResponse.SERVING if worker.serving() == worker.total
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        if status != last:
            await app.health.set(WORKERS_SERVICE, status)
            last = status
        if worker.orphaned():
            logger.error("worker %d: parent %d is gone; draining", worker.index, worker.parent_pid)
            stop.set()
            return
        await asyncio.sleep(0.1)
