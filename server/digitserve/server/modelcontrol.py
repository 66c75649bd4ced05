"""Triton's model repository extension: the repository index (every model version and its state,
with its version labels), and loading and unloading a model of the repository while the server
runs, which only ``--model-control explicit`` allows (as Triton's --model-control-mode=explicit;
that flag needs a bearer token, settings.Settings checks). A model loaded stays served until
unloaded; one unloaded stays so, whatever discovery finds, until it is loaded again."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from functools import partial
from typing import Any

from digitserve.errors import RepositoryError
from digitserve.repository import is_model_name
from digitserve.server.discovery import Discovery
from digitserve.server.errors import ControlRefusedError, InvalidInputError, NotServedError
from digitserve.server.registry import ModelInfo, Registry
from digitserve.server.versions import RepositorySource

logger = logging.getLogger(__name__)

EXPLICIT = "explicit"
REFUSED = ("model control is off: this server serves the models its repository and config name; "
           "start it with --model-control explicit (and a bearer token) to load and unload models")
WAITING = "waiting for a servable version: "  # registry.ModelVersions.reason once its first load gave up
_INDEX_STATES = {"serving": "READY", "refused": "UNAVAILABLE"}


def repository_index(infos: Iterable[ModelInfo], ready_only: bool) -> list[dict[str, Any]]:
    """Triton's repository index: one entry per model version (a model without versions, one
    entry), with its state (READY, LOADING, UNAVAILABLE), why, and its version labels (a list,
    empty when none names it), as the HTTP edge answers it; ``ready_only``: the READY ones."""
    entries: list[dict[str, Any]] = []
    for info in infos:
        if not info.versions:
            entries.append({"name": info.name, "state": "UNAVAILABLE", "reason": info.reason,
                            "labels": []})
        for version in info.versions:
            state = _INDEX_STATES.get(version.state) or ("LOADING" if info.state == "loading"
                                                        else "UNAVAILABLE")
            entries.append({"name": info.name, "version": str(version.version), "state": state,
                            "reason": version.reason, "labels": list(version.labels)})
    return [e for e in entries if e["state"] == "READY"] if ready_only else entries


class ModelControl:
    """Loads and unloads the models of the repository on request (RepositoryModelLoad/Unload and
    their HTTP routes), when ``mode`` is ``explicit``; refuses with ControlRefusedError otherwise."""

    def __init__(self, mode: str, registry: Registry, discovery: Discovery | None) -> None:
        self.mode = mode
        self.registry = registry
        self.discovery = discovery

    def _check(self, name: str) -> Discovery:
        if self.mode != EXPLICIT:
            raise ControlRefusedError(REFUSED)
        if self.discovery is None or self.registry.static:
            raise ControlRefusedError("model control needs a model repository; this server serves "
                                      "a model it was handed")
        if not is_model_name(name):
            raise InvalidInputError("model_name", f"{name!r} is not a model directory's name "
                                    "(letters, digits, '.', '_', '-', starting with a letter or digit)")
        return self.discovery

    async def load(self, name: str) -> None:
        """Serves model ``name`` of the repository and returns once a version of it serves (one
        served already: its versions are looked at again). NotServedError when it has no version
        or none passes the gate (then it is not served)."""
        discovery = self._check(name)
        registry = self.registry
        model = registry.models.get(name)
        if model is not None:
            await model.reload_once()
        else:
            root = registry.settings.model_repo
            source = RepositorySource(root, name)
            try:
                versions = await registry.reads.run(f"list {name}", f"listing {source}",
                                                    partial(source.servable, 0))
            except RepositoryError as error:
                raise NotServedError(f"model {name!r} cannot be loaded: {error}") from None
            if not versions:
                raise NotServedError(f"model {name!r} cannot be loaded: {root} holds no version of "
                                     "it; publish one first")
            model = registry.add(name)  # started, as the server has started
            if not registry.starting:
                registry.start(model)
        discovery.unloaded.discard(name)
        discovery.loaded.add(name)
        # Its first load ends serving, or gives up ("waiting for a servable version": every
        # version refused) and waits for a new one: then the load fails and the model goes.
        while not model.serving and model.failed is None and model.reason == "loading":
            await asyncio.sleep(0.02)
        if not model.serving:
            why = model.reason.removeprefix(WAITING) if model.failed is None else str(model.failed)
            discovery.loaded.discard(name)
            discovery.unloaded.add(name)
            if registry.models.get(name) is model:
                await registry.remove(name, "its load failed")
            raise NotServedError(f"model {name!r} cannot be loaded: {why}")
        logger.info("model %s loaded on request (RepositoryModelLoad)", name)
        await registry.changed(model)
        await registry.changed()

    async def unload(self, name: str) -> None:
        """Stops serving model ``name``: refused from now on, its calls in flight finish first
        (--grace-period); discovery does not serve it again until it is loaded."""
        discovery = self._check(name)
        self.registry.model(name)  # NotServedError naming those served
        discovery.loaded.discard(name)
        discovery.unloaded.add(name)
        await self.registry.remove(name, "unloaded on request (RepositoryModelUnload)")
        await self.registry.changed()
