"""h2load (Debian's nghttp2-client), a C HTTP/2 load generator, driving gRPC Predict calls: the
ceiling that a Python load tester is compared with."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from bench.servers import BenchError

PREDICT_PATH = "/digitserve.v1.DigitService/Predict"


def find() -> str | None:
    """The h2load binary; tries `apt-get install nghttp2-client` once when it is missing and we
    are root (as in the project's containers)."""
    path = shutil.which("h2load")
    if path is None and shutil.which("apt-get") and _is_root():
        subprocess.run(["apt-get", "install", "-y", "-q", "nghttp2-client"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
        path = shutil.which("h2load")
    return path


def _is_root() -> bool:
    import os

    return os.geteuid() == 0


def grpc_frame(payload: bytes) -> bytes:
    """A gRPC length-prefixed message: flag byte 0 (uncompressed), 4-byte big-endian length."""
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


def run(binary: str, target: str, payload: bytes, *, streams: int, duration: float, warmup: float,
        workdir: Path, connections: int = 1) -> dict[str, Any]:
    """``h2load -c connections -m streams -D duration`` POSTing one framed PredictRequest; returns
    rps, mean latency and the request counts. gRPC errors travel in trailers, which h2load does not
    read, so callers check the payload with a real client first."""
    body = workdir / f"h2load-{len(payload)}.bin"
    body.write_bytes(grpc_frame(payload))
    argv = [
        binary, "-c", str(connections), "-m", str(streams), "-t", "1",
        "-D", ms(duration), f"--warm-up-time={ms(warmup)}", "-d", str(body),
        "-H", "content-type: application/grpc", "-H", "te: trailers",
        f"http://{target}{PREDICT_PATH}",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + warmup + 60)
    if done.returncode != 0:
        raise BenchError(f"h2load failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return parse(done.stdout)


def ms(seconds: float) -> str:
    """h2load's <DURATION>: an integer with a unit."""
    return f"{max(1, round(seconds * 1000))}ms"


def parse(out: str) -> dict[str, Any]:
    """The figures of h2load's summary."""
    finished = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", out)
    counts = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                       r"(\d+) failed, (\d+) errored", out)
    latency = re.search(r"time for request:\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+"
                        r"([\d.]+)(us|ms|s)", out)
    if not finished or not counts:
        raise BenchError(f"cannot read h2load's output:\n{out[-1000:]}")
    scale = {"us": 1e-3, "ms": 1.0, "s": 1000.0}
    result: dict[str, Any] = {
        "rps": float(finished.group(3)),
        "requests": int(counts.group(3)),
        "succeeded": int(counts.group(4)),
        "failed": int(counts.group(5)) + int(counts.group(6)),
    }
    if latency:
        result["min_ms"] = float(latency.group(1)) * scale[latency.group(2)]
        result["max_ms"] = float(latency.group(3)) * scale[latency.group(4)]
        result["mean_ms"] = float(latency.group(5)) * scale[latency.group(6)]
    return result
