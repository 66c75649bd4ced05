"""Before/after in one run, server-bound: each checkout's server pinned to CPU 0 and the load tester
to CPU 1 (``taskset``), rounds alternating between the checkouts so that a shared machine's drift
falls on both alike; prints each round, the median req/s of each checkout and the ratio to the
first one. ``--http``: the HTTP/JSON edge instead (V2 infer of ``--batch`` images as JSON, h2load
``--h1`` with ``--concurrency`` keep-alive connections, as bench.rest loads it).

    python -m bench.pinned --tree before=/tmp/main-f2f0df1 --tree after=. \\
        --model-repo out/bench-repo --model-name mnist --data-dir data
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

from bench.servers import BenchError, RunningServer, ServerSpec, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent


def _tree(text: str) -> tuple[str, Path]:
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LABEL=PATH")
    root = Path(path).resolve()
    if _layout(root) is None:
        raise argparse.ArgumentTypeError(
            f"{root}: not a digitserve checkout (no server/digitserve/server/__main__.py)")
    return label, root


def _layout(root: Path) -> tuple[str, list[Path]] | None:
    """The server's module and the PYTHONPATH of a checkout: today's namespace layout, or the
    flat one before it (so that a tree from before the move can be the baseline)."""
    if (root / "server" / "digitserve" / "server" / "__main__.py").is_file():
        return "digitserve.server", [root / d for d in ("core", "protos", "server", "client", "trainer")]
    if (root / "server" / "__main__.py").is_file():
        return "server", [root, root / "protos"]
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.pinned", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--tree", type=_tree, action="append", required=True,
                        help="LABEL=PATH of a checkout whose server is measured; give two or more, "
                        "the first is the baseline of the ratios")
    parser.add_argument("--model-repo", type=Path, required=True, help="model repository")
    parser.add_argument("--model-name", default="mnist", help="model to serve (default: mnist)")
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT / "data",
                        help="MNIST IDX files for the load tester (default: ./data)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per checkout (default: 4)")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per round (default: 8)")
    parser.add_argument("--concurrency", type=int, default=64, help="calls in flight (default: 64)")
    parser.add_argument("--batch", type=int, default=1, help="images per call (default: 1)")
    parser.add_argument("--server-cpu", default="0", help="taskset CPU list of the server (default: 0)")
    parser.add_argument("--load-cpu", default="1", help="taskset CPU list of the tester (default: 1)")
    parser.add_argument("--http", action="store_true",
                        help="load the HTTP/JSON edge (V2 infer, h2load --h1) instead of gRPC Predict")
    parser.add_argument("--json-out", type=Path, help="also write every round as JSON")
    return parser


def start_server(label: str, root: Path, args: argparse.Namespace, log_dir: Path) -> RunningServer:
    """The mnist-serve of checkout ``root`` on ``args.server_cpu`` (with an HTTP port when
    ``args.http``), once its gRPC health says SERVING; bench.perf_analyzer starts its server here too."""
    port = free_port()
    layout = _layout(root)
    assert layout is not None
    module, path = layout
    argv = ["taskset", "-c", args.server_cpu, sys.executable, "-m", module, "--port", str(port),
            "--model-repo", str(args.model_repo.resolve()), "--model-name", args.model_name,
            "--reload-interval", "0", "--log-format", "json", "--log-level", "WARNING"]
    if args.http:
        argv += ["--http-port", str(free_port())]
    env = {"PYTHONPATH": os.pathsep.join(map(str, path))}
    spec = ServerSpec(name=label, kind="ours", argv=["env", "-C", str(root), *argv], env=env)
    server = RunningServer(spec, port, log_dir / f"{label}.log")
    server.wait_serving(120)
    return server


def _load(target: str, args: argparse.Namespace) -> dict[str, Any]:
    argv = ["taskset", "-c", args.load_cpu, sys.executable, "-m", "digitserve.client", "--target", target,
            "loadtest", "--data-dir", str(args.data_dir), "--concurrency", str(args.concurrency),
            "--batch", str(args.batch), "--duration", str(args.duration), "--processes", "1",
            "--json"]
    done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"load tester exited {done.returncode}: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def http_port(server: RunningServer) -> int:
    """The HTTP port a server was given (--http-port N of its command line)."""
    argv = server.spec.argv
    return int(argv[argv.index("--http-port") + 1])


def _http_load(server: RunningServer, args: argparse.Namespace, body_file: Path) -> dict[str, Any]:
    from bench.rest import h2load

    port = http_port(server)
    until = time.monotonic() + 60
    while True:  # gRPC health serves before the HTTP edge may have bound
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2):
                break
        except OSError:
            if time.monotonic() > until:
                raise
            time.sleep(0.2)
    load = argparse.Namespace(load_cpu=args.load_cpu, connections=args.concurrency, duration=args.duration)
    result = h2load(port, f"/v2/models/{args.model_name}/infer", body_file,
                    {"Content-Type": "application/json"}, load)
    # h2load reports the mean latency, not percentiles: both columns show it.
    return {"rps": result["rps"], "p50_ms": result.get("mean_ms", 0.0),
            "p99_ms": result.get("max_ms", 0.0), "errors": {}}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    trees: list[tuple[str, Path]] = args.tree
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-pinned-") as tmp:
        body_file = Path(tmp) / "body.json"
        if args.http:
            from bench.rest import as_json, mnist_pixels

            body_file.write_bytes(as_json(mnist_pixels(args.data_dir, args.batch)))
        for round_index in range(args.rounds):
            order = trees if round_index % 2 == 0 else trees[::-1]
            for label, root in order:
                server = start_server(label, root, args, Path(tmp))
                try:
                    result = (_http_load(server, args, body_file) if args.http
                              else _load(server.target, args))
                finally:
                    server.stop()
                row = {"round": round_index + 1, "tree": label, "rps": result["rps"],
                       "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"],
                       "errors": result["errors"]}
                rows.append(row)
                low, high = ("mean", "max") if args.http else ("p50", "p99")  # what h2load reports
                print(f"round {row['round']} {label:>10}: {row['rps']:9.1f} req/s  "
                      f"{low} {row['p50_ms']:.2f} ms  {high} {row['p99_ms']:.2f} ms  errors {row['errors']}",
                      flush=True)
    medians = {label: statistics.median(r["rps"] for r in rows if r["tree"] == label)
               for label, _ in trees}
    base_label = trees[0][0]
    edge = "HTTP/JSON V2 infer" if args.http else "gRPC Predict"
    print(f"\n{edge}: {args.concurrency} in flight, {args.batch} image(s) per call, server on CPU "
          f"{args.server_cpu}, tester on CPU {args.load_cpu}, {args.rounds} rounds of {args.duration:g} s")
    for label, _ in trees:
        print(f"  {label:>10}: median {medians[label]:9.1f} req/s  "
              f"({medians[label] / medians[base_label]:.3f}x {base_label})")
    if args.json_out is not None:
        args.json_out.write_text(json.dumps({"rows": rows, "medians": medians}, indent=2) + "\n")
    failed = any(r["errors"] for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
