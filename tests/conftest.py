"""Shared fixtures (the helpers they use are in support.py and servers.py): in-process servers on
127.0.0.1:0 that serve a model from a repository as mnist-serve does (or a fake, on purpose),
server processes, and one tiny model trained and published once for the whole session."""

from __future__ import annotations

import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.servers import ServerProcess, ServerThread, make_settings
from tests.support import FakeModel, noisy_bars, synthetic_digits


def pytest_configure(config: pytest.Config) -> None:
    """Every process a test starts (``python -m digitserve.server``, the CLIs) imports this
    checkout's source roots, as pytest itself does (``pythonpath``), not whatever checkout the
    venv was installed from in editable mode (a git worktree beside it, say)."""
    roots = [str(path) for path in config.getini("pythonpath")]  # absolute, from pyproject.toml
    earlier = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([*roots, *([earlier] if earlier else [])])


@pytest.fixture
def start_server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., ServerThread]]:
    """Starts in-process servers; stops them afterwards.

    ``start_server(**settings)`` serves what mnist-serve serves: the tiny model from a copy of
    ``tiny_repo`` (model name "tiny"), through the source App builds from the settings
    (load_version, the checksums, the quality gate, LiteRT where it agrees with the trainer),
    seen through ``server.source`` (an ObservedSource; ``wrap=`` wraps each model it loaded).
    ``model_repo=`` and ``model_name=`` serve another repository the same way.
    ``start_server(loader)`` serves what ``loader`` returns through a StaticSource instead: only
    for a test that needs a fake on purpose (a crash pixel, a slow or held model, another input
    shape), which says why where it does."""
    started: list[ServerThread] = []

    def start(loader: Callable[[], Any] | None = None, load: bool = True, *,
              wrap: Callable[[Any], Any] | None = None, **overrides: Any) -> ServerThread:
        if loader is None and "model_repo" not in overrides:
            repo = tmp_path / "served-repo"  # the test's own copy: a test may publish into it
            if not repo.exists():
                shutil.copytree(request.getfixturevalue("tiny_repo"), repo)
            overrides = {"model_repo": repo, "model_name": "tiny", **overrides}
        server = ServerThread(make_settings(tmp_path, **overrides), loader, wrap=wrap)
        started.append(server)
        if load:
            server.load()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def tiny_server(start_server: Callable[..., ServerThread]) -> ServerThread:
    """The tiny model served from a repository, as mnist-serve serves it."""
    return start_server()


@pytest.fixture
def fake_server(start_server: Callable[..., ServerThread]) -> ServerThread:
    """FakeModel through a StaticSource, for tests of the edges that need a fake on purpose: its
    answers are known without a model (exact probabilities), an image can crash it (INTERNAL), it
    records its calls, and it runs every call on the model thread."""
    return start_server(FakeModel)


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir of small synthetic IDX files in the standard MNIST names."""
    from digitserve.idx import write_idx

    root = tmp_path_factory.mktemp("data")
    for split, n, seed in (("train", 600, 1), ("t10k", 200, 2)):
        images, labels = synthetic_digits(n, seed)
        write_idx(root / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory, synthetic_data_dir: Path) -> Path:
    """A model repository holding one tiny model ('tiny', version 1; 100 % on its synthetic
    test set, so it passes the server's quality gate) trained for two epochs."""
    from digitserve.trainer.train import TrainConfig, run

    repo = tmp_path_factory.mktemp("repo")
    run(TrainConfig(data_dir=synthetic_data_dir, model_repo=repo, name="tiny", preset="seed",
                    epochs=2, batch_size=16, seed=7, report=False, verbose=0))
    return repo


@pytest.fixture(scope="session")
def noisy_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with model 'tiny', version 1: the seed preset trained on noisy_bars (its
    check-set accuracy far below MNIST's 0.9)."""
    from digitserve.idx import write_idx
    from digitserve.trainer.train import TrainConfig, run

    data = tmp_path_factory.mktemp("noisy-data")
    for split, n, seed in (("train", 600, 11), ("t10k", 200, 12)):
        images, labels = noisy_bars(n, seed)
        write_idx(data / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(data / f"{split}-labels-idx1-ubyte.gz", labels)
    repo = tmp_path_factory.mktemp("noisy-repo")
    run(TrainConfig(data_dir=data, model_repo=repo, name="tiny", preset="seed", epochs=2,
                    batch_size=16, seed=7, report=False, verbose=0))
    return repo


@pytest.fixture
def spawn() -> Iterator[type[ServerProcess]]:
    """Starts ``python -m digitserve.server`` processes (ServerProcess). Afterwards each must have
    ended as its test meant (``ServerProcess.check_ended_well``: one still running drains on
    SIGTERM and exits 0; none died of a signal the test did not send, or with an exit code the
    test did not read; no crash in its log), else the test fails: a crash is never green."""
    procs: list[ServerProcess] = []

    class Tracked(ServerProcess):
        def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
            super().__init__(*args, env=env)
            procs.append(self)

    yield Tracked
    problems = [problem for proc in procs if (problem := proc.check_ended_well()) is not None]
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """A non-daemon thread a failed test left running (a caller looping on a server that is gone)
    would keep this process alive after its summary until CI's own limit: name it and exit."""
    # Executors' idle workers are joined by their own exit hook; everything else is a leak.
    left = [t.name for t in threading.enumerate()
            if t is not threading.main_thread() and t.is_alive() and not t.daemon
            and not t.name.startswith(("ThreadPoolExecutor", "asyncio_"))]
    if left:
        sys.stderr.write(f"tests left non-daemon threads running: {', '.join(left)}; exiting anyway\n")
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(3)
