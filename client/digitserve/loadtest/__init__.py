"""The load tester behind ``mnist-client loadtest`` and the benchmark (``bench/``): Predict or V2
ModelInfer calls serialized once and sent closed- or open-loop from several processes, over its
own HTTP/2 framing (``digitserve.loadtest.http2``) or grpc.aio; throughput, latency percentiles,
errors, the accuracy of the answers and the model versions that gave them.

A package of its own, not part of the client library: ``pip install 'digitserve[loadtest]'``
adds what only it needs (``hpack``); ``mnist-client`` imports it only for its ``loadtest``
sub-command.
"""

from __future__ import annotations

from digitserve.loadtest.generator import (
    DEFAULT_CONNECTIONS,
    ENCODINGS,
    ENGINES,
    METHODS,
    PREDICT_METHOD,
    PROTOCOLS,
    LoadConfig,
    LoadResult,
    LoadTestError,
    Workload,
    build_workload,
    default_processes,
    error_summary,
    format_result,
    format_versions,
    run,
)

__all__ = ["DEFAULT_CONNECTIONS", "ENCODINGS", "ENGINES", "METHODS", "PREDICT_METHOD", "PROTOCOLS",
           "LoadConfig", "LoadResult", "LoadTestError", "Workload", "build_workload",
           "default_processes", "error_summary", "format_result", "format_versions", "run"]
