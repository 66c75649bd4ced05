"""Probes of the container check (.ci/containers.sh), run by its tools' Python (grpcio, no project
code): wait for gRPC health SERVING, count a server's Predict calls, read a loadtest's JSON.

  python .ci/probe.py serving TARGET TIMEOUT   print the epoch time at which TARGET's health ""
                                               answered SERVING (polled every 20 ms); exit 1 on timeout
  python .ci/probe.py predicts URL             print the Predict calls a server answered OK, from
                                               its Prometheus endpoint (0 when it has none yet)
  python .ci/probe.py http-ready URL           exit 0 iff GET URL answers 200 within 10 s
"""

from __future__ import annotations

import sys
import time
import urllib.error
import urllib.request

POLL_SECONDS = 0.02


def serving(target: str, timeout: float) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    last = "no answer"
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    print(f"{time.time():.3f}")
                    return 0
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            except grpc.RpcError as error:
                last = f"{error.code().name}: {error.details()}"  # type: ignore[attr-defined]
            time.sleep(POLL_SECONDS)
    print(f"{target}: not SERVING after {timeout:g} s (last: {last})", file=sys.stderr)
    return 1


def predicts(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
    except (OSError, urllib.error.URLError) as error:
        print(f"{url}: {error}", file=sys.stderr)
        return 1
    count = sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
                if line.startswith("grpc_server_handled_total{") and 'grpc_method="Predict"' in line
                and 'grpc_code="OK"' in line)
    print(count)
    return 0


def http_ready(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            print(f"{url}: {response.status}")
            return 0 if response.status == 200 else 1
    except (OSError, urllib.error.URLError) as error:
        print(f"{url}: {error}", file=sys.stderr)
        return 1


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "serving":
        return serving(argv[1], float(argv[2]))
    if len(argv) == 2 and argv[0] == "predicts":
        return predicts(argv[1])
    if len(argv) == 2 and argv[0] == "http-ready":
        return http_ready(argv[1])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
