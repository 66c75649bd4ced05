"""The benchmark's own logic: the median run, reading h2load's summary, the targets' lines, and the
big-calls figures."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench.big_calls import measure
from bench.h2load import parse
from bench.report import targets
from bench.run import median_run
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
