"""The model config file's watcher (--model-config): a look reads the file again when its size or
modification time changed, once it holds still, and puts the new config in force in the registry;
a config that cannot be used keeps the previous one (logged once, counted, and reported by
ListModels)."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

from digitserve.server.modelconfig import ModelConfigError, read_settled
from digitserve.server.registry import Registry
from digitserve.server.telemetry import ConfigMetrics
from digitserve.server.versions import RepositoryReads

logger = logging.getLogger(__name__)


def stamp(path: Path) -> tuple[int, int] | None:
    """The file's (mtime_ns, size); None when it cannot be read."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


class ConfigWatcher:
    """Watches ``path`` for the registry (the server read it once at start)."""

    def __init__(self, path: Path, registry: Registry, reads: RepositoryReads,
                 metrics: ConfigMetrics) -> None:
        self.path = path
        self.registry = registry
        self.reads = reads
        self.metrics = metrics
        self.seen = stamp(path)

    async def look(self) -> bool:
        """Reads the file again if it changed; True when a new config is in force."""
        path, registry = self.path, self.registry
        now = await self.reads.run("list config", f"looking at {path}", partial(stamp, path))
        if now == self.seen:
            return False
        self.seen = now
        try:
            # Only once it holds still: a file rewritten in place is half-written for a moment.
            # The flags' gate rules and version policy, for models the file gives none: every
            # config's default policy.
            config, self.seen = await self.reads.run("load config", f"reading {path}", partial(
                read_settled, path, registry.config.policy.rules,
                versions=registry.config.policy.version_policy))
        except ModelConfigError as error:
            if str(error) != registry.config_error:
                logger.error("model config not applied, the previous one stays in force: %s", error)
            registry.config_error = str(error)
            self.metrics.on_error()
            return False
        registry.config_error = ""
        self.metrics.on_applied()
        if config == registry.config:
            return False
        logger.info("model config %s applied: %s", path, ", ".join(sorted(config.models or ())) or
                    "every model in the repository")
        await registry.apply(config)
        return True
