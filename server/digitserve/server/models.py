"""One served model of the repository (``ModelServer``): its versions behind the gate, its data
plane (batcher queue, model thread, metrics labels), its version labels and canary split, its
health, and the watch that serves new versions, follows labels and notices versions that are
gone. The App holds one per model and routes each request by its ``model_name``."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

from grpc_health.v1 import health_pb2

from digitserve.inference import Model
from digitserve.repository import ModelNotFoundError, ModelRepository, RepositoryError
from digitserve.server.dataplane import CANARY, DataPlane
from digitserve.server.decoding import PictureDecoder
from digitserve.server.health import HealthServicer
from digitserve.server.modelconfig import ModelPolicy, ServingConfig
from digitserve.server.settings import Settings
from digitserve.server.telemetry import Telemetry
from digitserve.server.versions import (
    Fingerprint,
    ModelSource,
    NothingPublishedError,
    RepositoryReads,
    RepositorySource,
    RepositoryTimeoutError,
    missing_error,
    repository_error,
)

logger = logging.getLogger(__name__)

# Seconds between looks for a first version while waiting with --reload-interval 0.
WAIT_INTERVAL = 5.0
# Per model: SERVING while a version of it answers unpinned requests.
MODEL_SERVICE = "digitserve.v1.Model/{}"
# Per model: NOT_SERVING while a newer version is refused or the served version's files are gone.
MODEL_UPDATES_SERVICE = "digitserve.v1.ModelUpdates"

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class VersionInfo:
    """A version as ListModels reports it: ``state`` is available, serving or refused."""

    version: int
    state: str
    reason: str = ""
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelInfo:
    """A model as ListModels reports it: ``state`` is loading or serving."""

    name: str
    state: str
    reason: str
    default_version: int
    labels: Mapping[str, int]
    canary_weight: float
    versions: tuple[VersionInfo, ...] = field(default=())


class Router(Protocol):
    """What the edges (servicer, oip) ask of the server: the model a request names, and the
    decoder of the pictures requests carry."""

    pictures: PictureDecoder

    def model(self, name: str) -> ModelServer:
        """The served model ``name`` ("": the default model); ModelNotFoundError naming those
        served, InvalidInputError when the name is empty and there is no default."""
        ...

    def model_infos(self, name: str = "") -> list[ModelInfo]: ...

    @property
    def default_model(self) -> str: ...

    @property
    def ready(self) -> bool: ...

    @property
    def config_path(self) -> str: ...

    config_error: str


class ModelServer:
    """Serves one model: load() (or load_or_wait()) serves its newest version that passes the
    gate (or the pinned one), then the watch serves newer ones, loads the versions its labels
    name and unloads versions whose directories are gone. ``on_change`` is called (on the loop)
    whenever what it serves changes, so the App can update the server's overall health."""

    def __init__(self, name: str, source: ModelSource, settings: Settings, policy: ModelPolicy, *,
                 reads: RepositoryReads, telemetry: Telemetry, health: HealthServicer,
                 on_change: Callable[[], Awaitable[None]] | None = None,
                 on_unload: Callable[[], None] = lambda: None, freeze_gc: bool = False,
                 settle: Callable[[], None] = lambda: None) -> None:
        self.name = name
        self.source = source
        self.settings = settings
        self.policy = policy
        self.reads = reads
        self.telemetry = telemetry
        self.health = health
        self._on_change = on_change
        self._on_unload = on_unload
        self._freeze_gc = freeze_gc
        self._settle = settle
        self._set_rules()
        self.plane = DataPlane(
            settings.max_images_per_request,
            name=name,
            max_batch_size=settings.max_batch_size,
            max_queue_delay=settings.max_queue_delay_ms / 1000,
            max_queued_images=settings.max_queued_images,
            inline_max_images=settings.inline_max_images,
            keep_versions=settings.keep_versions,
            observer=telemetry,
        )
        # The fingerprint of each refused version's directory when it was refused: it is tried
        # again when that changes. A version refused by a timeout has none: it is tried again
        # once its hung read has returned.
        self._refused_at: dict[int, Fingerprint | None] = {}
        self.gone: dict[int, float] = {}  # loaded versions missing from disk: since when
        self._orphaned = False  # the served version is gone past the grace and nothing replaced it
        self.waiting = False  # no version was servable at start: the watch serves the first one
        self.first_served = asyncio.Event()
        self.published: list[int] = []  # the last listing of its versions
        self.label_problems: dict[str, str] = {}  # labels not in force as configured, and why
        self.reason = "loading"  # why nothing serves yet
        self.failed: BaseException | None = None  # why its first load failed (load_or_wait)
        self._watch_task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one look at a time (watch, SIGHUP, a config change)

    def __str__(self) -> str:
        return f"model {self.name}"

    # --- state ----------------------------------------------------------------------------------

    @property
    def model(self) -> Model | None:
        return self.plane.model

    @property
    def serving(self) -> bool:
        return self.plane.model is not None

    @property
    def stale(self) -> bool:
        """A newer version than the served one is refused, or the served one's files are gone."""
        model = self.plane.model
        return model is not None and (
            any(v > model.spec.version for v in self.plane.refused) or model.spec.version in self.gone)

    def info(self) -> ModelInfo:
        """What ListModels says of this model."""
        plane = self.plane
        labels_of: dict[int, list[str]] = {}
        for label, version in sorted(plane.labels.items()):
            labels_of.setdefault(version, []).append(label)
        # (a loader's source lists a version 0: "whatever it loads", not a version)
        versions = {v for v in (*self.published, *plane.loaded_versions, *plane.refused) if v > 0}
        listed = []
        for version in sorted(versions, reverse=True):
            if version in plane.refused:
                state, reason = "refused", plane.refused[version]
            elif version in plane.loaded_versions:
                state, reason = "serving", ""
            else:
                state, reason = "available", ""
            listed.append(VersionInfo(version, state, reason, tuple(labels_of.get(version, ()))))
        problems = "; ".join(f"label {label}: {why}" for label, why in sorted(self.label_problems.items()))
        reason = problems if self.serving else "; ".join(filter(None, (self.reason, problems)))
        return ModelInfo(self.name, "serving" if self.serving else "loading", reason,
                         plane.default_version, dict(plane.labels), plane.canary_weight, tuple(listed))

    async def set_health(self) -> None:
        """This model's health services."""
        await self.health.set(MODEL_SERVICE.format(self.name), SERVING if self.serving else NOT_SERVING)
        await self.health.set(f"{MODEL_UPDATES_SERVICE}/{self.name}", NOT_SERVING if self.stale else SERVING)

    async def _changed(self) -> None:
        if self._on_change is not None:
            await self._on_change()

    # --- policy ---------------------------------------------------------------------------------

    def _set_rules(self) -> None:
        self.source.rules = self.policy.rules

    def _pinned(self) -> int:
        return self.policy.version

    async def apply(self, policy: ModelPolicy) -> None:
        """A new policy (the model config changed): the gate rules apply to versions loaded from
        now on; a new pin, new labels or canary weight take effect at once where their versions
        are loaded (else after loading them: a label moves only once its new version passed)."""
        if policy == self.policy:
            return
        self.policy = policy
        self._set_rules()
        logger.info("model %s: config changed (version %s, labels %s, canary weight %g)", self.name,
                    policy.version or "newest", dict(policy.labels) or "none", policy.canary_weight)
        if self.serving:
            await self.reload_once()

    # --- loading --------------------------------------------------------------------------------

    def _serve(self, model: Model) -> None:
        self.plane.set_model(model)
        if self._freeze_gc:
            self._settle()

    def _event(self, kind: str, version: int, outcome: str) -> None:
        self.telemetry.on_model_event(self.name, kind, version, outcome)

    async def _list(self) -> list[int]:
        """The published versions, listed in a thread with the repository timeout."""
        versions = await self.reads.run(f"list {self.name}", f"listing {self.source}", self.source.versions)
        self.published = list(versions)
        return versions

    async def _fingerprint(self, version: int) -> Fingerprint | None:
        return await self.reads.run(
            f"fingerprint {self.name} {version}",
            f"listing the files of {self.source} version {version}",
            partial(self.source.fingerprint, version),
        )

    async def _try_load(self, kind: str, version: int) -> Model | None:
        """Loads, checks and warms a version in a thread of its own, with the repository timeout
        (not on the model thread, so serving goes on meanwhile); None, logged and remembered, if
        it is refused or its reads time out."""
        fingerprint: Fingerprint | None = None
        serving = None if self.plane.model is None else self.plane.model.spec.version
        logger.info("trying model %s version %d (%s)", self.name, version, kind)
        try:
            fingerprint = await self._fingerprint(version)
            model = await self.reads.run(
                f"load {self.name} {version}", f"loading {self.source} version {version}",
                partial(self.source.load, version, serving), tag=(fingerprint, serving, self.policy.rules),
            )
        except Exception as exc:  # any failure to load or check refuses the version
            self.plane.refuse(version, str(exc))
            if isinstance(exc, RepositoryTimeoutError):
                self._refused_at.pop(version, None)  # tried again once the read returns
            else:
                self._refused_at[version] = fingerprint  # tried again when its files change
            logger.error("refused model %s version %d: %s", self.name, version, exc)
            self._event(kind, version, "refused")
            return None
        self.plane.forgive(version)
        self._refused_at.pop(version, None)
        if not self.source.watchable and model.spec.name != self.name:
            # A loader's model (tests, embedding) is known by its own name from now on.
            self.name = self.plane.name = model.spec.name
            self.telemetry.touch_model(self.name)
        self._event(kind, version, "served")
        return model

    async def _worth_trying(self, version: int) -> bool:
        """False for a version refused before whose files have not changed since, and for one
        whose earlier read is still hung."""
        key = f"{self.name} {version}"
        if self.reads.busy(f"load {key}") or self.reads.busy(f"fingerprint {key}"):
            return False  # no second thread on a hung read
        if version not in self.plane.refused:
            return True
        if version not in self._refused_at:
            return True  # refused by a timeout whose read has returned since
        try:
            now = await self._fingerprint(version)
        except RepositoryTimeoutError:
            self._refused_at.pop(version, None)
            return False
        if now is None or now == self._refused_at[version]:
            return False
        logger.info("version %d of model %s was refused but its files changed: trying it again",
                    version, self.name)
        return True

    async def load(self) -> Model:
        """Serves the newest version that passes the checks (an older one when newer ones fail or
        their reads hang; the pinned one if pinned), loads the versions its labels name, then
        starts watching. RepositoryError (ModelNotFoundError when none is published) when none
        is servable."""
        async with self._lock:
            pinned = self._pinned()
            versions = await self._list()
            if pinned and pinned not in versions:
                raise ModelNotFoundError(f"model {self.name!r} has no version {pinned} (pinned)")
            for version in sorted([pinned] if pinned else versions, reverse=True):
                model = await self._try_load("load", version)
                if model is not None:
                    break
            else:
                reasons = "; ".join(f"version {v}: {r}" for v, r in sorted(self.plane.refused.items()))
                raise RepositoryError(f"no servable version of model {self.name!r} ({reasons})")
            await self._start_serving(model)
            await self._sync_labels(set(versions))
        self.start_watch()
        return model

    async def load_or_wait(self, exit_if_no_model: bool) -> Model:
        """load(); when no version is servable yet (none is published, or every one is refused)
        and ``exit_if_no_model`` is off, logs once what it waits for and returns the first version
        the watch serves (health NOT_SERVING meanwhile). A hung read still fails it."""
        try:
            return await self.load()
        except RepositoryTimeoutError:
            raise
        except RepositoryError as error:  # ModelNotFoundError (none published) or all refused
            if exit_if_no_model or not self.source.watchable:
                raise
            reason = error
        self.waiting = True
        self.reason = f"waiting for a servable version: {reason}"
        logger.warning(
            "waiting for a servable version of model %s (health NOT_SERVING; looking every %gs "
            "and at SIGHUP; --exit-if-no-model exits instead): %s",
            self.name, self.watch_interval(), reason,
        )
        await self._changed()
        self.start_watch()
        await self.first_served.wait()
        assert self.plane.model is not None
        return self.plane.model

    def watch_interval(self) -> float:
        """--reload-interval; while waiting for a first version with hot reload off, the default
        (that first look is not a reload)."""
        return self.settings.reload_interval or WAIT_INTERVAL

    def _reloads(self) -> bool:
        """Whether the watch goes on once a version serves (hot reload, labels, gone versions)."""
        return self.settings.reload_interval > 0 and self.source.watchable

    def start_watch(self) -> None:
        if self._watch_task is None and (self.plane.model is None or self._reloads()):
            self._watch_task = asyncio.get_running_loop().create_task(
                self._watch(), name=f"watch {self.name}")

    async def _start_serving(self, model: Model) -> None:
        """Serves the first version: health SERVING, the line that says so."""
        self._serve(model)
        self.reason = ""
        self.first_served.set()
        await self.set_health()
        await self._changed()
        logger.info("serving model %s version %d from %s", model.spec.name, model.spec.version, self.source)
        newer = sorted(v for v in self.plane.refused if v > model.spec.version)
        if newer:
            logger.warning(
                "model %s version %d is served although newer version(s) %s exist: they were "
                "refused (ListModels and GetModelInfo say why); the watch tries them again "
                "when their files change or their hung reads return",
                model.spec.name, model.spec.version, ", ".join(map(str, newer)),
            )

    def _forget_missing(self, on_disk: set[int]) -> None:
        for version in [v for v in self.plane.refused if v not in on_disk]:
            self.plane.forgive(version)  # refused_versions lists what is there
            self._refused_at.pop(version, None)

    async def _serve_first(self) -> bool:
        """While waiting: serves the newest published version that passes the checks (the pinned
        one, if pinned), skipping those refused before whose files did not change."""
        if self.reads.busy(f"list {self.name}"):
            return False
        try:
            versions = await self._list()
        except ModelNotFoundError:
            self.published = []
            return False  # still nothing published
        pinned = self._pinned()
        on_disk = set(versions)
        self._forget_missing(on_disk)
        for version in sorted(versions, reverse=True):
            if pinned and version != pinned:
                continue
            if await self._worth_trying(version):
                model = await self._try_load("load", version)
                if model is not None:
                    await self._start_serving(model)
                    await self._sync_labels(on_disk)
                    return True
        if self.plane.refused:
            self.reason = "waiting for a servable version: " + "; ".join(
                f"version {v}: {r}" for v, r in sorted(self.plane.refused.items()))
        return False

    def _note_gone(self, on_disk: set[int]) -> set[int]:
        """Tracks loaded versions missing from disk; returns those gone for the grace period or
        longer."""
        now = time.monotonic()
        grace = self.settings.removed_version_grace
        for version in self.plane.loaded_versions:
            if version in on_disk:
                if self.gone.pop(version, None) is not None:
                    logger.info("version %d of model %s is back in %s", version, self.name, self.source)
                    self._orphaned = False
            elif version not in self.gone:
                self.gone[version] = now
                logger.warning(
                    "version %d of model %s is gone from %s; it keeps answering from memory for "
                    "up to %gs, then %s", version, self.name, self.source, grace,
                    "the newest remaining version that passes the checks replaces it"
                    if self.plane.model is not None and self.plane.model.spec.version == version
                    else "it is unloaded",
                )
        return {v for v, since in self.gone.items() if now - since >= grace}

    async def _sync_labels(self, on_disk: set[int]) -> None:
        """Puts the policy's labels in force: a label whose version is loaded takes it at once;
        one whose version is not is loaded (past the gate) first; a label whose new version cannot
        be loaded keeps its previous version, and ListModels says why."""
        wanted = self.policy.labels
        before = dict(self.plane.labels)
        labels: dict[str, int] = {}
        problems: dict[str, str] = {}
        for label, version in sorted(wanted.items()):
            if version in self.plane.loaded_versions:
                labels[label] = version
                continue
            if version not in on_disk:
                problems[label] = f"version {version} is not published"
            elif await self._worth_trying(version):
                model = await self._try_load("label", version)
                if model is not None:
                    self.plane.add_version(model)
                    labels[label] = version
                    continue
                problems[label] = f"version {version} was refused: {self.plane.refused.get(version, '')}"
            elif version in self.plane.refused:
                problems[label] = f"version {version} was refused: {self.plane.refused[version]}"
            else:
                problems[label] = f"version {version} is still loading (a slow read)"
            previous = before.get(label)
            if previous is not None and previous in self.plane.loaded_versions:
                labels[label] = previous  # keeps its version until the new one can serve
        weight = self.policy.canary_weight if CANARY in labels else 0.0
        if labels != before or weight != self.plane.canary_weight:
            self.plane.set_labels(labels, weight)
            logger.info("model %s: version labels %s, canary weight %g", self.name,
                        ", ".join(f"{k} -> {v}" for k, v in sorted(labels.items())) or "none", weight)
        if problems != self.label_problems:
            for label, why in sorted(problems.items()):
                logger.error("model %s: label %s is not moved to its configured version %d: %s",
                             self.name, label, wanted[label], why)
        self.label_problems = problems

    async def reload_once(self) -> bool:
        """One look: serves the newest published version that passes the checks when it is newer
        than the served one (the pinned one, when pinned; the first one, while waiting); puts the
        labels in force; when the served version's directory has been gone for
        --removed-version-grace, serves the newest remaining version that passes, as a fresh
        start would. True if the served model changed."""
        async with self._lock:
            changed = await self._reload()
        await self.set_health()
        await self._changed()
        return changed

    async def _reload(self) -> bool:
        current = self.plane.model
        if current is None:
            return await self._serve_first()
        if self.reads.busy(f"list {self.name}"):
            return False  # the last listing is still hung (logged and counted when it timed out)
        try:
            versions = await self._list()
        except ModelNotFoundError:
            self.published = []
            versions = []
        on_disk = set(versions)
        self._forget_missing(on_disk)
        served = current.spec.version
        expired = self._note_gone(on_disk)
        for version in sorted(expired - {served}):
            self.plane.unload(version)
            del self.gone[version]
            self._on_unload()
            logger.warning("unloaded model %s version %d: its directory has been gone for %gs or more",
                           self.name, version, self.settings.removed_version_grace)
        replacing = served in expired
        pinned = self._pinned()
        if pinned:
            candidates = [pinned] if pinned in on_disk and (pinned != served or replacing) else []
        elif replacing:
            candidates = sorted((v for v in versions if v != served), reverse=True)
        else:
            candidates = sorted((v for v in versions if v > served), reverse=True)
        model: Model | None = None
        for version in candidates:
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
                del self.gone[served]
                self._on_unload()
                self._orphaned = False
                logger.warning(
                    "model %s version %d has been gone from %s for %gs or more: unloaded it and "
                    "serving version %d, the newest remaining version that passes the checks",
                    model.spec.name, served, self.source, self.settings.removed_version_grace,
                    model.spec.version,
                )
            else:
                logger.info("hot reload: serving model %s version %d (was version %d)",
                            model.spec.name, model.spec.version, served)
        elif replacing and not self._orphaned:
            self._orphaned = True
            logger.error(
                "model %s version %d has been gone from %s for %gs or more and no remaining "
                "version passes the checks: still serving it from memory (ModelUpdates health "
                "NOT_SERVING); a fresh start would not serve at all. Publish a version or restore "
                "the directory", current.spec.name, served, self.source,
                self.settings.removed_version_grace,
            )
        await self._sync_labels(on_disk)
        return model is not None

    async def _watch(self) -> None:
        while self.plane.model is None or self._reloads():
            await asyncio.sleep(self.watch_interval())
            try:
                await self.reload_once()
            except RepositoryTimeoutError:
                pass  # logged and counted where it timed out; the next look tries again
            except Exception:  # a listing error must not end the watch
                logger.exception("watching %s failed; trying again", self.source)

    async def close(self, grace: float = 0.0) -> None:
        """Stops the watch; waits up to ``grace`` seconds for the calls that hold one of its
        versions (Predict calls, Evaluate streams) to finish, then stops its batcher."""
        if self._watch_task is not None:
            self._watch_task.cancel()
        until = time.monotonic() + grace
        while (self.plane.in_use or self.plane.batcher.queued_images) and time.monotonic() < until:
            await asyncio.sleep(0.01)
        await self.plane.close()


async def check_repository(settings: Settings, reads: RepositoryReads, config: ServingConfig) -> None:
    """What the repository must hold before the server listens, as one line: it is there, it is
    a repository (not one model's directory), a pinned version is published
    (ModelNotFoundError, RepositoryTimeoutError). NothingPublishedError when a model named has
    no version yet or the repository holds no model: the server waits for one (unless
    --exit-if-no-model)."""
    root = settings.model_repo
    if config.models is None:
        error = await reads.run("list", f"listing {root}", partial(repository_error, root))
        if error is not None:
            raise error
        # One listing of each model directory, in one thread: a repository of many empty
        # directories costs one read, not one thread per directory.
        found = await reads.run("list models", f"listing the models in {root}",
                                ModelRepository(root).model_dirs)
        if not any(found.values()):  # model directories without a version yet: say the first one's
            raise missing_error(root, config.default_model or min(found, default="NAME"))
        if not config.default_model:
            return
    waiting: NothingPublishedError | None = None
    names = list(config.models or ())
    if config.default_model and config.default_model not in names:
        names.append(config.default_model)
    for name in names:
        source = RepositorySource(root, name)
        try:
            await reads.run(f"list {name}", f"listing {source}",
                            partial(source.servable, config.policy_of(name).version))
        except NothingPublishedError as error:
            waiting = waiting or error
    if waiting is not None:
        raise waiting
