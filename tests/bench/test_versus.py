"""bench.versus' tables: the ratio is the subject's median over the baseline's, and perf_analyzer's
rows give each round, their median, or why it does not run against a server."""

from __future__ import annotations

from bench.versus import perf_table, table


def test_the_ratio_is_of_the_medians_of_the_rounds() -> None:
    rps = {("v2-grpc", "1x64", "digitserve"): [100.0, 300.0, 200.0, 400.0],
           ("v2-grpc", "1x64", "kserve"): [100.0, 200.0, 150.0, 900.0]}
    (header, rule, row) = table(rps, ["v2-grpc"], ["1x64"])
    assert header.startswith("| edge |") and rule.count("|") == header.count("|")
    # medians 250 and 175 (even counts: the mean of the middle two), not the means 250 and 337.5
    assert row == ("| V2 gRPC ModelInfer, raw FP32 | 1 × 64 | digitserve | 100 / 300 / 200 / 400 | "
                   "250 | KServe (same LiteRT) (100 / 200 / 150 / 900) | 175 | **1.43×** |")


def test_perf_analyzer_rows_give_each_round_or_why_it_does_not_run() -> None:
    perf: dict[tuple[str, str], list[float | str | None]] = {
        ("64x8", "digitserve"): [10.0, None, 30.0, 20.0],
        ("64x8", "kserve"): ["error: failed to get model config: Method not found!"],
        ("1x64", "digitserve"): [None, None],
    }
    lines = perf_table(perf, ["1x64", "64x8"])
    assert lines[2:] == [
        "| `-b 1 --concurrency-range 64` | 1 × 64 | digitserve | no stable measurement | – |",
        "| `-b 1 --concurrency-range 64` | 1 × 64 | KServe (same LiteRT) | no stable measurement | – |",
        "| `-b 64 --concurrency-range 8` | 64 × 8 | digitserve | 10 / unstable / 30 / 20 | 20 |",
        "| `-b 64 --concurrency-range 8` | 64 × 8 | KServe (same LiteRT) | does not run: "
        "`error: failed to get model config: Method not found!` | – |",
    ]
