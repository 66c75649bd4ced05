"""Several server processes on one port (SO_REUSEPORT), supervised like gunicorn's arbiter: the
kernel spreads connections over the workers; the parent restarts a worker that dies (with backoff),
halts when one keeps failing to start, forwards SIGHUP (reload) and SIGTERM/SIGINT (drain), and the
workers die with it (PR_SET_PDEATHSIG)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from multiprocessing.process import BaseProcess
from types import FrameType

from digitserve.server.ports import ListenError, check_worker_metrics_ports, reserve_shared_port
from digitserve.server.settings import Settings
from digitserve.server.slot import SERVING, STARTING, WorkerSlot

logger = logging.getLogger(__name__)

FIRST_BACKOFF, MAX_BACKOFF = 0.5, 30.0
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int) -> bool:
    """Asks Linux to send this process SIGTERM (a drain) when its parent dies; False if the parent
    is already gone."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            logger.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    return os.getppid() == parent_pid


def _worker(settings: Settings, slot: WorkerSlot, log_level: str) -> None:
    from digitserve.server.logs import configure_logging

    configure_logging(log_level, settings.log_format, access=settings.access_log)
    # A group of its own: Ctrl-C in a terminal reaches the parent only, which forwards it once (a
    # second SIGINT would mean "stop at once").
    os.setpgrp()
    if not die_with_parent(slot.parent_pid):
        logger.error("worker %d (pid %d): its parent %d is gone; not starting", slot.index, os.getpid(),
                     slot.parent_pid)
        raise SystemExit(1)
    # Share the cores: TensorFlow would otherwise give every worker a thread per core.
    threads = max(1, (os.cpu_count() or 1) // slot.total)
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(threads))
    from digitserve.server.app import run_process

    logger.info("worker %d (pid %d) starting", slot.index, os.getpid())
    raise SystemExit(run_process(settings, reuse_port=True, worker=slot))


def _with_metrics_port(settings: Settings, index: int) -> Settings:
    """Worker ``index`` serves its own metrics (its own counters, a Prometheus target) on PORT+index;
    -1 (off) and 0 (a free port each) stay as is."""
    first = settings.metrics_port
    return replace(settings, metrics_port=first + index) if first > 0 else settings


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by signal {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"


@dataclass
class _Worker:
    index: int
    proc: BaseProcess | None = None
    started_at: float = 0.0
    serving: bool = False
    start_failures: int = 0  # in a row, before serving
    restart_at: float | None = None
    died_at: float | None = None
    exits: list[int | None] = field(default_factory=list)
    beats: int = 0  # its heartbeat counter when the arbiter last saw it move
    beat_at: float = 0.0  # when that was (time.monotonic())
    silenced: bool = False  # killed for a silent heartbeat, not yet reaped


class Arbiter:
    """Starts ``settings.workers`` processes and keeps them running until SIGTERM/SIGINT."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.context = multiprocessing.get_context("spawn")  # never fork a process that may hold TF state
        self.reserved = reserve_shared_port(settings.host, settings.port)  # ListenError: taken
        self.port = self.reserved.getsockname()[1]
        # --http-port is shared the same way: one address for clients, probes and Services.
        self.reserved_http, http_port = None, settings.http_port
        if settings.http_port >= 0:
            try:
                self.reserved_http = reserve_shared_port(settings.host, settings.http_port, "--http-port")
            except ListenError:
                self.reserved.close()
                raise
            http_port = self.reserved_http.getsockname()[1]
        self.worker_settings = replace(settings, port=self.port, http_port=http_port, workers=1)
        self.states = self.context.RawArray("b", settings.workers)
        self.heartbeats = self.context.RawArray("Q", settings.workers)  # WorkerSlot.beat
        self.workers = [_Worker(i) for i in range(settings.workers)]
        self.stop_signals, self.halted = 0, False

    # --- signals (run in the main thread, between the loop's waits) ------------------------------

    def _send(self, signum: int) -> int:
        sent = 0
        for worker in self.workers:
            proc = worker.proc
            if proc is not None and proc.pid is not None and proc.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signum)
                    sent += 1
        return sent

    def _on_stop(self, signum: int, _frame: FrameType | None) -> None:
        self.stop_signals += 1
        name = signal.Signals(signum).name
        if self.stop_signals == 1:
            logger.info("%s received: draining %d workers", name, self._send(signum))
        else:
            logger.warning("%s received again: the workers stop at once", name)
            self._send(signum)

    def _on_hup(self, _signum: int, _frame: FrameType | None) -> None:
        if not self.stop_signals:
            sent = self._send(signal.SIGHUP)
            logger.info("SIGHUP received: %d workers look for a new model version now", sent)

    # --- the pool ---------------------------------------------------------------------------------

    def _spawn(self, worker: _Worker) -> None:
        self.states[worker.index] = STARTING
        self.heartbeats[worker.index] = 0
        worker.beats, worker.silenced = 0, False
        slot = WorkerSlot(worker.index, self.states, os.getpid(), self.heartbeats)
        worker.proc = self.context.Process(
            target=_worker,
            args=(_with_metrics_port(self.worker_settings, worker.index), slot, self.settings.log_level),
            name=f"worker-{worker.index}")
        worker.proc.start()
        worker.started_at, worker.serving, worker.restart_at = time.monotonic(), False, None

    def _reap(self, worker: _Worker, now: float) -> None:
        # A worker that marked itself serving and died before the loop noticed still served.
        self._notice_serving(worker, now)
        proc = worker.proc
        assert proc is not None
        code = proc.exitcode
        worker.exits.append(code)
        worker.proc = None
        self.states[worker.index] = STARTING
        if self.stop_signals or self.halted:
            logger.info("worker %d (pid %s) stopped: %s", worker.index, proc.pid, describe_exit(code))
            return
        worker.died_at = now
        if worker.serving:
            worker.start_failures, delay = 0, 0.0
            what = f"after serving for {now - worker.started_at:.1f}s"
        else:
            worker.start_failures += 1
            delay = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (worker.start_failures - 1))
            what = f"before serving ({worker.start_failures} failed starts in a row)"
        if worker.start_failures > self.settings.worker_start_retries:
            logger.error(
                "worker %d (pid %s) died %s: %s; halting: a worker that cannot start after %d "
                "retries needs an operator (see its log lines above)",
                worker.index, proc.pid, what, describe_exit(code), self.settings.worker_start_retries)
            self.halted = True
            self._send(signal.SIGTERM)
            return
        logger.error("worker %d (pid %s) died %s: %s; restarting it in %.1fs",
                     worker.index, proc.pid, what, describe_exit(code), delay)
        worker.restart_at = now + delay

    def _check_heartbeat(self, worker: _Worker, now: float) -> None:
        """SIGKILLs a worker whose loop has not beaten (WorkerSlot.beat) for --worker-heartbeat-timeout
        seconds (stopped or hung, it holds its share of connections unanswered, unseen by waitpid);
        one before its first beat (importing) is not judged."""
        timeout = self.settings.worker_heartbeat_timeout
        proc = worker.proc
        if timeout <= 0 or proc is None or proc.pid is None or worker.silenced:
            return
        beats = self.heartbeats[worker.index]
        if beats != worker.beats:
            worker.beats, worker.beat_at = beats, now
            return
        if beats == 0 or now - worker.beat_at < timeout:
            return
        logger.error("worker %d (pid %d) has been silent for %.1fs (no heartbeat from its event "
                     "loop within --worker-heartbeat-timeout %gs: stopped or hung); killing it "
                     "with SIGKILL", worker.index, proc.pid, now - worker.beat_at, timeout)
        worker.silenced = True
        with contextlib.suppress(ProcessLookupError):  # it died meanwhile: reaped as usual
            os.kill(proc.pid, signal.SIGKILL)

    def _notice_serving(self, worker: _Worker, now: float) -> None:
        if worker.serving or worker.proc is None or self.states[worker.index] != SERVING:
            return
        worker.serving, worker.start_failures = True, 0
        if worker.died_at is not None:
            logger.info("worker %d (pid %s) restarted: serving %.2fs after the previous one died",
                        worker.index, worker.proc.pid, now - worker.died_at)

    def run(self) -> int:
        logger.info("starting %d workers on %s:%d%s", self.settings.workers, self.settings.host, self.port,
                    "" if self.reserved_http is None else
                    f" (HTTP on port {self.worker_settings.http_port}, shared too)")
        handlers = {signal.SIGTERM: self._on_stop, signal.SIGINT: self._on_stop, signal.SIGHUP: self._on_hup}
        previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
        try:
            for worker in self.workers:
                self._spawn(worker)
            while True:
                now = time.monotonic()
                for worker in self.workers:
                    if worker.proc is not None and worker.proc.exitcode is not None:
                        self._reap(worker, now)
                    self._check_heartbeat(worker, now)
                    self._notice_serving(worker, now)
                    if (worker.proc is None and worker.restart_at is not None
                            and worker.restart_at <= now and not (self.stop_signals or self.halted)):
                        self._spawn(worker)
                running = [w.proc.sentinel for w in self.workers if w.proc is not None]
                if not running and (self.stop_signals or self.halted):
                    break
                # Woken by a worker's exit; else a short nap to notice restarts due and readiness.
                multiprocessing.connection.wait(running, timeout=0.1)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.reserved.close()
            if self.reserved_http is not None:
                self.reserved_http.close()
        codes = [w.exits[-1] if w.exits else None for w in self.workers]
        logger.info("all workers stopped: exit codes %s", codes)
        return 0 if not self.halted and all(code == 0 for code in codes) else 1


EXIT_USAGE = 2  # what the flags name is not there (app.EXIT_USAGE, which this module does not import)


def check_before_start(settings: Settings) -> tuple[int, str] | None:
    """What a lone server checks before it listens, checked once for the pool (one line, not one per
    worker and restart): None, or the exit code and the line. Arbiter reserves the gRPC port."""
    from digitserve.repository import RepositoryError
    from digitserve.server.discovery import check_repository
    from digitserve.server.modelconfig import ModelConfigError, from_settings
    from digitserve.server.versions import NothingPublishedError, RepositoryReads, RepositoryTimeoutError

    reads = RepositoryReads(settings.repository_timeout)
    try:
        asyncio.run(check_repository(settings, reads, from_settings(settings)))
    except ModelConfigError as error:
        return EXIT_USAGE, f"cannot start: {error}"
    except RepositoryTimeoutError as error:  # a hung volume: as a lone server's start fails
        return 1, f"cannot load model {', '.join(settings.model_name) or '(any)'}: {error}"
    except NothingPublishedError as error:  # each worker waits for a first version, as a lone server
        if settings.exit_if_no_model:
            return EXIT_USAGE, f"cannot start: {error}"
    except RepositoryError as error:
        return EXIT_USAGE, f"cannot start: {error}"
    try:
        check_worker_metrics_ports(settings.host, settings.metrics_port, settings.workers)
    except ListenError as error:
        return EXIT_USAGE, f"cannot start: {error}"
    return None


def run_workers(settings: Settings) -> int:
    """Runs the supervised pool until SIGTERM/SIGINT; exits 0 only if every worker drained cleanly;
    2 (one line) when the repository holds nothing to serve or a port is taken."""
    if (problem := check_before_start(settings)) is None:
        try:
            arbiter = Arbiter(settings)
        except ListenError as error:
            problem = EXIT_USAGE, f"cannot start: {error}"
        else:
            return arbiter.run()
    code, line = problem
    logging.getLogger("digitserve.server.app").error("%s", line)
    return code
