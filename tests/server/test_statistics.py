"""Triton's statistics extension (server.statistics) through tritonclient, gRPC and HTTP: after the
calls a test makes, the counts equal them exactly and the times are real (non-zero where the
server spends time, within the wall time the client measured); both edges report the same."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tests.servers import ServerThread
from tests.support import require_module

# tritonclient registers the same `inference.*` message names as our generated code, so it runs
# in a subprocess (see test_oip.py).
SCRIPT = r"""
import asyncio, json, sys, time
import numpy as np
import tritonclient.grpc as tg
import tritonclient.grpc.aio as tga
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

grpc_url, http_url = sys.argv[1:]
rng = np.random.default_rng(0)
report = {}

def tensor(module, n, name="images", value=None):
    pixels = rng.random((n, 784), dtype=np.float32)
    if value is not None:
        pixels[0, 5] = value
    t = module.InferInput(name, [n, 784], "FP32")
    t.set_data_from_numpy(pixels)
    return t

for edge, module, url in (("grpc", tg, grpc_url), ("http", th, http_url)):
    client = module.InferenceServerClient(url)
    began_ms = time.time() * 1000
    wall = 0
    for n in (1, 2, 3, 2, 1):  # 5 successful calls, 9 images, one model call each
        t0 = time.perf_counter_ns()
        client.infer("tiny", [tensor(module, n)])
        wall += time.perf_counter_ns() - t0
    fails = []
    for bad in (dict(value=2.0), dict(value=-1.0), dict(name="pixels")):  # 3 refused calls
        try:
            client.infer("tiny", [tensor(module, 2, **bad)])
        except InferenceServerException as exc:
            fails.append(exc.message())
    try:  # not counted: no version of any model was chosen
        client.infer("no-such-model", [tensor(module, 1)])
    except InferenceServerException as exc:
        fails.append(exc.message())
    as_json = {"as_json": True} if edge == "grpc" else {}  # the JSON that tritonclient.http returns
    stats = client.get_inference_statistics("tiny", **as_json)
    report[edge] = {"stats": stats, "wall_ns": wall, "began_ms": began_ms,
                    "ended_ms": time.time() * 1000, "fails": fails,
                    "all": client.get_inference_statistics(**as_json),
                    "version": client.get_inference_statistics("tiny", "1", **as_json)}
    try:
        client.get_inference_statistics("tiny", "7")
    except InferenceServerException as exc:
        report[edge]["missing"] = [str(exc.status()), exc.message()]

async def concurrent():
    # 200 images a call: more than a call run on the event loop may hold, so each waits in the queue
    client = tga.InferenceServerClient(grpc_url)
    t0 = time.perf_counter_ns()
    await asyncio.gather(*(client.infer("tiny", [tensor(tga, 200)]) for _ in range(8)))
    wall = time.perf_counter_ns() - t0
    stats = await client.get_inference_statistics("tiny", as_json=True)
    await client.close()
    return {"stats": stats, "wall_ns": wall}

report["concurrent"] = asyncio.run(concurrent())
print(json.dumps(report))
"""


def numbers(stats: dict[str, Any]) -> dict[str, Any]:
    """A ModelStatistics as plain integers: tritonclient.grpc's JSON writes uint64 as strings and
    leaves zeros out, tritonclient.http's has them as numbers."""
    inference = stats.get("inference_stats", {})
    return {
        "name": stats["name"], "version": stats["version"],
        "last_inference": int(stats.get("last_inference", 0)),
        "inference_count": int(stats.get("inference_count", 0)),
        "execution_count": int(stats.get("execution_count", 0)),
        **{f"{key}.{field}": int(inference.get(key, {}).get(field, 0))
           for key in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
           for field in ("count", "ns")},
        "batches": sorted((int(b["batch_size"]), int(b.get("compute_infer", {}).get("count", 0)))
                          for b in stats.get("batch_stats", [])),
    }


def test_tritonclient_reads_statistics_that_count_the_calls_made(
    start_server: Callable[..., ServerThread], tmp_path: Path
) -> None:
    for module in ("tritonclient.grpc", "tritonclient.http", "geventhttpclient"):
        require_module(module, "it is in the dev extra: pip install -e '.[dev]'")
    server = start_server(http_port=0)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, server.target,
                           f"127.0.0.1:{server.app.http_port}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)

    grpc_stats = numbers(report["grpc"]["stats"]["model_stats"][0])
    http_stats = numbers(report["http"]["stats"]["model_stats"][0])
    assert (grpc_stats["name"], grpc_stats["version"]) == ("tiny", "1")
    # After the gRPC calls: theirs; after the HTTP calls: both edges' (one model, one version).
    for stats, calls in ((grpc_stats, 1), (http_stats, 2)):
        assert stats["success.count"] == 5 * calls
        assert stats["fail.count"] == 3 * calls
        assert stats["inference_count"] == 9 * calls
        assert stats["execution_count"] == 5 * calls  # one call at a time: one model call each
        assert stats["batches"] == [(1, 2 * calls), (2, 2 * calls), (3, calls)]
        for stage in ("queue", "compute_input", "compute_infer", "compute_output"):
            assert stats[f"{stage}.count"] == 5 * calls, stage
        for stage in ("success", "fail", "compute_input", "compute_infer", "compute_output"):
            assert stats[f"{stage}.ns"] > 0, stage
    # The times of the gRPC calls: within what the client waited for them, stages within the call.
    stages = sum(grpc_stats[f"{s}.ns"] for s in ("queue", "compute_input", "compute_infer", "compute_output"))
    assert stages <= grpc_stats["success.ns"] <= report["grpc"]["wall_ns"]
    http_only = {k: http_stats[k] - grpc_stats[k] for k in ("success.ns", "queue.ns")}
    assert 0 < http_only["success.ns"] <= report["http"]["wall_ns"]
    assert report["http"]["began_ms"] - 1 <= http_stats["last_inference"] <= report["http"]["ended_ms"] + 1
    for edge in ("grpc", "http"):
        fails = report[edge]["fails"]
        assert len(fails) == 4 and "out of range" in fails[0] and "out of range" in fails[1], fails
        assert fails[2] == "inputs[0].name: 'pixels' is not an input of model 'tiny'; expected 'images'"
        assert fails[3] == "model 'no-such-model' is not served; this server serves 'tiny'"

    # The same figures on both edges, for every model, the model and its version.
    for edge, stats in (("grpc", grpc_stats), ("http", http_stats)):
        assert [numbers(s) for s in report[edge]["all"]["model_stats"]] == [stats]
        assert numbers(report[edge]["version"]["model_stats"][0]) == stats
    assert report["grpc"]["missing"][0] == "StatusCode.NOT_FOUND"
    assert report["grpc"]["missing"][1] == report["http"]["missing"][1] == (
        "model 'tiny' version 7 is not served (serving version 1; loaded: 1)")

    # Concurrent calls of 200 images: each waits in the batcher's queue (time > 0), and a model
    # call may answer several of them (execution_count counts it once).
    after = numbers(report["concurrent"]["stats"]["model_stats"][0])
    assert after["success.count"] - http_stats["success.count"] == 8
    assert after["inference_count"] - http_stats["inference_count"] == 1600
    assert after["queue.count"] - http_stats["queue.count"] == 8
    assert after["queue.ns"] > http_stats["queue.ns"]
    executions = after["execution_count"] - http_stats["execution_count"]
    assert 1 <= executions <= 8
    assert sum(n for _, n in after["batches"]) == after["execution_count"]
    assert after["success.ns"] - http_stats["success.ns"] <= 8 * report["concurrent"]["wall_ns"]

    # Our own API's Predict is an inference call of the same version: counted too.
    from digitserve.client.client import DigitClient

    with DigitClient(server.target, timeout=30) as client:
        client.predict(np.random.default_rng(1).random((4, 784), dtype=np.float32))
    version = server.plane.statistics.versions[1]
    assert version.success_count == after["success.count"] + 1
    assert version.inference_count == after["inference_count"] + 4
