"""CPU per request and throughput of mnist-serve under different flags, on the same calls: the
A/B measurement behind a default that changes how the server runs (``--event-loop``,
``--scheduler-policy``), where instruction counts cannot see the change (a context switch, a
wake-up) or valgrind would serialise the threads whose hand-offs it is about.

    python -m bench.variants --model-repo out/bench-repo --edge v2-grpc --shape 1x64 \\
        --variant "normal=--scheduler-policy normal" --variant "batch=--scheduler-policy batch"

Every variant (``NAME=FLAGS``: mnist-serve's flags, split as a shell would) starts once, pinned to
``--server-cpu`` as ``bench.versus`` starts digitserve (this checkout, or ``--tree``; HTTP edge on).
h2load, pinned to ``--load-cpu``, sends ``--requests`` calls of one edge and shape (``bench.versus``'
bodies and targets) to each in turn, the order reversed every other round, ``--rounds`` rounds after
a warm-up of a tenth as many calls. CPU is the server process's and its children's user + system
time from ``/proc`` (every thread: grpc's event engine and poller, the model thread) over the calls
of the round. Each variant's answers are read and compared with the first's (1e-6) before the load.

The table: each variant's CPU µs per request and req/s in each round, their medians, and the median
over the rounds of each round's ratio to the first variant (a slow minute of the shared machine
falls on both sides of a round alike).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench import rest, versus
from bench.h2load import grpc_frame, parse
from bench.servers import BenchError


@dataclass
class Variant:
    name: str
    flags: list[str]
    cpu_us: list[float] = field(default_factory=list)  # per request, each round
    rps: list[float] = field(default_factory=list)


def parse_variant(text: str) -> Variant:
    """``NAME=FLAGS`` (FLAGS may be empty: the defaults)."""
    name, sep, flags = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected NAME=FLAGS, e.g. 'normal=--scheduler-policy normal'")
    return Variant(name.strip(), shlex.split(flags))


def process_cpu_seconds(pid: int) -> float:
    """User + system seconds of ``pid`` and of its children still running (every thread)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    seconds = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    children = Path(f"/proc/{pid}/task/{pid}/children")
    for child in children.read_text().split() if children.exists() else ():
        with contextlib.suppress(FileNotFoundError):  # ended meanwhile
            seconds += process_cpu_seconds(int(child))
    return seconds


def ratios(subject: list[float], baseline: list[float]) -> float:
    """The median over the rounds of subject ÷ baseline in the same round."""
    return statistics.median(s / b for s, b in zip(subject, baseline, strict=True))


def table(variants: list[Variant]) -> list[str]:
    first = variants[0]
    lines = ["| variant | mnist-serve flags | CPU µs per request, each round | median | ÷ first | "
             "req/s, each round | median | ÷ first |", "|---|---|---|---|---|---|---|---|"]
    for v in variants:
        flags = f"`{shlex.join(v.flags)}`" if v.flags else "(defaults)"
        lines.append(
            f"| {v.name} | {flags} | {' / '.join(f'{c:,.0f}' for c in v.cpu_us)} | "
            f"{statistics.median(v.cpu_us):,.0f} | {ratios(v.cpu_us, first.cpu_us):.3f} | "
            f"{' / '.join(f'{r:,.0f}' for r in v.rps)} | {statistics.median(v.rps):,.0f} | "
            f"{ratios(v.rps, first.rps):.3f} |")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.variants", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    versus.add_server_options(parser, model_repo=None)
    parser.add_argument("--variant", type=parse_variant, action="append", required=True,
                        help="NAME=FLAGS, mnist-serve's flags of one variant (repeat: two or more)")
    parser.add_argument("--edge", choices=["v2-grpc", "predict", "v2-rest"], default="v2-grpc")
    parser.add_argument("--shape", choices=list(versus.SHAPES), default="1x64")
    parser.add_argument("--requests", type=int, default=0,
                        help="calls per variant and round (default: 8000 at 1x64, 3000 at 64x8)")
    parser.add_argument("--rounds", type=int, default=6, help="rounds (default: 6)")
    parser.add_argument("--server-cpu", default="0", help="taskset CPU of the servers (default: 0)")
    parser.add_argument("--load-cpu", default="1", help="taskset CPU of h2load (default: 1)")
    parser.add_argument("--json-out", type=Path, help="also write every round as JSON")
    return parser


def _h2load(server: versus.Pinned, args: argparse.Namespace, body: Path, count: int) -> float:
    argv = ["taskset", "-c", args.load_cpu, "h2load", "-t", "1", "-n", str(count), "-d", str(body),
            *versus.h2load_target(server, args.edge, args.shape, args.model_name)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=600)
    if done.returncode != 0:
        raise BenchError(f"h2load failed ({done.returncode}): {done.stderr[-500:]}")
    result = parse(done.stdout)
    if result["failed"] or result["succeeded"] != count:
        raise BenchError(f"h2load against {server.name}: not every request succeeded: {result}")
    return float(result["rps"])


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    variants: list[Variant] = args.variant
    if len(variants) < 2 or len({v.name for v in variants}) != len(variants):
        print("--variant: give two or more, with different names", file=sys.stderr)
        return 2
    count = args.requests or (8000 if args.shape == "1x64" else 3000)
    body = versus.payloads(rest.mnist_pixels(args.data_dir, 64), args.model_name)[args.edge, args.shape]
    servers: dict[str, versus.Pinned] = {}
    with tempfile.TemporaryDirectory(prefix="bench-variants-") as tmp:
        body_file = Path(tmp) / "body.bin"
        body_file.write_bytes(body if args.edge == "v2-rest" else grpc_frame(body))
        try:
            for v in variants:
                own = copy.copy(args)
                own.server_arg = [*args.server_arg, *v.flags]
                log_dir = Path(tmp) / v.name.replace("/", "_")
                log_dir.mkdir()
                servers[v.name] = versus.start("digitserve", own, log_dir)
            answers = {}
            for v in variants:
                versus.wait_ready(servers[v.name], args.model_name)
                answers[v.name] = versus.answer(servers[v.name], args.edge, body, args.model_name)
                np.testing.assert_allclose(answers[v.name], answers[variants[0].name], rtol=0, atol=1e-6)
                _h2load(servers[v.name], args, body_file, max(100, count // 10))
            for index in range(args.rounds):
                for v in variants if index % 2 == 0 else variants[::-1]:
                    server = servers[v.name]
                    before = process_cpu_seconds(server.proc.pid)
                    rps = _h2load(server, args, body_file, count)
                    v.cpu_us.append((process_cpu_seconds(server.proc.pid) - before) / count * 1e6)
                    v.rps.append(rps)
                    print(f"round {index + 1} {v.name:>12}: {v.cpu_us[-1]:7,.0f} CPU µs per request, "
                          f"{rps:7,.0f} req/s", flush=True)
        finally:
            for server in servers.values():
                server.stop()
    count_images, in_flight = versus.SHAPES[args.shape]
    print(f"\n{args.edge}, {count_images} image(s) × {in_flight} in flight, {count} calls per variant "
          f"and round, {args.rounds} rounds; servers on CPU {args.server_cpu}, h2load on CPU "
          f"{args.load_cpu}\n")
    print("\n".join(table(variants)))
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(
            [{"name": v.name, "flags": v.flags, "cpu_us": v.cpu_us, "rps": v.rps} for v in variants],
            indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
