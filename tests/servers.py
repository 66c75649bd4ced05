"""The servers tests start (fixtures that start them stay in conftest.py): an App in a thread of
this process (ServerThread), a ``python -m digitserve.server`` process (ServerProcess), and the
model source they serve from, seen by the test (ObservedSource)."""

from __future__ import annotations

import asyncio
import collections
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from tests.support import REPO_ROOT

T = TypeVar("T")


def make_settings(tmp: Path, **overrides: Any) -> Any:
    """Settings as mnist-serve's defaults, on port 0, with ``overrides``."""
    from digitserve.server.settings import Settings

    return replace(Settings(model_repo=tmp, port=0), **overrides)


class ObservedSource:
    """The model source App built from the settings (a RepositorySource, as mnist-serve builds
    it: load_version, the checksums, the quality gate), seen by a test: it counts each method's
    calls (``calls["versions"]`` is the number of listings: the watch's looks), and with ``wrap``
    hands every model it loaded, gated, to ``wrap`` and serves what that returns (a test that
    records or holds the model's calls)."""

    def __init__(self, source: Any, wrap: Callable[[Any], Any] | None = None) -> None:
        self.source = source
        self.wrap = wrap
        self.watchable: bool = source.watchable
        self.calls: collections.Counter[str] = collections.Counter()

    @property
    def rules(self) -> Any:  # the gate rules are the observed source's
        return self.source.rules

    @rules.setter
    def rules(self, rules: Any) -> None:
        self.source.rules = rules

    def __str__(self) -> str:
        return str(self.source)  # log lines and messages name the repository, as in production

    def versions(self) -> list[int]:
        self.calls["versions"] += 1
        versions: list[int] = self.source.versions()
        return versions

    def fingerprint(self, version: int) -> Any:
        self.calls[f"fingerprint {version}"] += 1
        return self.source.fingerprint(version)

    def load(self, version: int, serving: int | None = None) -> Any:
        self.calls[f"load {version}"] += 1
        model = self.source.load(version, serving)
        return model if self.wrap is None else self.wrap(model)


class ServerThread:
    """An App running on its own event loop in a background thread, bound to 127.0.0.1:0.

    Without ``loader`` it serves what mnist-serve serves: the versions of ``settings.model_name``
    in ``settings.model_repo`` through the source App builds from the settings, seen through an
    ObservedSource (``self.source``; ``wrap`` as there). With ``loader`` it serves what that
    returns through a StaticSource, skipping the repository, the checksums and the quality gate:
    only for a test that needs a fake model on purpose."""

    def __init__(self, settings: Any, loader: Callable[[], Any] | None = None, *,
                 wrap: Callable[[Any], Any] | None = None) -> None:
        from digitserve.server.app import App

        if loader is not None and wrap is not None:
            raise ValueError("wrap applies to models loaded from the repository, not to a loader")
        self.source: ObservedSource | None = None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def make() -> App:
            app = App(settings, loader)
            if loader is None and len(app.models) == 1:  # one model named: observe its source
                # Observed, not rebuilt: whatever App builds from the settings is what is served.
                self.source = ObservedSource(app.source, wrap)
                app.source = self.source
            return app

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

    def metrics_port(self) -> int:
        """The port of its metrics endpoint (started with ``--metrics-port 0``), from its log."""
        match = re.search(r"metrics on http://127.0.0.1:(\d+)/metrics", self.log)
        if match is None:
            raise AssertionError(f"no metrics endpoint in the log (--metrics-port 0?):\n{self.log}")
        return int(match.group(1))

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(5)
