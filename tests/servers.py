"""The servers tests start (fixtures that start them stay in conftest.py): an App in a thread of
this process (ServerThread), a ``python -m digitserve.server`` process (ServerProcess), and the
model source they serve from, seen by the test (ObservedSource)."""

from __future__ import annotations

import asyncio
import collections
import os
import re
import signal
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

    def __str__(self) -> str:
        return str(self.source)  # log lines and messages name the repository, as in production

    def versions(self) -> list[int]:
        self.calls["versions"] += 1
        versions: list[int] = self.source.versions()
        return versions

    def fingerprint(self, version: int) -> Any:
        self.calls[f"fingerprint {version}"] += 1
        return self.source.fingerprint(version)

    def load(self, version: int, rules: Any, baseline: Any = None) -> Any:
        self.calls[f"load {version}"] += 1
        gated = self.source.load(version, rules, baseline)
        return gated if self.wrap is None else gated._replace(model=self.wrap(gated.model))


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
        from digitserve.server.eventloop import factory

        if loader is not None and wrap is not None:
            raise ValueError("wrap applies to models loaded from the repository, not to a loader")
        self.source: ObservedSource | None = None
        self.loop = factory(settings.event_loop)()  # the loop mnist-serve would run (uvloop)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def make() -> App:
            app = App(settings, loader)
            if loader is None and len(app.models) == 1:  # one model named: observe its source
                # Observed, not rebuilt: whatever App builds from the settings is what is served.
                (model,) = app.models.values()
                model.source = self.source = ObservedSource(model.source, wrap)
            return app

        self.app = self.call(make())
        self.port = self.call(self.app.start())
        self.target = f"127.0.0.1:{self.port}"

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def load(self) -> None:
        self.call(self.app.load())

    @property
    def plane(self) -> Any:
        """The default model's data plane (its batcher, its statistics)."""
        return self.app.registry.model("").plane

    @property
    def model(self) -> Any:
        """The default model's served version (None while nothing serves)."""
        return self.app.registry.model("").served

    def stop(self, grace: float = 0) -> None:
        if self.loop.is_running():
            self.call(self.app.stop(grace))
            # What asyncio.run does after the main coroutine (mnist-serve stops that way): the tasks
            # still pending (an HTTP connection's handler whose client never finished) are cancelled
            # and awaited, not left to be destroyed pending when a later test collects them.
            self.call(_cancel_pending())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
        if not self.loop.is_running() and not self.loop.is_closed():
            self.loop.close()


async def _cancel_pending(timeout: float = 10) -> None:
    """Cancels every task of the running loop but this one and waits (``timeout`` s at most) for
    them to end."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=timeout)


# Signals that mean a crash (the faulthandler dumps the stack for these).
FATAL_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGFPE, signal.SIGILL})
FAULT_LINE = "Fatal Python error"
_DIED = re.compile(r"killed by signal (\w+)")


def describe_code(code: int | None) -> str:
    if code is None:
        return "still running"
    return f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


class ServerProcess:
    """``python -m digitserve.server`` on 127.0.0.1:0; the bound port is read from its log.

    A crash never passes silently: ``check_ended_well`` (the ``spawn`` fixture calls it after every
    test) stops a server still running with SIGTERM and requires exit code 0, and fails a server
    that ended by a signal the test did not send, with an exit code the test did not read
    (``wait``), or with a crash in its log (a faulthandler dump, a worker killed by a signal). A
    test that kills on purpose says so: ``send_signal`` (this process) or ``signal_worker`` (a
    worker of ``--workers``), never ``proc.send_signal`` or ``os.kill``."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "digitserve.server", "--port", "0", *args],
            cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []
        self.port: int | None = None
        self.sent: set[signal.Signals] = set()  # signals the test sent this process
        self.sent_workers: set[signal.Signals] = set()  # ... and its workers
        self.read_code = False  # the test read the exit code (wait), so it asserted it
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

    def send_signal(self, signum: signal.Signals) -> None:
        """Sends this process ``signum``: the way a test stops, reloads or kills it."""
        self.sent.add(signum)
        self.proc.send_signal(signum)

    def signal_worker(self, pid: int, signum: signal.Signals) -> None:
        """Sends a worker (of ``--workers``) ``signum``: its death by it is then expected."""
        self.sent_workers.add(signum)
        os.kill(pid, signum)

    def expect_worker_signal(self, signum: signal.Signals) -> None:
        """A worker's death by ``signum`` that the test causes some other way (the arbiter's
        SIGKILL of a worker the test stopped) is expected."""
        self.sent_workers.add(signum)

    def metrics_port(self) -> int:
        """The port of its metrics endpoint (started with ``--metrics-port 0``), from its log."""
        match = re.search(r"metrics on http://127.0.0.1:(\d+)/metrics", self.log)
        if match is None:
            raise AssertionError(f"no metrics endpoint in the log (--metrics-port 0?):\n{self.log}")
        return int(match.group(1))

    def wait(self, timeout: float) -> int:
        """Its exit code, once it has exited: the caller asserts it."""
        code = self.proc.wait(timeout)
        self._reader.join(5)
        self.read_code = True
        return code

    def kill(self) -> None:
        """SIGKILL, on purpose (a test that stops it without a drain)."""
        if self.proc.poll() is None:
            self.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._reader.join(5)
        self.read_code = True

    def check_ended_well(self, grace: float = 60) -> str | None:
        """None if this server ended as the test meant it to; else what went wrong, with its log.
        One still running is drained (SIGTERM) and must exit 0 within ``grace`` seconds."""
        problems = []
        if self.proc.poll() is None:
            self.send_signal(signal.SIGTERM)
            try:
                code = self.wait(grace)
            except subprocess.TimeoutExpired:
                self.kill()
                problems.append(f"did not exit within {grace:.0f}s of SIGTERM at the end of the test")
            else:
                if code != 0:
                    problems.append(f"SIGTERM at the end of the test: {describe_code(code)}, not 0")
        else:
            self._reader.join(5)
            code = self.proc.returncode
            if code < 0:
                if signal.Signals(-code) not in self.sent:
                    problems.append(f"{describe_code(code)}, a signal the test did not send")
            elif code != 0 and not self.read_code:
                problems.append(f"ended with {describe_code(code)}, which the test never read")
        log = self.log
        if FAULT_LINE in log and not (self.sent | self.sent_workers) & FATAL_SIGNALS:
            problems.append("a crash in its log (a faulthandler dump)")
        for name in _DIED.findall(log):
            if name not in {s.name for s in self.sent_workers}:
                problems.append(f"a worker killed by signal {name}, which the test did not send")
        if not problems:
            return None
        return "server process: " + "; ".join(problems) + f"\n--- its log ---\n{log}"
