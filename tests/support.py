"""Helpers the tests share (fixtures stay in conftest.py): publishing a copy of a version, reading
a server's metrics endpoint, classification figures from an oracle independent of digitserve."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from digitserve.metadata import METADATA_FILE
from digitserve.repository import ModelRepository

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def publish_copy(repo: ModelRepository, source_dir: Path, name: str = "tiny") -> int:
    """Publishes every file of ``source_dir`` (model.tflite included, so it loads without
    TensorFlow) as the next version of ``name``; the repository writes the metadata with its
    checksums. Returns the version."""

    def build(staging: Path, version: int) -> dict[str, Any]:
        for path in source_dir.iterdir():
            if path.is_file() and not path.name.startswith(METADATA_FILE):
                shutil.copy(path, staging / path.name)
        metadata: dict[str, Any] = json.loads((source_dir / METADATA_FILE).read_text())
        metadata.pop("files", None)
        return metadata

    version, _ = repo.publish(name, build)
    return version


def scrape(port: int) -> Samples:
    """Every sample of the metrics endpoint on 127.0.0.1:``port``, keyed by (sample name, labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def oracle_metrics(y_true: npt.NDArray[Any], probs: npt.NDArray[Any]) -> dict[str, Any]:
    """The figures of a labelled set computed without digitserve.metrics: scikit-learn's
    accuracy, confusion matrix and per-class precision/recall/F1/support (zero_division=0), and
    the mean cross-entropy written out with Keras's clipping of probabilities to [1e-7, 1 - 1e-7]
    (scikit-learn's log_loss clips at the float's epsilon instead, so it would disagree on a
    confident wrong answer)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    classes = list(range(p.shape[1]))
    pred = p.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        y, pred, labels=classes, zero_division=0)
    losses = [-np.log(min(max(p[i, y[i]], 1e-7), 1 - 1e-7)) for i in range(len(y))]
    return {
        "count": len(y),
        "accuracy": float(accuracy_score(y, pred)),
        "mean_cross_entropy": float(sum(losses) / len(losses)),
        "confusion_matrix": confusion_matrix(y, pred, labels=classes).tolist(),
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "f1": f1.tolist(),
        "support": support.tolist(),
    }


def assert_metrics_match(actual: dict[str, Any], y_true: npt.NDArray[Any],
                         probs: npt.NDArray[Any]) -> None:
    """``actual`` (ClassificationMetrics.to_dict()'s shape: count, accuracy, mean_cross_entropy,
    confusion_matrix, per_class) equals the oracle's figures for (``y_true``, ``probs``)."""
    want = oracle_metrics(y_true, probs)
    assert actual["count"] == want["count"]
    assert actual["confusion_matrix"] == want["confusion_matrix"]
    assert actual["accuracy"] == pytest.approx(want["accuracy"], rel=1e-12)
    assert actual["mean_cross_entropy"] == pytest.approx(want["mean_cross_entropy"], rel=1e-9)
    per_class = actual["per_class"]
    for key in ("precision", "recall", "f1"):
        assert [c[key] for c in per_class] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key
    assert [c["support"] for c in per_class] == want["support"]


def skip_or_fail(reason: str) -> None:
    """Skips the test, or fails it when MNIST_REQUIRE_E2E is set (`make test`, CI), where every
    test must really run: a missing tool or a failed install there is an error, not a skip."""
    if os.environ.get("MNIST_REQUIRE_E2E"):
        pytest.fail(f"{reason}; MNIST_REQUIRE_E2E is set, so this test must run", pytrace=False)
    pytest.skip(reason)


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class PeakMemory:
    """The growth of this process's resident memory, to its peak, from the moment it is made:
    the kernel's high-water mark (VmHWM) is reset to the current RSS first (/proc/self/clear_refs
    "5"), so what TensorFlow or an earlier test allocated does not hide it. For an in-process
    server (ServerThread) whose load runs in another process, that is the server's own memory."""

    def __init__(self) -> None:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        self.start_kb = _status_kb("VmRSS")

    def growth_mb(self) -> float:
        return (_status_kb("VmHWM") - self.start_kb) / 1024


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "the condition",
             poll: float = 0.05) -> Any:
    """Polls ``predicate`` every ``poll`` s until it returns something true, and returns that;
    fails naming ``what`` after ``timeout`` s. For waiting on a counter, a state or a log line
    instead of sleeping and hoping it has changed."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}", pytrace=False)
        time.sleep(poll)


def tiny_litert(tiny_repo: Path) -> Any:
    """The tiny model loaded as the server loads it: from its LiteRT flatbuffer."""
    from digitserve.inference import load_version, read_check_set

    version_dir = ModelRepository(tiny_repo).version_dir("tiny", 1)
    model = load_version(version_dir, check_set=read_check_set(version_dir))
    assert model.inline and model.inference_path == "litert"
    return model


async def wait_for_async(predicate: Callable[[], Any], timeout: float = 60.0,
                         what: str = "the condition", poll: float = 0.01) -> Any:
    """``wait_for`` inside a coroutine: polls without blocking the event loop (which may be the
    one serving what the test waits for)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}", pytrace=False)
        await asyncio.sleep(poll)
