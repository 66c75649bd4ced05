"""Which models are served: those the model config (or the flags) names, else every model
directory of the repository that holds a version; a look adds the new ones to the registry and
removes those no longer named or gone from disk. Also what the repository must hold before the
server listens (check_repository)."""

from __future__ import annotations

import logging
import time
from functools import partial

from digitserve.repository import ModelRepository
from digitserve.server.modelconfig import ServingConfig
from digitserve.server.registry import Registry
from digitserve.server.settings import Settings
from digitserve.server.unserved import UnservedReport, bad_name, no_version
from digitserve.server.versions import (
    NothingPublishedError,
    RepositoryReads,
    RepositorySource,
    missing_error,
    repository_error,
)

logger = logging.getLogger(__name__)


def configured(config: ServingConfig) -> list[str]:
    """The models the config names (the default model included), without looking at disk."""
    names = list(config.models or ())
    if config.default_model and config.default_model not in names:
        names.append(config.default_model)
    return names


class Discovery:
    """Keeps the registry's models those the config names or the repository holds: a model
    directory appears (served once a version of it passes the gate), a model leaves the config
    (removed at once) or its directory is gone (removed after --removed-version-grace, after its
    calls in flight)."""

    def __init__(self, settings: Settings, registry: Registry, reads: RepositoryReads) -> None:
        self.settings = settings
        self.registry = registry
        self.reads = reads
        self.repository = ModelRepository(settings.model_repo)
        self.removed: dict[str, float] = {}  # models whose directory is gone: since when
        self.unpublished = 0  # model directories found without a version, not served (yet)
        self.unserved = UnservedReport(settings.model_repo)  # says which directories are not served
        # server.modelcontrol's requests: models served whatever the config says, and models
        # not served whatever the repository holds (until loaded again).
        self.loaded: set[str] = set()
        self.unloaded: set[str] = set()

    async def look(self) -> None:
        """One look at the config and the repository's model directories."""
        registry, config = self.registry, self.registry.config
        if registry.static:
            return
        names = set(configured(config))
        root = self.settings.model_repo
        if config.models is None:
            found, others = await self.reads.run("list models", f"listing the models in {root}",
                                                 self.repository.listing)
            # A directory without a version costs this one listing per look and nothing else: no
            # ModelVersions (batcher, watch, health services, metrics series) until a version
            # appears in it. One served already stays while its directory is there.
            names.update(n for n, published in found.items() if published or n in registry.models)
            waiting = [n for n, published in found.items() if not published and n not in names]
            self.unpublished = len(waiting)
            self.unserved.look({**{n: bad_name(why) for n, why in others.items()},
                                **{n: no_version(root, n) for n in waiting}})
        names = (names | self.loaded) - self.unloaded
        now = time.monotonic()
        grace = self.settings.removed_version_grace
        for name in sorted(names - set(registry.models)):
            logger.info("model %s found in %s: serving it once a version passes the gate", name, root)
            registry.add(name)
        for name in sorted(set(registry.models) - names):
            if config.models is not None:
                self.removed.pop(name, None)
                await registry.remove(name, "not in the model config")
                continue
            if name not in self.removed:
                self.removed[name] = now
                logger.warning("model %s is gone from %s; it is served for up to %gs more, then "
                               "removed", name, root, grace)
            if now - self.removed[name] >= grace:
                del self.removed[name]
                await registry.remove(name, "its directory is gone")
        for name in [n for n in self.removed if n in names]:
            del self.removed[name]
            logger.info("model %s is back in %s", name, root)
        await registry.changed()


async def check_repository(settings: Settings, reads: RepositoryReads, config: ServingConfig) -> None:
    """What the repository must hold before the server listens, as one line: it is there, it is
    a repository (not one model's directory), a pinned version is published (one of a specific
    version policy's)
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
    for name in configured(config):
        source = RepositorySource(root, name)
        policy = config.policy_of(name)
        listed = policy.versions.versions if policy.versions.kind == "specific" else ()
        try:
            await reads.run(f"list {name}", f"listing {source}",
                            partial(source.servable, policy.version, () if policy.version else listed))
        except NothingPublishedError as error:
            waiting = waiting or error
    if waiting is not None:
        raise waiting
