"""The model registry: every served model's versions and their states, labels, canary weight and
the gate's verdicts, and the decisions that take a published version to serving (ARCHITECTURE.md,
"A version's life"). It alone changes them; health, metrics, ListModels, GetModelInfo and the V2
routes read them here, and a request gets its model version from ``resolve``."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from functools import partial
from types import MappingProxyType
from typing import Any

from digitserve.inference import Model
from digitserve.repository import ModelNotFoundError, RepositoryError
from digitserve.server.dataplane import DataPlane
from digitserve.server.errors import InvalidInputError, ModelNotReadyError, NotServedError
from digitserve.server.health import (
    MODEL_SERVICE,
    MODEL_UPDATES_SERVICE,
    NOT_SERVING,
    SERVICE_NAME,
    SERVING,
    HealthServicer,
)
from digitserve.server.modelconfig import CANARY, ModelPolicy, ServingConfig
from digitserve.server.settings import Settings
from digitserve.server.telemetry import Telemetry
from digitserve.server.versionpolicy import VersionPolicy
from digitserve.server.versions import (
    Baseline,
    Fingerprint,
    ModelSource,
    RepositoryReads,
    RepositorySource,
    RepositoryTimeoutError,
)

logger = logging.getLogger(__name__)

WAIT_INTERVAL = 5.0  # seconds between looks for a first version while waiting with --reload-interval 0
STABLE = "stable"  # the label whose version unpinned calls get, when set


class State(Enum):
    LOADING = "loading"  # being read and gated, in a thread, off the model thread
    SERVING = "serving"  # loaded past the gate: answers the calls that pin it or its labels
    REFUSED = "refused"  # the gate or a read refused it (``reason``); tried again when its files change
    GONE = "gone"  # loaded, its directory gone: answers from memory for --removed-version-grace
    UNLOADING = "unloading"  # its model is being removed: the calls in flight finish on it


@dataclass
class Version:  # in ModelVersions.versions under its number
    state: State = State.LOADING
    reason: str = ""
    model: Model | None = None
    accuracy: float | None = None  # the gate's verdict: its check-set accuracy
    refused_at: Fingerprint | None = None  # its files when refused
    read_hung: bool = False  # refused by a read's timeout: tried again once that read returns
    gone_since: float = 0.0  # time.monotonic() when its directory was first seen gone


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
    version_policy: str = "latest:1"  # which versions stay loaded (VersionPolicy's spelling)


async def watch(interval: Callable[[], float], look: Callable[[], Awaitable[Any]], what: object,
                go_on: Callable[[], bool] = lambda: True) -> None:
    """Calls ``look`` every ``interval()`` seconds while ``go_on()``; a failed look is logged
    (a timeout where it timed out) and the next one tries again."""
    while go_on():
        await asyncio.sleep(interval())
        try:
            await look()
        except RepositoryTimeoutError:
            pass  # logged and counted where it timed out; the next look tries again
        except Exception:  # a listing error must not end the watch
            logger.exception("watching %s failed; trying again", what)


class ModelVersions:
    """One model: its versions, labels, canary weight and data plane, and its watch, which loads
    the versions its version policy names once they pass the gate (the newest serves unpinned
    calls), loads the versions the labels name and replaces versions gone from disk."""

    def __init__(self, name: str, source: ModelSource, policy: ModelPolicy, registry: Registry) -> None:
        self.name = name
        self.source = source
        self.policy = policy
        self.registry = registry
        self.settings = settings = registry.settings
        self.reads = registry.reads
        self.telemetry = registry.telemetry
        self.plane = DataPlane(
            settings.max_images_per_request,
            max_batch_size=settings.max_batch_size,
            max_queue_delay=settings.max_queue_delay_ms / 1000,
            max_queued_images=settings.max_queued_images,
            inline_max_images=settings.inline_max_images,
            observer=registry.telemetry,
        )
        self.versions: dict[int, Version] = {}
        self.served: Model | None = None  # what unpinned calls get, labels aside
        self._wanted: set[int] = set()  # the loaded versions the version policy names
        self._labels: dict[str, int] = {}  # labels in force: each names a loaded version
        self._canary_weight = 0.0
        self._random = random.Random()
        self.published: list[int] = []  # the last listing
        self.label_problems: dict[str, str] = {}  # labels not in force as configured, and why
        self.reason = "loading"  # why nothing serves yet
        self.failed: BaseException | None = None  # why its first load failed (load_or_wait)
        self.first_served = asyncio.Event()
        self._orphaned = False  # the served version is gone past the grace and nothing replaced it
        self._watch_task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one look at a time (watch, SIGHUP, a config change)

    def __str__(self) -> str:
        return f"model {self.name}"

    @property
    def serving(self) -> bool:
        """A version serves, with the labels it starts with in force."""
        return self.first_served.is_set()

    @property
    def loaded_versions(self) -> list[int]:
        """Versions that answer pinned requests, newest first."""
        return sorted((v for v, r in self.versions.items() if r.model is not None), reverse=True)

    @property
    def refused(self) -> Mapping[int, str]:
        """Refused versions and why."""
        return {v: r.reason for v, r in sorted(self.versions.items()) if r.state is State.REFUSED}

    @property
    def labels(self) -> Mapping[str, int]:
        """Version labels in force: label -> loaded version."""
        return MappingProxyType(self._labels)

    @property
    def canary_weight(self) -> float:
        return self._canary_weight if CANARY in self._labels else 0.0

    @property
    def default_version(self) -> int:
        """The version unpinned calls get (canary aside); 0 while nothing serves."""
        return self._labels.get(STABLE, 0 if self.served is None else self.served.spec.version)

    @property
    def missing(self) -> bool:
        """The served version's directory is gone."""
        return self.served is not None and self.versions[self.served.spec.version].state is State.GONE

    @property
    def stale(self) -> bool:
        """A newer version than the served one is refused, or the served one's files are gone."""
        served = self.served
        return served is not None and (any(v > served.spec.version for v in self.refused) or self.missing)

    def _loaded(self, version: int) -> bool:
        record = self.versions.get(version)
        return record is not None and record.model is not None

    def resolve(self, version: int = 0, label: str = "", *, split: bool = False) -> Model:
        """The model that answers a request pinning ``version`` or naming ``label`` (neither: the
        default version; with ``split``, as for a Predict call, the canary for a ``canary_weight``
        fraction of calls)."""
        served = self.served
        if served is None or not self.first_served.is_set():
            raise ModelNotReadyError("no model is loaded yet; retry when health reports SERVING")
        if label:
            if version:
                raise InvalidInputError(
                    "version_label", f"{label!r} and model_version {version} both name a version; "
                    "set one of them")
            if label not in self._labels:
                known = ", ".join(f"{k} -> {v}" for k, v in sorted(self._labels.items())) or "none"
                raise NotServedError(
                    f"model {served.spec.name!r} has no version label {label!r} (labels: {known})")
            version = self._labels[label]
        elif version == 0:
            if not self._labels:
                return served
            canary = self._labels.get(CANARY)
            if split and canary is not None and self._canary_weight > 0 \
                    and self._random.random() < self._canary_weight:
                version = canary
            else:
                version = self._labels.get(STABLE, served.spec.version)
        record = self.versions.get(version)
        if record is None or record.model is None:
            loaded = ", ".join(map(str, self.loaded_versions))
            why = f"; it was refused: {record.reason}" if record and record.state is State.REFUSED else ""
            raise NotServedError(f"model {served.spec.name!r} version {version} is not served "
                                 f"(serving version {served.spec.version}; loaded: {loaded}){why}")
        return record.model

    def info(self) -> ModelInfo:
        """What ListModels says of this model."""
        labels_of: dict[int, list[str]] = {}
        for label, number in sorted(self._labels.items()):
            labels_of.setdefault(number, []).append(label)
        refused, loaded = self.refused, self.loaded_versions
        # (a loader's source lists a version 0: "whatever it loads", not a version)
        listed = tuple(
            VersionInfo(v, "refused" if v in refused else "serving" if v in loaded else "available",
                        refused.get(v, ""), tuple(labels_of.get(v, ())))
            for v in sorted({v for v in (*self.published, *loaded, *refused) if v > 0}, reverse=True))
        problems = "; ".join(f"label {label}: {why}" for label, why in sorted(self.label_problems.items()))
        reason = problems if self.serving else "; ".join(filter(None, (self.reason, problems)))
        return ModelInfo(self.name, "serving" if self.serving else "loading", reason,
                         self.default_version, dict(self._labels), self.canary_weight, listed,
                         str(self.policy.versions))

    def _serve(self, model: Model) -> None:
        """Unpinned calls get ``model`` (loaded) from now on: one assignment."""
        self.served = model
        self._evict()
        self.registry.settle()

    def _evict(self) -> None:
        """Unloads the versions neither served, labelled nor named by the version policy (with the
        ``latest`` policy, the newest --keep-versions loaded stay too: the one just replaced can
        still be pinned); a call in flight on one finishes on it."""
        loaded = self.loaded_versions
        newest = loaded[: self.settings.keep_versions] if self.policy.versions.kind == "latest" else []
        keep = {*newest, *self._wanted, *self._labels.values()}
        if self.served is not None:
            keep.add(self.served.spec.version)
        for version in loaded:
            if version not in keep:
                del self.versions[version]

    def _unload(self, version: int) -> None:
        """Forgets a loaded version other than the served one (its files are gone)."""
        self.versions.pop(version, None)
        self._labels = {k: v for k, v in self._labels.items() if v != version}
        self.registry.on_unload()

    async def _fingerprint(self, version: int) -> Fingerprint | None:
        return await self.reads.run(f"fingerprint {self.name} {version}",
                                    f"listing the files of {self.source} version {version}",
                                    partial(self.source.fingerprint, version))

    async def _try_load(self, kind: str, version: int, against: Model | None = None) -> Model | None:
        """Loads a version past the gate in a thread of its own, with the repository timeout, so
        serving goes on meanwhile: SERVING and returned, or REFUSED (logged, counted) and None.
        --max-regression compares it with ``against`` (None: the served version)."""
        served = against or self.served
        baseline = None
        if served is not None and served.spec.version != version:
            accuracy = self.versions[served.spec.version].accuracy
            baseline = None if accuracy is None else Baseline(served.spec.version, accuracy)
        record = self.versions.setdefault(version, Version())
        record.state = State.LOADING
        rules = self.policy.rules
        logger.info("trying model %s version %d (%s)", self.name, version, kind)
        fingerprint: Fingerprint | None = None
        try:
            fingerprint = await self._fingerprint(version)
            model, accuracy = await self.reads.run(
                f"load {self.name} {version}", f"loading {self.source} version {version}",
                partial(self.source.load, version, rules, baseline), tag=(fingerprint, baseline, rules))
        except Exception as exc:  # any failure to load or check refuses the version
            record.state, record.reason, record.refused_at = State.REFUSED, str(exc), fingerprint
            record.read_hung = isinstance(exc, RepositoryTimeoutError)
            logger.error("refused model %s version %d: %s", self.name, version, exc)
            self.telemetry.on_model_event(self.name, kind, version, "refused")
            return None
        if not self.source.watchable and model.spec.name != self.name:
            # A loader's model (tests, embedding) is known by its own name from now on.
            self.name = model.spec.name
            self.telemetry.touch_model(self.name)
        del self.versions[version]  # a loader's model is known by its own version
        self.versions[model.spec.version] = Version(State.SERVING, model=model, accuracy=accuracy)
        self.plane.prepare(model)
        self.telemetry.on_model_event(self.name, kind, version, "served")
        return model

    async def _worth_trying(self, version: int) -> bool:
        """False for a version refused before whose files have not changed since, and for one
        whose earlier read is still hung."""
        key = f"{self.name} {version}"
        if self.reads.busy(f"load {key}") or self.reads.busy(f"fingerprint {key}"):
            return False  # no second thread on a hung read
        record = self.versions.get(version)
        if record is None or record.state is not State.REFUSED or record.read_hung:
            return True  # new, or refused by a timeout whose read has returned since
        try:
            now = await self._fingerprint(version)
        except RepositoryTimeoutError:
            record.read_hung = True
            return False
        if now is None or now == record.refused_at:
            return False
        logger.info("version %d of model %s was refused but its files changed: trying it again",
                    version, self.name)
        return True

    async def load(self) -> Model:
        """Serves the newest version that passes the gate (the pinned one if pinned), then starts
        watching; RepositoryError (ModelNotFoundError: none is published) when none can serve."""
        async with self._lock:
            await self._look(strict=True)
        self.start_watch()
        assert self.served is not None
        return self.served

    async def load_or_wait(self) -> Model:
        """load(); when no version can serve yet, unless --exit-if-no-model, logs once what it
        waits for and returns the first version the watch serves. A hung listing fails it."""
        try:
            return await self.load()
        except RepositoryError as error:  # ModelNotFoundError (none published) or all refused
            if isinstance(error, RepositoryTimeoutError) or self.settings.exit_if_no_model \
                    or not self.source.watchable:
                raise
            self.reason = f"waiting for a servable version: {error}"
            logger.warning(
                "waiting for a servable version of model %s (health NOT_SERVING; looking every %gs "
                "and at SIGHUP; --exit-if-no-model exits instead): %s",
                self.name, self.settings.reload_interval or WAIT_INTERVAL, error)
        await self.registry.changed(self)
        self.start_watch()
        await self.first_served.wait()
        assert self.served is not None
        return self.served

    def _watching(self) -> bool:
        """While waiting for a first version, and with hot reload once one serves."""
        return self.served is None or (self.settings.reload_interval > 0 and self.source.watchable)

    def start_watch(self) -> None:
        if self._watch_task is None and self._watching():
            # --reload-interval, or the default while waiting for a first version with it 0
            look = watch(lambda: self.settings.reload_interval or WAIT_INTERVAL, self.reload_once,
                         self.source, self._watching)
            self._watch_task = asyncio.get_running_loop().create_task(look, name=f"watch {self.name}")

    def _note_gone(self, on_disk: set[int]) -> set[int]:
        """Marks loaded versions missing from disk GONE (or back); returns those gone past the grace."""
        now = time.monotonic()
        grace = self.settings.removed_version_grace
        for version in self.loaded_versions:
            record = self.versions[version]
            if version in on_disk:
                if record.state is State.GONE:
                    record.state = State.SERVING
                    logger.info("version %d of model %s is back in %s", version, self.name, self.source)
                    self._orphaned = False
            elif record.state is not State.GONE:
                record.state, record.gone_since = State.GONE, now
                served = self.served is not None and self.served.spec.version == version
                logger.warning(
                    "version %d of model %s is gone from %s; it keeps answering from memory for "
                    "up to %gs, then %s", version, self.name, self.source, grace,
                    "the newest remaining version that passes the checks replaces it" if served
                    else "it is unloaded")
        return {v for v, r in self.versions.items() if r.state is State.GONE and now - r.gone_since >= grace}

    async def _sync_labels(self, on_disk: set[int]) -> None:
        """Puts the policy's labels in force, each once its version is loaded past the gate; one
        whose version cannot be loaded keeps its previous version, and ListModels says why."""
        wanted = self.policy.labels
        before = dict(self._labels)
        labels: dict[str, int] = {}
        problems: dict[str, str] = {}
        for label, version in sorted(wanted.items()):
            if self._loaded(version):
                labels[label] = version
                continue
            if version not in on_disk:
                problems[label] = f"version {version} is not published"
            elif await self._worth_trying(version) and await self._try_load("label", version) is not None:
                labels[label] = version
                continue
            elif version in self.refused:  # just now, or before and its files did not change
                problems[label] = f"version {version} was refused: {self.refused[version]}"
            else:
                problems[label] = f"version {version} is still loading (a slow read)"
            previous = before.get(label)
            if previous is not None and self._loaded(previous):
                labels[label] = previous  # keeps its version until the new one can serve
        weight = self.policy.canary_weight if CANARY in labels else 0.0
        if labels != before or weight != self.canary_weight:
            self._labels, self._canary_weight = labels, weight
            self._evict()
            logger.info("model %s: version labels %s, canary weight %g", self.name,
                        ", ".join(f"{k} -> {v}" for k, v in sorted(labels.items())) or "none", weight)
        if problems != self.label_problems:
            for label, why in sorted(problems.items()):
                logger.error("model %s: label %s is not moved to its configured version %d: %s",
                             self.name, label, wanted[label], why)
        self.label_problems = problems

    async def apply(self, policy: ModelPolicy) -> None:
        """A new policy: gate rules for the versions loaded from now on; a version policy (a pin),
        labels and canary weight at once where their versions are loaded, else once they passed
        the gate; versions that left the policy are unloaded."""
        if policy == self.policy:
            return
        self.policy = policy
        logger.info("model %s: config changed (version policy %s, labels %s, canary weight %g)",
                    self.name, policy.versions, dict(policy.labels) or "none", policy.canary_weight)
        if self.serving:
            await self.reload_once()

    async def reload_once(self) -> bool:
        """One look: serves a newer version that passes the gate (the pinned one; the first one,
        while waiting), puts the labels in force, and replaces a served version gone for
        --removed-version-grace as a fresh start would. True if the served model changed."""
        async with self._lock:
            changed = await self._look()
        await self.registry.changed(self)
        return changed

    async def _load_policy(self, policy: VersionPolicy, present: set[int], current: Model | None,
                           ) -> list[int]:
        """Loads the versions of ``present`` that ``policy`` names, newest first, each past the
        gate (``latest``: until N passed; refused ones and hung reads do not count); returns
        those loaded, newest first. Older ones are gated against the newest (--max-regression)."""
        limit = policy.num_versions if policy.kind == "latest" else None
        wanted: list[int] = []
        for version in policy.candidates(present):
            if limit is not None and len(wanted) >= limit:
                break
            if self._loaded(version):  # passed the gate when it was loaded
                wanted.append(version)
            elif await self._worth_trying(version):
                newest = self.versions[wanted[0]].model if wanted else None
                model = await self._try_load("load" if current is None else "reload", version,
                                             newest or current)
                if model is not None:
                    wanted.append(model.spec.version)
        return wanted

    async def _look(self, strict: bool = False) -> bool:
        """One look at the published versions (reload_once); ``strict``: load's first one, which
        raises where nothing can serve."""
        current = self.served
        if not strict and self.reads.busy(f"list {self.name}"):
            return False  # the last listing is still hung (logged and counted when it timed out)
        try:
            versions = await self.reads.run(f"list {self.name}", f"listing {self.source}",
                                            self.source.versions)
        except ModelNotFoundError:
            if strict:
                raise
            versions = []
        self.published = list(versions)
        on_disk = set(versions)
        pinned, policy = self.policy.version, self.policy.versions
        if strict and pinned and pinned not in on_disk:
            raise ModelNotFoundError(f"model {self.name!r} has no version {pinned} (pinned)")
        if strict and policy.kind == "specific" and not on_disk.intersection(policy.versions):
            raise ModelNotFoundError(f"model {self.name!r} has none of versions "
                                     f"{', '.join(map(str, policy.versions))} (version policy {policy})")
        for version in [v for v in self.refused if v not in on_disk]:
            del self.versions[version]  # ListModels lists the refusals of what is there
        served, replacing = 0, False
        if current is not None:
            served = current.spec.version
            expired = self._note_gone(on_disk)
            for version in sorted(expired - {served}):
                self._unload(version)
                logger.warning("unloaded model %s version %d: its directory has been gone for %gs "
                               "or more", self.name, version, self.settings.removed_version_grace)
            replacing = served in expired
        # What the policy chooses from: the versions on disk and the loaded ones answering from
        # memory (gone, within the grace; the served one past it only until it is replaced). A
        # loader's source lists a version 0, "whatever it loads": tried while nothing serves.
        present = {v for v in on_disk if v > 0 or current is None}
        present.update(v for v in self.loaded_versions if not (replacing and v == served))
        wanted = await self._load_policy(policy, present, current)
        model = self.versions[wanted[0]].model if wanted else None  # the newest serves
        if set(wanted) != self._wanted and (len(wanted) > 1 or len(self._wanted) > 1):
            logger.info("model %s: version policy %s keeps version(s) %s loaded", self.name, policy,
                        ", ".join(map(str, wanted)) or "none")
        self._wanted = set(wanted)
        if model is not None and model is not current:
            self._serve(model)
        else:
            self._evict()  # a version may have left the policy
            model = None  # nothing new serves
        if current is None:
            return await self._first(model, on_disk, strict)
        grace = self.settings.removed_version_grace
        if model is not None and replacing:
            self._unload(served)
            self._orphaned = False
            logger.warning(
                "model %s version %d has been gone from %s for %gs or more: unloaded it and "
                "serving version %d, the newest remaining version that passes the checks",
                model.spec.name, served, self.source, grace, model.spec.version)
        elif model is not None:
            logger.info("hot reload: serving model %s version %d (was version %d)",
                        model.spec.name, model.spec.version, served)
        elif replacing and not self._orphaned:
            self._orphaned = True
            logger.error(
                "model %s version %d has been gone from %s for %gs or more and no remaining "
                "version passes the checks: still serving it from memory (ModelUpdates health "
                "NOT_SERVING); a fresh start would not serve at all. Publish a version or restore "
                "the directory", current.spec.name, served, self.source, grace)
        await self._sync_labels(on_disk)
        return model is not None

    async def _first(self, model: Model | None, on_disk: set[int], strict: bool) -> bool:
        """After a look while nothing served: health SERVING and the line that says so once
        ``model`` serves with its labels in force; else why nothing serves (``strict``: raised)."""
        if model is None:
            reasons = "; ".join(f"version {v}: {r}" for v, r in self.refused.items())
            if strict:
                raise RepositoryError(f"no servable version of model {self.name!r} ({reasons})")
            if reasons:
                self.reason = f"waiting for a servable version: {reasons}"
            return False
        await self._sync_labels(on_disk)  # in force before health says SERVING
        self.reason = ""
        self.first_served.set()
        await self.registry.changed(self)
        logger.info("serving model %s version %d from %s", model.spec.name, model.spec.version, self.source)
        newer = sorted(v for v in self.refused if v > model.spec.version)
        if newer:
            logger.warning(
                "model %s version %d is served although newer version(s) %s exist: they were "
                "refused (ListModels and GetModelInfo say why); the watch tries them again "
                "when their files change or their hung reads return",
                model.spec.name, model.spec.version, ", ".join(map(str, newer)))
        return True

    async def close(self, grace: float = 0.0) -> None:
        """Stops the watch; its versions are UNLOADING for up to ``grace`` seconds, while calls
        hold one (Predict calls, Evaluate streams); then stops its batcher."""
        if self._watch_task is not None:
            self._watch_task.cancel()
        for record in self.versions.values():
            if record.model is not None:
                record.state = State.UNLOADING
        until = time.monotonic() + grace
        while (self.plane.in_use or self.plane.batcher.queued_images) and time.monotonic() < until:
            await asyncio.sleep(0.01)
        await self.plane.close()


def _names(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names) if names else "no model yet"


class Registry:
    """Every served model by name, the model config in force, and health as the models' state
    makes it. Discovery adds and removes models, the config watcher applies a config."""

    def __init__(self, settings: Settings, config: ServingConfig, *, reads: RepositoryReads,
                 telemetry: Telemetry, health: HealthServicer, static: bool = False,
                 on_unload: Callable[[], None] = lambda: None,
                 settle: Callable[[], None] = lambda: None) -> None:
        self.settings = settings
        self.config = config
        self.config_error = ""  # why the config file's last change was not applied
        self.static = static  # one model from a loader: no repository
        self.models: dict[str, ModelVersions] = {}
        self.reads = reads
        self.telemetry = telemetry
        self.health = health
        self.on_unload = on_unload  # a version unloaded (its files gone): counted
        self.settle = settle  # after each swap: settle_memory in mnist-serve
        self.became_ready = asyncio.Event()  # health "" became SERVING
        self.starting = False  # load_or_wait began: a model added from now on starts loading at once
        self.fatal: asyncio.Future[None] | None = None  # a first load failed (load_or_wait)
        self._tasks: set[asyncio.Task[Model]] = set()

    def add(self, name: str, source: ModelSource | None = None) -> ModelVersions:
        if source is None:
            settings = self.settings
            source = RepositorySource(settings.model_repo, name, inference=settings.inference,
                                      allow_missing_check_set=settings.allow_missing_check_set)
        model = self.models[name] = ModelVersions(name, source, self.config.policy_of(name), self)
        if not self.static:  # a loader's model is counted under its own name, once loaded
            self.telemetry.touch_model(name)
        if self.starting:
            self.start(model)
        return model

    async def remove(self, name: str, why: str) -> None:
        """Stops serving ``name`` at once; its calls in flight finish first (--grace-period)."""
        model = self.models.pop(name)
        logger.warning("model %s is no longer served (%s); its calls in flight finish first", name, why)
        await self.health.set(MODEL_SERVICE.format(name), NOT_SERVING)
        await model.close(self.settings.grace_period)

    def start(self, model: ModelVersions) -> None:
        """``model``'s first load (load_or_wait) in a task; its failure fails ``fatal``, or is logged."""
        task = asyncio.get_running_loop().create_task(model.load_or_wait(), name=f"load {model.name}")
        self._tasks.add(task)

        def done(task: asyncio.Task[Model]) -> None:
            self._tasks.discard(task)
            error = None if task.cancelled() else task.exception()
            if error is None:
                return
            model.failed = error
            if self.fatal is not None and not self.fatal.done():
                self.fatal.set_exception(error)
            else:
                logger.error("cannot serve model %s: %s", model.name, error)
        task.add_done_callback(done)

    @property
    def default_model(self) -> str:
        """The model a request without a name gets: the configured one, else the only one, else ""."""
        if self.config.default_model:
            return self.config.default_model
        return next(iter(self.models)) if len(self.models) == 1 else ""

    def model(self, name: str) -> ModelVersions:
        """The served model ``name`` ("": the default model); NOT_FOUND naming those served,
        INVALID_ARGUMENT when the name is empty and there is no default."""
        if not name:
            name = self.default_model
            if not name:
                raise InvalidInputError(
                    "model_name", f"empty, and this server serves {len(self.models)} models "
                    f"({_names(sorted(self.models))}) and has no default model; name one, or start "
                    "the server with --default-model")
        model = self.models.get(name)
        if model is None:
            raise NotServedError(f"model {name!r} is not served; this server serves "
                                 f"{_names(sorted(self.models))}")
        return model

    def resolve(self, name: str, version: int = 0, label: str = "", *,
                split: bool = False) -> tuple[DataPlane, Model]:
        """The data plane and the model version that answer a request (ModelVersions.resolve)."""
        model = self.model(name)
        return model.plane, model.resolve(version, label, split=split)

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
            return default in self.models and self.models[default].serving
        return any(m.serving for m in self.models.values())

    def served_missing(self) -> bool:
        return any(m.missing for m in self.models.values())

    def queued_images(self) -> float:
        return float(sum(m.plane.batcher.queued_images for m in list(self.models.values())))

    async def changed(self, model: ModelVersions | None = None) -> None:
        """Health from the models' state: ``model``'s services, "" and DigitService (ready), and
        ModelUpdates (NOT_SERVING while a model is stale)."""
        if model is not None:
            await self.health.set(MODEL_SERVICE.format(model.name), SERVING if model.serving else NOT_SERVING)
            await self.health.set(f"{MODEL_UPDATES_SERVICE}/{model.name}",
                                  NOT_SERVING if model.stale else SERVING)
        for name, known in list(self.models.items()) if self.static else ():
            if known.name != name:  # in place: App.models is this dict
                del self.models[name]
                self.models[known.name] = known
        status = SERVING if self.ready else NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)
        if any(m.serving for m in self.models.values()):
            stale = any(m.stale for m in self.models.values())
            await self.health.set(MODEL_UPDATES_SERVICE, NOT_SERVING if stale else SERVING)
        if status == SERVING:
            self.became_ready.set()

    async def apply(self, config: ServingConfig) -> None:
        """Puts a new model config in force: each model served that it names gets its policy."""
        self.config = config
        for name, model in list(self.models.items()):
            if config.serves(name):
                await model.apply(config.policy_of(name))

    async def reload_once(self) -> bool:
        """One look at each model's versions; True if a served version changed."""
        changed = False
        for model in list(self.models.values()):
            changed |= await model.reload_once()
        return changed

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for model in list(self.models.values()):
            await model.close()
