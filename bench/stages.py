"""Issue 26's per-stage breakdown: where a server's CPU goes on one call of ``bench.versus`` (an
edge and a request shape), from a profiler's samples of the running server, for digitserve beside
KServe (same LiteRT flatbuffer) and the null server on the same calls:

    python -m bench.stages --server digitserve --edge v2-grpc --shape 1x64
    python -m bench.stages --server kserve --edge v2-grpc --shape 1x64 --json

The server starts pinned to ``--server-cpu`` (``bench.versus.start``) and h2load, pinned to
``--load-cpu``, sends the shape's calls (``bench.versus.h2load``, its duration ``--seconds`` + 3 s).
After h2load's 1 s warm-up and half a second more, ``py-spy record --nonblocking --threads
--full-filenames --format raw`` samples every thread of the server ``--rate`` times a second for
``--seconds`` (py-spy leaves out a thread it finds idle: asleep by the OS's account, or in one of a
few known waits), on the load's CPU. Each sample (a collapsed stack, ``frame;frame;... count``, each
frame ``function (file:line)``) goes to the stage of its innermost frame that a rule claims
(``RULES``; the innermost wins, so the access line written inside ``Call.finish`` is logging, not
telemetry, and the model called inside the batcher is the model). A stack no rule claims is the
transport's (gRPC's Cython call handling, aiohttp's protocol, the asyncio loop) on the main thread,
gRPC's poller on the ``_poll_wrapper`` thread, or "other threads". ``--nonblocking`` reads stacks
while they change: py-spy drops what it cannot read (its "Errors", in the table's head line), and a
stack read mid-change may mix two moments' frames (a few samples in a run, stage by their innermost
claimed frame still).

Stages: **receive and parse** (request bytes to objects: the tolerant deserializer, wire.py's
packed reader, oipcodec.to_request, the REST body and its JSON), **validate and convert** (counts,
shapes, limits, pixels to float32: infer.read, pixels.py), **queue and batch** (batcher.py and
dataplane.py around the model call), **model** (the LiteRT interpreter), **encode** (answer to
bytes: oipcodec.to_response and its writer, the output tensors, the serializer, wire.py's encoder,
the REST JSON and response), **telemetry** (metrics, statistics, the Call's bookkeeping),
**logging** (the access line), **handler, other** (the rest of the call wrapper, the servicers, the
HTTP edge's middleware), **other server code**, **HTTP server and framework** (aiohttp, uvicorn,
starlette, FastAPI outside the handler), **transport and event loop**, **gRPC poller thread**,
**other threads**, and **stack not read** (py-spy's ``--nonblocking`` reads a stack while it
changes: a sample without a frame). **Idle** (the event loop's epoll wait, a thread's wait) is
counted but left out of the shares. KServe's rules are coarser: its protocol types' conversions in
and out (``infer_type.py``, pydantic, starlette's request and response), the model, logging (it
logs every gRPC call), prometheus, and the rest of KServe, FastAPI and grpc_interceptor as its
handler.

The table: each stage's share of the busy samples and its CPU µs per request, the share times the
server process's CPU time over the sampling (``/proc/PID/stat``: the samples say where, the kernel's
count how much; ``sampled_busy_seconds``, busy samples ÷ rate, is there to compare) divided by the
requests answered meanwhile (h2load's req/s × the sampled seconds). ``--json`` prints one JSON
object, ``--keep FILE`` keeps py-spy's output, ``--raw FILE`` classifies such a file again without a
server (shares only), ``--stacks N`` prints each stage's N heaviest stacks (innermost frames) to
stderr, to check the rules.
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
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from bench import rest, versus
from bench.h2load import grpc_frame
from bench.servers import BenchError

REPO_ROOT = Path(__file__).resolve().parent.parent
WARM_UP_S = 1.0  # versus.h2load's --warm-up-time
SETTLE_S = 0.5  # after the warm-up, before the sampling starts
LOAD_MARGIN_S = 3.0  # h2load runs this much longer than py-spy samples

PARSE = "receive and parse"
VALIDATE = "validate and convert"
QUEUE = "queue and batch"
MODEL = "model"
ENCODE = "encode"
TELEMETRY = "telemetry"
LOGGING = "logging"
HANDLER = "handler, other"
OTHER_CODE = "other server code"
HTTP = "HTTP server and framework"
LOOP = "transport and event loop"
POLLER = "gRPC poller thread"
THREADS = "other threads"
UNREAD = "stack not read"
IDLE = "idle"
STAGES = (PARSE, VALIDATE, QUEUE, MODEL, ENCODE, TELEMETRY, LOGGING, HANDLER, OTHER_CODE, HTTP, LOOP,
          POLLER, THREADS, UNREAD)  # the busy ones, in the table's order; IDLE is left out


class Frame(NamedTuple):
    function: str  # py-spy's name: the qualified name on Python 3.11 (``Call.finish``)
    file: str

    @classmethod
    def parse(cls, text: str) -> Frame:
        match = _FRAME.match(text)
        return cls(match.group(1), match.group(2)) if match else cls(text, "")


_FRAME = re.compile(r"^(.*) \(([^()]*?)(?::\d+)?\)$")
_THREAD = re.compile(r"^thread \((?:0x)?[0-9a-fA-F]+\)(?::\s*(.*))?$")  # py-spy --threads' root frame


@dataclass(frozen=True)
class Rule:
    """Claims a frame whose file name matches ``file`` (searched) and whose function's name matches
    ``function`` (in full) for ``stage``; stage None passes over the frame (start-up frames under
    everything the main thread runs). A ``leaf`` rule claims only a stack's innermost frame (a
    thread pool's worker waits in ``_worker`` itself, and runs work under it)."""

    stage: str | None
    file: re.Pattern[str]
    function: re.Pattern[str]
    leaf: bool = False

    def claims(self, frame: Frame) -> bool:
        """A nested function or comprehension (``to_request.<locals>.<listcomp>``) is its enclosing
        function's unless a rule names it."""
        if self.file.search(frame.file) is None:
            return False
        name = frame.function
        while True:
            if self.function.fullmatch(name) is not None:
                return True
            name, found, _ = name.rpartition(".<locals>.")
            if not found:
                return False


def rule(stage: str | None, file: str, function: str = ".*", leaf: bool = False) -> Rule:
    return Rule(stage, re.compile(file), re.compile(function), leaf)


_DS = r"/digitserve/server/"
_IDLE = [  # waits: the event loop's epoll, a thread's lock or queue
    rule(IDLE, r"(^|/)selectors\.py$", r"\w*Selector\.select", leaf=True),
    rule(IDLE, r"(^|/)threading\.py$", r"(Condition|Event|Semaphore|Thread)\.(wait|acquire|join)", leaf=True),
    rule(IDLE, r"(^|/)queue\.py$", r"Queue\.get", leaf=True),
    rule(IDLE, r"(^|/)concurrent/futures/thread\.py$", r"_worker", leaf=True),
]
_LITERT = [rule(MODEL, r"/(ai_edge_litert|tflite_runtime|tensorflow|keras)/")]
_LOGGING = [rule(LOGGING, r"(^|/)logging/[^/]+\.py$")]
_TELEMETRY = [rule(TELEMETRY, r"/prometheus_client/")]
_HTTP = [rule(HTTP, r"/(aiohttp|uvicorn|starlette|fastapi|h11|httptools)/")]

RULES: dict[str, list[Rule]] = {
    "digitserve": [
        *_IDLE,
        rule(MODEL, r"/digitserve/inference/litert\.py$", r"LiteRTRunner\.__call__|LiteRTModel\.predict"),
        rule(MODEL, r"/digitserve/inference/keras\.py$", r"KerasModel\.(predict|tensorflow_predict)"),
        *_LITERT,
        rule(LOGGING, _DS + r"logs\.py$"),
        *_LOGGING,
        # Receive and parse: bytes (or JSON) to the request's objects.
        rule(PARSE, _DS + r"calls\.py$", r"tolerant_deserializer\.<locals>\.parse"),
        rule(PARSE, _DS + r"wire\.py$",
             r"parse_predict_request|_packed|_read_varint|PackedPredictRequest\..*"),
        rule(PARSE, _DS + r"oipcodec\.py$", r"to_request|_input"),
        rule(PARSE, _DS + r"v1codec\.py$", r"images_input|_pixels|_where"),
        rule(PARSE, _DS + r"restcodec\.py$", r"read_infer|_document|_input|_elements|_flatten|_base64|"
                                            r"_parameters|_object|_type|expect|ValueLimit\..*"),
        rule(PARSE, _DS + r"rest\.py$", r"read_body"),
        rule(PARSE, r"/aiohttp/(web_request|streams|multipart)\.py$"),
        rule(PARSE, r"(^|/)json/(__init__|decoder|scanner)\.py$", r"loads|JSONDecoder\..*|.*scan.*"),
        # Validate and convert: counts, shapes, limits, pixels to float32 (and pictures decoded).
        rule(VALIDATE, _DS + r"infer\.py$", r"read|decode|pixels|requested_outputs|_check_parameters"),
        rule(VALIDATE, _DS + r"(pixels|decoding)\.py$"),
        rule(VALIDATE, r"/digitserve/pictures\.py$"),
        # Telemetry: metrics, per-version statistics, the Call's bookkeeping (its access line is
        # logging, claimed above: the innermost frame wins).
        rule(TELEMETRY, _DS + r"(telemetry|statistics)\.py$"),
        rule(TELEMETRY, _DS + r"calls\.py$", r"Call\.(__init__|finish)|MethodMetrics\..*|outcome"),
        rule(TELEMETRY, _DS + r"httpserver\.py$", r"HttpMetrics\..*|HttpEdge\.observe"),
        rule(TELEMETRY, _DS + r"batcher\.py$", r"Batcher\._account"),
        rule(TELEMETRY, _DS + r"infertypes\.py$", r"InferResponse\.answered"),
        *_TELEMETRY,
        # Encode: the answer to bytes.
        rule(ENCODE, _DS + r"oipcodec\.py$",
             r"to_response\w*|encode_infer_response|_infer_head|_output_tensor"),
        rule(ENCODE, _DS + r"infertypes\.py$",
             r"OutputTensor\..*|InferResponse\.(tensors|raw_outputs)|_encoded_labels|_raw_\w+"),
        rule(ENCODE, _DS + r"calls\.py$", r"_serializer\.<locals>\.serialize"),
        rule(ENCODE, _DS + r"(wire|protowire)\.py$"),  # what is left of it: PredictionEncoder, the varints
        rule(ENCODE, _DS + r"v1codec\.py$", r"_encoder"),
        rule(ENCODE, _DS + r"restcodec\.py$", r"infer_body"),
        rule(ENCODE, _DS + r"rest\.py$", r"json_reply|error_reply|Reply\..*"),
        rule(ENCODE, r"/aiohttp/web_response\.py$"),
        rule(ENCODE, r"(^|/)json/(__init__|encoder)\.py$", r"dumps|JSONEncoder\..*|_make_iterencode.*"),
        # Queue and batch: around the model call.
        rule(QUEUE, _DS + r"(batcher|dataplane)\.py$"),
        # The rest of the call: the wrapper, the servicers, routing, the HTTP edge's middleware.
        rule(HANDLER, _DS + r"(calls|status|servicer|oip|oipcodec|v1codec|infer|infertypes|registry|"
                            r"versions|slot|httpserver|httpconnections|rest|restcodec|drain|gate|"
                            r"errors|security|unserved)\.py$"),
        rule(None, _DS + r"(__main__|cli|eventloop)\.py$"),  # under everything the main thread runs
        rule(OTHER_CODE, r"/digitserve/"),
        *_HTTP,
    ],
    "kserve": [
        *_IDLE,
        rule(MODEL, r"(^|/)kserve_server\.py$", r"_(litert|tensorflow)\.<locals>\.run"),
        *_LITERT,
        *_LOGGING,
        rule(VALIDATE, r"/kserve/protocol/infer_type\.py$", r"InferInput\.as_numpy"),
        rule(VALIDATE, r"/kserve/protocol/grpc/servicer\.py$", r"\w+\.validate_grpc_request"),
        rule(VALIDATE, r"/kserve/model\.py$", r"\w*Model\.validate"),
        rule(VALIDATE, r"(^|/)kserve_server\.py$", r".*Digits\.predict"),  # pixels reshaped, to float32
        rule(PARSE, r"/kserve/protocol/infer_type\.py$",
             r"(InferRequest|InferInput|RequestedOutput)\..*|get_content|deserialize_bytes_tensor"),
        rule(PARSE, r"/kserve/protocol/dataplane\.py$", r"DataPlane\.decode\w*"),
        rule(PARSE, r"/(pydantic|pydantic_core)/"),
        rule(PARSE, r"/fastapi/dependencies/"),
        rule(PARSE, r"/starlette/(requests|formparsers)\.py$"),
        rule(PARSE, r"(^|/)json/(__init__|decoder|scanner)\.py$", r"loads|JSONDecoder\..*|.*scan.*"),
        rule(ENCODE, r"/kserve/protocol/infer_type\.py$",
             r"(InferResponse|InferOutput)\..*|serialize_byte_tensor|to_grpc_parameters|to_http_parameters"),
        rule(ENCODE, r"/kserve/protocol/dataplane\.py$", r"DataPlane\.encode"),
        rule(ENCODE, r"/fastapi/(encoders|responses)\.py$"),
        rule(ENCODE, r"/fastapi/routing\.py$", r"serialize_response|_prepare_response_content"),
        rule(ENCODE, r"/starlette/responses\.py$"),
        rule(ENCODE, r"(^|/)json/(__init__|encoder)\.py$", r"dumps|JSONEncoder\..*|_make_iterencode.*"),
        rule(TELEMETRY, r"/kserve/model\.py$", r"get_latency_ms"),
        rule(TELEMETRY, r"/kserve/metrics\.py$"),
        *_TELEMETRY,
        rule(None, r"/kserve/model_server\.py$", r"ModelServer\.start"),
        rule(None, r"(^|/)kserve_server\.py$", r"<module>|main"),
        rule(HANDLER, r"/(kserve|grpc_interceptor|timing_asgi)/"),
        rule(HANDLER, r"(^|/)kserve_server\.py$"),
        *_HTTP,
    ],
    "null": [
        *_IDLE,
        *_LOGGING,
        rule(ENCODE, r"(^|/)null_server\.py$", r"reply"),
        rule(None, r"(^|/)null_server\.py$", r"<module>|main|_run_module_as_main"),
        rule(HANDLER, r"(^|/)null_server\.py$"),
    ],
}


def split(stack: str) -> tuple[str | None, list[Frame]]:
    """The thread's name (py-spy --threads' root frame; None without it) and the frames, outermost
    first."""
    texts = [t for t in stack.split(";") if t]
    thread = None
    if texts:
        match = _THREAD.match(texts[0])
        if match:
            thread = match.group(1) or ""
            texts = texts[1:]
    return thread, [Frame.parse(t) for t in texts]


def classify(stack: str, rules: Sequence[Rule]) -> str:
    """The stage of one collapsed stack: the innermost frame a rule claims decides (the first rule
    that claims it); else the thread: the transport and event loop on the main thread, gRPC's
    poller (a thread running grpc.aio's Cython ``_poll_wrapper``, which has no Python frame of its
    own), or another thread."""
    thread, frames = split(stack)
    for depth, frame in enumerate(reversed(frames)):
        for candidate in rules:
            if (depth == 0 or not candidate.leaf) and candidate.claims(frame):
                if candidate.stage is not None:
                    return candidate.stage
                break
    if not frames:
        return UNREAD
    innermost = frames[-1]
    if thread is not None:
        if "_poll_wrapper" in thread:
            return POLLER
        return LOOP if thread == "MainThread" else THREADS
    if frames[0].function in ("Thread._bootstrap", "_bootstrap") and frames[0].file.endswith("threading.py"):
        run = innermost.function in ("Thread.run", "run") and innermost.file.endswith("threading.py")
        return POLLER if run else THREADS
    return LOOP


def read_raw(text: str) -> list[tuple[str, int]]:
    """py-spy's raw (collapsed) output: one ``stack count`` a line; an empty stack is a sample
    whose frames could not be read."""
    samples = []
    for line in text.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if count.isdigit():
            samples.append((stack, int(count)))
    return samples


def tally(samples: Iterable[tuple[str, int]], rules: Sequence[Rule]) -> dict[str, int]:
    counts: collections.Counter[str] = collections.Counter()
    for stack, count in samples:
        counts[classify(stack, rules)] += count
    return dict(counts)


def breakdown(counts: dict[str, int], cpu_seconds: float | None = None,
              requests: float | None = None) -> list[dict[str, Any]]:
    """Each busy stage: samples, share of the busy samples and, given the CPU time and the requests
    it served, CPU µs per request."""
    busy = sum(n for stage, n in counts.items() if stage != IDLE)
    rows = []
    for stage in (*STAGES, *sorted(set(counts) - {*STAGES, IDLE})):
        samples = counts.get(stage, 0)
        share = samples / busy if busy else 0.0
        row: dict[str, Any] = {"stage": stage, "samples": samples, "share": round(share, 4)}
        if cpu_seconds is not None and requests:
            row["us_per_request"] = round(share * cpu_seconds / requests * 1e6, 1)
        rows.append(row)
    return rows


def heaviest(samples: Iterable[tuple[str, int]], rules: Sequence[Rule], top: int,
             depth: int = 4) -> dict[str, list[tuple[int, str]]]:
    """Each stage's ``top`` heaviest stacks, by their innermost ``depth`` frames."""
    by_stage: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for stack, count in samples:
        thread, frames = split(stack)
        tail = " < ".join(f"{f.function} ({Path(f.file).name})" for f in reversed(frames[-depth:]))
        by_stage[classify(stack, rules)][f"{tail or '-'} [{thread}]"] += count
    return {stage: [(n, s) for s, n in c.most_common(top)] for stage, c in by_stage.items()}


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of process ``pid``, every thread."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def py_spy_binary(given: Path | None) -> str:
    if given is not None:
        return str(given)
    found = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if found is None:
        raise BenchError("py-spy not found: pip install py-spy, or give --py-spy")
    return found


def record(binary: str, pid: int, rate: int, seconds: float, out: Path, cpu: str) -> str:
    """Runs ``py-spy record`` on ``pid`` (pinned to ``cpu``) for ``seconds``; its summary line."""
    argv = ["taskset", "-c", cpu, binary, "record", "-p", str(pid), "-r", str(rate), "-d", f"{seconds:g}",
            "--format", "raw", "--nonblocking", "--threads", "--full-filenames", "-o", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=seconds + 60)
    if done.returncode != 0 or not out.exists():
        raise BenchError(f"py-spy failed ({done.returncode}): {done.stderr[-800:]}")
    summary = re.search(r"Samples: \d+ Errors: \d+", done.stdout + done.stderr)
    return summary.group(0) if summary else ""


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Starts the server, loads it, samples it; the samples and the figures of the run."""
    body = versus.payloads(rest.mnist_pixels(args.data_dir, 64), args.model_name)[args.edge, args.shape]
    spy = py_spy_binary(args.py_spy)
    with tempfile.TemporaryDirectory(prefix="bench-stages-") as tmp:
        body_file, out = Path(tmp) / "body.bin", Path(tmp) / "py-spy.txt"
        body_file.write_bytes(body if args.edge == "v2-rest" else grpc_frame(body))
        server = versus.start(args.server, args, Path(tmp))
        try:
            versus.wait_ready(server, args.model_name)
            if args.server != "null":  # its answer read first: h2load reads no gRPC status
                got = versus.answer(server, args.edge, body, args.model_name)
                if got.shape != (versus.SHAPES[args.shape][0], 10):
                    raise BenchError(f"{args.server} answered {got.shape}")
            failed = versus.failed_calls(server) if args.server == "digitserve" else 0.0
            load = argparse.Namespace(**vars(args))
            load.duration = args.seconds + LOAD_MARGIN_S
            with ThreadPoolExecutor(max_workers=1) as pool:
                running = pool.submit(versus.h2load, server, args.edge, args.shape, body_file,
                                      args.model_name, load)
                time.sleep(WARM_UP_S + SETTLE_S)
                server.check_alive()
                cpu_before, wall_before = cpu_seconds(server.proc.pid), time.monotonic()
                summary = record(spy, server.proc.pid, args.rate, args.seconds, out, args.load_cpu)
                cpu_after, wall_after = cpu_seconds(server.proc.pid), time.monotonic()
                result = running.result()
            if args.server == "digitserve" and versus.failed_calls(server) > failed:
                raise BenchError("digitserve's metrics count failed calls under the load")
            raw = out.read_text()
        finally:
            server.stop()
    if args.keep is not None:
        args.keep.write_text(raw)
    cpu_rate = (cpu_after - cpu_before) / (wall_after - wall_before)  # CPU seconds a second
    return {"raw": raw, "rps": result["rps"], "requests": result["rps"] * args.seconds,
            "cpu_seconds": cpu_rate * args.seconds, "py_spy": summary}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.stages", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--server", choices=list(RULES), default="digitserve")
    parser.add_argument("--edge", choices=list(versus.EDGES), default="v2-grpc")
    parser.add_argument("--shape", choices=list(versus.SHAPES), default="1x64")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds sampled (default: 10)")
    parser.add_argument("--rate", type=int, default=200, help="samples a second (default: 200)")
    versus.add_server_options(parser, model_repo=REPO_ROOT / "out" / "bench-repo")
    parser.add_argument("--server-cpu", default="0", help="taskset CPU of the server (default: 0)")
    parser.add_argument("--load-cpu", default="1", help="taskset CPU of h2load and py-spy (default: 1)")
    parser.add_argument("--py-spy", type=Path, help="py-spy binary (default: on PATH or beside python)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--keep", type=Path, help="keep py-spy's raw output there")
    parser.add_argument("--raw", type=Path, help="classify this py-spy raw file; no server, shares only")
    parser.add_argument("--stacks", type=int, default=0, help="print each stage's N heaviest stacks")
    return parser


def table(result: dict[str, Any]) -> list[str]:
    count, in_flight = versus.SHAPES[result["shape"]]
    head = (f"{result['server']} {result['edge']} {count} image(s) x {in_flight} in flight: "
            f"{result['busy_samples']:,} busy samples, {result['idle_samples']:,} idle")
    if "rps" in result:
        head += (f"; {result['rps']:,.0f} req/s, {result['cpu_us_per_request']:,.0f} CPU µs per "
                 f"request ({result['cpu_seconds']:.2f} CPU s over {result['seconds']:g} s sampled; "
                 f"py-spy: {result['py_spy'] or '?'})")
    lines = [head, "", "| stage | samples | share of busy | CPU µs per request |", "|---|---|---|---|"]
    for row in result["stages"]:
        per = f"{row['us_per_request']:,.1f}" if "us_per_request" in row else "-"
        lines.append(f"| {row['stage']} | {row['samples']:,} | {row['share']:.1%} | {per} |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.raw is None and args.server not in versus.EDGES[args.edge][1]:
        raise SystemExit(f"--edge {args.edge} compares {' and '.join(versus.EDGES[args.edge][1])}; "
                         f"--server {args.server} does not serve it")
    if args.raw is None and args.server == "kserve" and not args.kserve_python.exists():
        print(f"{args.kserve_python}: no KServe environment (bench/kserve-venv.sh makes one)",
              file=sys.stderr)
        return 2
    rules = RULES[args.server]
    run: dict[str, Any] = {"raw": args.raw.read_text()} if args.raw is not None else measure(args)
    samples = read_raw(run.pop("raw"))
    counts = tally(samples, rules)
    result: dict[str, Any] = {"server": args.server, "edge": args.edge, "shape": args.shape,
                              "seconds": args.seconds, "rate": args.rate, **run,
                              "busy_samples": sum(n for s, n in counts.items() if s != IDLE),
                              "idle_samples": counts.get(IDLE, 0)}
    if "rps" in run:
        result["rps"] = round(run["rps"], 1)
        result["requests"] = round(run["requests"])
        result["cpu_seconds"] = round(run["cpu_seconds"], 3)
        result["cpu_us_per_request"] = round(run["cpu_seconds"] / run["requests"] * 1e6, 1)
        result["sampled_busy_seconds"] = round(result["busy_samples"] / args.rate, 3)
    result["stages"] = breakdown(counts, run.get("cpu_seconds"), run.get("requests"))
    if args.stacks:
        for stage, stacks in heaviest(samples, rules, args.stacks).items():
            print(f"{stage}:", file=sys.stderr)
            for count, text in stacks:
                print(f"  {count:6d}  {text}", file=sys.stderr)
    print(json.dumps(result) if args.json else "\n".join(table(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
