"""The benchmark: starts the null server, the tutorial-style naive server, digitserve (seed and
default models; the seed one also over its V2 edge) and, where its virtual environment exists,
KServe; drives each with the same load tester in rounds (and h2load for the ceiling), times
Evaluate, cold start and memory, and writes the tables into BENCHMARKS.md."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import h2load, report
from bench.servers import BenchError, RunningServer, ServerSpec, free_port, model_versions
from digitserve import loadtest
from digitserve.client.client import DigitClient
from digitserve.idx import IdxError, Split, load_split

logger = logging.getLogger("bench")
PROG = "python -m bench"
REPO_ROOT = Path(__file__).resolve().parent.parent
HEADER = """# Benchmarks

`make bench` (or `python -m bench`) runs everything below; see the end of this file for how to
read it. The section between the markers is rewritten by each run.
"""
# (concurrency, batch, streams for h2load) of each point.
POINTS = {"one": (1, 1), "many": (64, 1), "batch": (8, 64)}


def build_parser() -> argparse.ArgumentParser:
    nproc = os.cpu_count() or 1
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--data-dir", type=Path,
                        default=Path(os.environ.get("MNIST_DATA_DIR", REPO_ROOT / "data")),
                        help="MNIST IDX files (default: $MNIST_DATA_DIR or ./data)")
    parser.add_argument("--model-repo", type=Path, default=REPO_ROOT / "out" / "bench-repo",
                        help="model repository; the seed and default presets are trained into it "
                        "when missing (default: out/bench-repo)")
    parser.add_argument("--model-name", default="mnist", help="model name in the repository")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per point (default: 15)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring")
    parser.add_argument("--repeat", type=int, default=3,
                        help="measure each point in this many runs of duration/repeat seconds and "
                        "keep the median one by throughput: steadier on a shared machine "
                        "(default: %(default)s)")
    parser.add_argument("--encoding", default="float32", choices=loadtest.ENCODINGS,
                        help="pixel encoding on the wire (default: float32, as in issue 3)")
    parser.add_argument("--workers", default=",".join(str(w) for w in sorted({1, nproc})),
                        help="comma-separated --workers values for digitserve (default: %(default)s)")
    parser.add_argument("--load-processes", type=int, default=0,
                        help="load processes for the 64- and 8-in-flight points (0: the load "
                        "tester's default)")
    parser.add_argument("--connections", type=int, default=loadtest.DEFAULT_CONNECTIONS,
                        help="connections per load process at 64 and 8 in flight, so SO_REUSEPORT "
                        "spreads them over workers (default: %(default)s)")
    parser.add_argument("--engine", default="h2", choices=loadtest.ENGINES,
                        help="the load tester's engine (mnist-client loadtest --engine; default: "
                        "%(default)s)")
    parser.add_argument("--kserve-python", type=Path,
                        default=REPO_ROOT / "out" / "kserve-venv" / "bin" / "python",
                        help="the Python of a virtual environment with KServe, TensorFlow and "
                        "ai-edge-litert (bench/kserve-venv.sh makes one) for the KServe rows, left "
                        "out when it does not exist (default: out/kserve-venv/bin/python)")
    parser.add_argument("--skip", default="",
                        help="comma-separated: naive, default, h2load, kserve, oip (our server's "
                        "V2 row)")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--note", default="", help="a sentence added to the machine line")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "BENCHMARKS.md",
                        help="markdown file to write (default: BENCHMARKS.md)")
    parser.add_argument("--json-out", type=Path, help="also write the raw results as JSON")
    parser.add_argument("--from-json", type=Path,
                        help="measure nothing: rewrite --out from a --json-out file of an earlier run")
    return parser


def ensure_models(args: argparse.Namespace, presets: Sequence[str]) -> dict[str, int]:
    """The newest version of each preset in the repository, training the missing ones."""
    found = model_versions(args.model_repo, args.model_name)
    for preset in presets:
        if preset in found:
            continue
        logger.info("training the %s preset into %s (once)", preset, args.model_repo)
        done = subprocess.run(
            [sys.executable, "-m", "digitserve.trainer", "train", "--data-dir", str(args.data_dir),
             "--model-repo", str(args.model_repo), "--model-name", args.model_name, "--preset", preset,
             "--no-report", "--json", "--verbose", "0"],
            cwd=REPO_ROOT, capture_output=True, text=True, check=False,
        )
        if done.returncode != 0:
            raise BenchError(f"training the {preset} preset failed: {done.stderr.strip()[-800:]}")
        found[preset] = int(json.loads(done.stdout)["version"])
    return found


def server_supports_workers() -> bool:
    done = subprocess.run([sys.executable, "-m", "digitserve.server", "--help"], capture_output=True,
                          text=True, cwd=REPO_ROOT, check=False)
    return "--workers" in done.stdout


def specs(args: argparse.Namespace, versions: dict[str, int], skip: set[str]) -> list[ServerSpec]:
    py = sys.executable
    out = [ServerSpec("null server (grpc.aio, no model)", "null", [py, "-m", "bench.null_server"],
                      model="–")]
    seed_dir = args.model_repo / args.model_name / str(versions["seed"])
    if "naive" not in skip:
        out.append(ServerSpec("naive: sync grpc + model.predict", "naive", [py, "-m", "bench.naive_server",
                              "--model-dir", str(seed_dir)], model="seed"))
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    if not server_supports_workers():
        workers = [1]
    for preset in ("seed", "default"):
        if preset not in versions or (preset == "default" and "default" in skip):
            continue
        for w in (workers if preset == "seed" else [max(workers)]):
            argv = [py, "-m", "digitserve.server", "--model-repo", str(args.model_repo), "--model-name",
                    args.model_name, "--model-version", str(versions[preset])]
            if w > 1:
                argv += ["--workers", str(w)]
            out.append(ServerSpec(f"digitserve, {w} worker{'s' if w > 1 else ''}", "ours", argv,
                                  model=preset, workers=w,
                                  ready_line=r"serving model \S+ version \d+", ready_count=w))
            if preset == "seed" and w == max(workers) and "oip" not in skip:
                out.append(replace(out[-1], name=f"{out[-1].name}, V2 protocol", kind="ours-oip",
                                   protocol="oip"))
    if "kserve" not in skip:
        if args.kserve_python.is_file():
            # As issue 3's table measured it (a tf.function model call), and with our flatbuffer,
            # so that only the serving stacks differ.
            for call, kind, label in (("tensorflow", "kserve", "tf.function"),
                                      ("litert", "kserve-litert", "the same LiteRT flatbuffer")):
                out.append(ServerSpec(
                    f"KServe ModelServer, V2 protocol, {label}", kind,
                    [str(args.kserve_python), str(REPO_ROOT / "bench" / "kserve_server.py"),
                     "--model-dir", str(seed_dir), "--model-call", call],
                    model="seed", protocol="oip", ready_probe="oip", model_name=args.model_name,
                    evaluates=False))
        else:
            logger.warning("%s not found (bench/kserve-venv.sh makes it): no KServe row",
                           args.kserve_python)
    return out


def configs(args: argparse.Namespace, target: str) -> dict[str, loadtest.LoadConfig]:
    out = {}
    for name, (concurrency, _batch) in POINTS.items():
        heavy = concurrency > 1
        processes = (args.load_processes or loadtest.default_processes(concurrency, 0)) if heavy else 1
        out[name] = loadtest.LoadConfig(
            target=target, concurrency=concurrency, duration=args.duration, processes=processes,
            connections=args.connections if heavy else 1, timeout=60, connect_timeout=60,
            engine=args.engine,
        )
    return out


class Contender:
    """A server under test: its process, its row of the table, and the runs of each point."""

    def __init__(self, spec: ServerSpec, args: argparse.Namespace) -> None:
        port = free_port()
        log_dir = REPO_ROOT / "out" / "bench-logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        slug = "".join(c if c.isalnum() else "-" for c in f"{spec.name}-{spec.model}")
        self.spec = spec
        self.server = RunningServer(replace(spec, argv=[*spec.argv, "--port", str(port)]), port,
                                    log_dir / f"{slug}.log")
        self.row: dict[str, Any] = {"name": spec.name, "model": spec.model, "workers": spec.workers,
                                    "kind": spec.kind, "preset": spec.model, "scenarios": {}}
        self.runs: dict[str, list[dict[str, Any]]] = {point: [] for point in POINTS}
        self.plan = configs(args, self.server.target)

    @property
    def live(self) -> bool:
        return "failed" not in self.row

    def fail(self, exc: Exception) -> None:
        self.row["failed"] = str(exc)
        logger.error("%s: %s", self.spec.name, exc)
        self.server.stop()


def start(spec: ServerSpec, args: argparse.Namespace) -> Contender:
    """Starts a server and times its cold start (the servers started before it sit idle)."""
    contender = Contender(spec, args)
    try:
        contender.row["cold_start_s"] = contender.server.wait_serving(args.startup_timeout)
        logger.info("%s (%s): SERVING after %.2fs", spec.name, spec.model,
                    contender.row["cold_start_s"])
    except BenchError as exc:
        contender.fail(exc)
    return contender


def measure(contenders: list[Contender], args: argparse.Namespace, split: Split,
            workloads: dict[str, dict[str, loadtest.Workload]], h2: str | None) -> list[dict[str, Any]]:
    """Every point in ``--repeat`` rounds; in each round every server takes its turn at the point,
    so a slow minute of a shared machine falls on all of them, not on one server's figures. Then
    each server's median run per point, its Evaluate and its memory. ``workloads``: by protocol,
    then ``one`` (1 image per request) and ``batch``."""
    h2_row: dict[str, Any] = {"name": "null server, driven by h2load", "model": "–", "workers": 1,
                              "kind": "h2load", "preset": "–", "scenarios": {}}
    h2_runs: dict[str, list[dict[str, Any]]] = {point: [] for point in POINTS}
    null = next((c for c in contenders if c.spec.kind == "null" and c.live), None)
    for contender in contenders:
        if contender.live and args.warmup > 0:
            _run(contender, replace(contender.plan["many"], duration=args.warmup),
                 workloads[contender.spec.protocol]["one"])
    for _ in range(args.repeat):
        for point, (streams, batch) in POINTS.items():
            shape = "batch" if point == "batch" else "one"
            workload = workloads["digitserve"][shape]
            for contender in contenders:
                config = replace(contender.plan[point], duration=args.duration / args.repeat)
                if contender.live and (result := _run(
                        contender, config, workloads[contender.spec.protocol][shape])) is not None:
                    contender.runs[point].append(result)
            if h2 is not None and null is not None and null.live and "failed" not in h2_row:
                try:
                    run = h2load.run(h2, null.server.target, workload.payloads[0], streams=streams,
                                     duration=args.duration / args.repeat, warmup=args.warmup,
                                     workdir=REPO_ROOT / "out" / "bench-logs")
                    run["images_per_s"] = run["rps"] * batch
                    run["p50_ms"] = run["p99_ms"] = None
                    h2_runs[point].append(run)
                except BenchError as exc:
                    h2_row["failed"] = str(exc)
                    logger.error("h2load: %s", exc)
    rows = []
    for contender in contenders:
        rows.append(contender.row)
        if contender.live:
            _finish(contender, split)
        if contender is null and h2 is not None:
            for point, runs in h2_runs.items():
                if runs:
                    h2_row["scenarios"][point] = median_run(runs)
                    logger.info("  h2load %s: %.0f req/s", point, h2_row["scenarios"][point]["rps"])
            rows.append(h2_row)
    return rows


def _run(contender: Contender, config: loadtest.LoadConfig,
         workload: loadtest.Workload) -> dict[str, Any] | None:
    try:
        return loadtest.run(config, workload, progress=sys.stderr.isatty()).to_dict()
    except loadtest.LoadTestError as exc:
        contender.fail(exc)
        return None


def _finish(contender: Contender, split: Split) -> None:
    """The median of each point, Evaluate of the test set and memory; then the server stops."""
    row, server = contender.row, contender.server
    logger.info("%s (%s):", contender.spec.name, contender.spec.model)
    try:
        for point, runs in contender.runs.items():
            result = row["scenarios"][point] = median_run(runs)
            logger.info("  %s: %.0f req/s, %.0f images/s, p50 %.2f ms, p99 %.2f ms, errors %s",
                        point, result["rps"], result["images_per_s"], result["p50_ms"] or -1,
                        result["p99_ms"] or -1, result["errors"] or "none")
        if contender.spec.evaluates:
            with DigitClient(server.target, timeout=120) as client:
                started = time.perf_counter()
                evaluated = client.evaluate(split.images, split.labels)
                row["evaluate_s"] = time.perf_counter() - started
                row["evaluate_accuracy"] = evaluated.accuracy
            logger.info("  Evaluate of %d images: %.2fs", evaluated.count, row["evaluate_s"])
        row["memory"] = server.memory()
    except Exception as exc:  # a server that died or answered wrongly fails its row, not the run
        row["failed"] = str(exc)
        logger.error("%s: %s", contender.spec.name, exc)
    finally:
        server.stop()


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median throughput, with every run's req/s beside it."""
    result = dict(sorted(runs, key=lambda r: float(r["rps"]))[len(runs) // 2])
    result["runs_rps"] = [round(float(r["rps"]), 1) for r in runs]
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[bench] %(message)s", stream=sys.stderr)
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        publish(args, saved["rows"], saved["settings"], saved.get("machine") or report.machine())
        return 0
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    load_before = report.load_average()
    try:
        split = load_split(args.data_dir, "t10k")
    except IdxError as exc:
        print(f"{PROG}: error: {exc} (run `make data` first)", file=sys.stderr)
        return 1
    try:
        if args.duration <= 0 or args.warmup < 0 or args.repeat < 1:
            raise BenchError("--duration must be positive, --warmup not negative, --repeat ≥ 1")
        versions = ensure_models(args, ["seed"] if "default" in skip else ["seed", "default"])
        workloads = {
            protocol: {
                shape: loadtest.build_workload(split.images, split.labels, batch=batch,
                                               encoding=args.encoding, protocol=protocol,
                                               model_name=args.model_name)
                for shape, batch in (("one", 1), ("batch", 64))
            }
            for protocol in loadtest.PROTOCOLS
        }
        h2 = None if "h2load" in skip else h2load.find()
        if h2 is None and "h2load" not in skip:
            logger.warning("h2load not found (apt-get install nghttp2-client): no ceiling row")
        contenders: list[Contender] = []
        try:
            for spec in specs(args, versions, skip):
                contenders.append(start(spec, args))
            rows = measure(contenders, args, split, workloads, h2)
        finally:
            for contender in contenders:
                contender.server.stop()
    except (BenchError, loadtest.LoadTestError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    rows = [r for r in rows if "failed" not in r] + [r for r in rows if "failed" in r]
    plan = configs(args, "127.0.0.1:0")  # for the description only
    settings = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": f"{PROG} {shlex.join(sys.argv[1:] if argv is None else argv)}".strip(),
        "duration": args.duration, "warmup": args.warmup, "encoding": args.encoding,
        "repeat": args.repeat,
        "load": f"engine {args.engine}, " + ", ".join(
            f"{plan[k].effective_processes()} process(es) × {plan[k].connections} connection(s) "
            f"at {plan[k].concurrency} in flight" for k in POINTS),
        "note": " ".join(filter(None, [
            f"Load average (1 min) {load_before} before the run and {report.load_average()} after.",
            args.note,
        ])),
    }
    host = report.machine()
    if args.json_out is not None:
        args.json_out.write_text(json.dumps({"settings": settings, "machine": host, "rows": rows},
                                            indent=1))
    return publish(args, rows, settings, host)


def publish(args: argparse.Namespace, rows: list[dict[str, Any]], settings: dict[str, Any],
            host: dict[str, str]) -> int:
    """Writes the section into --out and prints it; 1 if a server failed."""
    section = report.render([r for r in rows if "failed" not in r], settings, host)
    failed = [r for r in rows if "failed" in r]
    if failed:
        section = section.replace(report.END, "\n".join(
            f"- {r['name']} ({r['model']}) failed: {r['failed'].splitlines()[0]}" for r in failed
        ) + "\n\n" + report.END)
    report.write(args.out, section, HEADER)
    print(section)
    logger.info("wrote %s", args.out)
    return 1 if failed else 0
