"""The server's composition root and lifecycle: build the parts, bind, load or wait for the models,
drain on SIGTERM, reload on SIGHUP."""

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

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc

from digitserve.inference import Model
from digitserve.nativelog import native_stderr_logged
from digitserve.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from digitserve.repository import ModelNotFoundError, RepositoryError
from digitserve.server import scheduling
from digitserve.server.calls import CallInterceptor, GenericOnly
from digitserve.server.configwatch import ConfigWatcher
from digitserve.server.decoding import PictureDecoder, PictureLimits
from digitserve.server.discovery import Discovery, check_repository, configured
from digitserve.server.drain import Drain
from digitserve.server.eventloop import describe, run
from digitserve.server.health import SERVICE_NAME, HealthServicer
from digitserve.server.httpserver import HttpEdge
from digitserve.server.logs import access_log
from digitserve.server.modelconfig import ModelConfigError, ServingConfig, from_settings
from digitserve.server.modelcontrol import ModelControl
from digitserve.server.oip import SERVICE as OIP_SERVICE
from digitserve.server.oip import InferenceServicer
from digitserve.server.ports import ListenError, grpc_bind_error, listen_error, metrics_port_error
from digitserve.server.reflection import SERVICES as REFLECTION_SERVICES
from digitserve.server.reflection import add_reflection
from digitserve.server.registry import WAIT_INTERVAL, ModelVersions, Registry, watch
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
    ModelSource,
    NothingPublishedError,
    RepositoryReads,
    RepositoryTimeoutError,
    StaticSource,
    repository_error,
)
from digitserve.v1 import digit_service_pb2 as pb
from digitserve.v1 import digit_service_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

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


class App:
    """The composition root of one server: __init__ builds the parts (security, telemetry, the
    registry, discovery, the config watcher, the gRPC server and the HTTP edge), start() binds
    and serves (health NOT_SERVING), load() or load_or_wait() makes it SERVING, stop() drains."""

    def __init__(
        self,
        settings: Settings,
        loader: ModelLoader | None = None,
        *,
        source: ModelSource | None = None,
        reuse_port: bool = False,
        freeze_gc: bool = False,
        worker_index: int = 0,
        workers: int = 1,
    ) -> None:
        self.settings = settings
        self.worker_index = worker_index  # --workers N: this process's index (its ports' lines say it)
        self.security = ServerSecurity.from_settings(settings)  # reads TLS and token files: fails first
        self.telemetry = Telemetry(low_confidence=settings.low_confidence)
        certificate = self.security.certificate  # TLS: its expiry as a metric
        export_certificate_expiry(self.telemetry, None if certificate is None else certificate.expires)
        # Every repository read in a daemon thread with a timeout (digitserve.server.versions).
        repository_metrics = RepositoryMetrics(self.telemetry.registry, hung_reads=lambda: self.reads.hung,
                                               served_missing=lambda: self.registry.served_missing())
        self.reads = RepositoryReads(settings.repository_timeout, repository_metrics.on_timeout)
        self.health = HealthServicer()  # NOT_FOUND names the services it knows
        static = source is not None or loader is not None  # one model, no repository
        # from_settings: ModelConfigError when the file cannot be used
        config = ServingConfig(None) if static else from_settings(settings)
        self.registry = Registry(settings, config, reads=self.reads, telemetry=self.telemetry,
                                 health=self.health, static=static, on_unload=repository_metrics.on_unload,
                                 settle=settle_memory if freeze_gc else lambda: None)
        self.discovery = Discovery(settings, self.registry, self.reads)
        self.config_watcher: ConfigWatcher | None = None
        if static:
            name = settings.model_name[0] if settings.model_name else "mnist"
            self.registry.add(name, source if source is not None else StaticSource(loader))  # type: ignore[arg-type]
        else:
            if settings.model_config is not None:
                self.config_watcher = ConfigWatcher(settings.model_config, self.registry, self.reads,
                                                    ConfigMetrics(self.telemetry.registry))
            for name in configured(config):
                self.registry.add(name)
        self._watch_task: asyncio.Task[None] | None = None
        self.telemetry.watch_queue(self.registry.queued_images)
        self.draining = False  # stop() began: readiness is false over every protocol from now on
        self.reuse_port = reuse_port
        # Pictures (Image.encoded, V2 BYTES) are decoded on threads of their own, never the loop.
        self.pictures = PictureDecoder(settings.picture_threads, PictureLimits(
            settings.max_picture_bytes, settings.max_picture_request_bytes,
            settings.max_picture_pixels, settings.max_queued_pictures,
            settings.max_picture_decoded_bytes))
        # --model-control explicit: RepositoryModelLoad/Unload and their HTTP routes.
        self.control = ModelControl(settings.model_control, self.registry, None if static else self.discovery)
        # The V2 protocol, over gRPC and HTTP; ``workers``: the model's copies at this address.
        self.oip = InferenceServicer(self.registry, self.pictures, workers, self.control,
                                     lambda: self.draining)
        self.drain = Drain()  # SIGTERM: calls that arrive are held, then refused UNAVAILABLE
        # Every call: request id, token check, metrics, access line; bytes that do not parse of
        # DigitService and the V2 protocol: INVALID_ARGUMENT.
        interceptor = CallInterceptor(self.telemetry, self.security.auth, self.drain,
                                      tolerant=(pb.DESCRIPTOR.services_by_name["DigitService"], OIP_SERVICE))
        self.server = grpc_server(server_options(settings, reuse_port), interceptor,
                                  DigitServicer(self.registry, self.pictures), self.oip, self.health)
        self.port = 0
        self.metrics_port: int | None = None
        # --http-port: the V2 protocol's REST binding, on this loop, through the same data planes.
        self.http: HttpEdge | None = None
        self.http_port: int | None = None
        if settings.http_port >= 0:
            api = RestApi(self.registry, self.pictures, lambda: self.draining, self.telemetry.exposition,
                          workers, self.control)
            self.http = HttpEdge(settings, api, self.telemetry, self.security.auth)

    @property
    def models(self) -> dict[str, ModelVersions]:
        return self.registry.models

    async def refresh(self) -> None:
        """One look at the config file and the repository's models (the watch, SIGHUP)."""
        if self.config_watcher is not None:
            await self.config_watcher.look()
        await self.discovery.look()

    def _start_watch(self) -> None:
        """Models found from now on start loading at once; the watch of the config file and the
        repository's models starts."""
        self.registry.starting = True
        config = self.registry.config
        if self._watch_task is None and (self.config_watcher is not None or (
                config.models is None and not self.registry.static)):
            self._watch_task = asyncio.get_running_loop().create_task(watch(
                lambda: self.settings.reload_interval or WAIT_INTERVAL, self.refresh,
                self.settings.model_repo), name="watch")

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> int:
        """Binds and starts serving; returns the bound port."""
        if not self.registry.static:  # a loader's model is known by its own name once loaded
            for model in list(self.registry.models.values()):
                await self.registry.changed(model)
        await self.registry.changed()
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
        served = ", ".join(sorted(self.models)) \
            if self.registry.static or self.registry.config.models is not None \
            else f"every model in {self.settings.model_repo}"
        logger.info("listening on %s:%d (model %s; %s; event loop %s, %s)", self.settings.host,
                    self.port, served, self.security.description, describe(asyncio.get_running_loop()),
                    scheduling.describe())
        return self.port

    async def load(self) -> Model:
        """Serves every model (each its newest version that passes the checks), then starts the
        watches; returns the default model's version (or the first model's). RepositoryError
        when a model has no servable version."""
        await self.discovery.look()
        if not self.models:
            error = repository_error(self.settings.model_repo)
            raise error if error is not None else ModelNotFoundError("no model to serve")
        for name in sorted(self.models):
            await self.models[name].load()
        self._start_watch()
        await self.registry.changed()
        served = self.models.get(self.registry.default_model) or self.models[min(self.models)]
        assert served.served is not None
        return served.served

    async def load_or_wait(self) -> None:
        """Starts every model (each serves its first version or waits for one), then returns
        once health "" is SERVING. A model whose first load fails (a hung read; with
        --exit-if-no-model, no servable version) fails it."""
        registry = self.registry
        fatal = registry.fatal = asyncio.get_running_loop().create_future()
        try:
            await self.discovery.look()  # what it finds is started below, once
        except RepositoryError as error:
            if isinstance(error, RepositoryTimeoutError):
                raise
            logger.warning("cannot list the models of %s yet: %s", self.settings.model_repo, error)
        if not self.models:
            root = self.settings.model_repo
            why = await self.reads.run("list", f"listing {root}", partial(repository_error, root))
            unpublished = self.discovery.unpublished
            logger.warning(
                "waiting for a model in %s (health NOT_SERVING; looking every %gs and at SIGHUP; "
                "--exit-if-no-model exits instead): %s", root,
                self.settings.reload_interval or WAIT_INTERVAL, why or (
                    f"{unpublished} model directories, none with a version yet" if unpublished
                    else "no model directory yet"))
        for model in list(self.models.values()):
            registry.start(model)
        self._start_watch()
        serving = asyncio.ensure_future(registry.became_ready.wait())
        try:
            await asyncio.wait({serving, fatal}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            serving.cancel()
        registry.fatal = None
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
        await self.health.enter_graceful_shutdown()
        started = time.perf_counter()
        stop_grpc = self.drain.run(partial(self.server.stop, grace), gather=grace > 0)
        if self.http is not None:
            await asyncio.gather(stop_grpc, self.http.drain(grace))
        else:
            await stop_grpc
        await self.registry.close()
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


def run_process(settings: Settings, *, reuse_port: bool = False, worker: WorkerSlot | None = None) -> int:
    """A server process's main (mnist-serve's, or a worker's of ``--workers N``): its threads'
    scheduling policy, set before grpc starts its threads (they inherit it; the threads already
    running are set too), then ``serve`` on the event loop ``--event-loop`` names."""
    scheduling.apply(settings.scheduler_policy)
    return run(serve(settings, reuse_port=reuse_port, worker=worker), settings.event_loop)


async def serve(settings: Settings, *, reuse_port: bool = False, worker: WorkerSlot | None = None) -> int:
    """Runs until SIGTERM or SIGINT (a drain; a second one stops at once); SIGHUP looks for a new
    model version now. Returns the process exit code. ``worker``: this process is one of
    ``--workers N`` (digitserve.server.workers), whose state it shares."""
    if worker is not None:  # from the start: the arbiter kills a worker whose loop stops
        worker.start_heartbeat()
    try:
        app = App(settings, reuse_port=reuse_port, freeze_gc=True,
                  worker_index=0 if worker is None else worker.index,
                  workers=1 if worker is None else worker.total)
    except (SecurityConfigError, ModelConfigError) as error:  # TLS or token files; the model config
        logger.error("cannot start: %s", error)
        return 1 if isinstance(error, SecurityConfigError) else EXIT_USAGE
    # Before listening: the repository holds something to serve (one line saying what is missing
    # and what is there instead, exit 2), read in a thread with the repository timeout.
    code: int | None = None
    try:
        if not app.registry.static:
            await check_repository(settings, app.reads, app.registry.config)
    except RepositoryTimeoutError as error:  # a hung volume: logged where it timed out
        logger.error("cannot load model %s: %s", ", ".join(app.models) or "(any)", error)
        code = 1
    except RepositoryError as error:  # ModelNotFoundError, an invalid model name
        # NothingPublishedError: a repository to publish into; the server waits, unless told not to
        if settings.exit_if_no_model or not isinstance(error, NothingPublishedError):
            logger.error("cannot start: %s", error)
            code = EXIT_USAGE
    if code is None:
        try:
            await app.start()
        except ListenError as error:  # a port taken: one line naming its flag
            logger.error("cannot start: %s", error)
            code = EXIT_USAGE
    if code is not None:
        await app.stop(0)
        return code
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
    logger.info("SIGHUP received: looking for %s now",
                "a first model" if not app.registry.ready and not app.models else "a new model version")
    try:
        await app.refresh()
        changed = await app.registry.reload_once()
    except Exception:
        logger.exception("SIGHUP reload of %s failed; still serving what was served",
                         app.settings.model_repo)
        return
    if not changed:
        served = ", ".join(f"{m.name} version {m.served.spec.version}" if len(app.models) > 1
                           else f"version {m.served.spec.version}"
                           for m in app.models.values() if m.served is not None)
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
