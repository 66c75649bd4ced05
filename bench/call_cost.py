"""CPU per call of the two Python sides of a Predict, measured in one process with getrusage:

    python -m bench.call_cost server --model-dir out/bench-repo/mnist/1
    python -m bench.call_cost client --target 127.0.0.1:50051 --data-dir data
    python -m bench.call_cost client --target 127.0.0.1:50051 --data-dir data --framing h2lib
    python -m bench.call_cost gc --model-dir out/bench-repo/mnist/1
    python -m bench.call_cost interceptor --calls 20000

``server``: the whole per-call path of mnist-serve in-process — request id, metrics, access line
(formatted and buffered as in the server, written to /dev/null), parsing the request's bytes with
the server's deserializer, validation, the model
(as loaded by the server), the reply — with a stand-in for gRPC's servicer context, so what gRPC
itself costs is left out. ``client``: ``mnist-client loadtest`` (one process, 64 in flight, engine
h2 or grpc) against a running server; the client's whole transport included; ``--framing h2lib``
runs engine h2's calls over python-hyper's ``h2`` library instead of the tester's own framing
(``bench/h2lib.py``; ``pip install h2``). ``gc``: the objects
the cyclic garbage collector tracks once a model is loaded as the server loads it (or, with
``--keras``, through TensorFlow), and what a full collection of them costs. ``interceptor``: the
call interceptor (digitserve.server.calls) alone around a behavior that returns at once; under
``valgrind --tool=callgrind``, two runs of different ``--calls`` give its instructions per call.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _Context:
    """What the wrapped Predict asks of grpc.aio's servicer context."""

    def __init__(self) -> None:
        self._trailing: Any = ()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("user-agent", "bench"),)

    def set_trailing_metadata(self, metadata: Any) -> None:
        self._trailing = metadata

    def trailing_metadata(self) -> Any:
        return self._trailing

    def peer(self) -> str:
        return "ipv4:127.0.0.1:50000"

    def code(self) -> None:
        return None

    def time_remaining(self) -> float:
        return 30.0

    async def abort(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"aborted: {args}")


def server(model_dir: Path, calls: int, images: int) -> None:
    import grpc

    from digitserve.inference import load_version, read_check_set
    from digitserve.server.calls import CallInterceptor, tolerant_deserializer
    from digitserve.server.dataplane import DataPlane
    from digitserve.server.decoding import PictureDecoder
    from digitserve.server.logs import access_log
    from digitserve.server.servicer import DigitServicer
    from digitserve.server.telemetry import Telemetry
    from digitserve.v1 import digit_service_pb2 as pb

    logging.basicConfig(level=logging.INFO, stream=open("/dev/null", "w"))  # noqa: SIM115
    access_log.direct(open("/dev/null", "w"), json_lines=True)  # noqa: SIM115
    model = load_version(model_dir, check_set=read_check_set(model_dir))
    telemetry = Telemetry()
    plane = DataPlane(1024, observer=telemetry)
    plane.prepare(model)

    class OneModel:  # the registry of one served version (digitserve.server.registry.Registry)
        def resolve(self, name: str, version: int = 0, label: str = "", *,
                    split: bool = False) -> tuple[DataPlane, Any]:
            return plane, model

    handler = grpc.unary_unary_rpc_method_handler(
        DigitServicer(cast(Any, OneModel()), PictureDecoder()).Predict)
    predict = CallInterceptor(telemetry).wrap("/digitserve.v1.DigitService/Predict", handler).unary_unary
    pixels = np.random.default_rng(0).random((images, model.spec.input_size), dtype=np.float32)
    data = pb.PredictRequest(images=[pb.Image(float32=row.tobytes()) for row in pixels]).SerializeToString()
    parse = tolerant_deserializer(pb.PredictRequest)

    async def measure(concurrency: int) -> float:
        async def caller(n: int) -> None:
            context = _Context()
            for _ in range(n):
                await predict(parse(data), context)

        per = calls // concurrency
        started = _cpu()
        await asyncio.gather(*(caller(per) for _ in range(concurrency)))
        return (_cpu() - started) / (per * concurrency) * 1e6

    async def main() -> None:
        await measure(1)  # warm-up
        for concurrency in (1, 64):
            print(f"server path ({model.inference_path}), {images} image(s) per call, "
                  f"{concurrency} in flight: {await measure(concurrency):.1f} µs CPU per call")
        await plane.close()

    asyncio.run(main())


def interceptor(calls: int) -> None:
    """The call interceptor alone: its unary wrapper (request id, metrics, access line) around a
    behavior that returns at once, ``calls`` times. Under callgrind, the difference of two runs'
    instruction counts divided by the difference of their calls is its cost per call."""
    import grpc

    from digitserve.server.calls import CallInterceptor
    from digitserve.server.telemetry import Telemetry

    async def behavior(request: Any, context: Any) -> bytes:
        return b""

    wrapped = CallInterceptor(Telemetry()).wrap(
        "/bench.Bench/Call", grpc.unary_unary_rpc_method_handler(behavior)).unary_unary

    async def main() -> float:
        context = _Context()
        started = _cpu()
        for _ in range(calls):
            await wrapped(b"", context)
        return (_cpu() - started) / max(calls, 1) * 1e6

    print(f"interceptor, unary, empty behavior: {asyncio.run(main()):.2f} µs CPU per call ({calls} calls)")


def client(target: str, data_dir: Path, seconds: float, engine: str, framing: str) -> None:
    from digitserve import loadtest
    from digitserve.idx import load_split

    if framing == "h2lib":
        from bench import h2lib

        h2lib.install()

    split = load_split(data_dir, "t10k")
    workload = loadtest.build_workload(split.images, split.labels, batch=1, encoding="float32")
    config = loadtest.LoadConfig(target=target, concurrency=64, duration=seconds, processes=1,
                                 connections=loadtest.DEFAULT_CONNECTIONS, engine=engine)
    started, wall = _cpu(), time.perf_counter()
    result = loadtest.run(config, workload).to_dict()
    cpu, wall = _cpu() - started, time.perf_counter() - wall
    how = f"engine {engine}" + (f", framing {framing}" if engine == "h2" else "")
    print(f"load tester ({how}): {result['requests']} calls, {result['rps']:.0f} req/s, "
          f"{cpu / result['requests'] * 1e6:.0f} µs CPU per call ({cpu / wall:.2f} cores)")


def collector(model_dir: Path, keras: bool) -> None:
    import gc

    from digitserve.inference import KerasModel, load_version, read_check_set

    if keras:
        model: Any = KerasModel.load(model_dir)
    else:
        model = load_version(model_dir, check_set=read_check_set(model_dir))
    gc.collect()
    started = time.perf_counter()
    gc.collect()
    print(f"after loading ({type(model).__name__}, {model.inference_path}): "
          f"{len(gc.get_objects()):,} objects tracked; a full collection "
          f"{(time.perf_counter() - started) * 1000:.0f} ms")
    gc.freeze()
    started = time.perf_counter()
    gc.collect()
    print(f"after gc.freeze(): a full collection {(time.perf_counter() - started) * 1000:.1f} ms")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.call_cost", description=__doc__)
    sub = parser.add_subparsers(dest="side", required=True)
    s = sub.add_parser("server", help="mnist-serve's per-call Python, gRPC left out")
    s.add_argument("--model-dir", type=Path, required=True, help="a published version directory")
    s.add_argument("--calls", type=int, default=20_000)
    s.add_argument("--images", type=int, default=1, help="images per Predict request")
    c = sub.add_parser("client", help="the load tester's CPU per call against a running server")
    c.add_argument("--target", default="127.0.0.1:50051")
    c.add_argument("--data-dir", type=Path, default=Path("data"))
    c.add_argument("--seconds", type=float, default=5.0)
    c.add_argument("--engine", default="h2", choices=["h2", "grpc"], help="loadtest --engine")
    c.add_argument("--framing", default="own", choices=["own", "h2lib"],
                   help="engine h2's HTTP/2 framing: the load tester's own, or the h2 library's")
    i = sub.add_parser("interceptor", help="the call interceptor's own cost per unary call")
    i.add_argument("--calls", type=int, default=20_000)
    g = sub.add_parser("gc", help="what a full garbage collection costs with a model loaded")
    g.add_argument("--model-dir", type=Path, required=True, help="a published version directory")
    g.add_argument("--keras", action="store_true",
                   help="load the Keras model (TensorFlow) even when the version has a flatbuffer")
    args = parser.parse_args(argv)
    if args.side == "server":
        server(args.model_dir, args.calls, args.images)
    elif args.side == "interceptor":
        interceptor(args.calls)
    elif args.side == "gc":
        collector(args.model_dir, args.keras)
    else:
        client(args.target, args.data_dir, args.seconds, args.engine, args.framing)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
