"""Issue 26's comparison: digitserve against KServe on the same LiteRT flatbuffer, and our own API
against the transport-only null server, every server pinned to one CPU and h2load (a C load
generator, one connection) to another, in rounds that alternate the servers' order so that a
shared machine's drift falls on all of them alike; medians and ratios from the same run.

    bench/kserve-venv.sh        # once
    python -m bench.versus --model-repo out/bench-repo --model-name mnist --version 1 --data-dir data

The three servers start once, each pinned to ``--server-cpu``: ``mnist-serve`` (this checkout, or
``--tree``; gRPC and HTTP, its default flags), KServe's ModelServer through
``bench/kserve_server.py --model-call litert`` (the same flatbuffer, one thread) and
``bench.null_server`` (grpc.aio, no model). The points, each for ``--duration`` seconds after 1 s
of warm-up, in every round:

- **V2 gRPC** (``inference.GRPCInferenceService/ModelInfer``, FP32 pixels in
  ``raw_input_contents``): digitserve and KServe, 1 image × 64 in flight and 64 images × 8;
- **our Predict** (``digitserve.v1.DigitService/Predict``, packed float32 pixels): digitserve and
  the null server, the same two shapes;
- **V2 REST** (``POST /v2/models/NAME/infer``, JSON): digitserve and KServe, h2load ``--h1`` with
  as many keep-alive connections as calls in flight.

With perf_analyzer installed (``.ci/perf-analyzer.sh``; ``--perf-analyzer``), each round also
drives the V2 gRPC points with it, pinned as h2load is: its default mode (Triton's protocol, random
data in the model's declared datatype), ``-b`` images per request. KServe answers no ModelConfig,
which perf_analyzer asks for first, so its rows say why it does not run there.

Before the load, one request of each point goes to each server through a real client, its answer
read (every class the true label's where the model is right, and digitserve's probabilities equal
to KServe's within 1e-6); after it, digitserve's metrics must count no failed call (h2load does
not read gRPC's trailers). ``--write`` puts the table into BENCHMARKS.md between its ``versus``
markers; ``--json-out`` keeps every round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench import perf_analyzer, rest
from bench.h2load import grpc_frame, ms, parse
from bench.servers import BenchError, free_port, write_section

REPO_ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- versus:begin (written by `python -m bench.versus --write`) -->", "<!-- versus:end -->"
INFER_PATH = "/inference.GRPCInferenceService/ModelInfer"
PREDICT_PATH = "/digitserve.v1.DigitService/Predict"
SHAPES = {"1x64": (1, 64), "64x8": (64, 8)}  # images per request, requests in flight
EDGES = {  # edge: (what it is, the two servers compared: subject, baseline)
    "v2-grpc": ("V2 gRPC ModelInfer, raw FP32", ("digitserve", "kserve")),
    "predict": ("our gRPC Predict, float32", ("digitserve", "null")),
    "v2-rest": ("V2 REST infer, JSON (HTTP/1.1)", ("digitserve", "kserve")),
}
NAMES = {"digitserve": "digitserve", "kserve": "KServe (same LiteRT)", "null": "null server"}


@dataclass
class Pinned:
    """A server process pinned to a CPU, with its gRPC port and (when it has one) its HTTP port."""

    name: str
    proc: subprocess.Popen[bytes]
    grpc_port: int
    http_port: int | None
    log: Path

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"{self.name} exited {self.proc.returncode}; see {self.log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.returncode not in (0, -15):
            raise BenchError(f"{self.name} ended with {self.proc.returncode}; see {self.log}")


def _tree_env(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(str(tree / d) for d in ("core", "protos", "server", "client",
                                                                 "trainer"))
    return env


def start(name: str, args: argparse.Namespace, log_dir: Path, wrap: Sequence[str] = ()) -> Pinned:
    """Starts server ``name`` pinned to ``args.server_cpu``, or run by ``wrap`` (a command prefix
    such as valgrind's) when given."""
    pin = list(wrap) or ["taskset", "-c", args.server_cpu]
    grpc_port, http_port = free_port(), free_port()
    http: int | None = http_port
    env = dict(os.environ)
    if name == "digitserve":
        argv = [*pin, sys.executable, "-m", "digitserve.server", "--port", str(grpc_port),
                "--http-port", str(http_port), "--model-repo", str(args.model_repo.resolve()),
                "--model-name", args.model_name, "--model-version", str(args.version),
                "--reload-interval", "0", *args.server_arg]
        env = _tree_env(args.tree)
    elif name == "kserve":
        argv = [*pin, str(args.kserve_python), str(REPO_ROOT / "bench" / "kserve_server.py"),
                "--model-dir", str(args.model_repo.resolve() / args.model_name / str(args.version)),
                "--port", str(grpc_port), "--http-port", str(http_port), "--model-call", "litert"]
        env.pop("PYTHONPATH", None)
    else:
        argv = [*pin, sys.executable, "-m", "bench.null_server", "--port", str(grpc_port)]
        http = None
    log = log_dir / f"versus-{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
    return Pinned(name, proc, grpc_port, http, log)


def wait_ready(server: Pinned, model: str, timeout: float = 180) -> None:
    """Until the server answers its health (gRPC) and, with an HTTP port, the model's readiness."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    until = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            server.check_alive()
            try:
                if server.name == "kserve":
                    ready = _oip(channel, "ModelReady", model)
                else:
                    ready = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == 1
                if ready and server.http_port is not None:
                    with urllib.request.urlopen(
                            f"http://127.0.0.1:{server.http_port}/v2/models/{model}/ready", timeout=2):
                        pass
                if ready:
                    return
            except (grpc.RpcError, OSError):
                pass
            if time.monotonic() > until:
                raise BenchError(f"{server.name} not ready in {timeout:g} s; see {server.log}")
            time.sleep(0.2)


def _oip(channel: grpc.Channel, method: str, model: str) -> bool:
    from digitserve.oip import grpc_predict_v2_pb2 as oip

    call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}",
                               request_serializer=oip.ModelReadyRequest.SerializeToString,
                               response_deserializer=oip.ModelReadyResponse.FromString)
    return bool(call(oip.ModelReadyRequest(name=model), timeout=2).ready)


def payloads(pixels: np.ndarray, model: str) -> dict[tuple[str, str], bytes]:
    """The request body of each (edge, shape): serialized messages for gRPC, JSON for REST."""
    from digitserve.oip import grpc_predict_v2_pb2 as oip
    from digitserve.v1 import digit_service_pb2 as pb

    out: dict[tuple[str, str], bytes] = {}
    for shape, (count, _) in SHAPES.items():
        rows = np.ascontiguousarray(pixels[:count], dtype="<f4")
        infer = oip.ModelInferRequest(model_name=model, raw_input_contents=[rows.tobytes()])
        infer.inputs.add(name="images", datatype="FP32", shape=list(rows.shape))
        out["v2-grpc", shape] = infer.SerializeToString()
        out["predict", shape] = pb.PredictRequest(
            images=[pb.Image(float32=row.tobytes()) for row in rows]).SerializeToString()
        out["v2-rest", shape] = rest.as_json(rows)
    return out


def answer(server: Pinned, edge: str, body: bytes, model: str) -> np.ndarray:
    """The probabilities (N × 10) a server answers to ``body``, through a real client."""
    from digitserve.oip import grpc_predict_v2_pb2 as oip
    from digitserve.v1 import digit_service_pb2 as pb

    if edge == "v2-rest":
        assert server.http_port is not None
        return rest.probabilities(*rest.post(server.http_port, f"/v2/models/{model}/infer", body,
                                             {"Content-Type": "application/json"}))
    path = INFER_PATH if edge == "v2-grpc" else PREDICT_PATH
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        data = channel.unary_unary(path)(body, timeout=30)
    if edge == "v2-grpc":
        response = oip.ModelInferResponse.FromString(data)
        index = [o.name for o in response.outputs].index("probabilities")
        shape = list(response.outputs[index].shape)
        return np.frombuffer(response.raw_output_contents[index], "<f4").reshape(shape)
    predictions = pb.PredictResponse.FromString(data).predictions
    return np.asarray([list(p.probabilities) for p in predictions], np.float32)


def h2load_target(server: Pinned, edge: str, shape: str, model: str) -> list[str]:
    """h2load's arguments that send one edge's calls of a shape to ``server``: its connections,
    streams, headers and URL (the caller adds how long, or how many, and the body file)."""
    _, in_flight = SHAPES[shape]
    if edge == "v2-rest":
        return ["--h1", "-c", str(in_flight), "-H", "Content-Type: application/json",
                f"http://127.0.0.1:{server.http_port}/v2/models/{model}/infer"]
    path = INFER_PATH if edge == "v2-grpc" else PREDICT_PATH
    return ["-c", "1", "-m", str(in_flight), "-H", "content-type: application/grpc",
            "-H", "te: trailers", f"http://127.0.0.1:{server.grpc_port}{path}"]


def h2load(server: Pinned, edge: str, shape: str, body_file: Path, model: str,
           args: argparse.Namespace) -> dict[str, Any]:
    argv = ["taskset", "-c", args.load_cpu, "h2load", "-t", "1", "-D", ms(args.duration),
            f"--warm-up-time={ms(1.0)}", "-d", str(body_file),
            *h2load_target(server, edge, shape, model)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=args.duration + 60)
    if done.returncode != 0:
        raise BenchError(f"h2load failed ({done.returncode}): {done.stderr[-500:]}")
    result = parse(done.stdout)
    if result["failed"] or result["succeeded"] != result["requests"]:
        raise BenchError(f"h2load against {server.name}: not every request succeeded: {result}")
    return result


def failed_calls(server: Pinned) -> float:
    """Calls digitserve answered with an error status (its own metrics; h2load reads no trailer)."""
    assert server.http_port is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    failed = 0.0
    for line in text.splitlines():
        if line.startswith("grpc_server_handled_total{") and 'grpc_code="OK"' not in line:
            failed += float(line.rsplit(" ", 1)[1])
    return failed


def add_server_options(parser: argparse.ArgumentParser, model_repo: Path | None) -> None:
    """The options of what the servers serve and which checkout and KServe run it, shared by
    bench.versus, bench.instructions and bench.stages (``model_repo`` None: required)."""
    parser.add_argument("--model-repo", type=Path, required=model_repo is None, default=model_repo,
                        help="model repository" + ("" if model_repo is None else f" (default: {model_repo})"))
    parser.add_argument("--model-name", default="mnist", help="model name (default: mnist)")
    parser.add_argument("--version", type=int, default=1, help="the version served (default: 1)")
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT / "data",
                        help="MNIST IDX files (default: ./data)")
    parser.add_argument("--tree", type=Path, default=REPO_ROOT,
                        help="checkout whose mnist-serve is measured (default: this one)")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="one more argument for mnist-serve (repeatable)")
    parser.add_argument("--kserve-python", type=Path,
                        default=REPO_ROOT / "out" / "kserve-venv" / "bin" / "python",
                        help="KServe's environment (bench/kserve-venv.sh; default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.versus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    add_server_options(parser, model_repo=None)
    parser.add_argument("--edges", default=",".join(EDGES), help="edges (default: %(default)s)")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="shapes (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds (default: 4)")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per point (default: 8)")
    parser.add_argument("--server-cpu", default="0", help="taskset CPU of the servers (default: 0)")
    parser.add_argument("--load-cpu", default="1", help="taskset CPU of h2load (default: 1)")
    parser.add_argument("--perf-analyzer", choices=["auto", "yes", "no"], default="auto",
                        help="also drive the V2 gRPC points with Triton's perf_analyzer "
                        "(.ci/perf-analyzer.sh installs it; auto: when it is installed)")
    parser.add_argument("--json-out", type=Path, help="also write every round as JSON")
    parser.add_argument("--write", action="store_true", help="put the table into BENCHMARKS.md")
    return parser


def table(rps: dict[tuple[str, str, str], list[float]], edges: list[str], shapes: list[str]) -> list[str]:
    lines = ["| edge | images × in flight | server | req/s, each round | median | baseline | "
             "its median | ratio |", "|---|---|---|---|---|---|---|---|"]
    for edge in edges:
        subject, baseline = EDGES[edge][1]
        for shape in shapes:
            ours, theirs = rps[edge, shape, subject], rps[edge, shape, baseline]
            count, in_flight = SHAPES[shape]
            lines.append(
                f"| {EDGES[edge][0]} | {count} × {in_flight} | {NAMES[subject]} | "
                f"{' / '.join(f'{r:,.0f}' for r in ours)} | {statistics.median(ours):,.0f} | "
                f"{NAMES[baseline]} ({' / '.join(f'{r:,.0f}' for r in theirs)}) | "
                f"{statistics.median(theirs):,.0f} | "
                f"**{statistics.median(ours) / statistics.median(theirs):.2f}×** |")
    return lines


def perf_point(server: Pinned, shape: str, args: argparse.Namespace, workdir: Path) -> float | str | None:
    """perf_analyzer (its default mode: Triton's protocol, random data in the datatype the model's
    metadata declares) at one V2 gRPC point: ``-b`` images per request and the shape's calls in
    flight, pinned to the load CPU. Its requests per second (its inferences per second over the
    batch); None when its windows never agreed within 50 %; the reason as text when it does not
    run against the server (KServe answers no ModelConfig, which it asks for first)."""
    count, in_flight = SHAPES[shape]
    result = perf_analyzer.point(f"127.0.0.1:{server.grpc_port}", protocol="grpc",
                                 model=args.model_name, concurrency=in_flight, duration=args.duration,
                                 stability=50, cpu=args.load_cpu, workdir=workdir,
                                 extra=("-b", str(count)))
    if result is None:
        return None
    if result.returncode != 0 or not result.rows:
        lines = [line.strip() for line in result.output.splitlines() if line.strip()]
        return next((line for line in lines if line.startswith("error")), lines[-1] if lines else
                    f"exit {result.returncode}")
    return result.rows[0]["rps"] / count


def perf_table(perf: dict[tuple[str, str], list[float | str | None]], shapes: list[str]) -> list[str]:
    """perf_analyzer's rows: digitserve's requests per second each round and their median, and
    KServe's, or why perf_analyzer does not run against it."""
    lines = ["| perf_analyzer, V2 gRPC ModelInfer (UINT8 random data) | images × in flight | "
             "server | req/s, each round | median |", "|---|---|---|---|---|"]
    for shape in shapes:
        count, in_flight = SHAPES[shape]
        for name in ("digitserve", "kserve"):
            runs = perf.get((shape, name), [])
            figures = [r for r in runs if isinstance(r, float)]
            refusal = next((r for r in runs if isinstance(r, str)), None)
            if refusal is not None:
                cells = f"does not run: `{refusal}` | –"
            elif figures:
                cells = " / ".join(f"{r:,.0f}" if isinstance(r, float) else "unstable" for r in runs)
                cells += f" | {statistics.median(figures):,.0f}"
            else:
                cells = "no stable measurement | –"
            lines.append(f"| `-b {count} --concurrency-range {in_flight}` | {count} × {in_flight} | "
                         f"{NAMES[name]} | {cells} |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    edges = [e for e in args.edges.split(",") if e]
    shapes = [s for s in args.shapes.split(",") if s]
    for edge in edges:
        if edge not in EDGES:
            raise SystemExit(f"--edges: {edge!r} is not one of {', '.join(EDGES)}")
    for shape in shapes:
        if shape not in SHAPES:
            raise SystemExit(f"--shapes: {shape!r} is not one of {', '.join(SHAPES)}")
    names = sorted({n for e in edges for n in EDGES[e][1]}, key=list(NAMES).index)
    if "kserve" in names and not args.kserve_python.exists():
        print(f"{args.kserve_python}: no KServe environment (bench/kserve-venv.sh makes one)",
              file=sys.stderr)
        return 2
    pixels = rest.mnist_pixels(args.data_dir, 64)
    from digitserve.idx import read_idx

    labels = read_idx(args.data_dir / "t10k-labels-idx1-ubyte.gz")[:64]
    bodies = payloads(pixels, args.model_name)
    rps: dict[tuple[str, str, str], list[float]] = {}
    perf: dict[tuple[str, str], list[float | str | None]] = {}
    with_perf = "v2-grpc" in edges and (
        args.perf_analyzer == "yes" or (args.perf_analyzer == "auto" and perf_analyzer.binary().exists()))
    if args.perf_analyzer == "yes" and not perf_analyzer.binary().exists():
        print(f"{perf_analyzer.binary()}: no perf_analyzer (.ci/perf-analyzer.sh installs it)",
              file=sys.stderr)
        return 2
    servers: dict[str, Pinned] = {}
    with tempfile.TemporaryDirectory(prefix="bench-versus-") as tmp:
        files: dict[tuple[str, str], Path] = {}
        for (edge, shape), body in bodies.items():
            files[edge, shape] = Path(tmp) / f"{edge}-{shape}.bin"
            files[edge, shape].write_bytes(body if edge == "v2-rest" else grpc_frame(body))
        try:
            for name in names:
                servers[name] = start(name, args, Path(tmp))
            for server in servers.values():
                wait_ready(server, args.model_name)
            for edge in edges:  # every answer read before any load
                for shape in shapes:
                    got = {n: answer(servers[n], edge, bodies[edge, shape], args.model_name)
                           for n in EDGES[edge][1] if n != "null"}
                    count = SHAPES[shape][0]
                    right = float(np.mean(got["digitserve"].argmax(1) == labels[:count]))
                    if got["digitserve"].shape != (count, 10) or (count == 64 and right < 0.8):
                        raise BenchError(f"{edge} {shape}: digitserve answered {got['digitserve'].shape}, "
                                         f"{right:.0%} right")
                    if "kserve" in got:
                        np.testing.assert_allclose(got["digitserve"], got["kserve"], rtol=0, atol=1e-6)
            before = failed_calls(servers["digitserve"])
            for index in range(args.rounds):
                for edge in edges:
                    for shape in shapes:
                        pair = EDGES[edge][1]
                        for name in pair if index % 2 == 0 else pair[::-1]:
                            result = h2load(servers[name], edge, shape, files[edge, shape],
                                            args.model_name, args)
                            rps.setdefault((edge, shape, name), []).append(result["rps"])
                            print(f"round {index + 1} {edge:>8} {shape:>5} {name:>10}: "
                                  f"{result['rps']:9,.0f} req/s", flush=True)
                for shape in shapes if with_perf else ():
                    pair = EDGES["v2-grpc"][1]
                    for name in pair if index % 2 == 0 else pair[::-1]:
                        runs = perf.setdefault((shape, name), [])
                        if any(isinstance(r, str) for r in runs):
                            continue  # it does not run against this server: said once
                        runs.append(perf_point(servers[name], shape, args, Path(tmp)))
                        print(f"round {index + 1} perf_analyzer {shape:>5} {name:>10}: {runs[-1]}",
                              flush=True)
            failed = failed_calls(servers["digitserve"]) - before
            if failed:
                raise BenchError(f"digitserve's metrics count {failed:g} failed calls under the load")
        finally:
            for server in servers.values():
                server.stop()
    lines = [
        f"Each server pinned to CPU {args.server_cpu}, h2load on CPU {args.load_cpu} (gRPC: one "
        f"connection; REST: HTTP/1.1, one keep-alive connection per call in flight); {args.rounds} "
        f"rounds of {args.duration:g} s per point, servers alternating; model {args.model_name} "
        f"version {args.version} through its LiteRT flatbuffer (XNNPACK, one thread) in digitserve "
        "and KServe; answers read and compared before the load, no failed call in digitserve's "
        "metrics after it.", "", *table(rps, edges, shapes)]
    if with_perf:
        lines += ["", "Triton's perf_analyzer at the V2 gRPC points in the same rounds, pinned as "
                  "h2load is: its default mode (Triton's protocol) sends random data in the "
                  "datatype the model's metadata declares (UINT8 for digitserve), so its calls "
                  "differ from h2load's FP32 ones above.", "", *perf_table(perf, shapes)]
    text = "\n".join(lines)
    print("\n" + text)
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(
            {"rounds": [{"edge": e, "shape": s, "server": n, "rps": v} for (e, s, n), v in rps.items()],
             "perf_analyzer": [{"shape": s, "server": n, "rps": v} for (s, n), v in perf.items()]},
            indent=2) + "\n")
    if args.write:
        command = "python -m bench.versus " + " ".join(argv if argv is not None else sys.argv[1:])
        write_section(REPO_ROOT / "BENCHMARKS.md", BEGIN, END, command, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
