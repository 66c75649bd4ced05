"""--workers N supervised like gunicorn's arbiter: a killed worker (either one) is logged and
restarted while calls keep succeeding and health tells; a worker that cannot start is retried with
backoff, then the server halts; the workers die with the parent; SIGHUP reloads, kills nothing."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from digitserve.client.client import DigitClient
from digitserve.client.errors import CallError
from digitserve.repository import ModelRepository
from tests.servers import ServerProcess
from tests.support import publish_copy, wait_for

TINY = ("--model-name", "tiny", "--reload-interval", "0")
WORKERS = "digitserve.v1.Workers"


def report(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with capsys.disabled():
        print(f"\n{text}")


def worker_pids(server: ServerProcess) -> dict[int, list[int]]:
    """Every pid each worker index has had, in order, from the 'worker i (pid p) starting' lines."""
    pids: dict[int, list[int]] = {}
    for index, pid in re.findall(r"worker (\d+) \(pid (\d+)\) starting", server.log):
        pids.setdefault(int(index), []).append(int(pid))
    return pids


def health(target: str, service: str = "") -> str:
    """One health check on a new connection (which the kernel gives to a live worker)."""
    with DigitClient(target, timeout=5) as client:
        try:
            return client.health(service)
        except CallError as exc:
            return str(exc.code().name)


def start_pool(spawn: type[ServerProcess], repo: Path, *args: str) -> tuple[ServerProcess, str]:
    server = spawn("--model-repo", str(repo), *TINY, "--workers", "2", *args)
    target = server.target()
    wait_for(lambda: server.log.count("serving model tiny version") >= 2, 90, "both workers serving")
    wait_for(lambda: health(target, WORKERS) == "SERVING", 30, "Workers SERVING")
    return server, target


class Load:
    """Predict calls in a closed loop from two threads (each its own channel) until stopped; the
    ``load`` fixture stops it when a test fails half-way (a live non-daemon caller thread once
    kept pytest from exiting after its summary)."""

    def __init__(self, target: str, timeout: float = 20) -> None:
        self.codes: Counter[str] = Counter()
        self._stop = threading.Event()
        self._timeout = timeout
        self._threads = [threading.Thread(target=self._run, args=(target,), daemon=True)
                         for _ in range(2)]
        for thread in self._threads:
            thread.start()

    def _run(self, target: str) -> None:
        image = np.zeros(784, np.uint8)
        with DigitClient(target, timeout=self._timeout) as client:
            while not self._stop.is_set():
                try:
                    client.predict(image)
                    self.codes["OK"] += 1
                except CallError as exc:
                    self.codes[exc.code().name] += 1

    def stop(self) -> Counter[str]:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        return self.codes


@pytest.fixture
def load() -> Iterator[Callable[..., Load]]:
    started: list[Load] = []

    def start(target: str, timeout: float = 20) -> Load:
        started.append(Load(target, timeout))
        return started[-1]

    yield start
    for each in started:
        each.stop()


class WorkersWatch:
    """Health Watch streams on ``digitserve.v1.Workers`` over ``n`` connections of their own,
    opened before a worker is killed: the kernel spreads the connections over both workers, and a
    stream on the worker that lives sees every status it sets, however short the restart (a
    Check polled on new connections after the death log line missed a 0.3 s window in CI)."""

    def __init__(self, target: str, n: int = 16) -> None:
        self.seen: list[list[str]] = [[] for _ in range(n)]
        self._channels = [grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
                          for _ in range(n)]
        self._threads = [threading.Thread(target=self._watch, args=(k,), daemon=True) for k in range(n)]
        for thread in self._threads:
            thread.start()
        wait_for(lambda: all(self.seen), 10, "every Watch stream's first status")

    def _watch(self, k: int) -> None:
        stub = health_pb2_grpc.HealthStub(self._channels[k])
        try:
            for response in stub.Watch(health_pb2.HealthCheckRequest(service=WORKERS)):
                self.seen[k].append(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
        except grpc.RpcError as exc:
            self.seen[k].append(exc.code().name)  # UNAVAILABLE: its worker was the one killed

    def went_down_and_up(self) -> bool:
        """Some stream (on the worker that lived) saw SERVING, then NOT_SERVING, then SERVING."""
        return any(re.search(r"SERVING NOT_SERVING( NOT_SERVING)* SERVING", " ".join(s)) for s in self.seen)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
        for thread in self._threads:
            thread.join(5)


def test_a_killed_worker_is_logged_and_restarted_and_health_tells(
    spawn: type[ServerProcess], tiny_repo: Path, load: Callable[..., Load],
    capsys: pytest.CaptureFixture[str],
) -> None:
    server, target = start_pool(spawn, tiny_repo)
    calls = load(target)
    figures = []
    for index in (1, 0):  # worker 0 too: the parent must not give up on the pool
        old = worker_pids(server)[index][-1]
        before = calls.codes["OK"]
        watch = WorkersWatch(target)
        killed = time.monotonic()
        server.signal_worker(old, signal.SIGKILL)
        died = wait_for(lambda i=index, p=old: re.search(  # type: ignore[misc]
            rf"worker {i} \(pid {p}\) died after serving for [\d.]+s: killed by signal SIGKILL; "
            rf"restarting it in 0.0s", server.log), 10, f"worker {index}'s death logged")
        assert died
        # While it restarts: the pool reports lost capacity, the live worker serves on.
        assert health(target) == "SERVING"
        restarted = wait_for(lambda i=index: re.search(  # type: ignore[misc]
            rf"worker {i} \(pid (\d+)\) restarted: serving ([\d.]+)s after", server.log),
            90, f"worker {index} restarted")
        new = int(restarted.group(1))
        assert new != old and worker_pids(server)[index][-1] == new
        wait_for(lambda: health(target, WORKERS) == "SERVING", 10, "Workers SERVING")
        wait_for(watch.went_down_and_up, 10, "a Watch stream to see Workers go NOT_SERVING and back")
        watch.close()
        figures.append(f"worker {index}: killed, serving again after {float(restarted.group(2)):.2f}s "
                       f"(Workers health back to SERVING after {time.monotonic() - killed:.2f}s), "
                       f"{calls.codes['OK'] - before} calls OK meanwhile")
    codes = calls.stop()
    assert server.proc.poll() is None  # the parent never gave up
    assert set(codes) == {"OK"} and codes["OK"] > 100, codes
    server.send_signal(signal.SIGTERM)
    assert server.wait(60) == 0
    assert "all workers stopped: exit codes [0, 0]" in server.log
    report(capsys, "worker kill/restart: " + "; ".join(figures) + f"; calls {dict(codes)}")


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_a_worker_that_crashes_leaves_its_stack_and_the_signal_in_the_log_and_is_restarted(
    spawn: type[ServerProcess], tiny_repo: Path, log_format: str,
) -> None:
    """A worker dead of SIGSEGV: its faulthandler dump reaches the log (JSON records in JSON mode,
    through the worker's own bridge), the arbiter names the signal and restarts it, the pool
    serves on."""
    server, target = start_pool(spawn, tiny_repo, "--log-format", log_format)
    old = worker_pids(server)[1][-1]
    server.signal_worker(old, signal.SIGSEGV)
    wait_for(lambda: re.search(
        rf"worker 1 \(pid {old}\) died after serving for [\d.]+s: killed by signal SIGSEGV; "
        rf"restarting it in 0.0s", server.log), 30, "the arbiter's line naming SIGSEGV")
    wait_for(lambda: re.search(r"worker 1 \(pid (\d+)\) restarted: serving", server.log), 90,
             "worker 1 restarted")
    assert "Fatal Python error: Segmentation fault" in server.log
    if log_format == "json":
        assert '"logger": "faulthandler", "message": "Fatal Python error: Segmentation fault"' in server.log
    wait_for(lambda: health(target, WORKERS) == "SERVING", 30, "Workers SERVING")
    server.send_signal(signal.SIGTERM)
    assert server.wait(60) == 0
    assert "all workers stopped: exit codes [0, 0]" in server.log


def test_a_stopped_worker_is_found_by_its_heartbeat_killed_and_restarted(
    spawn: type[ServerProcess], tiny_repo: Path, load: Callable[..., Load],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """SIGSTOP leaves a worker alive to waitpid while the connections the kernel hands it hang:
    the arbiter finds it by its silent heartbeat (the default --worker-heartbeat-timeout, 10 s),
    says so naming it, kills it and restarts it; new connections are answered again."""
    server, target = start_pool(spawn, tiny_repo)
    calls = load(target)
    stopped = worker_pids(server)[1][-1]
    server.expect_worker_signal(signal.SIGKILL)  # the arbiter's, once it finds the worker silent
    server.signal_worker(stopped, signal.SIGSTOP)
    try:
        silent = wait_for(lambda: re.search(
            rf"worker 1 \(pid {stopped}\) has been silent for ([\d.]+)s \(no heartbeat from its event "
            r"loop within --worker-heartbeat-timeout 10s: stopped or hung\); killing it with SIGKILL",
            server.log), 90, "the arbiter's line on the silent worker")
        assert 10 <= float(silent.group(1)) < 60
        wait_for(lambda: re.search(
            rf"worker 1 \(pid {stopped}\) died after serving for [\d.]+s: killed by signal SIGKILL; "
            r"restarting it in 0.0s", server.log), 30, "its death logged")
    finally:
        with contextlib.suppress(ProcessLookupError):  # never leave a stopped process behind
            os.kill(stopped, signal.SIGCONT)
    restarted = wait_for(lambda: re.search(
        r"worker 1 \(pid (\d+)\) restarted: serving ([\d.]+)s after", server.log), 90, "worker 1 restarted")
    assert int(restarted.group(1)) not in (stopped, worker_pids(server)[0][-1])
    wait_for(lambda: health(target, WORKERS) == "SERVING", 30, "Workers SERVING")
    checks = Counter(health(target) for _ in range(20))  # new connections: both workers answer
    assert checks == {"SERVING": 20}, checks
    codes = calls.stop()
    assert codes["OK"] > 100, codes
    server.send_signal(signal.SIGTERM)
    assert server.wait(60) == 0
    assert server.log.count("has been silent") == 1
    report(capsys, f"stopped worker: killed after {float(silent.group(1)):.1f}s of silence, serving "
                   f"again {float(restarted.group(2)):.2f}s later; health {dict(checks)}; "
                   f"calls {dict(codes)}")


def test_workers_die_with_the_parent_and_free_the_port(
    spawn: type[ServerProcess], tiny_repo: Path, load: Callable[..., Load],
    capsys: pytest.CaptureFixture[str],
) -> None:
    server, target = start_pool(spawn, tiny_repo)
    pids = [p[-1] for p in worker_pids(server).values()]
    calls = load(target, timeout=2)  # its calls after the kill wait for a server that never comes
    wait_for(lambda: calls.codes["OK"] > 50, 30, "calls")
    killed = time.monotonic()
    server.kill()

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        # A zombie (exited, its new parent not yet reaping) counts as gone.
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"

    wait_for(lambda: not any(alive(p) for p in pids), 10, "workers to exit")
    gone = time.monotonic() - killed
    calls.stop()
    with socket.socket() as sock:  # no SO_REUSEPORT: fails while any process listens on the port
        # SO_REUSEADDR only lets the bind past the closed connections' TIME_WAIT entries, never
        # past a listening socket.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", int(target.rsplit(":", 1)[1])))
        sock.listen()
    assert gone < 5
    report(capsys, f"parent SIGKILL: both workers gone {gone:.2f}s later, the port free")


def test_sighup_makes_the_workers_reload_and_kills_nothing(
    spawn: type[ServerProcess], tiny_repo: Path, tmp_path: Path, load: Callable[..., Load],
    capsys: pytest.CaptureFixture[str],
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo)
    server, target = start_pool(spawn, repo)  # --reload-interval 0: only SIGHUP looks
    pids = worker_pids(server)
    calls = load(target)
    repository = ModelRepository(repo)
    assert publish_copy(repository, repository.version_dir("tiny", 1)) == 2
    sent = time.monotonic()
    server.send_signal(signal.SIGHUP)
    wait_for(lambda: server.log.count("hot reload: serving model tiny version 2") == 2, 90,
             "both workers reloading")
    reloaded = time.monotonic() - sent
    codes = calls.stop()
    assert server.proc.poll() is None and worker_pids(server) == pids  # nothing restarted
    assert "SIGHUP received: 2 workers look for a new model version now" in server.log
    assert "died" not in server.log
    for _ in range(6):
        with DigitClient(target) as client:
            assert client.predict(np.zeros(784, np.uint8)).model_version == 2
    assert set(codes) == {"OK"}, codes
    server.send_signal(signal.SIGTERM)
    assert server.wait(60) == 0
    report(capsys, f"SIGHUP: both workers serve version 2 {reloaded:.2f}s later, same pids, "
                   f"calls {dict(codes)}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def taken_after_the_check(port: int) -> socket.socket:
    """Takes a worker's metrics port once the pool has started (its 'starting N workers on' line,
    which server.target() waits for): the arbiter checks the ports before it starts the workers,
    so a port taken before then is one line and exit 2 (tests/server/test_start_errors.py). What this
    leaves is a port taken after that check (by another process meanwhile), which the worker
    finds when it binds: the worker process starts, imports grpc and the server and configures
    its logging first, more than a second here, while this takes the port at once."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", port))
    taken.listen()
    return taken


def test_a_worker_that_cannot_start_is_retried_with_backoff(
    spawn: type[ServerProcess], tiny_repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    metrics = free_port()
    server = spawn("--model-repo", str(tiny_repo), *TINY, "--workers", "2",
                   "--metrics-port", str(metrics), "--worker-start-retries", "5")
    target = server.target()
    taken = taken_after_the_check(metrics + 1)  # worker 1's metrics port (PORT+1)
    try:
        for failures, delay in ((1, "0.5"), (2, "1.0")):
            wait_for(lambda f=failures, d=delay: re.search(  # type: ignore[misc]
                rf"worker 1 \(pid \d+\) died before serving \({f} failed starts in a row\): exit "
                rf"code 2; restarting it in {d}s", server.log), 90, f"failure {failures}")
        assert (f"cannot start: --metrics-port {metrics}: 127.0.0.1:{metrics + 1} (worker 1's, "
                "--metrics-port + 1) is in use (another mnist-serve?); choose another --metrics-port"
                ) in server.log, server.log
        wait_for(lambda: server.log.count("serving model tiny version") >= 1, 60, "worker 0")
        assert health(target) == "SERVING"
        assert health(target, WORKERS) == "NOT_SERVING"
    finally:
        taken.close()
    restarted = wait_for(lambda: re.search(r"worker 1 \(pid \d+\) restarted: serving ([\d.]+)s",
                                           server.log), 90, "worker 1 serving")
    wait_for(lambda: health(target, WORKERS) == "SERVING", 10, "Workers SERVING")
    failed = len(re.findall(r"worker 1 \(pid \d+\) died before serving", server.log))
    server.send_signal(signal.SIGTERM)
    assert server.wait(60) == 0
    report(capsys, f"metrics port taken: worker 1 failed {failed} starts (backoff 0.5 s, 1 s, ...), "
                   f"serving {float(restarted.group(1)):.2f}s after its last failure once the port "
                   f"was free")


def test_a_worker_that_keeps_failing_to_start_halts_the_server(
    spawn: type[ServerProcess], tiny_repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    metrics = free_port()
    started = time.monotonic()
    server = spawn("--model-repo", str(tiny_repo), *TINY, "--workers", "2",
                   "--metrics-port", str(metrics), "--worker-start-retries", "1")
    server.target()
    with taken_after_the_check(metrics + 1):
        assert server.wait(120) == 1
    elapsed = time.monotonic() - started
    assert re.search(r"worker 1 \(pid \d+\) died before serving \(2 failed starts in a row\): exit "
                     r"code 2; halting: a worker that cannot start after 1 retries needs an "
                     r"operator", server.log), server.log
    assert re.search(r"worker 0 \(pid \d+\) stopped: exit code 0", server.log), server.log
    report(capsys, f"halt: worker 1 failed 2 starts (1 retry allowed); exit 1 after {elapsed:.1f}s")
