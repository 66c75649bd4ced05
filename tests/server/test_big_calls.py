"""Big calls on the real LiteRT model (the tiny model served as production serves it, by an
in-process App): 64 callers of 1,024-image Predicts, or 64 Evaluate streams of 1,024-image
messages, 8x the queue bound in flight. No big model call runs on the event loop, health stays
SERVING and answers faster than the calls that do model work (measured from a channel of its
own), the work beyond the bound is refused with RESOURCE_EXHAUSTED faster than work is served,
and the queued-images gauge tells the truth (non-zero while work waits, never above the bound, 0
afterwards). Prints the figures: latencies and the event loop's timer lag are reported, never
asserted against a clock (``python -m bench.big_calls`` measures them on a server process)."""

from __future__ import annotations

import asyncio
import collections
import multiprocessing
import re
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.big_calls import load
from tests.servers import ServerThread

CALLERS = 64
IMAGES = 1024
MAX_QUEUED = 8192  # the server's default --max-queued-images: 8 calls of 1,024 images
DURATION = 4.0


def queued_images(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    match = re.search(r"^digitserve_queued_images ([0-9.e+]+)$", text, re.M)
    assert match, text
    return float(match.group(1))


class Recorded:
    """The served model, recording on which thread each call ran and its size
    (start_server(wrap=Recorded) wraps the model loaded from the repository, past the gate)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.spec, self.metadata, self.inline = model.spec, model.metadata, model.inline
        self.inference_path = model.inference_path
        self.calls: list[tuple[int, int]] = []  # (thread id, images)
        self.seconds: list[tuple[int, float]] = []  # (images, seconds) of each call

    def predict(self, images: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        self.calls.append((threading.get_ident(), images.shape[0]))
        started = time.perf_counter()
        result: npt.NDArray[np.float32] = self.model.predict(images)
        self.seconds.append((images.shape[0], time.perf_counter() - started))
        return result


@pytest.mark.parametrize("kind", ["predict", "evaluate"])
def test_big_calls_leave_health_responsive_and_excess_is_refused_fast(
    start_server: Callable[..., ServerThread], kind: str, capsys: pytest.CaptureFixture[str],
) -> None:
    server = start_server(wrap=Recorded, metrics_port=0, max_queued_images=MAX_QUEUED)
    model = server.model
    assert isinstance(model, Recorded) and model.inference_path == "litert"
    target = server.target
    metrics_port = server.app.metrics_port
    assert metrics_port
    # The most images of a call run on the event loop (f2f0df1 has no such limit: every call).
    limit = getattr(server.plane.batcher, "inline_limits", {}).get(model, 0)
    model.calls.clear()
    lag_ms: list[float] = []

    async def beat() -> None:  # how late the event loop runs a 2 ms timer
        while True:
            started = time.perf_counter()
            await asyncio.sleep(0.002)
            lag_ms.append((time.perf_counter() - started - 0.002) * 1000)

    beating = asyncio.run_coroutine_threadsafe(beat(), server.loop)
    control_ms: list[float] = []
    control_loop = asyncio.new_event_loop()

    async def control_beat() -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(0.002)
            control_ms.append((time.perf_counter() - started - 0.002) * 1000)

    control_thread = threading.Thread(target=control_loop.run_forever, daemon=True)
    control_thread.start()
    control = asyncio.run_coroutine_threadsafe(control_beat(), control_loop)
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

    threads = [threading.Thread(target=check_health, daemon=True),
               threading.Thread(target=watch_gauge, daemon=True)]
    for t in threads:
        t.start()
    # The callers run in another process, so they don't compete with the checks for this GIL.
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        outcomes = pool.apply(load, (target, kind, CALLERS, DURATION))
    stop.set()
    for t in threads:
        t.join(30)
    beating.cancel()
    control.cancel()
    control_loop.call_soon_threadsafe(control_loop.stop)
    control_thread.join(10)
    control_loop.close()  # else collected later, in whichever test runs then: unraisable warnings
    big = [sec * 1000 for n, sec in model.seconds if n == IMAGES]
    ctl = np.array(control_ms)
    on_loop = [n for thread, n in model.calls if thread == server.thread.ident]
    lag = np.array(lag_ms)
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
              f"ms; event loop: {len(on_loop)} model calls on it (largest "
              f"{max(on_loop, default=0)} images, inline limit {limit}), {len(model.calls) - len(on_loop)} "
              f"on the model thread, timer lag p99 {pct(lag, 99):.1f} ms, max {pct(lag, 100):.1f} ms "
              f"(a loop of its own: p99 {pct(ctl, 99):.1f} ms, max {pct(ctl, 100):.1f} ms); {len(big)} "
              f"{IMAGES}-image model calls p50 {pct(np.array(big), 50):.1f} ms; "
              f"queued-images gauge "
              f"max {max(gauge):.0f} over {len(gauge)} scrapes, {after:.0f} after")
    assert max(on_loop, default=0) <= limit  # no big model call ever ran on the event loop
    assert 0 < limit < IMAGES
    assert set(health_codes) == {"SERVING"}, health_codes
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert codes["OK"] >= CALLERS and codes["RESOURCE_EXHAUSTED"] >= CALLERS, codes
    assert server.plane.batcher.stats.rejected == codes["RESOURCE_EXHAUSTED"]
    # No clock in pass/fail (the machine is shared: at a load average of 7-15 the event loop's
    # timer lag p99 reached 51 ms and a refusal's p99 1.5 s with nothing wrong), only figures of
    # the same run against each other. A refusal waits for no model work, so it takes less than
    # the median accepted call (both include sending ~800 KB among 64 such streams, most of the
    # time on this machine). A health check waits for no model work either, from a channel of
    # its own on the same event loop: its median is below the median accepted call's. The timer
    # lags are printed, with those of a loop in a thread of its own in this process (what the
    # machine and the GIL alone cost it) beside them.
    assert pct(refused, 50) < pct(ok, 50)
    assert len(health) >= 10 and pct(health, 50) < pct(ok, 50)
    assert 0 < max(gauge) <= MAX_QUEUED
    assert after == 0
