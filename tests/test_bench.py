"""The benchmark's own logic: the median run, and reading h2load's summary."""

from __future__ import annotations

from bench.h2load import parse
from bench.run import median_run

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
