"""Calls racing SIGTERM: several drains of a real server process under a closed loop of DigitClient
Predict calls, with a second replica behind round_robin; no call may be lost."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest

from client.client import DigitClient
from tests.conftest import ServerProcess

DRAINS = 4
CALLERS = 8


def report(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with capsys.disabled():
        print(f"\n{text}")


def test_calls_racing_sigterm_are_never_lost(
    spawn: type[ServerProcess], tiny_repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ("--model-repo", str(tiny_repo), "--model-name", "tiny", "--grace-period", "10")
    replicas = [spawn(*args), spawn(*args)]
    ports = []
    for replica in replicas:
        replica.target()
        ports.append(replica.port)
    target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in ports)
    calls: list[tuple[float, float, str]] = []  # (start, end, code)
    stop = threading.Event()
    image = np.zeros(784, np.uint8)

    with DigitClient(target, timeout=30) as client:
        for port in ports:
            with DigitClient(f"127.0.0.1:{port}") as one:
                assert one.wait_until_serving(90) == "SERVING"

        def caller() -> None:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    client.predict(image)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                calls.append((started, time.monotonic(), code))

        threads = [threading.Thread(target=caller) for _ in range(CALLERS)]
        for thread in threads:
            thread.start()
        figures = []
        try:
            for drain in range(DRAINS):
                victim = drain % 2
                time.sleep(1.0)  # full speed over both replicas
                signalled = time.monotonic()
                replicas[victim].proc.send_signal(signal.SIGTERM)
                assert replicas[victim].wait(30) == 0
                exited = time.monotonic()
                time.sleep(0.3)
                window = [c for c in calls if signalled - 1 <= c[0] < exited + 0.3]
                racing = [c for c in window if c[0] < signalled <= c[1]]
                codes = Counter(c[2] for c in window)
                rate = sum(1 for c in calls if signalled - 1 <= c[1] < signalled)
                figures.append(f"drain {drain + 1}: {rate} calls/s before the signal, "
                               f"{len(window)} calls from 1 s before it to the exit, {len(racing)} "
                               f"racing it, codes {dict(codes)}, exit 0 after "
                               f"{exited - signalled:.2f}s")
                # The drained replica comes back on the same port for the next round.
                replicas[victim] = spawn(*args, "--port", str(ports[victim]))
                replicas[victim].target()
                with DigitClient(f"127.0.0.1:{ports[victim]}") as one:
                    assert one.wait_until_serving(90) == "SERVING"
        finally:
            stop.set()
            for thread in threads:
                thread.join(60)
    codes = Counter(c[2] for c in calls)
    report(capsys, f"SIGTERM drains of one of 2 replicas under round_robin, {CALLERS} closed-loop "
                   f"callers: {len(calls)} calls, codes {dict(codes)}\n  " + "\n  ".join(figures))
    assert set(codes) == {"OK"}, codes
