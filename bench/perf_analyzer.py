"""perf_analyzer, Triton's load tester, in its default mode (no ``--service-kind``: Triton's own
protocol, which is the Open Inference Protocol plus Triton's extensions) against mnist-serve's V2
edges, beside the project's own load tools making the same calls: ``mnist-client loadtest
--protocol oip --encoding uint8`` on gRPC (ModelInfer of one UINT8 image) and h2load ``--h1`` on
HTTP (V2 infer of one UINT8 image with the binary data extension, as perf_analyzer sends it). The
server is pinned to CPU 0 and every load tool to CPU 1 (``taskset``, as bench.pinned does); at
each point the tools take turns, their order alternating between rounds, so that a shared
machine's drift falls on all alike; each figure is the median over the rounds.

    .ci/perf-analyzer.sh                # once: perf_analyzer in .perf-venv
    python -m bench.perf_analyzer --model-repo out/bench-repo --data-dir data --write

perf_analyzer runs with random data (its default) and with real test images (``--input-data``,
a JSON file of the first ``--images`` MNIST test images), over gRPC and HTTP, at each
``--concurrency``. The functions above ``main`` are what tests/interop/test_perf_analyzer.py uses.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.servers import BenchError, write_section

REPO_ROOT = Path(__file__).resolve().parent.parent
WRAPPER = REPO_ROOT / "bench" / "perf-analyzer"
BEGIN = "<!-- perf-analyzer:begin (written by `python -m bench.perf_analyzer --write`) -->"
END = "<!-- perf-analyzer:end -->"


def binary() -> Path:
    """Where .ci/perf-analyzer.sh puts the binary that bench/perf-analyzer runs ($PERF_VENV)."""
    venv = Path(os.environ.get("PERF_VENV", REPO_ROOT / ".perf-venv"))
    return venv / "bin" / "perf_analyzer"


def input_data(images: npt.NDArray[np.uint8], described: dict[str, Any]) -> dict[str, Any]:
    """perf_analyzer's ``--input-data`` JSON of ``images`` (N × H × W pixels, 0–255) for the model
    whose V2 model metadata is ``described``: one entry per image, the pixels in the input's declared
    datatype (UINT8 as they are, FP32 scaled to [0, 1]) and in its shape without the batch
    dimension."""
    (tensor,) = described["inputs"]
    shape = [int(d) for d in tensor["shape"]]
    dims = shape[1:] if shape[0] == -1 else shape
    if int(np.prod(dims)) != images[0].size:
        raise BenchError(f"input {tensor['name']!r} holds {dims}, not {images[0].size} pixels")
    if tensor["datatype"] == "UINT8":
        rows: list[list[Any]] = [image.ravel().tolist() for image in images]
    elif tensor["datatype"] == "FP32":
        rows = [(image.ravel() / np.float32(255)).tolist() for image in images]
    else:
        raise BenchError(f"input {tensor['name']!r} is {tensor['datatype']}: expected UINT8 or FP32")
    return {"data": [{tensor["name"]: {"content": row, "shape": dims}} for row in rows]}


@dataclass
class Run:
    """One perf_analyzer run: its exit code and output, and per concurrency the client's figures
    from its CSV (``-f``), and the requests the client counted and those the server's statistics
    say succeeded (both over the same measurement windows) from its report."""

    returncode: int
    output: str
    rows: list[dict[str, float]]  # concurrency, rps, p50_ms, p99_ms, avg_ms
    requests: dict[int, int]
    served: dict[int, int]

    def check(self) -> None:
        """Raises BenchError unless the run exited 0 with a throughput at every concurrency."""
        if self.returncode != 0 or not self.rows or any(row["rps"] <= 0 for row in self.rows):
            raise BenchError(f"perf_analyzer exited {self.returncode}, rows {self.rows}:\n"
                             f"{self.output[-3000:]}")


def run(target: str, *, protocol: str, model: str, concurrency: Sequence[int], workdir: Path,
        streaming: bool = False, data: Path | None = None, measurement: Sequence[str] = (),
        cpu: str | None = None, timeout: float = 300) -> Run:
    """Runs perf_analyzer (bench/perf-analyzer) against ``target`` (host:port) over ``protocol``
    (grpc or http) at each ``concurrency`` in turn; ``data``: an ``--input-data`` file (random
    data without one); ``measurement``: its measurement options (time windows of 5 s by
    default); ``cpu``: a taskset CPU list to pin it to."""
    table = workdir / f"perf-{protocol}-{os.getpid()}-{time.monotonic_ns()}.csv"
    argv = [str(WRAPPER), "-m", model, "-u", target, "-i", protocol, "-f", str(table),
            "--concurrency-range", ",".join(str(c) for c in concurrency) if len(concurrency) == 1
            else f"{min(concurrency)}:{max(concurrency)}", *measurement]
    if streaming:
        argv.append("--streaming")
    if data is not None:
        argv += ["--input-data", str(data)]
    if cpu is not None:
        argv = ["taskset", "-c", cpu, *argv]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout)
        returncode, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as late:  # killed: what it printed says where it stopped
        returncode = -9
        output = "".join(part.decode(errors="replace") if isinstance(part, bytes) else part or ""
                         for part in (late.stdout, late.stderr))
        output += f"\n(perf_analyzer killed after {timeout:g} s)"
    rows = _rows(table, output) if table.exists() else []
    table.unlink(missing_ok=True)
    wanted = set(concurrency)
    return Run(returncode, output, [r for r in rows if r["concurrency"] in wanted],
               *_report_counts(output))


def _rows(table: Path, output: str) -> list[dict[str, float]]:
    """The client's figures per concurrency, in its order: throughput and percentiles from perf_analyzer's CSV
    (latencies in µs there), the average from its summary lines (the CSV splits it into parts, and
    which parts depends on whether the server reports statistics)."""
    average = {int(level): float(us) / 1000 for level, us in re.findall(
        r"^Concurrency: (\d+), throughput: [\d.]+ infer/sec, latency (\d+) usec", output, flags=re.M)}
    with table.open(newline="") as f:
        rows = [{"concurrency": float(row["Concurrency"]), "rps": float(row["Inferences/Second"]),
                 "p50_ms": float(row["p50 latency"]) / 1000, "p99_ms": float(row["p99 latency"]) / 1000,
                 "avg_ms": average.get(int(row["Concurrency"]), float("nan"))}
                for row in csv.DictReader(f)]
    return sorted(rows, key=lambda row: row["concurrency"])  # the CSV is in order of throughput


def _report_counts(output: str) -> tuple[dict[int, int], dict[int, int]]:
    """Per concurrency, from perf_analyzer's report: the client's ``Request count`` and the
    server's ``Successful request count`` (printed only when the server lists the statistics
    extension and answers ModelStatistics)."""
    client: dict[int, int] = {}
    server: dict[int, int] = {}
    for block in re.split(r"^Request concurrency: ", output, flags=re.M)[1:]:
        level = int(block.split(None, 1)[0])
        if found := re.search(r"^    Request count: (\d+)", block, flags=re.M):
            client[level] = int(found.group(1))
        if found := re.search(r"^    Successful request count: (\d+)", block, flags=re.M):
            server[level] = int(found.group(1))
    return client, server


# --- the benchmark --------------------------------------------------------------------------------

EDGES = {"grpc": "gRPC ModelInfer", "http": "HTTP V2 infer", "stream": "gRPC ModelStreamInfer"}
TOOLS = ("ours", "pa-random", "pa-images")
LABELS = {"ours": "our tool", "pa-random": "perf_analyzer random data",
          "pa-images": "perf_analyzer test images"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.perf_analyzer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--model-repo", type=Path, default=REPO_ROOT / "out" / "bench-repo",
                        help="model repository (default: out/bench-repo, where `make bench` trains)")
    parser.add_argument("--model-name", default="mnist", help="model to serve (default: mnist)")
    parser.add_argument("--tree", type=Path, default=REPO_ROOT,
                        help="the checkout whose mnist-serve is measured (default: this one)")
    parser.add_argument("--data-dir", type=Path,
                        default=Path(os.environ.get("MNIST_DATA_DIR", REPO_ROOT / "data")),
                        help="MNIST IDX files (default: $MNIST_DATA_DIR or ./data)")
    parser.add_argument("--concurrency", default="1,2,4,8,16",
                        help="comma-separated calls in flight (default: %(default)s)")
    parser.add_argument("--edges", default="grpc,http,stream",
                        help="comma-separated: grpc, http, stream (perf_analyzer --streaming) "
                        "(default: %(default)s)")
    parser.add_argument("--duration", type=float, default=5.0,
                        help="seconds per point and tool (perf_analyzer: its 3 windows together; "
                        "default: 5)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (default: 2); each figure is "
                        "the median over them")
    parser.add_argument("--images", type=int, default=100,
                        help="test images in perf_analyzer's --input-data (default: 100)")
    parser.add_argument("--stability", type=int, default=50,
                        help="perf_analyzer's --stability-percentage (default: 50; its own 10 is "
                        "rarely met on a shared machine)")
    parser.add_argument("--server-cpu", default="0", help="taskset CPU list of the server (default: 0)")
    parser.add_argument("--load-cpu", default="1", help="taskset CPU list of the tools (default: 1)")
    parser.add_argument("--json-out", type=Path, help="also write every run as JSON")
    parser.add_argument("--write", action="store_true", help="put the table into BENCHMARKS.md")
    return parser


def _http_body(images: npt.NDArray[np.uint8], described: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    """What perf_analyzer sends over HTTP (read off the wire): one image's UINT8 pixels with the
    binary data extension, every output of the metadata asked for as binary data."""
    raw = images[0].ravel().tobytes()
    header = json.dumps({
        "id": "", "inputs": [{"name": described["inputs"][0]["name"], "datatype": "UINT8",
                              "shape": [1, len(raw)], "parameters": {"binary_data_size": len(raw)}}],
        "outputs": [{"name": output["name"], "parameters": {"binary_data": True}}
                    for output in sorted(described["outputs"], key=lambda o: str(o["name"]))],
    }, separators=(",", ":")).encode()
    return header + raw, {"Content-Type": "application/octet-stream",
                          "Inference-Header-Content-Length": str(len(header))}


def _loadtest(target: str, concurrency: int, args: argparse.Namespace) -> dict[str, Any]:
    """mnist-client loadtest: V2 ModelInfer of one UINT8 test image, one connection."""
    argv = ["taskset", "-c", args.load_cpu, sys.executable, "-m", "digitserve.client", "--target",
            target, "loadtest", "--protocol", "oip", "--encoding", "uint8", "--model-name",
            args.model_name, "--data-dir", str(args.data_dir), "--concurrency", str(concurrency),
            "--duration", f"{args.duration:g}", "--processes", "1", "--connections", "1", "--json"]
    done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, check=False,
                          timeout=args.duration + 120)
    if done.returncode != 0:
        raise BenchError(f"mnist-client loadtest exited {done.returncode}: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if result["errors"]:
        raise BenchError(f"mnist-client loadtest: errors {result['errors']}")
    return {"rps": result["rps"], "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"]}


def _h2load(port: int, concurrency: int, body: Path, headers: dict[str, str],
            args: argparse.Namespace) -> dict[str, Any]:
    """h2load --h1 with ``concurrency`` keep-alive connections (bench.rest's load)."""
    from bench.rest import h2load

    load = argparse.Namespace(load_cpu=args.load_cpu, connections=concurrency, duration=args.duration)
    result = h2load(port, f"/v2/models/{args.model_name}/infer", body, headers, load)
    return {"rps": result["rps"], "mean_ms": result.get("mean_ms", float("nan"))}


def window_ms(duration: float) -> int:
    """perf_analyzer's measurement window for a point of about ``duration`` seconds: a third of
    it (three windows make a measurement), at least 200 ms."""
    return max(200, round(duration * 1000 / 3))


def point(target: str, *, protocol: str, model: str, concurrency: int, duration: float,
          stability: float, cpu: str | None, workdir: Path, streaming: bool = False,
          data: Path | None = None, extra: Sequence[str] = ()) -> Run | None:
    """perf_analyzer at one concurrency for about ``duration`` seconds: three measurement windows
    that must agree within ``stability`` per cent (at most 20 tries), ``extra`` options added
    (``-b``). None when they never agreed (it then reports nothing, exit 2)."""
    measurement = (*extra, "--measurement-interval", str(window_ms(duration)), "--stability-percentage",
                   f"{stability:g}", "--max-trials", "20")
    result = run(target, protocol=protocol, model=model, concurrency=[concurrency], workdir=workdir,
                 streaming=streaming, data=data, measurement=measurement, cpu=cpu,
                 timeout=duration * 10 + 60)
    if result.returncode == 2 and "Failed to obtain stable measurement" in result.output:
        return None
    return result


def _perf_analyzer(target: str, edge: str, concurrency: int, data: Path | None,
                   args: argparse.Namespace, workdir: Path) -> dict[str, Any] | None:
    """perf_analyzer's figures at one point; None when its windows never agreed within
    --stability: the point is left out of this round."""
    result = point(target, protocol="http" if edge == "http" else "grpc", model=args.model_name,
                   concurrency=concurrency, duration=args.duration, stability=args.stability,
                   cpu=args.load_cpu, workdir=workdir, streaming=edge == "stream", data=data)
    if result is None:
        return None
    result.check()
    (row,) = result.rows
    return {"rps": row["rps"], "p50_ms": row["p50_ms"], "p99_ms": row["p99_ms"],
            "avg_ms": row["avg_ms"], "requests": result.requests.get(concurrency, 0)}


def _wait_http(port: int, model: str, timeout: float = 60) -> dict[str, Any]:
    """The model's V2 metadata, once the HTTP edge answers (it binds after gRPC health serves)."""
    until = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/{model}", timeout=2) as r:
                described: dict[str, Any] = json.loads(r.read())
                return described
        except OSError:
            if time.monotonic() > until:
                raise
            time.sleep(0.2)


def _cell(result: dict[str, Any] | None) -> str:
    if result is None:
        return "– | –"
    if "p50_ms" in result:
        return f"{result['rps']:,.0f} | {result['p50_ms']:.2f} / {result['p99_ms']:.2f}"
    return f"{result['rps']:,.0f} | {result['mean_ms']:.2f} (mean)"


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median throughput (the lower middle one of an even count)."""
    ordered = sorted(runs, key=lambda r: float(r["rps"]))
    return ordered[(len(ordered) - 1) // 2]


def table(results: dict[tuple[str, int, str], list[dict[str, Any]]], edges: Sequence[str],
          levels: Sequence[int]) -> list[str]:
    """The markdown table of the medians: one row per edge and concurrency."""
    lines = ["| edge | in flight | our tool: req/s | p50 / p99 ms | perf_analyzer, random data: "
             "req/s | p50 / p99 ms | perf_analyzer, test images: req/s | p50 / p99 ms |",
             "|---|---|---|---|---|---|---|---|"]
    for edge in edges:
        for level in levels:
            cells = [_cell(_median(results[edge, level, tool]) if results.get((edge, level, tool))
                           else None) for tool in TOOLS]
            lines.append(f"| {EDGES[edge]} | {level} | " + " | ".join(cells) + " |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    from bench.pinned import http_port, start_server
    from digitserve.idx import read_idx

    args = build_parser().parse_args(argv)
    if not binary().exists():
        print(f"{binary()}: no perf_analyzer (.ci/perf-analyzer.sh installs it)", file=sys.stderr)
        return 2
    levels = [int(c) for c in args.concurrency.split(",")]
    edges = [e for e in args.edges.split(",") if e]
    if unknown := [e for e in edges if e not in EDGES]:
        print(f"--edges: {', '.join(unknown)}: expected grpc, http or stream", file=sys.stderr)
        return 2
    images = read_idx(args.data_dir / "t10k-images-idx3-ubyte.gz")[:args.images]
    results: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    unstable: list[str] = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-perf-") as tmp:
        workdir = Path(tmp)
        options = argparse.Namespace(server_cpu=args.server_cpu, model_repo=args.model_repo,
                                     model_name=args.model_name, http=True)
        server = start_server("ours", args.tree.resolve(), options, workdir)
        try:
            port = http_port(server)
            described = _wait_http(port, args.model_name)
            data = workdir / "images.json"
            data.write_text(json.dumps(input_data(images, described)))
            body, headers = _http_body(images, described)
            body_file = workdir / "body.bin"
            body_file.write_bytes(body)
            for index in range(args.rounds):
                for edge in edges:
                    target = f"127.0.0.1:{port}" if edge == "http" else server.target
                    for level in levels:
                        for tool in TOOLS if index % 2 == 0 else TOOLS[::-1]:
                            if tool == "ours" and edge == "stream":
                                continue  # the project's tools have no streaming mode
                            if tool == "ours":
                                result: dict[str, Any] | None = (
                                _h2load(port, level, body_file, headers, args) if edge == "http"
                                else _loadtest(server.target, level, args))
                            else:
                                result = _perf_analyzer(target, edge, level,
                                                        data if tool == "pa-images" else None,
                                                        args, workdir)
                            print(f"round {index + 1} {edge:>6} {level:>2} in flight {tool:>9}: "
                                  f"{_cell(result) if result else 'not stable'}", flush=True)
                            if result is None:
                                unstable.append(f"{EDGES[edge]}, {level} in flight, {LABELS[tool]}, "
                                                f"round {index + 1}")
                            else:
                                results.setdefault((edge, level, tool), []).append(result)
        finally:
            server.stop()
    slower = " (of two, the slower)" if args.rounds == 2 else ""
    lines = [
        f"Server on CPU {args.server_cpu}, each tool on CPU {args.load_cpu} (taskset), one "
        f"mnist-serve (1 worker, model {args.model_name}) for all runs; {args.rounds} round(s), the "
        f"tools' order alternating; {args.duration:g} s per point and tool (perf_analyzer: "
        f"{window_ms(args.duration)} ms windows, --stability-percentage "
        f"{args.stability}); the median run by req/s{slower}. Our tool: `mnist-client loadtest "
        "--protocol oip --encoding uint8 --processes 1 --connections 1` on gRPC, h2load `--h1` on "
        "HTTP (the body perf_analyzer sends, from a file); perf_analyzer 2.34.0 in its default "
        f"mode, random data and the first {args.images} test images (`--input-data`). "
        f"{os.cpu_count()} CPUs; load average (1 min) {load_before:.2f} before the run and "
        f"{os.getloadavg()[0]:.2f} after.",
        "",
        *table(results, edges, levels),
    ]
    if unstable:
        lines += ["", "perf_analyzer's windows never agreed within the stability percentage "
                  "(that run left out of the median; '–' where no round was stable): "
                  + "; ".join(unstable) + "."]
    text = "\n".join(lines)
    print("\n" + text)
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(
            {" ".join(map(str, key)): runs for key, runs in results.items()}, indent=2) + "\n")
    if args.write:
        _write(text, argv)
    return 0


def _write(text: str, argv: Sequence[str] | None) -> None:
    command = "python -m bench.perf_analyzer " + " ".join(argv if argv is not None else sys.argv[1:])
    write_section(REPO_ROOT / "BENCHMARKS.md", BEGIN, END, command, text)


if __name__ == "__main__":
    sys.exit(main())
