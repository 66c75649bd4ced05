"""Server lifecycle: build the grpc.aio server, load the model, report health, drain on signals."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import time
from collections.abc import Callable
from functools import partial

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from digitserve.inference import Model
from digitserve.nativelog import native_stderr_logged
from digitserve.repository import ModelNotFoundError, RepositoryError
from digitserve.server.calls import CallWrapper, Services
from digitserve.server.dataplane import DataPlane
from digitserve.server.health import HealthServicer
from digitserve.server.logs import access_log
from digitserve.server.oip import SERVICE as OIP_SERVICE
from digitserve.server.oip import InferenceServicer
from digitserve.server.ports import ListenError, grpc_bind_error, metrics_port_error
from digitserve.server.reflection import add_reflection
from digitserve.server.security import SecurityConfigError, ServerSecurity
from digitserve.server.servicer import DigitServicer, add_to_server
from digitserve.server.settings import Settings
from digitserve.server.slot import WorkerSlot
from digitserve.server.telemetry import RepositoryMetrics, Telemetry, export_certificate_expiry, watch_workers
from digitserve.server.versions import (
    Fingerprint,
    GateRules,
    ModelSource,
    NothingPublishedError,
    RepositoryReads,
    RepositorySource,
    RepositoryTimeoutError,
    StaticSource,
)
from digitserve.v1 import digit_service_pb2 as pb

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
        # (tests/server/test_resilience.py). Without it the limit holds against the flood all the same
        # (tests/server/test_flood.py, with the flood's SETTINGS acknowledged or not).
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


# Seconds between looks for a first version while waiting with --reload-interval 0.
WAIT_INTERVAL = 5.0
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
        worker_index: int = 0,
    ) -> None:
        self.settings = settings
        self.worker_index = worker_index  # --workers N: this process's index (its ports' lines say it)
        self.freeze_gc = freeze_gc  # settle_memory() after each (re)load: the mnist-serve process
        self.security = ServerSecurity.from_settings(settings)  # reads TLS and token files: fails first
        if source is None:
            source = (
                StaticSource(loader)
                if loader is not None
                else RepositorySource(
                    settings.model_repo, settings.model_name,
                    GateRules(settings.min_check_accuracy, settings.max_regression),
                    settings.inference, allow_missing_check_set=settings.allow_missing_check_set,
                )
            )
        self.source = source
        self.model_events: list[ModelEvent] = []
        self.telemetry = Telemetry(low_confidence=settings.low_confidence)
        self.model_events.append(self.telemetry.on_model_event)
        certificate = self.security.certificate  # TLS: its expiry as a metric
        export_certificate_expiry(self.telemetry, None if certificate is None else certificate.expires)
        self._watch_task: asyncio.Task[None] | None = None
        # Every repository read in a daemon thread with a timeout (digitserve.server.versions).
        self.repository_metrics = RepositoryMetrics(
            self.telemetry.registry,
            hung_reads=lambda: self.reads.hung,
            served_missing=lambda: self.plane.model is not None
            and self.plane.model.spec.version in self._gone,
        )
        self.reads = RepositoryReads(settings.repository_timeout, self.repository_metrics.on_timeout)
        # The fingerprint of each refused version's directory when it was refused: it is tried
        # again when that changes (a version refused while incomplete, then completed). A version
        # refused by a timeout has none: it is tried again once its hung read has returned.
        self._refused_at: dict[int, Fingerprint | None] = {}
        self._gone: dict[int, float] = {}  # loaded versions missing from disk: since when
        self._orphaned = False  # the served version is gone past the grace and nothing replaced it
        self.waiting = False  # no version was servable at start: the watch serves the first one
        self._first_served = asyncio.Event()
        self.plane = DataPlane(
            settings.max_images_per_request,
            max_batch_size=settings.max_batch_size,
            max_queue_delay=settings.max_queue_delay_ms / 1000,
            max_queued_images=settings.max_queued_images,
            inline_max_images=settings.inline_max_images,
            keep_versions=settings.keep_versions,
            observer=self.telemetry,
        )
        self.telemetry.watch_queue(lambda: self.plane.batcher.queued_images)
        self.health = HealthServicer()  # NOT_FOUND names the services it knows
        self.server = grpc.aio.server(options=server_options(settings, reuse_port))
        # Every method of every service wrapped once: request id, token check, metrics, access line.
        services = Services(self.server, CallWrapper(self.telemetry, self.security.auth))
        add_to_server(DigitServicer(self.plane), services)  # bytes that do not parse: INVALID_ARGUMENT
        add_to_server(InferenceServicer(self.plane, settings.model_name), services, OIP_SERVICE)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, services)
        add_reflection(services, (  # v1 and v1alpha
            SERVICE_NAME,
            OIP_SERVICE.full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        ))
        services.close()
        self.port = 0
        self.metrics_port: int | None = None

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def start(self) -> int:
        """Binds and starts serving; returns the bound port."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
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

    async def _list(self) -> list[int]:
        """The published versions, listed in a thread with the repository timeout."""
        return await self.reads.run("list", f"listing {self.source}", self.source.versions)

    async def _try_load(self, kind: str, version: int) -> Model | None:
        """Loads, checks and warms a version in a thread of its own, with the repository timeout
        (not on the model thread, so serving goes on meanwhile); None, logged and remembered, if
        it is refused or its reads time out."""
        fingerprint: Fingerprint | None = None
        serving = None if self.plane.model is None else self.plane.model.spec.version
        logger.info("trying model %s version %d (%s)", self.settings.model_name, version, kind)
        try:
            fingerprint = await self.reads.run(
                f"fingerprint {version}", f"listing the files of {self.source} version {version}",
                partial(self.source.fingerprint, version),
            )
            model = await self.reads.run(
                f"load {version}", f"loading {self.source} version {version}",
                partial(self.source.load, version, serving), tag=(fingerprint, serving),
            )
        except Exception as exc:  # any failure to load or check refuses the version
            self.plane.refuse(version, str(exc))
            if isinstance(exc, RepositoryTimeoutError):
                self._refused_at.pop(version, None)  # tried again once the read returns
            else:
                self._refused_at[version] = fingerprint  # tried again when its files change
            logger.error("refused model %s version %d: %s", self.settings.model_name, version, exc)
            self._event(kind, version, "refused")
            return None
        self.plane.forgive(version)
        self._refused_at.pop(version, None)
        self._event(kind, version, "served")
        return model

    async def _worth_trying(self, version: int) -> bool:
        """False for a version refused before whose files have not changed since, and for one
        whose earlier read is still hung."""
        if self.reads.busy(f"load {version}") or self.reads.busy(f"fingerprint {version}"):
            return False  # no second thread on a hung read
        if version not in self.plane.refused:
            return True
        if version not in self._refused_at:
            return True  # refused by a timeout whose read has returned since
        try:
            now = await self.reads.run(
                f"fingerprint {version}", f"listing the files of {self.source} version {version}",
                partial(self.source.fingerprint, version),
            )
        except RepositoryTimeoutError:
            self._refused_at.pop(version, None)
            return False
        if now is None or now == self._refused_at[version]:
            return False
        logger.info("version %d of model %s was refused but its files changed: trying it again",
                    version, self.settings.model_name)
        return True

    async def load(self) -> Model:
        """Serves the newest version that passes the checks (an older one when newer ones fail or
        their reads hang), then reports SERVING and starts watching for new versions.
        RepositoryError (ModelNotFoundError when none is published) when none is servable."""
        pinned = self.settings.model_version
        versions = [pinned] if pinned else await self._list()
        for version in sorted(versions, reverse=True):
            model = await self._try_load("load", version)
            if model is not None:
                break
        else:
            reasons = "; ".join(f"version {v}: {r}" for v, r in sorted(self.plane.refused.items()))
            raise RepositoryError(f"no servable version of model {self.settings.model_name!r} ({reasons})")
        await self._start_serving(model)
        self._start_watch()
        return model

    async def load_or_wait(self) -> Model:
        """load(); when no version is servable yet (none is published, or every one is refused)
        and --exit-if-no-model is off, logs once what it waits for and returns the first version
        the watch serves (health NOT_SERVING meanwhile). A hung read still fails it."""
        try:
            return await self.load()
        except RepositoryTimeoutError:
            raise
        except RepositoryError as error:  # ModelNotFoundError (none published) or all refused
            if self.settings.exit_if_no_model or not self.source.watchable:
                raise
            reason = error
        self.waiting = True
        interval = self._watch_interval()
        logger.warning(
            "waiting for a servable version of model %s (health NOT_SERVING; looking every %gs "
            "and at SIGHUP; --exit-if-no-model exits instead): %s",
            self.settings.model_name, interval, reason,
        )
        self._start_watch()
        await self._first_served.wait()
        assert self.plane.model is not None
        return self.plane.model

    def _watch_interval(self) -> float:
        """--reload-interval; while waiting for a first version with hot reload off, the default
        (that first look is not a reload)."""
        return self.settings.reload_interval or WAIT_INTERVAL

    def _reloads(self) -> bool:
        """Whether a served version may be replaced by a newer one (hot reload)."""
        return (not self.settings.model_version and self.settings.reload_interval > 0
                and self.source.watchable)

    def _start_watch(self) -> None:
        if self._watch_task is None and (self.plane.model is None or self._reloads()):
            self._watch_task = asyncio.get_running_loop().create_task(self._watch(), name="watch")

    async def _start_serving(self, model: Model) -> None:
        """Serves the first version: health SERVING, the line that says so."""
        self._serve(model)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        await self._set_updates_health()
        self._first_served.set()
        logger.info("serving model %s version %d from %s", model.spec.name, model.spec.version, self.source)
        newer = sorted(v for v in self.plane.refused if v > model.spec.version)
        if newer:
            logger.warning(
                "model %s version %d is served although newer version(s) %s exist: they were "
                "refused (GetModelInfo's refused_versions says why); the watch tries them again "
                "when their files change or their hung reads return",
                model.spec.name, model.spec.version, ", ".join(map(str, newer)),
            )

    async def _serve_first(self) -> bool:
        """While waiting: serves the newest published version that passes the checks (the pinned
        one, if pinned), skipping those refused before whose files did not change."""
        if self.reads.busy("list"):
            return False
        try:
            versions = await self._list()
        except ModelNotFoundError:
            return False  # still nothing published
        pinned = self.settings.model_version
        on_disk = set(versions)
        for version in [v for v in self.plane.refused if v not in on_disk]:
            self.plane.forgive(version)
            self._refused_at.pop(version, None)
        for version in sorted(versions, reverse=True):
            if pinned and version != pinned:
                continue
            if await self._worth_trying(version):
                model = await self._try_load("load", version)
                if model is not None:
                    await self._start_serving(model)
                    return True
        return False

    async def _set_updates_health(self) -> None:
        """ModelUpdates: NOT_SERVING while a newer version is refused or the served version's
        files are gone from the repository."""
        model = self.plane.model
        stale = model is not None and (
            any(v > model.spec.version for v in self.plane.refused) or model.spec.version in self._gone
        )
        await self.health.set(
            MODEL_UPDATES_SERVICE,
            health_pb2.HealthCheckResponse.NOT_SERVING
            if stale
            else health_pb2.HealthCheckResponse.SERVING,
        )

    def _note_gone(self, on_disk: set[int]) -> set[int]:
        """Tracks loaded versions missing from disk; returns those gone for the grace period or
        longer."""
        now = time.monotonic()
        grace = self.settings.removed_version_grace
        for version in self.plane.loaded_versions:
            if version in on_disk:
                if self._gone.pop(version, None) is not None:
                    logger.info("version %d of model %s is back in %s", version,
                                self.settings.model_name, self.source)
                    self._orphaned = False
            elif version not in self._gone:
                self._gone[version] = now
                logger.warning(
                    "version %d of model %s is gone from %s; it keeps answering from memory for "
                    "up to %gs, then %s", version, self.settings.model_name, self.source, grace,
                    "the newest remaining version that passes the checks replaces it"
                    if self.plane.model is not None and self.plane.model.spec.version == version
                    else "it is unloaded",
                )
        return {v for v, since in self._gone.items() if now - since >= grace}

    async def reload_once(self) -> bool:
        """Serves the newest published version that passes the checks when it is newer than the
        served one (the first one, while waiting: _serve_first); skips versions refused before
        whose files did not change, and those whose reads hang. When the served version's
        directory has been gone for --removed-version-grace, serves the newest remaining version
        that passes, as a fresh start would. True if the served model changed."""
        current = self.plane.model
        if current is None:
            return await self._serve_first()
        if self.reads.busy("list"):
            return False  # the last listing is still hung (logged and counted when it timed out)
        try:
            versions = await self._list()
        except ModelNotFoundError:
            versions = []
        on_disk = set(versions)
        for version in [v for v in self.plane.refused if v not in on_disk]:
            self.plane.forgive(version)  # refused_versions lists what is there
            self._refused_at.pop(version, None)
        served = current.spec.version
        expired = self._note_gone(on_disk)
        for version in sorted(expired - {served}):
            self.plane.unload(version)
            del self._gone[version]
            self.repository_metrics.on_unload()
            logger.warning("unloaded model %s version %d: its directory has been gone for %gs or more",
                           self.settings.model_name, version, self.settings.removed_version_grace)
        replacing = served in expired
        model: Model | None = None
        for version in sorted((v for v in versions if replacing or v > served), reverse=True):
            if version in self.plane.loaded_versions:  # passed the checks when it was loaded
                model = self.plane.resolve(version)
                break
            if await self._worth_trying(version):
                model = await self._try_load("reload", version)
                if model is not None:
                    break
        if model is not None:
            self._serve(model)
            if replacing:
                self.plane.unload(served)
                del self._gone[served]
                self.repository_metrics.on_unload()
                self._orphaned = False
                logger.warning(
                    "model %s version %d has been gone from %s for %gs or more: unloaded it and "
                    "serving version %d, the newest remaining version that passes the checks",
                    model.spec.name, served, self.source, self.settings.removed_version_grace,
                    model.spec.version,
                )
            else:
                logger.info(
                    "hot reload: serving model %s version %d (was version %d)",
                    model.spec.name, model.spec.version, served,
                )
        elif replacing and not self._orphaned:
            self._orphaned = True
            logger.error(
                "model %s version %d has been gone from %s for %gs or more and no remaining "
                "version passes the checks: still serving it from memory (ModelUpdates health "
                "NOT_SERVING); a fresh start would not serve at all. Publish a version or restore "
                "the directory", current.spec.name, served, self.source,
                self.settings.removed_version_grace,
            )
        await self._set_updates_health()
        return model is not None

    async def _watch(self) -> None:
        while self.plane.model is None or self._reloads():
            await asyncio.sleep(self._watch_interval())
            try:
                await self.reload_once()
            except RepositoryTimeoutError:
                pass  # logged and counted where it timed out; the next look tries again
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
    try:
        app = App(settings, reuse_port=reuse_port, freeze_gc=True,
                  worker_index=0 if worker is None else worker.index)
    except SecurityConfigError as error:
        logger.error("cannot start: %s", error)
        return 1
    # Before listening: the repository holds something to serve (one line saying what is missing
    # and what is there instead, exit 2), read in a thread with the repository timeout.
    try:
        await app.reads.run("list", f"listing {app.source}",
                            partial(app.source.servable, settings.model_version))
    except RepositoryTimeoutError as error:  # a hung volume: logged where it timed out
        logger.error("cannot load model %s: %s", settings.model_name, error)
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
        logger.error("cannot load model %s: %s", settings.model_name, exc)
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
    """SIGHUP: one look for a newer version at once (the watch looks again at its interval)."""
    if app.plane.model is None:
        if not app.waiting:
            logger.info("SIGHUP received: still loading the first version; nothing to reload")
            return
        logger.info("SIGHUP received: looking for a first model version now")
        try:
            await app.reload_once()
        except Exception:
            logger.exception("SIGHUP look for a first version of %s failed; still waiting", app.source)
        return
    logger.info("SIGHUP received: looking for a new model version now")
    try:
        changed = await app.reload_once()
    except Exception:
        logger.exception("SIGHUP reload of %s failed; still serving version %d",
                         app.source, app.plane.model.spec.version)
        return
    if not changed:
        logger.info("SIGHUP reload: still serving version %d", app.plane.model.spec.version)


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
