"""``python -m bench.presets``: a preset's accuracy and training time over several seeds, each
version then served and evaluated as a user's server would serve it.

For each seed, ``mnist-train train --preset P --seed S --json --no-report`` runs in its own
process (the trainer's own ``train_seconds`` is the time: ``model.fit`` only), publishing into one
scratch repository. Then ``mnist-serve --version-policy all`` serves every version and each is
evaluated on the 10,000 official test images through ``DigitClient.evaluate``: the served accuracy
must equal the trainer's figure exactly, and the inference path is reported (``litert`` when the
server serves the flatbuffer). The summary is the minimum accuracy and the maximum time, against
the goals given (``--min-accuracy``, ``--max-seconds``): exit 1 when one is missed.
``--write`` puts the table in docs/configuration.md, below the presets.

    python -m bench.presets --data-dir data --preset default --seeds 1,2,3 \\
        --min-accuracy 0.992 --max-seconds 120 --write
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.servers import BenchError, RunningServer, ServerSpec, free_port, write_section

REPO_ROOT = Path(__file__).resolve().parent.parent
BEGIN = "<!-- presets:begin (written by `python -m bench.presets --write`) -->"
END = "<!-- presets:end -->"
MODEL = "mnist"


@dataclass
class Run:
    """One seed's figures: the trainer's, then the server's."""

    seed: int
    version: int
    test_accuracy: float
    holdout_accuracy: float | None
    train_seconds: float
    epochs: int
    served_accuracy: float | None = None
    inference_path: str = ""


def train(data_dir: Path, repo: Path, preset: str, seed: int, epochs: int | None) -> Run:
    """One ``mnist-train train`` process; its JSON summary as a Run."""
    argv = [sys.executable, "-m", "digitserve.trainer", "train", "--data-dir", str(data_dir),
            "--model-repo", str(repo), "--model-name", MODEL, "--preset", preset, "--seed", str(seed),
            "--json", "--no-report", "--verbose", "0"]
    if epochs is not None:
        argv += ["--epochs", str(epochs)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"mnist-train exited with {done.returncode}:\n{done.stderr[-2000:]}")
    summary = json.loads(done.stdout)
    return Run(seed=seed, version=int(summary["version"]), test_accuracy=float(summary["test_accuracy"]),
               holdout_accuracy=summary.get("holdout_accuracy"), epochs=int(summary["epochs"]),
               train_seconds=float(summary["train_seconds"]))


def serve_and_evaluate(data_dir: Path, repo: Path, runs: Sequence[Run], scratch: Path) -> None:
    """Serves every version of the scratch repository and fills in each run's served accuracy
    (Evaluate on the official test set, pinned to its version) and inference path."""
    from digitserve.client import DigitClient
    from digitserve.idx import load_split

    port = free_port()
    argv = [sys.executable, "-m", "digitserve.server", "--model-repo", str(repo), "--model-name", MODEL,
            "--port", str(port), "--version-policy", "all"]
    server = RunningServer(ServerSpec("digitserve", "ours", argv), port, scratch / "server.log")
    try:
        server.wait_serving(300)
        test = load_split(data_dir, "t10k")
        with DigitClient(server.target, timeout=120) as client:
            for run in runs:
                result = client.evaluate(test.images, test.labels, model_version=run.version)
                run.served_accuracy = result.accuracy
                run.inference_path = client.model_info(model_version=run.version)["inference_path"]
    finally:
        server.stop()


def table(preset: str, runs: Sequence[Run]) -> str:
    """The Markdown table of the runs and the summary line."""
    lines = ["| seed | epochs | test accuracy (trainer) | Evaluate through the server | inference path | "
             "hold-out accuracy | training time: s |", "|---|---|---|---|---|---|---|"]
    for run in runs:
        served = "—" if run.served_accuracy is None else f"{run.served_accuracy:.2%}"
        holdout = "—" if run.holdout_accuracy is None else f"{run.holdout_accuracy:.2%}"
        lines.append(f"| {run.seed} | {run.epochs} | {run.test_accuracy:.2%} | {served} "
                     f"| {run.inference_path or '—'} | {holdout} | {run.train_seconds:.1f} |")
    lowest = min(run.test_accuracy for run in runs)
    slowest = max(run.train_seconds for run in runs)
    lines += ["", f"Preset `{preset}`, {len(runs)} seed(s): minimum test accuracy {lowest:.2%}, maximum "
              f"training time {slowest:.1f} s (`model.fit`, as the trainer reports it; "
              f"{os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.1f} at the end)."]
    return "\n".join(lines)


def verdict(runs: Sequence[Run], min_accuracy: float | None, max_seconds: float | None) -> list[str]:
    """One line per goal missed: accuracy, time, and a served figure that differs from the trainer's."""
    missed = []
    lowest = min(run.test_accuracy for run in runs)
    slowest = max(run.train_seconds for run in runs)
    if min_accuracy is not None and lowest < min_accuracy:
        missed.append(f"minimum test accuracy {lowest:.4f} is below the goal {min_accuracy:.4f}")
    if max_seconds is not None and slowest > max_seconds:
        missed.append(f"maximum training time {slowest:.1f} s is above the goal {max_seconds:g} s")
    for run in runs:
        if run.served_accuracy is not None and run.served_accuracy != run.test_accuracy:
            missed.append(f"seed {run.seed}: the server's Evaluate gave {run.served_accuracy:.4f}, the "
                          f"trainer {run.test_accuracy:.4f}")
    return missed


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds separated by commas, e.g. 1,2,3: {text!r}"
                                         ) from None
    if not seeds:
        raise argparse.ArgumentTypeError("expected at least one seed, e.g. 1,2,3")
    return seeds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.presets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="the MNIST IDX files")
    parser.add_argument("--preset", default="default", help="the preset to measure (default: %(default)s)")
    parser.add_argument("--seeds", type=_seeds, default=[1, 2, 3], help="seeds, e.g. 1,2,3 (the default)")
    parser.add_argument("--epochs", type=int, help="override the preset's epochs")
    parser.add_argument("--min-accuracy", type=float, help="goal: the lowest test accuracy (a fraction)")
    parser.add_argument("--max-seconds", type=float, help="goal: the longest training time")
    parser.add_argument("--no-serve", dest="serve", action="store_false",
                        help="skip serving and evaluating the versions")
    parser.add_argument("--write", action="store_true", help="put the table in docs/configuration.md")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-presets-") as scratch:
        repo = Path(scratch) / "models"
        runs = []
        try:
            for seed in args.seeds:
                runs.append(train(args.data_dir, repo, args.preset, seed, args.epochs))
                run = runs[-1]
                print(f"seed {seed}: test accuracy {run.test_accuracy:.2%}, trained in "
                      f"{run.train_seconds:.1f} s", file=sys.stderr, flush=True)
            if args.serve:
                serve_and_evaluate(args.data_dir, repo, runs, Path(scratch))
        except BenchError as exc:
            print(f"bench.presets: error: {exc}", file=sys.stderr)
            return 1
    text = table(args.preset, runs)
    print(text)
    print(f"({time.monotonic() - started:.0f} s in all)", file=sys.stderr)
    if args.write:
        command = "python -m bench.presets " + " ".join(argv if argv is not None else sys.argv[1:])
        write_section(REPO_ROOT / "docs" / "configuration.md", BEGIN, END, command, text)
    missed = verdict(runs, args.min_accuracy, args.max_seconds)
    for line in missed:
        print(f"bench.presets: goal missed: {line}", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
