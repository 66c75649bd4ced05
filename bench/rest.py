"""The HTTP rows of the benchmark: our HTTP/JSON edge (``mnist-serve --http-port``) against KServe's
REST edge (FastAPI on uvicorn, ``bench/kserve_server.py``), the same model version through the same
LiteRT flatbuffer, the same load tool (h2load ``--h1``: HTTP/1.1 keep-alive connections, the request
body from a file), each server pinned to one CPU and the load to another, rounds alternating so
that a shared machine's drift falls on both alike; ratios from the same run.

    python -m bench.rest --model-repo out/bench-repo --version 1 --data-dir data

Points: a V2 infer request of 1 image as JSON (FP32 numbers, only ``probabilities`` asked for,
which is all KServe's model answers), the same pixels with the binary-data extension (raw FP32 in,
raw FP32 out), and 64 images as JSON. Before the load, one request of each point is sent to each
server and the answers compared (1e-6). ``--write`` puts the table into BENCHMARKS.md between its
``rest`` markers.
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
from pathlib import Path
from typing import Any

import numpy as np

from bench.h2load import ms, parse
from bench.servers import BenchError, free_port, write_section

REPO_ROOT = Path(__file__).resolve().parent.parent
POINTS = ("json-1", "binary-1", "json-64")
LABELS = {"json-1": "1 image, JSON", "binary-1": "1 image, binary data extension",
          "json-64": "64 images, JSON"}
BEGIN, END = "<!-- rest:begin (written by `python -m bench.rest --write`) -->", "<!-- rest:end -->"


def mnist_pixels(data_dir: Path, count: int) -> np.ndarray:
    from digitserve.idx import read_idx, scale_pixels

    images = read_idx(data_dir / "t10k-images-idx3-ubyte.gz")[:count].reshape(count, -1)
    return scale_pixels(images)


def as_json(rows: np.ndarray) -> bytes:
    """A V2 infer request of ``rows`` (N × pixels) as JSON, asking for the probabilities only."""
    return json.dumps({"inputs": [{"name": "images", "shape": list(rows.shape), "datatype": "FP32",
                                   "data": rows.ravel().tolist()}],
                       "outputs": [{"name": "probabilities"}]}).encode()


def bodies(pixels: np.ndarray) -> dict[str, tuple[bytes, dict[str, str]]]:
    """Each point's request body and headers."""

    raw = pixels[:1].astype("<f4").tobytes()
    header = json.dumps({
        "inputs": [{"name": "images", "shape": [1, pixels.shape[1]], "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)}}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}).encode()
    json_headers = {"Content-Type": "application/json"}
    return {
        "json-1": (as_json(pixels[:1]), json_headers),
        "binary-1": (header + raw, {"Content-Type": "application/octet-stream",
                                    "Inference-Header-Content-Length": str(len(header))}),
        "json-64": (as_json(pixels[:64]), json_headers),
    }


def probabilities(body: bytes, headers: dict[str, str]) -> np.ndarray:
    length = headers.get("inference-header-content-length")
    if length is None:
        answer = json.loads(body)
        output = answer["outputs"][0]
        return np.asarray(output["data"], np.float32).reshape(output["shape"])
    answer = json.loads(body[:int(length)])
    output = answer["outputs"][0]
    return np.frombuffer(body[int(length):], "<f4").reshape(output["shape"])


def post(port: int, path: str, body: bytes, headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, headers=headers,
                                     method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read(), {k.lower(): v for k, v in response.getheaders()}


class Server:
    def __init__(self, name: str, argv: list[str], port: int, log: Path, env: dict[str, str]) -> None:
        self.name, self.port = name, port
        self.log = log.open("w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)

    def wait_ready(self, model: str, timeout: float = 180) -> None:
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited {self.proc.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v2/models/{model}/ready",
                                            timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise BenchError(f"{self.name} not ready in {timeout:g}s; see {self.log.name}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def start(name: str, args: argparse.Namespace, log_dir: Path) -> Server:
    http_port = free_port()
    version_dir = args.model_repo.resolve() / args.model_name / str(args.version)
    pin = ["taskset", "-c", args.server_cpu]
    env = dict(os.environ)
    if name == "ours":
        argv = [*pin, sys.executable, "-m", "digitserve.server", "--port", str(free_port()),
                "--http-port", str(http_port), "--model-repo", str(args.model_repo.resolve()),
                "--model-name", args.model_name, "--model-version", str(args.version),
                "--reload-interval", "0", "--log-format", "json", "--log-level", "WARNING"]
    else:
        argv = [*pin, str(args.kserve_python), str(REPO_ROOT / "bench" / "kserve_server.py"),
                "--model-dir", str(version_dir), "--port", str(free_port()), "--http-port",
                str(http_port), "--model-call", "litert"]
        env.pop("PYTHONPATH", None)
    server = Server(name, argv, http_port, log_dir / f"rest-{name}.log", env)
    server.wait_ready(args.model_name)
    return server


def h2load(port: int, path: str, body_file: Path, headers: dict[str, str], args: argparse.Namespace
           ) -> dict[str, Any]:
    argv = ["taskset", "-c", args.load_cpu, "h2load", "--h1", "-c", str(args.connections), "-t", "1",
            "-D", ms(args.duration), f"--warm-up-time={ms(1.0)}", "-d", str(body_file)]
    for key, value in headers.items():
        argv += ["-H", f"{key}: {value}"]
    done = subprocess.run([*argv, f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True,
                          check=False, timeout=args.duration + 60)
    if done.returncode != 0:
        raise BenchError(f"h2load failed: {done.stderr[-500:]}")
    result = parse(done.stdout)
    if result["failed"] or result["succeeded"] != result["requests"]:
        raise BenchError(f"h2load: not every request succeeded: {result}\n{done.stdout[-800:]}")
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.rest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--model-repo", type=Path, required=True)
    parser.add_argument("--model-name", default="mnist")
    parser.add_argument("--version", type=int, default=1, help="the version both serve (default: 1)")
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT / "data")
    parser.add_argument("--kserve-python", type=Path,
                        default=REPO_ROOT / "out" / "kserve-venv" / "bin" / "python")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per point and round")
    parser.add_argument("--connections", type=int, default=16, help="h2load connections (default: 16)")
    parser.add_argument("--server-cpu", default="0")
    parser.add_argument("--load-cpu", default="1")
    parser.add_argument("--write", action="store_true", help="put the table into BENCHMARKS.md")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.kserve_python.exists():
        print(f"{args.kserve_python}: no KServe environment (bench/kserve-venv.sh makes one)",
              file=sys.stderr)
        return 2
    pixels = mnist_pixels(args.data_dir, 64)
    points = bodies(pixels)
    path = f"/v2/models/{args.model_name}/infer"
    rps: dict[tuple[str, str], list[float]] = {}
    latency: dict[tuple[str, str], list[float]] = {}
    servers = ("ours", "kserve")
    with tempfile.TemporaryDirectory(prefix="bench-rest-") as tmp:
        files = {}
        for point, (body, _) in points.items():
            files[point] = Path(tmp) / f"{point}.body"
            files[point].write_bytes(body)
        answers: dict[tuple[str, str], np.ndarray] = {}
        for index in range(args.rounds):
            for name in servers if index % 2 == 0 else servers[::-1]:
                server = start(name, args, Path(tmp))
                try:
                    for point, (body, headers) in points.items():
                        if index == 0:
                            answers[name, point] = probabilities(*post(server.port, path, body, headers))
                        result = h2load(server.port, path, files[point], headers, args)
                        rps.setdefault((name, point), []).append(result["rps"])
                        latency.setdefault((name, point), []).append(result.get("mean_ms", float("nan")))
                        print(f"round {index + 1} {name:>6} {point:>8}: {result['rps']:8.0f} req/s, mean "
                              f"{result.get('mean_ms', float('nan')):.2f} ms", flush=True)
                finally:
                    server.stop()
            if index == 0:
                for point in points:
                    np.testing.assert_allclose(answers["ours", point], answers["kserve", point],
                                               rtol=0, atol=1e-6)
    found = subprocess.run(
        [str(args.kserve_python), "-c", "import importlib.metadata as m; print(m.version('kserve'), "
         "m.version('fastapi'), m.version('uvicorn'))"], capture_output=True, text=True, check=False)
    versions = [*found.stdout.split(), "?", "?", "?"]
    lines = [
        f"h2load --h1, {args.connections} connections, {args.rounds} rounds of {args.duration:g} s per point "
        f"(the median), server on CPU {args.server_cpu}, h2load on CPU {args.load_cpu}; model "
        f"{args.model_name} version {args.version} through its LiteRT flatbuffer in both; KServe "
        f"{versions[0]} (FastAPI {versions[1]} on uvicorn {versions[2]}), "
        "one process, its defaults. Answers compared before the load (1e-6).",
        "",
        "| point | digitserve HTTP: req/s | mean ms | KServe REST: req/s | mean ms | digitserve ÷ KServe |",
        "|---|---|---|---|---|---|",
    ]
    for point in points:
        ours, theirs = statistics.median(rps["ours", point]), statistics.median(rps["kserve", point])
        lines.append(f"| {LABELS[point]} | {ours:,.0f} | {statistics.median(latency['ours', point]):.2f} | "
                     f"{theirs:,.0f} | {statistics.median(latency['kserve', point]):.2f} | "
                     f"**{ours / theirs:.2f}×** |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.write:
        command = "python -m bench.rest " + " ".join(argv if argv is not None else sys.argv[1:])
        write_section(REPO_ROOT / "BENCHMARKS.md", BEGIN, END, command, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
