"""Which async HTTP stack for the HTTP/JSON edge: the same small V2 infer route (read the body,
``json.loads``, the pixels into numpy, a JSON answer) and a readiness route served by each
candidate on the default asyncio event loop (the loop grpc.aio runs on in mnist-serve), the server
pinned to one CPU and h2load (``--h1``, HTTP/1.1 keep-alive) to another, rounds alternating
between the stacks so that a shared machine's drift falls on all alike. Besides req/s it reports
the server process's CPU time per request (medians of the rounds), which other jobs on a shared
machine change far less than req/s.

    python -m bench.http_stacks --python out/stacks-venv/bin/python

``--python``: an interpreter that has the stacks (``pip install aiohttp 'uvicorn[standard]'
starlette fastapi numpy``); a stack it lacks is left out. Candidates: aiohttp's web application
and its low-level server, and uvicorn (httptools parser) under Starlette, FastAPI (as KServe and
MLServer run it) and a bare ASGI callable (uvicorn's own floor). The route reads the body as bytes
in every stack (no pydantic model), so only the HTTP stacks differ.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

STACKS = ("aiohttp", "aiohttp-lowlevel", "uvicorn-starlette", "uvicorn-fastapi", "uvicorn-asgi")
INFER = "/v2/models/mnist/infer"
READY = "/v2/health/ready"
PROBABILITIES = [0.01, 0.02, 0.03, 0.04, 0.5, 0.1, 0.1, 0.1, 0.05, 0.05]


def answer(body: bytes) -> bytes:
    """The route's work, the same in every stack: the request parsed, its pixels as numpy, a
    V2 response."""
    import numpy as np

    request = json.loads(body)
    tensor = request["inputs"][0]
    pixels = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
    rows = pixels.shape[0]
    return json.dumps({
        "model_name": "mnist", "model_version": "1",
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [rows, 10],
                     "data": PROBABILITIES * rows}],
    }).encode()


READY_BODY = b'{"ready": true}'


# --- the servers (run in the --python interpreter) ----------------------------------------------

async def _aiohttp(port: int) -> None:
    from aiohttp import web

    async def infer(request: web.Request) -> web.Response:
        return web.Response(body=answer(await request.read()), content_type="application/json")

    async def ready(request: web.Request) -> web.Response:
        return web.Response(body=READY_BODY, content_type="application/json")

    app = web.Application()
    app.router.add_post(INFER, infer)
    app.router.add_get(READY, ready)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


async def _aiohttp_lowlevel(port: int) -> None:
    from aiohttp import web

    async def handle(request: web.BaseRequest) -> web.Response:
        if request.path == INFER and request.method == "POST":
            return web.Response(body=answer(await request.read()), content_type="application/json")
        if request.path == READY:
            return web.Response(body=READY_BODY, content_type="application/json")
        return web.Response(status=404)

    server = web.Server(handle, access_log=None)
    await asyncio.get_running_loop().create_server(server, "127.0.0.1", port)
    await asyncio.Event().wait()


def _uvicorn(app: Any, port: int) -> Callable[[], Any]:
    async def run() -> None:
        import uvicorn

        config = uvicorn.Config(app, host="127.0.0.1", port=port, loop="none", http="httptools",
                                lifespan="off", access_log=False, log_level="warning")
        await uvicorn.Server(config).serve()

    return run


def _starlette() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def infer(request: Request) -> Response:
        return Response(answer(await request.body()), media_type="application/json")

    async def ready(request: Request) -> Response:
        return Response(READY_BODY, media_type="application/json")

    return Starlette(routes=[Route(INFER, infer, methods=["POST"]), Route(READY, ready)])


def _fastapi() -> Any:
    from fastapi import FastAPI, Request, Response

    async def infer(request: Request) -> Response:
        return Response(answer(await request.body()), media_type="application/json")

    async def ready() -> Response:
        return Response(READY_BODY, media_type="application/json")

    # The annotations as objects (this module's are strings), for FastAPI's dependency injection.
    infer.__annotations__ = {"request": Request, "return": Response}
    ready.__annotations__ = {"return": Response}
    app = FastAPI()
    app.add_api_route(INFER, infer, methods=["POST"])
    app.add_api_route(READY, ready, methods=["GET"])
    return app


async def _asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    body = b""
    if scope["path"] == INFER:
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        body = answer(body)
    else:
        body = READY_BODY
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def serve(stack: str, port: int) -> None:
    if stack == "aiohttp":
        asyncio.run(_aiohttp(port))
    elif stack == "aiohttp-lowlevel":
        asyncio.run(_aiohttp_lowlevel(port))
    else:
        makers: dict[str, Callable[[], Any]] = {
            "uvicorn-starlette": _starlette, "uvicorn-fastapi": _fastapi, "uvicorn-asgi": lambda: _asgi}
        app = makers[stack]()
        asyncio.run(_uvicorn(app, port)())


# --- the driver ----------------------------------------------------------------------------------

def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _has(python: str, stack: str) -> bool:
    modules = {"aiohttp": "aiohttp", "aiohttp-lowlevel": "aiohttp", "uvicorn-starlette": "starlette",
               "uvicorn-fastapi": "fastapi", "uvicorn-asgi": "uvicorn"}[stack]
    check = f"import {modules}, numpy" + (", uvicorn, httptools" if stack.startswith("uvicorn") else "")
    return subprocess.run([python, "-c", check], capture_output=True, check=False).returncode == 0


def _versions(python: str) -> str:
    code = ("import importlib.metadata as m\n"
            "for p in ('aiohttp','uvicorn','httptools','starlette','fastapi'):\n"
            "    try: print(p, m.version(p))\n"
            "    except m.PackageNotFoundError: pass")
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False)
    return ", ".join(done.stdout.split("\n")).strip(", ").replace(" ,", ",")


def body_of_one_image() -> bytes:
    """A V2 infer request of one MNIST-like image: float32 pixels as JSON numbers (what a client
    that converts a numpy array with tolist() sends)."""
    import numpy as np

    rng = np.random.default_rng(0)
    pixels = np.zeros(784, np.float32)
    pixels[rng.choice(784, 150, replace=False)] = rng.integers(1, 256, 150) / np.float32(255)
    return json.dumps({"inputs": [{"name": "images", "shape": [1, 784], "datatype": "FP32",
                                   "data": pixels.astype(np.float32).tolist()}]}).encode()


def _wait(port: int, proc: subprocess.Popen[bytes]) -> None:
    until = time.monotonic() + 30
    while time.monotonic() < until:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{READY}", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("server did not answer in 30 s")


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def h2load(port: int, path: str, body: Path | None, args: argparse.Namespace, pid: int) -> dict[str, Any]:
    """A warm-up of 1,000 requests, then ``--duration`` seconds of load; req/s and the server's CPU
    time per request over the measured part (which other jobs on the machine barely change, where
    they change req/s a lot)."""
    from bench.h2load import ms, parse

    argv = ["taskset", "-c", args.load_cpu, "h2load", "--h1", "-c", str(args.connections), "-t", "1"]
    if body is not None:
        argv += ["-d", str(body), "-H", "content-type: application/json"]
    url = f"http://127.0.0.1:{port}{path}"
    subprocess.run([*argv, "-n", "1000", url], capture_output=True, check=False, timeout=120)
    before = cpu_seconds(pid)
    done = subprocess.run([*argv, "-D", ms(args.duration), url], capture_output=True, text=True,
                          check=False, timeout=args.duration + 60)
    spent = cpu_seconds(pid) - before
    if done.returncode != 0:
        raise RuntimeError(f"h2load failed: {done.stderr[-500:]}")
    result = parse(done.stdout)
    result["cpu_us"] = spent / max(result["requests"], 1) * 1e6
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.http_stacks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--python", default=sys.executable, help="interpreter that has the stacks")
    parser.add_argument("--stack", action="append", choices=STACKS, help="measure only these")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per route and round")
    parser.add_argument("--connections", type=int, default=16, help="h2load connections (--h1)")
    parser.add_argument("--server-cpu", default="0")
    parser.add_argument("--load-cpu", default="1")
    parser.add_argument("--serve", nargs=2, metavar=("STACK", "PORT"), help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return 0
    stacks = [s for s in (args.stack or STACKS) if _has(args.python, s)]
    if not stacks:
        print(f"{args.python} has none of the stacks", file=sys.stderr)
        return 2
    results: dict[str, dict[str, list[float]]] = {
        s: {"infer": [], "ready": [], "infer_cpu": [], "ready_cpu": []} for s in stacks}
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="http-stacks-") as tmp:
        body = Path(tmp) / "infer.json"
        body.write_bytes(body_of_one_image())
        for index in range(args.rounds):
            for stack in stacks if index % 2 == 0 else stacks[::-1]:
                port = _free_port()
                env = {**os.environ, "PYTHONPATH": str(root)}
                proc = subprocess.Popen(
                    ["taskset", "-c", args.server_cpu, args.python, "-m", "bench.http_stacks",
                     "--serve", stack, str(port)], cwd=root, env=env)
                try:
                    _wait(port, proc)
                    infer = h2load(port, INFER, body, args, proc.pid)
                    ready = h2load(port, READY, None, args, proc.pid)
                finally:
                    proc.terminate()
                    proc.wait(10)
                for name, result in (("infer", infer), ("ready", ready)):
                    if result["failed"] or result["succeeded"] != result["requests"]:
                        raise RuntimeError(f"{stack} {name}: {result}")
                    results[stack][name].append(result["rps"])
                    results[stack][f"{name}_cpu"].append(result["cpu_us"])
                print(f"round {index + 1} {stack:>18}: infer {infer['rps']:8.0f} req/s "
                      f"{infer['cpu_us']:6.0f} us CPU/req, ready {ready['rps']:8.0f} req/s "
                      f"{ready['cpu_us']:6.0f} us CPU/req", flush=True)
    print(f"\nh2load --h1, {args.connections} connections, server on CPU {args.server_cpu}, load on "
          f"CPU {args.load_cpu}, {args.rounds} rounds of {args.duration:g} s per route; "
          f"{_versions(args.python)}; infer body {body_of_one_image().__len__():,} bytes (1 image)")
    print("| stack | infer: server CPU µs/request | req/s | ready: server CPU µs/request | req/s |")
    print("|---|---|---|---|---|")
    for stack in stacks:
        figures = {k: statistics.median(v) for k, v in results[stack].items()}
        print(f"| {stack} | {figures['infer_cpu']:,.0f} | {figures['infer']:,.0f} | "
              f"{figures['ready_cpu']:,.0f} | {figures['ready']:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
