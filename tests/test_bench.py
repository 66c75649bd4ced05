"""The benchmark's own logic: the median run, reading h2load's summary, the targets' lines, the
big-calls figures, and perf_analyzer's input data and report."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench import perf_analyzer
from bench.big_calls import measure
from bench.h2load import parse
from bench.report import targets
from bench.run import median_run
from bench.servers import BenchError
from tests.servers import ServerThread

H2LOAD_SUMMARY = """
finished in 5.00s, 4521.60 req/s, 1.20MB/s
requests: 22608 total, 22672 started, 22608 done, 22608 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 22608 2xx, 0 3xx, 0 4xx, 0 5xx
                     min         max         mean         sd        +/- sd
time for request:      1.12ms     31.71ms     14.09ms      2.91ms    79.67%
"""


def test_median_run_keeps_the_middle_throughput_and_lists_all() -> None:
    runs = [{"rps": 900.0, "p99_ms": 9.0}, {"rps": 1200.0, "p99_ms": 3.0}, {"rps": 1000.0, "p99_ms": 5.0}]
    result = median_run(runs)
    assert result["rps"] == 1000.0 and result["p99_ms"] == 5.0
    assert result["runs_rps"] == [900.0, 1200.0, 1000.0]
    assert "runs_rps" not in runs[2]  # the runs themselves are left as they were
    assert median_run([{"rps": 7.0}])["rps"] == 7.0


def test_h2load_summary_is_read() -> None:
    result = parse(H2LOAD_SUMMARY)
    assert result["rps"] == 4521.60 and result["requests"] == 22608
    assert result["succeeded"] == 22608 and result["failed"] == 0


def _row(name: str, kind: str, workers: int, one: float, many: float, batch: float,
         p99: float) -> dict[str, Any]:
    return {"name": name, "kind": kind, "preset": "seed" if kind != "null" else "–",
            "workers": workers, "evaluate_s": 0.1 if kind.startswith(("ours", "null")) else None,
            "scenarios": {"one": {"rps": one, "p99_ms": p99}, "many": {"rps": many},
                          "batch": {"images_per_s": batch}}}


def test_targets_compare_our_server_with_null_and_kserve_rows() -> None:
    rows = [
        _row("null", "null", 1, 2000, 4000, 190_000, 1.0),
        _row("ours, 1", "ours", 1, 1500, 2500, 90_000, 1.3),
        _row("ours, 2", "ours", 2, 1500, 3600, 100_000, 1.4),
        _row("ours, 2, V2", "ours-oip", 2, 1400, 3000, 95_000, 1.5),
        _row("KServe tf", "kserve", 1, 700, 800, 20_000, 3.0),
        _row("KServe litert", "kserve-litert", 1, 1100, 1800, 70_000, 2.0),
    ]
    lines = targets(rows)
    assert lines[0] == "Targets of issue 3, for `ours, 2` with the seed model:"
    assert "req/s ÷ null's: **0.900** (target ≥ 0.8) ✓" in lines[2]
    assert "p99 ÷ null's p99: **1.400** (target ≤ 1.5) ✓" in lines[3]
    assert "images/s ÷ null's: **0.526** (target ≥ 0.8) ✗" in lines[4]
    assert lines[6] == ("- 1 image/request, 64 in flight: req/s ÷ KServe tf's: **4.500** "
                        "(target ≥ 4.0) ✓")
    assert lines[7] == "  - both over the V2 protocol (`ours, 2, V2`): **3.750**"
    assert lines[8] == "- 1 image/request, 64 in flight: req/s ÷ KServe litert's: **2.000**"
    assert lines[9] == "  - both over the V2 protocol (`ours, 2, V2`): **1.667**"
    # Without KServe rows, no KServe lines.
    assert not any("KServe" in line for line in targets(rows[:4]))


def test_big_calls_reports_served_calls_refusals_and_health(
    start_server: Callable[..., ServerThread],
) -> None:
    # 100-image calls go through the queue (the tiny LiteRT model runs up to 64 on the loop);
    # 8 callers against a bound of 200 queued images: some served, some refused.
    server = start_server(max_queued_images=200, max_images_per_request=100)
    result = measure(server.target, "predict", 8, 1.0, 100)
    assert set(result["calls"]) == {"OK", "RESOURCE_EXHAUSTED"}, result
    assert result["calls"]["OK"] >= 8 and result["calls"]["RESOURCE_EXHAUSTED"] >= 8
    assert server.plane.batcher.stats.rejected == result["calls"]["RESOURCE_EXHAUSTED"]
    assert set(result["health"]["checks"]) == {"SERVING"}
    for figures in (result["served"], result["refused"], result["health"]):
        assert 0 < figures["p50_ms"] <= figures["p99_ms"] <= figures["max_ms"]


# perf_analyzer 2.34.0's report and CSV of a run against mnist-serve (bench.perf_analyzer.run).
PERF_OUTPUT = """*** Measurement Settings ***
  Batch size: 1
  Service Kind: Triton
  Using "count_windows" mode for stabilization

Request concurrency: 1
  Client:
    Request count: 1716
    Throughput: 571.725 infer/sec
    Avg latency: 1747 usec (standard deviation 1885 usec)
    p50 latency: 1069 usec
  Server:
    Inference count: 1717
    Execution count: 1717
    Successful request count: 1715
Request concurrency: 2
  Client:
    Request count: 2463
    Throughput: 820.756 infer/sec
    Avg latency: 2405 usec (standard deviation 3843 usec)
  Server:
    Inference count: 2462
    Execution count: 2462
    Successful request count: 2462
Inferences/Second vs. Client Average Batch Latency
Concurrency: 1, throughput: 571.725 infer/sec, latency 1747 usec
Concurrency: 2, throughput: 820.756 infer/sec, latency 2405 usec
"""
PERF_CSV = """\
Concurrency,Inferences/Second,Client Send,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency
2,820.756,3,2,1680,3594,6247,11779
1,571.725,4,2,1069,4023,6770,8893
"""


def test_perf_analyzer_report_is_read(tmp_path: Path) -> None:
    table = tmp_path / "perf.csv"
    table.write_text(PERF_CSV)
    rows = perf_analyzer._rows(table, PERF_OUTPUT)
    assert rows == [
        {"concurrency": 1, "rps": 571.725, "p50_ms": 1.069, "p99_ms": 8.893, "avg_ms": 1.747},
        {"concurrency": 2, "rps": 820.756, "p50_ms": 1.68, "p99_ms": 11.779, "avg_ms": 2.405},
    ]
    assert perf_analyzer._report_counts(PERF_OUTPUT) == ({1: 1716, 2: 2463}, {1: 1715, 2: 2462})
    # Without the statistics extension perf_analyzer prints no server block.
    without = re.sub(r"  Server:\n(    .*\n)+", "", PERF_OUTPUT)
    assert perf_analyzer._report_counts(without) == ({1: 1716, 2: 2463}, {})


def _metadata(datatype: str, shape: list[int]) -> dict[str, Any]:
    return {"name": "mnist", "inputs": [{"name": "images", "datatype": datatype, "shape": shape}],
            "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]}


def test_perf_analyzer_input_data_follows_the_declared_input() -> None:
    images = np.arange(2 * 28 * 28, dtype=np.uint32).reshape(2, 28, 28).astype(np.uint8)
    uint8 = perf_analyzer.input_data(images, _metadata("UINT8", [-1, 784]))
    assert [entry["images"]["shape"] for entry in uint8["data"]] == [[784], [784]]
    assert [entry["images"]["content"] for entry in uint8["data"]] == [images[0].ravel().tolist(),
                                                                        images[1].ravel().tolist()]
    fp32 = perf_analyzer.input_data(images[:1], _metadata("FP32", [-1, 28, 28]))
    (entry,) = fp32["data"]
    assert entry["images"]["shape"] == [28, 28]
    np.testing.assert_allclose(entry["images"]["content"], images[0].ravel() / 255, rtol=1e-6)
    assert max(entry["images"]["content"]) <= 1.0


@pytest.mark.parametrize(("datatype", "shape", "message"), [
    ("UINT8", [-1, 100], "holds [100], not 784 pixels"),
    ("INT64", [-1, 784], "is INT64: expected UINT8 or FP32"),
])
def test_perf_analyzer_input_data_refuses_what_it_cannot_fill(datatype: str, shape: list[int],
                                                              message: str) -> None:
    with pytest.raises(BenchError, match=message.replace("[", r"\[").replace("]", r"\]")):
        perf_analyzer.input_data(np.zeros((1, 28, 28), np.uint8), _metadata(datatype, shape))
