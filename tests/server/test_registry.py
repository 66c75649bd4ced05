"""The model registry (issue 22): the one owner of every version's state. A version is loading
while the gate reads it (in a thread, against the served version's accuracy), then serving or
refused with its reason, gone when its directory disappears, unloading while its model closes;
every reader (ListModels' infos, a pinned call, readiness, ModelUpdates' staleness) sees that
one state. Real versions of the tiny model from a repository, through the real gate."""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from digitserve.server.errors import ModelNotReadyError, NotServedError
from digitserve.server.health import HealthServicer
from digitserve.server.modelconfig import from_settings
from digitserve.server.registry import Registry, State
from digitserve.server.telemetry import Telemetry
from digitserve.server.versions import Baseline, RepositoryReads
from tests.server.test_gate import publish_copy
from tests.server.test_gate_rules import wrong_labels
from tests.servers import make_settings


def test_a_version_s_states_from_published_to_unloading(tiny_repo: Path, tmp_path: Path) -> None:
    root = tmp_path / "repo"
    publish_copy(tiny_repo, root, 1)
    settings = make_settings(tmp_path, model_repo=root, model_name="tiny", reload_interval=0,
                             removed_version_grace=3600)

    async def scenario() -> None:
        registry = Registry(settings, from_settings(settings), reads=RepositoryReads(60),
                            telemetry=Telemetry(), health=HealthServicer())
        model = registry.add("tiny")
        gated: list[tuple[int, State, Baseline | None]] = []  # each version's state as the gate reads it
        source = model.source

        class Recording:
            watchable = True

            def versions(self) -> list[int]:
                return source.versions()

            def fingerprint(self, version: int) -> Any:
                return source.fingerprint(version)

            def load(self, version: int, rules: Any, baseline: Baseline | None = None) -> Any:
                gated.append((version, model.versions[version].state, baseline))
                return source.load(version, rules, baseline)

            def __str__(self) -> str:
                return str(source)

        model.source = Recording()
        assert not registry.ready
        with pytest.raises(ModelNotReadyError):
            registry.resolve("tiny")

        await model.load()
        assert gated == [(1, State.LOADING, None)]
        assert (model.versions[1].state, model.versions[1].accuracy) == (State.SERVING, 1.0)
        assert registry.ready and registry.resolve("")[1].spec.version == 1

        # Refused by the gate (its answers do not reproduce the recorded figure): one reason,
        # wherever it is read.
        publish_copy(tiny_repo, root, 2, check_set=wrong_labels)
        assert not await model.reload_once()
        assert gated[-1] == (2, State.LOADING, Baseline(1, 1.0))  # judged against the served version
        refused = model.versions[2]
        assert refused.state is State.REFUSED
        assert refused.reason.startswith("check-set accuracy 0.9000 (180 of 200 images) does not reproduce")
        (info,) = registry.model_infos("tiny")
        assert [(v.version, v.state, v.reason) for v in info.versions] == [
            (2, "refused", refused.reason), (1, "serving", "")]
        with pytest.raises(NotServedError, match=r"version 2 is not served .*it was refused: check-set"):
            registry.resolve("tiny", 2)
        assert model.stale and registry.resolve("tiny")[1].spec.version == 1
        await model.reload_once()
        assert len(gated) == 2  # its files did not change: not read again

        publish_copy(tiny_repo, root, 3)
        assert await model.reload_once()
        assert model.served is not None and model.served.spec.version == 3
        assert model.versions[3].state is State.SERVING and not model.stale
        assert model.loaded_versions == [3, 1]

        shutil.rmtree(root / "tiny" / "3")
        assert not await model.reload_once()
        assert model.versions[3].state is State.GONE and model.stale and registry.served_missing()
        assert registry.resolve("tiny")[1].spec.version == 3  # from memory, within the grace
        model.settings = replace(settings, removed_version_grace=0)
        assert await model.reload_once()  # replaced as a fresh start would: 2 is still refused
        assert model.served is not None and model.served.spec.version == 1
        assert sorted(model.versions) == [1, 2] and not registry.served_missing()
        assert len(gated) == 3

        await model.close()
        assert model.versions[1].state is State.UNLOADING

    asyncio.run(scenario())
