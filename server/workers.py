"""Several server processes on one port (SO_REUSEPORT), as in grpc's multiprocessing example:
the kernel spreads connections over the workers, each with its own event loop and model."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import socket
from dataclasses import replace
from types import FrameType

from server.settings import Settings

logger = logging.getLogger(__name__)


def _reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound with SO_REUSEPORT (not listening) that fixes the port number when it is 0;
    held open while the workers bind the same port."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host.strip("[]"), port, type=socket.SOCK_STREAM
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    return sock


def _worker(settings: Settings, index: int, log_level: str) -> None:
    from server.cli import configure_logging

    configure_logging(log_level, settings.log_format)
    # Share the cores: TensorFlow would otherwise give every worker a thread per core.
    threads = max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("MNIST_WORKERS_TOTAL", 1))))
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(threads))
    from server.app import serve

    logger.info("worker %d (pid %d) starting", index, os.getpid())
    raise SystemExit(asyncio.run(serve(settings, reuse_port=True)))


def _with_metrics_port(settings: Settings, index: int) -> Settings:
    """Worker ``index`` serves its own metrics on PORT+index (each process has its own counters;
    Prometheus scrapes each worker as a target). -1 (off) and 0 (a free port each) stay as is."""
    if settings.metrics_port > 0:
        return replace(settings, metrics_port=settings.metrics_port + index)
    return settings


def run_workers(settings: Settings) -> int:
    """Starts ``settings.workers`` processes, forwards SIGTERM/SIGINT to them and waits; exits 0
    only if every worker did."""
    reserved = _reserve_port(settings.host, settings.port)
    port = reserved.getsockname()[1]
    worker_settings = replace(settings, port=port, workers=1)
    os.environ["MNIST_WORKERS_TOTAL"] = str(settings.workers)
    context = multiprocessing.get_context("spawn")  # never fork a process that may hold TF state
    procs = [
        context.Process(
            target=_worker,
            args=(_with_metrics_port(worker_settings, i), i, settings.log_level),
            name=f"worker-{i}",
        )
        for i in range(settings.workers)
    ]
    logger.info("starting %d workers on %s:%d", settings.workers, settings.host, port)

    def forward(signum: int, _frame: FrameType | None) -> None:
        logger.info("signal %d received: stopping %d workers", signum, len(procs))
        for proc in procs:
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for proc in procs:
            proc.start()
        codes = []
        for proc in procs:
            proc.join()
            codes.append(proc.exitcode)
            if proc.exitcode != 0:  # one worker failed (e.g. no model): stop the others too
                forward(signal.SIGTERM, None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        reserved.close()
    logger.info("all workers stopped: exit codes %s", codes)
    return 0 if all(code == 0 for code in codes) else 1
