"""Fault tests with figures: a burst far above capacity, SIGTERM under load, and a replica process
SIGKILLed under round_robin load. Each prints calls sent, calls failed, errors by code and recovery time."""

from __future__ import annotations

import asyncio
import collections
import multiprocessing
import re
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest

from digitserve.client.client import DigitClient, encode_images
from digitserve.client.errors import CallError
from digitserve.v1 import digit_service_pb2 as pb
from digitserve.v1 import digit_service_pb2_grpc as pb_grpc
from tests.servers import ServerProcess, ServerThread
from tests.support import FakeModel, PeakMemory, in_flight, wait_for


def report(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with capsys.disabled():
        print(f"\n{text}")


class CostlyModel(FakeModel):
    """A fake model whose every call takes 50 ms, so a burst overflows its queue: a fake on
    purpose, whose every call, however small, goes through the queue to the model thread.
    ``seconds``: the wall time of each call."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []

    def predict(self, images: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        started = time.perf_counter()
        time.sleep(0.05)
        result = super().predict(images)
        self.seconds.append(time.perf_counter() - started)
        return result


def overload(target: str, callers: int, duration: float) -> list[tuple[str, float]]:
    """``callers`` closed-loop Predict callers for ``duration`` seconds: (code, seconds) per call."""
    images = np.random.default_rng(0).integers(0, 256, size=(callers, 784), dtype=np.uint8)
    requests = [pb.PredictRequest(images=encode_images(images[i])) for i in range(callers)]
    outcomes: list[tuple[str, float]] = []

    async def run() -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.DigitServiceStub(channel)
            end = time.perf_counter() + duration

            async def caller(request: pb.PredictRequest) -> None:
                while time.perf_counter() < end:
                    started = time.perf_counter()
                    try:
                        await stub.Predict(request, timeout=30)
                        code = "OK"
                    except grpc.aio.AioRpcError as exc:
                        code = exc.code().name
                    outcomes.append((code, time.perf_counter() - started))

            await asyncio.gather(*(caller(r) for r in requests))

    asyncio.run(run())
    return outcomes


class CostlyLiteRT:
    """The tiny model as production serves it (the LiteRT interpreter, ``inline`` as loaded;
    start_server(wrap=CostlyLiteRT) wraps it past the gate), whose every call takes 50 ms more,
    so a burst overflows its queue. ``seconds``: the wall time of each call."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.spec, self.metadata, self.inline = model.spec, model.metadata, model.inline
        self.inference_path = model.inference_path
        self.seconds: list[float] = []

    def predict(self, images: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        started = time.perf_counter()
        time.sleep(0.05)
        result: npt.NDArray[np.float32] = self.model.predict(images)
        self.seconds.append(time.perf_counter() - started)
        return result


@pytest.mark.parametrize("path", ["fake", "litert"])
def test_overload_far_above_capacity_is_refused_fast_and_the_rest_stay_bounded(
    start_server: Callable[..., ServerThread], capsys: pytest.CaptureFixture[str], path: str,
) -> None:
    # Capacity: 16 images per 50 ms model call = 320 images/s; the queue holds 64 images (4
    # calls' worth). 200 callers in a closed loop ask for far more.
    limits = {"max_batch_size": 16, "max_queued_images": 64, "max_images_per_request": 16}
    if path == "fake":
        server = start_server(CostlyModel, **limits)  # a fake on purpose: see CostlyModel
    else:
        server = start_server(wrap=CostlyLiteRT, **limits)
        assert isinstance(server.model, CostlyLiteRT)
    callers, duration = 200, 3.0
    memory = PeakMemory()  # the server runs in this process, its callers in another
    # The callers run in another process, so they don't compete with the server for this GIL.
    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        outcomes = pool.apply(overload, (server.target, callers, duration))
    elapsed = time.perf_counter() - started
    images = np.zeros((1, 784), np.uint8)
    rss_growth_mb = memory.growth_mb()
    codes = collections.Counter(code for code, _ in outcomes)
    ok = np.sort([t for code, t in outcomes if code == "OK"]) * 1000
    refused = np.sort([t for code, t in outcomes if code == "RESOURCE_EXHAUSTED"]) * 1000
    assert set(codes) == {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert len(refused) > 100 and len(ok) > 100
    # An accepted call waits behind at most 64 queued images (4 model calls) plus the one running,
    # then its own: 6 model calls at most, besides what a call costs without model work (a
    # refusal's). Scaled by the model calls and refusals of this run, not by a clock (on a busy
    # machine every figure grows), with a margin of 2 for the noise of a percentile.
    model = server.model
    assert isinstance(model, CostlyModel | CostlyLiteRT)
    model_ms = np.percentile(model.seconds, 99) * 1000
    bound_ms = 2 * (np.percentile(refused, 99) + 6 * model_ms)
    assert np.percentile(ok, 99) < bound_ms
    assert np.percentile(refused, 50) * 2 < np.percentile(ok, 50)
    assert rss_growth_mb < 200
    with DigitClient(server.target) as client:
        assert client.health() == "SERVING" and client.predict(images[0]).model_version == 1
    report(capsys, f"overload ({path}): {callers} callers for {elapsed:.1f}s, {len(outcomes)} calls; "
                   f"{len(ok)} served (p50 {np.percentile(ok, 50):.0f} ms, p99 "
                   f"{np.percentile(ok, 99):.0f} ms, bound {bound_ms:.0f} ms from {len(model.seconds)} "
                   f"model calls of p99 {model_ms:.0f} ms), {len(refused)} RESOURCE_EXHAUSTED (p50 "
                   f"{np.percentile(refused, 50):.1f} ms, p99 {np.percentile(refused, 99):.1f} ms); "
                   f"errors by code {dict(codes)}; peak RSS growth {rss_growth_mb:.0f} MB; "
                   f"healthy and serving afterwards")


def test_sigterm_under_load_fails_no_in_flight_call(
    spawn: type[ServerProcess], tiny_repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = spawn("--model-repo", str(tiny_repo), "--model-name", "tiny", "--grace-period", "10",
                   "--metrics-port", "0")
    target = server.target()
    metrics_port = server.metrics_port()
    with DigitClient(target, timeout=60) as client:
        assert client.wait_until_serving(90) == "SERVING"
    images = np.random.default_rng(1).integers(0, 256, size=(512, 784), dtype=np.uint8)
    labels = np.random.default_rng(2).integers(0, 10, size=512)
    calls: list[tuple[float, float, str]] = []  # Predict load: (start, end, code)
    stop = threading.Event()

    def load(seed: int) -> None:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.DigitServiceStub(channel)
            i = seed
            while not stop.is_set() and i < seed + 100_000:
                request = pb.PredictRequest(images=encode_images(images[i % 64: i % 64 + 8]))
                started = time.monotonic()
                try:
                    stub.Predict(request, timeout=20)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                calls.append((started, time.monotonic(), code))
                if code != "OK":
                    time.sleep(0.05)
                i += 1

    # Calls surely in flight at the signal: Evaluate streams that sent their first batch well
    # before it and send the rest only after it.
    first_sent = [threading.Event() for _ in range(4)]
    resume = threading.Event()

    def stream(k: int) -> Iterator[pb.EvaluateRequest]:
        for start in range(0, 512, 128):
            yield pb.EvaluateRequest(images=encode_images(images[start:start + 128]),
                                     labels=labels[start:start + 128].tolist())
            first_sent[k].set()
            resume.wait(30)

    threads = [threading.Thread(target=load, args=(k * 1000,), daemon=True) for k in range(6)]
    for t in threads:
        t.start()
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.DigitServiceStub(channel)
        streams = [stub.Evaluate.future(stream(k), timeout=60) for k in range(4)]
        assert all(event.wait(30) for event in first_sent)
        # The server holds the 4 streams, and the Predict load is flowing.
        wait_for(lambda: in_flight(metrics_port, "Evaluate") == 4, 30, "4 Evaluate calls in flight")
        wait_for(lambda: sum(1 for c in calls if c[2] == "OK") >= 100, 60, "100 Predict calls")
        sigterm = time.monotonic()
        server.send_signal(signal.SIGTERM)
        # The streams send the rest of their messages once the drain has begun (new calls are
        # refused meanwhile).
        wait_for(lambda: "signal received: draining" in server.log, 30, "the drain to begin")
        resume.set()
        results = []
        for future in streams:
            try:
                results.append(future.result(30).count)
            except grpc.RpcError as exc:
                results.append(exc.code().name)
    code = server.wait(30)
    exited = time.monotonic()
    stop.set()
    for t in threads:
        t.join(30)
    assert code == 0
    assert results == [512] * 4  # every in-flight call completed, with all its images
    before = collections.Counter(c[2] for c in calls if c[1] < sigterm)
    after = collections.Counter(c[2] for c in calls if c[0] >= sigterm)
    racing = collections.Counter(c[2] for c in calls if c[0] < sigterm <= c[1])
    assert set(before) == {"OK"}
    # New calls are refused while the server drains: UNAVAILABLE, or CANCELLED for one the
    # transport had accepted but the server had not started when it stopped taking calls.
    assert set(after) <= {"OK", "UNAVAILABLE", "CANCELLED"}
    assert exited - sigterm < 10
    report(capsys, f"SIGTERM under load: 4 Evaluate streams in flight at the signal, "
                   f"{results.count(512)} completed with all 512 images; Predict load: "
                   f"{len(calls)} calls, finished before the signal {dict(before)}, racing it "
                   f"{dict(racing)}, started after it {dict(after)}; exit 0 after "
                   f"{exited - sigterm:.2f}s (grace 10 s)")


def predicts_served(replica: ServerProcess) -> int:
    """Predict calls a replica answered OK, from its Prometheus endpoint (``--metrics-port 0``)."""
    port = re.search(r"metrics on http://127.0.0.1:(\d+)/metrics", replica.log)
    assert port, replica.log
    with urllib.request.urlopen(f"http://127.0.0.1:{port.group(1)}/metrics", timeout=10) as page:
        text = page.read().decode()
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith("grpc_server_handled_total{") and 'grpc_method="Predict"' in line
               and 'grpc_code="OK"' in line)


def test_round_robin_over_three_replicas_survives_a_killed_one(
    spawn: type[ServerProcess], tiny_repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    replicas = [spawn("--model-repo", str(tiny_repo), "--model-name", "tiny", "--metrics-port", "0")
                for _ in range(3)]
    target = "ipv4:" + ",".join(r.target() for r in replicas)
    for replica in replicas:
        with DigitClient(replica.target(), timeout=30) as one:
            assert one.wait_until_serving(90) == "SERVING"
    images = np.random.default_rng(2).integers(0, 256, size=(16, 784), dtype=np.uint8)
    codes: collections.Counter[str] = collections.Counter()
    failures_after_kill: list[float] = []
    with DigitClient(target, timeout=5) as client:
        for i in range(300):
            client.predict(images[i % 16])
            codes["OK"] += 1
        served_before = [predicts_served(r) for r in replicas]
        assert all(n > 50 for n in served_before), served_before
        killed_at = time.monotonic()
        replicas[1].kill()  # SIGKILL: no GOAWAY, its connections are cut by the kernel
        recovered_at = None
        for i in range(600):
            try:
                client.predict(images[i % 16])
                codes["OK"] += 1
                if recovered_at is None:
                    recovered_at = time.monotonic()
            except CallError as exc:
                codes[exc.code().name] += 1
                failures_after_kill.append(time.monotonic() - killed_at)
    survivors = [predicts_served(replicas[k]) - served_before[k] for k in (0, 2)]
    assert all(n > 200 for n in survivors), survivors
    assert sum(survivors) == 600 - len(failures_after_kill)
    assert len(failures_after_kill) <= 5
    assert recovered_at is not None
    report(capsys, f"round_robin over 3 replica processes, one SIGKILLed: {sum(codes.values())} calls, "
                   f"codes {dict(codes)}; before the kill each replica served {served_before}; after "
                   f"it the survivors served {survivors}; {len(failures_after_kill)} calls failed "
                   f"while it recovered; first success {(recovered_at - killed_at) * 1000:.1f} ms "
                   f"after the kill")
