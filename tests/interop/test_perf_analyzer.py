"""perf_analyzer, Triton's load tester (installed by .ci/perf-analyzer.sh, run by
bench/perf-analyzer), in its default mode (no --service-kind, no shim) against a real mnist-serve
process: over gRPC, over HTTP and over gRPC's ModelStreamInfer (--streaming), with its random data
and with real MNIST test images (--input-data). Each run must exit 0 and report a throughput at
every concurrency, and the server's own counters are the oracle of "no errors": every call it
answered succeeded, it predicted at least as many images as perf_analyzer counted, and real
images got the class the server gives the same pixels sent as FP32 JSON. perf_analyzer also
reports the server's statistics (Triton's statistics extension) over its measurement windows:
their successful requests must agree with the requests perf_analyzer counted."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench import perf_analyzer
from digitserve.idx import read_idx
from tests.servers import ServerProcess
from tests.support import Samples, real_data_dir, scrape, skip_or_fail, wait_for

MODEL = "tiny"
# Short, and bounded by requests rather than by time: each window ends after 40 answers, and a
# concurrency passes once 3 windows agree within 50 % (a shared machine's noise must not fail it).
MEASUREMENT = ("--measurement-mode", "count_windows", "--measurement-request-count", "40",
               "--stability-percentage", "50", "--max-trials", "20")
MODES = [  # (protocol, streaming)
    pytest.param("grpc", False, id="grpc"),
    pytest.param("http", False, id="http"),
    pytest.param("grpc", True, id="grpc-streaming"),
]


def _call(port: int, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


class Served:
    """A spawned mnist-serve with its gRPC, HTTP and metrics ports."""

    def __init__(self, spawn: Any, repo: Path) -> None:
        self.proc: ServerProcess = spawn("--model-repo", str(repo), "--http-port", "0",
                                         "--metrics-port", "0", "--reload-interval", "0",
                                         "--log-format", "text")
        self.grpc_target = self.proc.target()
        found = wait_for(lambda: re.search(r"Open Inference Protocol REST\) on http://127\.0\.0\.1:(\d+)/v2",
                                           self.proc.log), 60, "the HTTP edge's line")
        self.http_port = int(found.group(1))
        wait_for(lambda: f"serving model {MODEL} version 1" in self.proc.log, 120, "the model")
        self.metrics = self.proc.metrics_port()

    def target(self, protocol: str) -> str:
        return self.grpc_target if protocol == "grpc" else f"127.0.0.1:{self.http_port}"

    def classes(self, images: np.ndarray) -> np.ndarray:
        """The server's answer for ``images`` sent as FP32 in [0, 1] over HTTP/JSON (the path
        that predates UINT8 inputs): the oracle of what perf_analyzer's pixels must get."""
        pixels = images.reshape(len(images), -1).astype(np.float32) / np.float32(255)
        answer = _call(self.http_port, "POST", f"/v2/models/{MODEL}/infer", {
            "inputs": [{"name": "images", "shape": list(pixels.shape), "datatype": "FP32",
                        "data": pixels.ravel().tolist()}],
            "outputs": [{"name": "probabilities"}]})
        (output,) = answer["outputs"]
        probabilities = np.asarray(output["data"], np.float32).reshape(output["shape"])
        return np.asarray(probabilities.argmax(axis=1))


def _predictions(samples: Samples) -> dict[str, float]:
    """Images the server predicted, by class."""
    return {dict(labels)["class"]: value for (name, labels), value in samples.items()
            if name == "digitserve_predictions_total"}


def _failed_calls(samples: Samples) -> dict[str, float]:
    """Calls answered with anything but success, on either edge. perf_analyzer (2.34.0) cancels
    its stream once a concurrency's measurement is done, so a ModelStreamInfer call ends CANCELLED
    by its client's choice; the answers inside it are checked by the statistics and predictions."""
    failed = {}
    for (name, labels), value in samples.items():
        label = dict(labels)
        if (label.get("grpc_method"), label.get("grpc_code")) == ("ModelStreamInfer", "CANCELLED"):
            continue
        if value and name == "grpc_server_handled_total" and label["grpc_code"] != "OK":
            failed[f"{label['grpc_method']} {label['grpc_code']}"] = value
        if value and name == "http_server_requests_total" and not label["code"].startswith("2"):
            failed[f"{label['method']} {label['route']} {label['code']}"] = value
    return failed


@pytest.fixture
def analyzer() -> Path:
    path = perf_analyzer.binary()
    if not path.exists():
        skip_or_fail(f"perf_analyzer is not installed at {path} (.ci/perf-analyzer.sh)")
    return path


def _check(result: perf_analyzer.Run, samples: Samples) -> None:
    """What every run must show: exit 0 and a throughput at concurrency 1 and 2, no error, no
    failed call on the server, and the server's statistics of each concurrency's windows agreeing
    with perf_analyzer's count within 5 % (perf_analyzer reads the statistics just before and
    after each window: calls that end between its window's end and that read, or that were in
    flight at its start, are in one count only)."""
    assert result.returncode == 0, result.output
    assert [row["concurrency"] for row in result.rows] == [1, 2], result.output
    assert all(row["rps"] > 0 for row in result.rows), result.rows
    assert "error" not in result.output.lower(), result.output
    assert _failed_calls(samples) == {}, result.output
    assert sorted(result.requests) == [1, 2] and min(result.requests.values()) >= 40, result.output
    assert sorted(result.served) == [1, 2], f"no server statistics in the report:\n{result.output}"
    for level, counted in result.requests.items():
        assert abs(result.served[level] - counted) <= 0.05 * counted, (level, result.served,
                                                                       result.requests)


@pytest.mark.parametrize(("protocol", "streaming"), MODES)
def test_perf_analyzer_random_data(analyzer: Path, spawn: Any, tiny_repo: Path, tmp_path: Path,
                                   protocol: str, streaming: bool) -> None:
    served = Served(spawn, tiny_repo)
    before = sum(_predictions(scrape(served.metrics)).values())
    result = perf_analyzer.run(served.target(protocol), protocol=protocol, model=MODEL,
                               concurrency=[1, 2], workdir=tmp_path, streaming=streaming,
                               measurement=MEASUREMENT, timeout=120)
    samples = scrape(served.metrics)
    _check(result, samples)
    assert sum(_predictions(samples).values()) - before >= sum(result.requests.values())


@pytest.mark.parametrize(("protocol", "streaming"), MODES)
def test_perf_analyzer_real_images(analyzer: Path, spawn: Any, tiny_repo: Path, tmp_path: Path,
                                   protocol: str, streaming: bool) -> None:
    data = real_data_dir()
    if data is None:
        skip_or_fail("no real MNIST (mnist-train fetch, or MNIST_DATA_DIR)")
    served = Served(spawn, tiny_repo)
    images = read_idx(data / "t10k-images-idx3-ubyte.gz")[:200]
    classes = served.classes(images)
    # Only images of the class the server gives most of them: any other class counted during the
    # run means perf_analyzer's pixels did not reach the model as they are in the file.
    common = int(np.bincount(classes).argmax())
    chosen = images[classes == common][:20]
    described = _call(served.http_port, "GET", f"/v2/models/{MODEL}")
    (tmp_path / "images.json").write_text(json.dumps(perf_analyzer.input_data(chosen, described)))
    before = _predictions(scrape(served.metrics))
    result = perf_analyzer.run(served.target(protocol), protocol=protocol, model=MODEL,
                               concurrency=[1, 2], workdir=tmp_path, streaming=streaming,
                               data=tmp_path / "images.json", measurement=MEASUREMENT, timeout=120)
    samples = scrape(served.metrics)
    _check(result, samples)
    after = _predictions(samples)
    grown = {c: after[c] - before.get(c, 0.0) for c in after if after[c] != before.get(c, 0.0)}
    assert list(grown) == [str(common)], (grown, common)
    assert grown[str(common)] >= sum(result.requests.values()), result.output
