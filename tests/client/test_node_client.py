"""The Node.js client (examples/node/predict.js) against an in-process server: the same prediction as
our Python client. Runs when node and npm are installed (else a skip, a failure under
MNIST_REQUIRE_E2E); npm installs its pinned packages once."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from digitserve.client.client import DigitClient
from digitserve.idx import read_idx
from tests.servers import ServerThread
from tests.support import REPO_ROOT, skip_or_fail

NODE_DIR = REPO_ROOT / "examples" / "node"
NODE = shutil.which("node")
NPM = shutil.which("npm")



@pytest.fixture(scope="module")
def node_client() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Runs predict.js with the given arguments, after `npm ci` if its packages are missing."""
    if NODE is None or NPM is None:
        skip_or_fail("node and npm are not installed")
    assert NODE is not None and NPM is not None
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        try:
            install = subprocess.run(
                [NPM, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True, text=True,
                timeout=300,
            )
        except subprocess.TimeoutExpired:
            skip_or_fail("npm ci timed out (no registry?)")
        if install.returncode != 0:
            tail = (install.stderr or install.stdout).strip().splitlines()[-1:]
            skip_or_fail(f"npm ci failed (no registry?): {' '.join(tail)}")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [NODE, str(NODE_DIR / "predict.js"), *args], capture_output=True, text=True, timeout=60
        )

    return run


def node_json(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def assert_same_prediction(node: dict[str, Any], target: str, image: np.ndarray) -> None:
    with DigitClient(target, timeout=10) as client:
        ours = client.predict(image)
    np.testing.assert_array_equal(np.array(node["probabilities"], dtype=np.float32), ours.probabilities[0])
    assert (node["class_index"], node["label"]) == (ours.class_indices[0], ours.labels[0])
    assert (node["model_name"], node["model_version"]) == (ours.model_name, ours.model_version)


def test_node_predicts_an_idx_image_like_the_python_client(
    node_client: Callable[..., subprocess.CompletedProcess[str]], tiny_server: ServerThread,
    synthetic_data_dir: Path,
) -> None:
    index = 7
    proc = node_client("--target", tiny_server.target, "--data-dir", str(synthetic_data_dir),
                       "--index", str(index), "--timeout", "10", "--json")
    image = read_idx(synthetic_data_dir / "t10k-images-idx3-ubyte.gz")[index].reshape(-1)
    assert_same_prediction(node_json(proc), tiny_server.target, image)


def test_node_predicts_a_synthetic_image_like_the_python_client(
    node_client: Callable[..., subprocess.CompletedProcess[str]], tiny_server: ServerThread,
) -> None:
    proc = node_client("--target", tiny_server.target, "--synthetic", "--json")
    image = np.zeros((28, 28), dtype=np.uint8)
    image[4:24, 13:15] = 255  # predict.js: a 2-pixel stroke, rows 28/7 .. 28 - 28/7, columns 13-14
    assert_same_prediction(node_json(proc), tiny_server.target, image.reshape(-1))


def test_node_prints_the_digit_for_people(
    node_client: Callable[..., subprocess.CompletedProcess[str]], tiny_server: ServerThread,
) -> None:
    proc = node_client("--target", tiny_server.target, "--synthetic")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "model tiny version 1"
    assert lines[1].startswith("predicted digit: ")
    assert len(lines) == 2 + 10


def test_node_reports_errors_in_one_line(
    node_client: Callable[..., subprocess.CompletedProcess[str]], tiny_server: ServerThread,
) -> None:
    proc = node_client("--target", tiny_server.target, "--synthetic", "--model-version", "9")
    assert proc.returncode == 1
    assert proc.stderr.startswith("predict.js: NOT_FOUND: ") and proc.stderr.count("\n") == 1, proc.stderr
    usage = node_client("--target", tiny_server.target)
    assert usage.returncode == 2
    assert "give exactly one of --data-dir or --synthetic" in usage.stderr


def test_node_without_a_server_says_what_to_do_at_once(
    node_client: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    with socket.socket() as held:  # bound, not listening: connections to it are refused
        held.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{held.getsockname()[1]}"
        started = time.monotonic()
        proc = node_client("--target", target, "--synthetic", "--timeout", "40")
        took = time.monotonic() - started
    assert proc.returncode == 1
    assert proc.stderr == (f"predict.js: cannot connect to {target}: connection refused (is mnist-serve "
                           "running?); start it (mnist-serve --model-repo models) or give --target "
                           "HOST:PORT (MNIST_TARGET)\n")
    assert took < 20  # at once, not at the 40 s deadline
