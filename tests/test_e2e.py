"""End to end on real MNIST, as separate processes: mnist-train → mnist-serve → mnist-client
evaluate on the 10k test set, whose figures must equal the trainer's metadata."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import photoset
from digitserve.client.client import DigitClient
from digitserve.idx import load_split
from tests.servers import ServerProcess
from tests.support import real_data_dir

BIN = Path(sys.executable).parent


def _data_dir() -> Path:
    data = real_data_dir()
    if data is None:
        if os.environ.get("MNIST_REQUIRE_E2E"):
            pytest.fail("MNIST_REQUIRE_E2E is set but no real MNIST: run `mnist-train fetch`")
        pytest.skip("real MNIST not fetched (set MNIST_DATA_DIR or run `make data`)")
    return data


def run_json(*args: str) -> dict[str, object]:
    done = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    result: dict[str, object] = json.loads(done.stdout)
    return result


@pytest.mark.e2e
def test_train_serve_evaluate_on_real_mnist(
    spawn: type[ServerProcess], tmp_path: Path
) -> None:
    data = _data_dir()
    repo = tmp_path / "repo"
    summary = run_json(str(BIN / "mnist-train"), "train", "--data-dir", str(data),
                       "--model-repo", str(repo), "--name", "mnist", "--preset", "default",
                       "--epochs", "1", "--seed", "3", "--no-report", "--json")
    assert summary["version"] == 1 and Path(str(summary["path"])) == repo / "mnist" / "1"
    metadata = json.loads((repo / "mnist" / "1" / "metadata.json").read_text())
    metrics = metadata["metrics"]
    assert metrics["test_accuracy"] == summary["test_accuracy"]
    assert metrics["test_accuracy"] > 0.95  # one epoch of the default preset

    server = spawn("--model-repo", str(repo), "--model-name", "mnist")
    target = server.target()
    client = [str(BIN / "mnist-client"), "--target", target, "--timeout", "60"]
    assert subprocess.run([*client, "health", "--wait", "120"], timeout=130).returncode == 0

    predicted = run_json(*client, "predict", "--data-dir", str(data), "--index", "0", "--json")
    assert predicted["true_label"] == 7 and predicted["model_version"] == 1

    evaluated = run_json(*client, "evaluate", "--data-dir", str(data), "--json")
    assert evaluated["count"] == 10_000 == metadata["data"]["test_size"]
    assert evaluated["accuracy"] == metrics["test_accuracy"]
    assert evaluated["confusion_matrix"] == metrics["confusion_matrix"]
    assert evaluated["mean_cross_entropy"] == pytest.approx(metrics["test_loss"], abs=1e-9)
    assert evaluated["model_version"] == 1
    if metadata["inference"]["path"] == "litert":  # served from model.tflite, TensorFlow unloaded
        assert "tensorflow" not in Path(f"/proc/{server.proc.pid}/maps").read_text()

    # Photos: the first 10 test digits drawn as the photo set draws them (dark ink on paper under
    # a lighting gradient, noise, PNG and JPEG), and each photo's light-on-dark inverse (chalk on
    # a board), sent as pictures for the server to read: each read as its digit.
    split = load_split(data, "t10k")
    rng = np.random.default_rng(0)
    photos, inverses = [], []
    for i in range(10):
        drawn = photoset.draw(split.images[i], rng)
        photos.append(photoset.encode(drawn, jpeg=i % 2 == 1))
        inverses.append(photoset.encode(255 - drawn, jpeg=i % 2 == 1))
    truth = [str(label) for label in split.labels[:10]]
    with DigitClient(target, timeout=60) as digits:
        read = digits.predict(photos, preprocess="server").labels
        read_inverse = digits.predict(inverses, preprocess="server").labels
    assert (list(read), list(read_inverse)) == (truth, truth)

    server.send_signal(signal.SIGTERM)
    assert server.wait(60) == 0
