"""Helpers the tests share (fixtures stay in conftest.py; the servers tests start are in
servers.py): the fake model, synthetic digits, publishing a copy of a version, reading a server's
metrics endpoint, classification figures from an oracle independent of digitserve, waiting on a
condition, a gRPC error's code and message."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shutil
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import numpy.typing as npt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from digitserve.inference import ModelSpec
from digitserve.metadata import METADATA_FILE
from digitserve.repository import ModelRepository

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
REPO_ROOT = Path(__file__).resolve().parent.parent


class FakeModel:
    """A deterministic softmax classifier with no TensorFlow: logits = images @ W. An image whose
    first pixel is exactly 0.123 makes it raise, to exercise the INTERNAL path. Served through a
    StaticSource (``start_server(FakeModel)``, ``fake_server``), skipping the repository and the
    quality gate: only for a test that needs a fake on purpose, which says why where it uses it."""

    CRASH_PIXEL = np.float32(0.123)

    def __init__(self, version: int = 1, input_shape: tuple[int, int] = (28, 28),
                 labels: tuple[str, ...] = tuple(str(d) for d in range(10))) -> None:
        size = input_shape[0] * input_shape[1]
        self.spec = ModelSpec("fake", version, input_shape, 1 / 255, labels)
        self.inference_path = "fake"
        self.inline = False  # runs on the model thread, as a TensorFlow-path model does
        self.metadata: dict[str, Any] = {
            "name": "fake", "version": version, "preset": "fake",
            "input": {"shape": list(input_shape), "size": size, "scale": 1 / 255},
            "labels": list(labels), "metrics": {"test_accuracy": 0.5},
            "created_at": "2026-01-01T00:00:00Z",
        }
        rng = np.random.default_rng(version)
        self.weights = rng.normal(size=(size, len(labels))).astype(np.float32)
        self.calls: list[int] = []

    def predict(self, images: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        if np.any(images[:, 0] == self.CRASH_PIXEL):
            raise RuntimeError("fake model crashed on purpose")
        self.calls.append(images.shape[0])
        logits = images.astype(np.float64) @ self.weights
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def expect_error(call: Callable[[], object], code: Any, *fragments: str) -> Any:
    """Runs ``call`` (a grpc stub's or a DigitClient's), asserts it fails with gRPC status ``code``
    and details holding each fragment; returns the error."""
    import grpc

    from digitserve.client.errors import CallError

    with pytest.raises((grpc.RpcError, CallError)) as info:
        call()
    err = info.value
    assert err.code() == code, (err.code(), err.details())
    for fragment in fragments:
        assert fragment in err.details(), (fragment, err.details())
    return err


def synthetic_digits(n: int, seed: int, shape: tuple[int, int] = (28, 28)) -> tuple[
    npt.NDArray[np.uint8], npt.NDArray[np.uint8]
]:
    """Learnable fake digits: class k lights a bar at a class-specific place, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    images = rng.integers(0, 60, size=(n, *shape)).astype(np.uint8)
    for i, k in enumerate(labels):
        row = 2 + int(k) * 2
        images[i, row : row + 2, 4:24] = 255
    return images, labels


def real_data_dir() -> Path | None:
    """The real MNIST files (MNIST_DATA_DIR or ./data), if fetched."""
    path = Path(os.environ.get("MNIST_DATA_DIR", REPO_ROOT / "data"))
    return path if (path / "t10k-images-idx3-ubyte.gz").is_file() else None


def publish_copy(repo: ModelRepository, source_dir: Path, name: str = "tiny") -> int:
    """Publishes every file of ``source_dir`` (model.tflite included, so it loads without
    TensorFlow) as the next version of ``name`` (its metadata renamed to it); the repository
    writes the metadata with its checksums. Returns the version."""

    def build(staging: Path, version: int) -> dict[str, Any]:
        for path in source_dir.iterdir():
            if path.is_file() and not path.name.startswith(METADATA_FILE):
                shutil.copy(path, staging / path.name)
        metadata: dict[str, Any] = json.loads((source_dir / METADATA_FILE).read_text())
        metadata.pop("files", None)
        metadata["name"] = name
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


def in_flight(port: int, method: str) -> float:
    """Calls of ``method`` (a method's name: "Evaluate") the server whose metrics endpoint is on
    127.0.0.1:``port`` has started and not finished: calls it holds, which a drain must finish."""
    return sum(value for (name, labels), value in scrape(port).items()
               if name == "grpc_server_in_flight_calls" and dict(labels)["grpc_method"] == method)


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


def assert_mnist_geometry(pixels: npt.NDArray[np.uint8], shape: tuple[int, int] = (28, 28)) -> None:
    """MNIST's geometry, from its definition and not from digitserve.pictures: the centre of mass
    (the intensity-weighted mean of the row and column indices) within 0.5 px of the frame's
    centre, (14, 14) in 28×28, in y and in x; the bounding box of the digit's pixels within the
    20×20 box (20/28 of the frame) and filling it along its longer side (anti-aliasing may leave
    the last row of it at 0)."""
    image = pixels.reshape(shape).astype(np.float64)
    assert image.sum() > 0
    rows, cols = np.indices(shape)
    centre = (np.average(rows, weights=image), np.average(cols, weights=image))
    want = (shape[0] / 2, shape[1] / 2)
    assert abs(centre[0] - want[0]) <= 0.5 and abs(centre[1] - want[1]) <= 0.5, (centre, want)
    box = round(min(shape) * 20 / 28)
    ink_rows, ink_cols = np.nonzero(image)
    height, width = np.ptp(ink_rows) + 1, np.ptp(ink_cols) + 1
    assert height <= box and width <= box and max(height, width) >= box - 1, (height, width, box)


def skip_or_fail(reason: str, *, allow_module_level: bool = False) -> NoReturn:
    """Skips the test, or fails it when MNIST_REQUIRE_E2E is set (`make test`, CI), where every
    test must really run: a missing tool or a failed install there is an error, not a skip.
    ``allow_module_level``: called while a test module is imported (its whole module)."""
    if os.environ.get("MNIST_REQUIRE_E2E"):
        pytest.fail(f"{reason}; MNIST_REQUIRE_E2E is set, so this test must run", pytrace=False)
    pytest.skip(reason, allow_module_level=allow_module_level)


def require_module(name: str, install: str, *, allow_module_level: bool = False) -> None:
    """skip_or_fail unless ``name`` (a module, dotted or not) is installed; ``install`` says where
    it comes from (an extra of pyproject.toml, say). Found, not imported (its parent packages
    are): tritonclient.grpc's protos would clash in this process's descriptor pool with ours."""
    try:
        found = importlib.util.find_spec(name) is not None
    except ImportError:  # a parent package missing
        found = False
    if not found:
        skip_or_fail(f"{name} is not installed ({install})", allow_module_level=allow_module_level)


def require_tool(name: str, install: str) -> str:
    """The path of the program ``name`` on PATH; skip_or_fail when there is none."""
    path = shutil.which(name)
    if path is None:
        skip_or_fail(f"{name} is not installed ({install})")
    return path


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


def walk_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
                 ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """A command's parser and each of its sub-parsers, with the words that select it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk_parsers(sub, (*path, name))


def noisy_bars(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Not digits: 28×28 bars under heavy noise, and 40 % of the labels drawn at random, so no
    model gets much above 0.6 on it."""
    images, labels = synthetic_digits(n, seed)
    rng = np.random.default_rng(seed + 100)
    noise = rng.integers(0, 200, size=images.shape).astype(np.uint8)
    images = np.maximum(images, noise)
    shuffled = rng.random(n) < 0.4
    labels[shuffled] = rng.integers(0, 10, size=int(shuffled.sum())).astype(np.uint8)
    return images, labels


def digit_photo(fmt: str = "PNG", seed: int = 0, size: tuple[int, int] = (400, 300)) -> bytes:
    """A photo of a pen-drawn '2' as the photo set draws its digits (bench/photoset.py): dark ink
    on paper lit by a linear gradient from 140 to 230 grey, Gaussian noise σ = 8; RGB, saved as
    PNG or JPEG (quality 70)."""
    import io

    from PIL import Image, ImageDraw

    cols, rows = size
    paper = Image.new("L", size, 255)
    stroke = [(0.15, 0.25), (0.3, 0.08), (0.6, 0.05), (0.82, 0.2), (0.8, 0.42), (0.5, 0.65),
              (0.15, 0.95), (0.9, 0.93)]
    x0, y0, x1, y1 = 0.35 * cols, 0.1 * rows, 0.8 * cols, 0.9 * rows
    ImageDraw.Draw(paper).line([(x0 + x * (x1 - x0), y0 + y * (y1 - y0)) for x, y in stroke],
                               fill=0, width=max(2, rows // 14), joint="curve")
    y, x = np.mgrid[0:rows, 0:cols]
    light = 140 + 90 * (0.7 * x / (cols - 1) + 0.3 * y / (rows - 1))
    grey = light * np.asarray(paper, dtype=np.float64) / 255
    grey += np.random.default_rng(seed).normal(0, 8, grey.shape)
    out = io.BytesIO()
    Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8)).convert("RGB").save(
        out, format=fmt, **({"quality": 70} if fmt == "JPEG" else {}))
    return out.getvalue()
