"""Big calls on the real LiteRT model (a `python -m server` process serving the tiny model): 64
callers of 1,024-image Predicts, or 64 Evaluate streams of 1,024-image messages, 8x the queue bound
in flight. Health stays responsive (p99 < 200 ms, measured from a channel of its own), the work
beyond the bound is refused with RESOURCE_EXHAUSTED at once, and the queued-images gauge tells the
truth (non-zero while work waits, never above the bound, 0 afterwards). Prints the figures."""

from __future__ import annotations

import asyncio
import collections
import multiprocessing
import re
import threading
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.client import DigitClient, encode_images
from digitserve.v1 import digit_service_pb2 as pb
from digitserve.v1 import digit_service_pb2_grpc as pb_grpc
from tests.conftest import ServerProcess

CALLERS = 64
IMAGES = 1024
MAX_QUEUED = 8192  # the server's default --max-queued-images: 8 calls of 1,024 images
DURATION = 4.0


def load(target: str, kind: str, callers: int, duration: float) -> list[tuple[str, float]]:
    """``callers`` closed-loop callers for ``duration`` seconds, each sending 1,024-image Predicts
    or Evaluate streams of one 1,024-image message, backing off after a refusal: (code,
    seconds) per call."""
    rng = np.random.default_rng(0)
    images = encode_images(rng.integers(0, 256, size=(IMAGES, 784), dtype=np.uint8))
    labels = rng.integers(0, 10, size=IMAGES).tolist()
    predict = pb.PredictRequest(images=images)
    message = pb.EvaluateRequest(images=images, labels=labels)
    outcomes: list[tuple[str, float]] = []

    async def run() -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.DigitServiceStub(channel)
            end = time.perf_counter() + duration

            async def messages() -> AsyncIterator[pb.EvaluateRequest]:
                yield message

            async def caller() -> None:
                refusals = 0
                while time.perf_counter() < end:
                    started = time.perf_counter()
                    try:
                        if kind == "predict":
                            await stub.Predict(predict, timeout=60)
                        else:
                            await stub.Evaluate(messages(), timeout=60)
                        code = "OK"
                    except grpc.aio.AioRpcError as exc:
                        code = exc.code().name
                    outcomes.append((code, time.perf_counter() - started))
                    # Retry with backoff, as the refusal asks: exponential from 0.1 s to 2 s,
                    # as mnist-client's retry policy does for UNAVAILABLE.
                    refusals = 0 if code == "OK" else refusals + 1
                    if refusals:
                        await asyncio.sleep(min(2.0, 0.1 * 2 ** (refusals - 1)))

            await asyncio.gather(*(caller() for _ in range(callers)))

    asyncio.run(run())
    return outcomes


def queued_images(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    match = re.search(r"^digitserve_queued_images ([0-9.e+]+)$", text, re.M)
    assert match, text
    return float(match.group(1))


@pytest.mark.parametrize("kind", ["predict", "evaluate"])
def test_big_calls_leave_health_responsive_and_excess_is_refused_fast(
    spawn: type[ServerProcess], tiny_repo: Path, kind: str, capsys: pytest.CaptureFixture[str],
) -> None:
    server = spawn("--model-repo", str(tiny_repo), "--model-name", "tiny", "--metrics-port", "0",
                   "--max-queued-images", str(MAX_QUEUED))
    target = server.target()
    with DigitClient(target, timeout=60) as client:
        assert client.wait_until_serving(90) == "SERVING"
    port_line = re.search(r"metrics on http://[\d.]+:(\d+)/metrics", server.log)
    assert port_line, server.log
    metrics_port = int(port_line.group(1))
    health_ms: list[float] = []
    health_codes: collections.Counter[str] = collections.Counter()
    gauge: list[float] = []
    stop = threading.Event()

    def check_health() -> None:
        with grpc.insecure_channel(target) as channel:  # a channel of its own
            stub = health_pb2_grpc.HealthStub(channel)
            stub.Check(health_pb2.HealthCheckRequest(), timeout=10)  # connected
            while not stop.is_set():
                started = time.perf_counter()
                response = stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
                health_codes[health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)] += 1
                health_ms.append((time.perf_counter() - started) * 1000)
                stop.wait(0.02)

    def watch_gauge() -> None:
        while not stop.is_set():
            gauge.append(queued_images(metrics_port))
            stop.wait(0.01)

    threads = [threading.Thread(target=check_health), threading.Thread(target=watch_gauge)]
    for t in threads:
        t.start()
    # The callers run in another process, so they don't compete with the checks for this GIL.
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        outcomes = pool.apply(load, (target, kind, CALLERS, DURATION))
    stop.set()
    for t in threads:
        t.join(30)
    after = queued_images(metrics_port)
    codes = collections.Counter(code for code, _ in outcomes)
    ok = np.array([t for code, t in outcomes if code == "OK"]) * 1000
    refused = np.array([t for code, t in outcomes if code == "RESOURCE_EXHAUSTED"]) * 1000
    health = np.array(health_ms)

    def pct(values: np.ndarray, q: float) -> float:
        return float(np.percentile(values, q)) if len(values) else float("nan")

    with capsys.disabled():
        print(f"\n{kind}: {CALLERS} callers of {IMAGES}-image "
              f"{'Predicts' if kind == 'predict' else 'Evaluate streams'} for "
              f"{DURATION:.0f}s, queue bound {MAX_QUEUED} images; calls {dict(codes)}; OK p50 "
              f"{pct(ok, 50):.0f} ms; RESOURCE_EXHAUSTED p50 {pct(refused, 50):.1f} ms, p99 "
              f"{pct(refused, 99):.1f} ms; health {len(health)} checks {dict(health_codes)} p50 "
              f"{pct(health, 50):.1f} ms, p99 {pct(health, 99):.1f} ms, max {pct(health, 100):.1f} "
              f"ms; queued-images gauge "
              f"max {max(gauge):.0f} over {len(gauge)} scrapes, {after:.0f} after")
    assert set(health_codes) == {"SERVING"}, health_codes
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert codes["OK"] >= CALLERS and codes["RESOURCE_EXHAUSTED"] >= CALLERS, codes
    # Fast: a refusal does no model work and waits for none, so it takes at most half the median
    # accepted call and well under a second even on this loaded machine.
    assert np.percentile(refused, 50) * 2 < np.percentile(ok, 50)
    assert np.percentile(refused, 99) < 1000
    assert len(health) > 50 and np.percentile(health, 99) < 200
    assert 0 < max(gauge) <= MAX_QUEUED
    assert after == 0
