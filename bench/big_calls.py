"""Big calls, in absolute figures: a digitserve server process under 64 closed-loop callers of
1,024-image Predicts (or Evaluate streams of one 1,024-image message), 8x its queue bound in
flight, with gRPC health checked from a channel of its own meanwhile.

    python -m bench.big_calls --model-repo out/bench-repo --model-name mnist [--kind evaluate]
        [--duration 10] [--callers 64] [--images 1024] [--pin] [--json]

Prints the calls by code, the latency of the served calls and of the refusals (RESOURCE_EXHAUSTED),
and the health checks' latency: the figures tests/server/test_big_calls.py prints but asserts only
against each other (refusals faster than served calls, health faster than them), since on a shared
machine any absolute bound fails with nothing wrong. ``--pin`` runs the server on CPU 0 and the
callers on CPU 1 (``taskset``), as bench.pinned does, for figures comparable between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.servers import BenchError, RunningServer, ServerSpec, free_port
from digitserve.client.client import encode_images
from digitserve.v1 import digit_service_pb2 as pb
from digitserve.v1 import digit_service_pb2_grpc as pb_grpc

PROG = "python -m bench.big_calls"


def load(target: str, kind: str, callers: int, duration: float,
         images: int = 1024) -> list[tuple[str, float]]:
    """``callers`` closed-loop callers for ``duration`` seconds, each sending ``images``-image
    Predicts (``kind`` "predict") or Evaluate streams of one such message ("evaluate"), backing
    off after a refusal: (code, seconds) per call. On a machine too busy to reach ``callers``
    answers and ``callers`` refusals in that time, it goes on until it has (at most 8 times as
    long), so the figures always rest on as many calls."""
    rng = np.random.default_rng(0)
    encoded = encode_images(rng.integers(0, 256, size=(images, 784), dtype=np.uint8))
    labels = rng.integers(0, 10, size=images).tolist()
    predict = pb.PredictRequest(images=encoded)
    message = pb.EvaluateRequest(images=encoded, labels=labels)
    outcomes: list[tuple[str, float]] = []

    async def run() -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.DigitServiceStub(channel)  # type: ignore[no-untyped-call]
            end = time.perf_counter() + duration

            async def messages() -> AsyncIterator[pb.EvaluateRequest]:
                yield message

            def enough() -> bool:
                codes = collections.Counter(code for code, _ in outcomes)
                return codes["OK"] >= callers and codes["RESOURCE_EXHAUSTED"] >= callers

            async def caller() -> None:
                refusals = 0
                while time.perf_counter() < end or (
                        time.perf_counter() < end + 7 * duration and not enough()):
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


def _pinned_load(cpu: int | None, *args: Any) -> list[tuple[str, float]]:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    return load(*args)


def percentiles(values_s: Sequence[float]) -> dict[str, float | None]:
    """p50, p99 and max in milliseconds (None without values)."""
    ms = np.asarray(values_s, dtype=np.float64) * 1000
    if not len(ms):
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    return {"p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1), "max_ms": round(float(ms.max()), 1)}


def measure(target: str, kind: str, callers: int, duration: float, images: int,
            load_cpu: int | None = None) -> dict[str, Any]:
    """The load in another process, health checked from this one meanwhile: the figures."""
    health: list[float] = []
    statuses: collections.Counter[str] = collections.Counter()
    stop = threading.Event()

    def check_health() -> None:
        with grpc.insecure_channel(target) as channel:  # a channel of its own
            stub = health_pb2_grpc.HealthStub(channel)
            stub.Check(health_pb2.HealthCheckRequest(), timeout=10)  # connected
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    response = stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
                    statuses[health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)] += 1
                except grpc.RpcError as exc:
                    statuses[exc.code().name] += 1
                health.append(time.perf_counter() - started)
                stop.wait(0.02)

    checker = threading.Thread(target=check_health, daemon=True)
    checker.start()
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        outcomes = pool.apply(_pinned_load, (load_cpu, target, kind, callers, duration, images))
    stop.set()
    checker.join(30)
    codes = collections.Counter(code for code, _ in outcomes)
    return {
        "kind": kind, "callers": callers, "images": images, "duration_s": duration,
        "calls": dict(codes),
        "served": percentiles([t for code, t in outcomes if code == "OK"]),
        "refused": percentiles([t for code, t in outcomes if code == "RESOURCE_EXHAUSTED"]),
        "health": {"checks": dict(statuses), **percentiles(health)},
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repo", type=Path, required=True, help="model repository")
    parser.add_argument("--model-name", default="mnist", help="model name in the repository")
    parser.add_argument("--kind", choices=["predict", "evaluate"], default="predict",
                        help="what each caller sends (default: %(default)s)")
    parser.add_argument("--callers", type=int, default=64, help="callers in a closed loop")
    parser.add_argument("--images", type=int, default=1024, help="images per call")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load")
    parser.add_argument("--max-queued-images", type=int, default=8192,
                        help="the server's --max-queued-images (default: its default, 8192)")
    parser.add_argument("--pin", action="store_true",
                        help="server on CPU 0, callers on CPU 1 (needs 2 CPUs)")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.pin and len(os.sched_getaffinity(0)) < 2:
        print(f"{PROG}: error: --pin needs 2 CPUs, this process may use "
              f"{len(os.sched_getaffinity(0))}", file=sys.stderr)
        return 2
    port = free_port()
    argv_ = [sys.executable, "-m", "digitserve.server", "--model-repo", str(args.model_repo),
             "--model-name", args.model_name, "--port", str(port),
             "--max-queued-images", str(args.max_queued_images)]
    if args.pin:
        argv_ = ["taskset", "-c", "0", *argv_]
    with tempfile.TemporaryDirectory() as scratch:
        server = RunningServer(ServerSpec("digitserve", "ours", argv_), port,
                               Path(scratch) / "server.log")
        try:
            server.wait_serving(args.startup_timeout)
            result = measure(server.target, args.kind, args.callers, args.duration, args.images,
                             1 if args.pin else None)
        except BenchError as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return 1
        finally:
            server.stop()
    if args.json:
        print(json.dumps(result))
    else:
        served, refused, health = result["served"], result["refused"], result["health"]
        print(f"{args.kind}: {args.callers} callers of {args.images}-image calls for "
              f"{args.duration:g}s; calls {result['calls']}; served p50 {served['p50_ms']} ms, p99 "
              f"{served['p99_ms']} ms; RESOURCE_EXHAUSTED p50 {refused['p50_ms']} ms, p99 "
              f"{refused['p99_ms']} ms; health {health['checks']} p50 {health['p50_ms']} ms, p99 "
              f"{health['p99_ms']} ms, max {health['max_ms']} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
