"""Shared fixtures: a fake model, an in-process server on 127.0.0.1:0, and one tiny trained model
published into a temporary repository for the whole session."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import pytest

from digitserve.inference import ModelSpec

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parent.parent


class FakeModel:
    """A deterministic softmax classifier with no TensorFlow: logits = images @ W. An image whose
    first pixel is exactly 0.123 makes it raise, to exercise the INTERNAL path."""

    CRASH_PIXEL = np.float32(0.123)

    def __init__(self, version: int = 1, input_shape: tuple[int, int] = (28, 28),
                 labels: tuple[str, ...] = tuple(str(d) for d in range(10))) -> None:
        size = input_shape[0] * input_shape[1]
        self.spec = ModelSpec("fake", version, input_shape, 1 / 255, labels)
        self.inference_path = "fake"
        self.inline = False  # runs on the model thread, as a TensorFlow-path model does
        self.metadata: dict[str, Any] = {
            "name": "fake", "version": version, "preset": "fake",
            "input": {"shape": list(input_shape), "size": size, "scale": 1 / 255},
            "labels": list(labels), "metrics": {"test_accuracy": 0.5},
            "created_at": "2026-01-01T00:00:00Z",
        }
        rng = np.random.default_rng(version)
        self.weights = rng.normal(size=(size, len(labels))).astype(np.float32)
        self.calls: list[int] = []

    def predict(self, images: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        if np.any(images[:, 0] == self.CRASH_PIXEL):
            raise RuntimeError("fake model crashed on purpose")
        self.calls.append(images.shape[0])
        logits = images.astype(np.float64) @ self.weights
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


class ServerThread:
    """An App running on its own event loop in a background thread, bound to 127.0.0.1:0."""

    def __init__(self, settings: Any, loader: Callable[[], Any] | None) -> None:
        from digitserve.server.app import App

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def make() -> App:
            return App(settings, loader)

        self.app = self.call(make())
        self.port = self.call(self.app.start())
        self.target = f"127.0.0.1:{self.port}"

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def load(self) -> None:
        self.call(self.app.load())

    def stop(self, grace: float = 0) -> None:
        if self.loop.is_running():
            self.call(self.app.stop(grace))
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
        if not self.loop.is_running() and not self.loop.is_closed():
            self.loop.close()


def expect_error(call: Callable[[], object], code: Any, *fragments: str) -> Any:
    """Runs ``call``, asserts it fails with gRPC status ``code`` and details holding each fragment;
    returns the error."""
    import grpc

    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    assert err.code() == code, (err.code(), err.details())
    for fragment in fragments:
        assert fragment in err.details(), (fragment, err.details())
    return err


def make_settings(tmp: Path, **overrides: Any) -> Any:
    from digitserve.server.settings import Settings

    return replace(Settings(model_repo=tmp, port=0), **overrides)


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., ServerThread]]:
    """Starts servers with a given loader (a FakeModel by default); stops them afterwards."""
    started: list[ServerThread] = []

    def start(loader: Callable[[], Any] | None = None, load: bool = True,
              **overrides: Any) -> ServerThread:
        server = ServerThread(make_settings(tmp_path, **overrides), loader or FakeModel)
        started.append(server)
        if load:
            server.load()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def fake_server(start_server: Callable[..., ServerThread]) -> ServerThread:
    return start_server()


def synthetic_digits(n: int, seed: int, shape: tuple[int, int] = (28, 28)) -> tuple[
    npt.NDArray[np.uint8], npt.NDArray[np.uint8]
]:
    """Learnable fake digits: class k lights a bar at a class-specific place, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    images = rng.integers(0, 60, size=(n, *shape)).astype(np.uint8)
    for i, k in enumerate(labels):
        row = 2 + int(k) * 2
        images[i, row : row + 2, 4:24] = 255
    return images, labels


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


class ServerProcess:
    """``python -m digitserve.server`` on 127.0.0.1:0; the bound port is read from its log."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "digitserve.server", "--port", "0", *args],
            cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []
        self.port: int | None = None
        self._bound = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        with self.proc.stderr:
            for line in self.proc.stderr:
                self.lines.append(line)
                match = re.search(r"(?:listening|workers) on [\d.]+:(\d+)", line)
                if match:
                    self.port = int(match.group(1))
                    self._bound.set()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def target(self, timeout: float = 60) -> str:
        if not self._bound.wait(timeout):
            raise AssertionError(f"server did not bind:\n{self.log}")
        return f"127.0.0.1:{self.port}"

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(5)


@pytest.fixture
def spawn() -> Iterator[type[ServerProcess]]:
    procs: list[ServerProcess] = []

    class Tracked(ServerProcess):
        def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
            super().__init__(*args, env=env)
            procs.append(self)

    yield Tracked
    for proc in procs:
        proc.kill()


def real_data_dir() -> Path | None:
    """The real MNIST files (MNIST_DATA_DIR or ./data), if fetched."""
    path = Path(os.environ.get("MNIST_DATA_DIR", REPO_ROOT / "data"))
    return path if (path / "t10k-images-idx3-ubyte.gz").is_file() else None


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
