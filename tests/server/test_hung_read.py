"""A hung repository read (a FIFO as metadata.json stands in for a hung network volume) is logged
and counted, does not stop a newer good version from loading, at start-up or by the hot-reload
watch, and does not hold up shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from digitserve.client.client import DigitClient
from digitserve.repository import ModelRepository
from digitserve.server.health import MODEL_UPDATES_SERVICE
from tests.servers import ServerProcess, ServerThread, make_settings
from tests.support import publish_copy, wait_for

# --repository-timeout of these tests: a good version loads in ~0.1 s alone, ~1 s in the pytest
# process (which has TensorFlow, so each load also measures TensorFlow's batch-1 spread) on a
# loaded machine.
TIMEOUT = 3.0


def report(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with capsys.disabled():
        print(f"\n{text}")


@pytest.fixture
def staged(tiny_repo: Path, tmp_path: Path) -> Path:
    """A scratch repository holding 'tiny' versions 1, 2 and 3 (copies of the trained version 1,
    each published with consistent metadata), to copy into the served repository as needed."""
    scratch = tmp_path / "scratch"
    shutil.copytree(tiny_repo, scratch)
    repo = ModelRepository(scratch)
    for expected in (2, 3):
        assert publish_copy(repo, repo.version_dir("tiny", 1)) == expected
    return scratch / "tiny"


def install(staged: Path, root: Path, version: int, hung: bool = False) -> Path:
    """Puts staged ``version`` into ``root``'s 'tiny' with one rename; with ``hung`` its
    metadata.json is a FIFO nobody writes: every read of it blocks. Returns the FIFO's path."""
    staging = root / "tiny" / f".copy-{version}"
    shutil.copytree(staged / str(version), staging,
                    ignore=shutil.ignore_patterns("metadata.json") if hung else None)
    if hung:
        os.mkfifo(staging / "metadata.json")
    staging.rename(root / "tiny" / str(version))
    return root / "tiny" / str(version) / "metadata.json"


def release(fifo: Path) -> None:
    """Lets every reader blocked on ``fifo`` go (open for writing and close: they read EOF)."""
    for _ in range(200):
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: no reader left (or the file is gone)
            return
        os.close(fd)
        time.sleep(0.02)


@pytest.fixture
def root(staged: Path, tmp_path: Path) -> Iterator[Path]:
    """The served repository, with version 1 only; FIFOs left in it are released at the end."""
    root = tmp_path / "repo"
    (root / "tiny").mkdir(parents=True)
    install(staged, root, 1)
    yield root
    for fifo in root.glob("tiny/*/metadata.json"):
        if fifo.is_fifo():
            release(fifo)


def blocked_on_a_fifo(pid: int) -> bool:
    """Whether a thread of process ``pid`` waits in open() for a FIFO's writer (Linux shows the
    kernel function it sleeps in, wait_for_partner, in the thread's wchan)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if (task / "wchan").read_text() == "wait_for_partner":
                return True
        except OSError:  # the thread ended meanwhile
            continue
    return False


def repository_threads(version: int) -> int:
    return sum(1 for t in threading.enumerate() if t.name == f"repository load tiny {version}")


def test_a_hung_version_is_skipped_logged_counted_and_a_newer_good_one_is_served(
    staged: Path, root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.INFO)
    server = ServerThread(make_settings(tmp_path, model_repo=root, model_name="tiny",
                                        reload_interval=0.1, repository_timeout=TIMEOUT), None)
    try:
        server.load()
        registry = server.app.telemetry.registry

        def timeouts() -> float:
            return registry.get_sample_value("digitserve_repository_timeouts_total",
                                             {"operation": "load"}) or 0.0

        with DigitClient(server.target, timeout=10) as client:
            assert client.model_info()["version"] == 1
            hung_at = time.monotonic()
            install(staged, root, 2, hung=True)
            wait_for(lambda: timeouts() >= 1, timeout=30)
            noticed = time.monotonic() - hung_at
            # The watch goes on: ten more looks start no second thread on the hung read.
            source = server.source
            assert source is not None
            looks = source.calls["versions"]
            wait_for(lambda: source.calls["versions"] >= looks + 10, 30, "ten more looks")
            assert repository_threads(2) == 1 and source.calls["load 2"] == 1
            assert timeouts() == 1
            assert registry.get_sample_value("digitserve_repository_hung_reads") == 1
            info = client.model_info()
            assert info["version"] == 1
            reason = info["refused_versions"]["2"]
            assert f"did not return within the {TIMEOUT:g}s repository timeout" in reason
            assert client.health() == "SERVING"
            assert client.health(MODEL_UPDATES_SERVICE) == "NOT_SERVING"  # a newer one is stuck

            published = time.monotonic()
            install(staged, root, 3)
            wait_for(lambda: client.model_info()["version"] == 3, timeout=30)
            swap = time.monotonic() - published
            assert client.health(MODEL_UPDATES_SERVICE) == "SERVING"
            assert client.predict(np.zeros((1, 784), np.uint8)).model_version == 3
    finally:
        server.stop()
    timed_out = [r.getMessage() for r in caplog.records
                 if r.levelno == logging.ERROR and "repository read timed out" in r.getMessage()]
    assert len(timed_out) == 1, timed_out
    assert f"loading {root}/tiny version 2 did not return within {TIMEOUT:g}s" in timed_out[0]
    report(capsys, f"hung read: version 2's metadata.json blocks; the timeout was logged and "
                   f"counted {noticed:.2f}s after it appeared (timeout {TIMEOUT:g}s), one thread "
                   f"on it after 10 more looks; version 3 served {swap:.2f}s after publishing")


def test_a_hung_newest_version_at_start_up_serves_the_next_and_sigterm_still_exits(
    spawn: type[ServerProcess], staged: Path, root: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    install(staged, root, 2, hung=True)
    started = time.monotonic()
    server = spawn("--model-repo", str(root), "--model-name", "tiny", "--repository-timeout",
                   str(TIMEOUT), "--grace-period", "1", "--log-format", "text")
    with DigitClient(server.target(), timeout=10) as client:
        assert client.wait_until_serving(60) == "SERVING", server.log
        serving = time.monotonic() - started
        assert client.model_info()["version"] == 1
        assert client.health(MODEL_UPDATES_SERVICE) == "NOT_SERVING"
    assert f"loading {root}/tiny version 2 did not return within {TIMEOUT:g}s" in server.log
    assert "version 1 is served although newer version(s) 2 exist" in server.log
    signalled = time.monotonic()
    server.send_signal(signal.SIGTERM)
    code = server.wait(1 + 10)  # grace + margin, with the read of version 2 still hung
    exited = time.monotonic() - signalled
    assert code == 0, server.log
    report(capsys, f"hung read at start-up: SERVING on version 1 {serving:.2f}s after the start "
                   f"(version 2 hung, timeout {TIMEOUT:g}s); SIGTERM exited {exited:.2f}s later "
                   f"(grace 1s) with the read still hung")


def test_sigterm_during_a_hung_reload_exits_within_the_grace_period(
    spawn: type[ServerProcess], staged: Path, root: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    # A long repository timeout: the read of version 2 is still in progress at the signal.
    server = spawn("--model-repo", str(root), "--model-name", "tiny", "--repository-timeout", "600",
                   "--reload-interval", "0.2", "--grace-period", "1", "--log-format", "text")
    with DigitClient(server.target(), timeout=10) as client:
        assert client.wait_until_serving(60) == "SERVING", server.log
    assert not blocked_on_a_fifo(server.proc.pid)
    install(staged, root, 2, hung=True)
    wait_for(lambda: "trying model tiny version 2 (reload)" in server.log, 30, "the reload to start")
    wait_for(lambda: blocked_on_a_fifo(server.proc.pid), 30, "the reload's read to block")
    signalled = time.monotonic()
    server.send_signal(signal.SIGTERM)
    code = server.wait(1 + 10)  # grace + margin
    exited = time.monotonic() - signalled
    assert code == 0, server.log
    assert "stopped after draining" in server.log
    report(capsys, f"SIGTERM with a hung hot-reload read in progress: exited 0 after "
                   f"{exited:.2f}s (grace 1s)")


def test_reads_run_one_thread_per_hung_key_and_keep_a_late_outcome_for_the_same_files() -> None:
    from digitserve.server.versions import RepositoryReads, RepositoryTimeoutError

    timeouts: list[str] = []
    reads = RepositoryReads(0.2, timeouts.append)
    release = threading.Event()
    calls: list[str] = []

    def slow() -> str:
        calls.append("slow")
        release.wait(30)
        return "loaded"

    async def scenario() -> None:
        with pytest.raises(RepositoryTimeoutError, match=r"did not return within the 0\.2s"):
            await reads.run("load 2", "loading version 2", slow, tag="files-a")
        assert reads.hung == 1 and reads.busy("load 2") and timeouts == ["load"]
        with pytest.raises(RepositoryTimeoutError, match="not retried until it returns"):
            await reads.run("load 2", "loading version 2", slow, tag="files-a")
        assert calls == ["slow"]  # no second thread on the hung read
        assert await reads.run("load 3", "loading version 3", lambda: "other") == "other"
        release.set()
        deadline = time.monotonic() + 30  # the released read returns (on a loaded machine, late)
        while reads.busy("load 2") and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert reads.hung == 0
        # The late outcome serves the next run for the same files, without reading again...
        assert await reads.run("load 2", "loading version 2", slow, tag="files-a") == "loaded"
        assert calls == ["slow"]
        # ...and files that changed since are read afresh.
        assert await reads.run("load 2", "loading version 2", lambda: "fresh", tag="files-b") == "fresh"

    asyncio.run(scenario())
