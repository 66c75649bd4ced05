"""Waiting for a first version (issue 15, item 5): a server started before anything servable is
published stays up, health NOT_SERVING, logs one line saying what it waits for, and serves the
first version that is published without a restart; --exit-if-no-model exits instead. Each model
found is started once."""

from __future__ import annotations

import collections
import json
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from digitserve.client.client import DigitClient
from digitserve.repository import ModelRepository
from digitserve.server.health import SERVICE_NAME
from digitserve.server.registry import ModelVersions
from tests.server.test_gate import publish_copy as publish_damaged
from tests.servers import ServerProcess, ServerThread
from tests.support import publish_copy, wait_for


def waiting_lines(server: ServerProcess) -> list[str]:
    return [line for line in server.lines if "waiting for a servable version" in line]


def test_a_server_on_an_empty_repository_serves_the_first_version_published(
    tiny_repo: Path, tmp_path: Path, spawn: type[ServerProcess]
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    server = spawn("--model-repo", str(repo), "--model-name", "tiny", "--reload-interval", "0.2",
                   "--metrics-port", "-1")
    with DigitClient(server.target(), timeout=30) as client:
        wait_for(lambda: waiting_lines(server), what="the waiting line")
        for service in ("", SERVICE_NAME):
            assert client.health(service) == "NOT_SERVING"
        (line,) = waiting_lines(server)
        assert json.loads(line)["message"] == (
            "waiting for a servable version of model tiny (health NOT_SERVING; looking every 0.2s "
            f"and at SIGHUP; --exit-if-no-model exits instead): --model-repo {repo}: the directory "
            f"is empty: no model is published there yet; publish one (mnist-train train "
            f"--model-repo {repo} --model-name tiny)")
        assert publish_copy(ModelRepository(repo), ModelRepository(tiny_repo).version_dir("tiny", 1)) == 1
        assert client.wait_until_serving(60) == "SERVING"
        assert client.wait_until_serving(5, SERVICE_NAME) == "SERVING"
        assert client.predict(np.zeros((1, 784), dtype=np.uint8)).model_version == 1
    assert server.proc.poll() is None  # the same process: no restart
    assert len(waiting_lines(server)) == 1, server.log  # one line, not one per look


def test_a_server_whose_versions_are_all_refused_waits_for_a_servable_one(
    tiny_repo: Path, tmp_path: Path, spawn: type[ServerProcess]
) -> None:
    # Reload off: the wait still looks (every 5s by default) and SIGHUP looks at once.
    publish_damaged(tiny_repo, tmp_path, 1, remove=("check_set.npz",))
    server = spawn("--model-repo", str(tmp_path), "--model-name", "tiny", "--reload-interval", "0",
                   "--metrics-port", "-1", "--log-format", "text")
    with DigitClient(server.target(), timeout=30) as client:
        wait_for(lambda: waiting_lines(server), what="the waiting line")
        assert "no servable version of model 'tiny' (version 1: " in waiting_lines(server)[0]
        assert client.health() == "NOT_SERVING"
        publish_damaged(tiny_repo, tmp_path, 2)
        server.send_signal(signal.SIGHUP)
        assert client.wait_until_serving(30) == "SERVING"
        assert client.model_info()["version"] == 2


def test_exit_if_no_model_exits_at_start(tmp_path: Path, spawn: type[ServerProcess]) -> None:
    server = spawn("--model-repo", str(tmp_path), "--model-name", "tiny", "--exit-if-no-model",
                   "--log-format", "text")
    assert server.wait(60) == 2
    assert server.lines[-1].rstrip().endswith(
        f"cannot start: --model-repo {tmp_path}: the directory is empty: no model is published "
        f"there yet; publish one (mnist-train train --model-repo {tmp_path} --model-name tiny)")


def test_a_path_that_is_not_a_repository_is_still_an_error(
    tmp_path: Path, spawn: type[ServerProcess]
) -> None:
    # Only an absent publication is waited for; a flag that names the wrong thing exits 2.
    server = spawn("--model-repo", str(tmp_path / "missing"), "--model-name", "tiny")
    assert server.wait(60) == 2
    assert "no such directory" in server.log and not waiting_lines(server)


def test_serving_every_model_starts_each_model_once(
    tiny_repo: Path, tmp_path: Path, start_server: Callable[..., ServerThread],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    # The serve image's mode (no --model-name): the models are found by load_or_wait itself,
    # which once started each of them twice (two loads of the same version at every start).
    starts: collections.Counter[str] = collections.Counter()
    start = ModelVersions.load_or_wait

    def counted(self: ModelVersions, *args: Any, **kwargs: Any) -> Any:
        starts[self.name] += 1
        return start(self, *args, **kwargs)

    monkeypatch.setattr(ModelVersions, "load_or_wait", counted)
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo)
    server = start_server(model_repo=repo, model_name=(), load=False)
    server.call(server.app.load_or_wait())
    assert starts == {"tiny": 1}
