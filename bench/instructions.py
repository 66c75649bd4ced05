"""Instructions per request, counted by callgrind (``valgrind --tool=callgrind``): a figure a
busy machine cannot move (runs differ by about 1-2 %: gRPC's threads wake on timers), for
digitserve, KServe on the same LiteRT flatbuffer and the null server, on the calls of
``bench.versus``:

    python -m bench.instructions --server digitserve --edge v2-grpc --shape 1x64 \\
        --model-repo out/bench-repo --model-name mnist --version 1

The server runs under callgrind with instrumentation off; h2load sends ``--warmup`` requests, then
instrumentation is on while it sends ``--calls`` more (the shape's calls in flight, one
connection; HTTP/1.1 keep-alive connections for ``v2-rest``), then off. Every thread of the
server counts (gRPC's poller included). Besides the total per request it splits the instructions
by the shared object that ran them (the Python interpreter, gRPC's core and Cython layer,
protobuf's upb, numpy, LiteRT and XNNPACK, libc), which says whether a saving came from the
interpreter (our Python) or from the libraries. ``--tree`` measures another checkout's
mnist-serve; ``--json`` prints one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import rest, versus
from bench.h2load import grpc_frame, parse
from bench.servers import BenchError

REPO_ROOT = Path(__file__).resolve().parent.parent
# Shared objects by what they are, first match wins.
COMPONENTS = (
    ("Python interpreter", re.compile(r"libpython|/python3(\.\d+)?$|/bin/python")),
    ("gRPC core and Cython", re.compile(r"cygrpc|libgrpc|libabsl|libupb|/grpc/")),
    ("protobuf (upb)", re.compile(r"_message\.abi3|protobuf|_upb")),
    ("numpy", re.compile(r"numpy")),
    ("LiteRT and XNNPACK", re.compile(r"litert|tflite|tensorflow")),
    ("libc, libm, loader", re.compile(r"libc\.so|libm\.so|ld-linux|libpthread|libstdc\+\+|libgcc")),
)
_NAMED = re.compile(r"^(ob|fl|fi|fe|fn|cob|cfi|cfl|cfn)=(?:\((\d+)\))?\s*(.*)$")


def read_callgrind(path: Path) -> tuple[int, dict[str, int]]:
    """The total instructions (Ir) of a callgrind output file and each shared object's own
    (exclusive) instructions. Parses the format's name compression and skips the inclusive costs
    that follow ``calls=`` lines."""
    names: dict[tuple[str, str], str] = {}
    own: collections.Counter[str] = collections.Counter()
    total = 0
    obj = "?"
    after_call = False
    with path.open() as lines:
        for line in lines:
            if not line or line[0] in "#\n":
                continue
            first = line[0]
            if first.isdigit() or first in "+-*":
                if after_call:
                    after_call = False
                    continue
                parts = line.split()
                if len(parts) > 1:
                    own[obj] += int(parts[1])
                continue
            if line.startswith("calls="):
                after_call = True
                continue
            match = _NAMED.match(line.rstrip("\n"))
            if match:
                kind, ident, name = match.groups()
                space = kind.lstrip("c") if kind != "cob" else "ob"
                space = {"fi": "fl", "fe": "fl"}.get(space, space)
                if ident is not None:
                    if name:
                        names[space, ident] = name
                    else:
                        name = names.get((space, ident), ident)
                if kind == "ob":
                    obj = name
                continue
            if line.startswith(("summary:", "totals:")):
                total = max(total, int(line.split()[1]))
    return total or sum(own.values()), dict(own)


def components(own: dict[str, int]) -> dict[str, int]:
    grouped: collections.Counter[str] = collections.Counter()
    for obj, cost in own.items():
        for name, pattern in COMPONENTS:
            if pattern.search(obj):
                grouped[name] += cost
                break
        else:
            grouped["other (kernel entry, other extensions)"] += cost
    return dict(grouped)


def h2load_n(server: versus.Pinned, edge: str, shape: str, body: Path, model: str, calls: int) -> None:
    """``calls`` requests of bench.versus's kind (``-n``: a count, not a duration; not pinned)."""
    argv = ["h2load", "-t", "1", "-n", str(calls), "-d", str(body),
            *versus.h2load_target(server, edge, shape, model)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=3600)
    result = parse(done.stdout) if done.returncode == 0 else None
    if result is None or result["succeeded"] != calls:
        raise BenchError(f"h2load against {server.name} under callgrind: {done.stdout[-800:]}"
                         f"{done.stderr[-500:]}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--server", choices=["digitserve", "kserve", "null"], default="digitserve")
    parser.add_argument("--edge", choices=list(versus.EDGES), default="v2-grpc")
    parser.add_argument("--shape", choices=list(versus.SHAPES), default="1x64")
    parser.add_argument("--calls", type=int, default=400, help="requests counted (default: 400)")
    parser.add_argument("--warmup", type=int, default=200, help="requests before (default: 200)")
    versus.add_server_options(parser, model_repo=REPO_ROOT / "out" / "bench-repo")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--keep", type=Path, help="keep callgrind's output file there")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.server == "null" and args.edge != "predict":
        raise SystemExit("--server null serves Predict only: --edge predict")
    body = versus.payloads(rest.mnist_pixels(args.data_dir, 64), args.model_name)[args.edge, args.shape]
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as tmp:
        out = Path(tmp) / "callgrind.out"
        body_file = Path(tmp) / "body.bin"
        body_file.write_bytes(body if args.edge == "v2-rest" else grpc_frame(body))
        server = versus.start(args.server, args, Path(tmp), wrap=[
            "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"])
        try:
            versus.wait_ready(server, args.model_name, timeout=900)
            h2load_n(server, args.edge, args.shape, body_file, args.model_name, args.warmup)
            subprocess.run(["callgrind_control", "-i", "on", str(server.proc.pid)], check=True,
                           capture_output=True)
            started = time.monotonic()
            h2load_n(server, args.edge, args.shape, body_file, args.model_name, args.calls)
            seconds = time.monotonic() - started
            subprocess.run(["callgrind_control", "-i", "off", str(server.proc.pid)], check=True,
                           capture_output=True)
        finally:
            server.stop()
        total, own = read_callgrind(out)
        if args.keep is not None:
            shutil.copyfile(out, args.keep)
    per = {name: cost / args.calls for name, cost in components(own).items()}
    result: dict[str, Any] = {
        "server": args.server, "edge": args.edge, "shape": args.shape, "calls": args.calls,
        "instructions_per_request": round(total / args.calls),
        "by_component": {k: round(v) for k, v in sorted(per.items(), key=lambda kv: -kv[1])},
        "seconds_under_callgrind": round(seconds, 1)}
    if args.json:
        print(json.dumps(result))
    else:
        count, in_flight = versus.SHAPES[args.shape]
        print(f"{args.server} {args.edge} {count} image(s) x {in_flight} in flight, {args.calls} "
              f"requests: {result['instructions_per_request']:,} instructions per request")
        for name, cost in result["by_component"].items():
            print(f"  {cost:>12,.0f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
