"""What the tutorial leads to: a sync gRPC server with a thread pool that loads ``model.keras`` and
calls ``model.predict`` once per request. The benchmark's baseline, not for production.

    python -m bench.naive_server --model-dir models/mnist/2 --port 50071
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from digitserve.metadata import METADATA_FILE, Metadata
from digitserve.metrics import MetricsAccumulator
from digitserve.v1 import digit_service_pb2 as pb
from digitserve.v1 import digit_service_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)
SERVICE = "digitserve.v1.DigitService"


def decode(images: Sequence[pb.Image]) -> npt.NDArray[np.float32]:
    rows = []
    for image in images:
        kind = image.WhichOneof("pixels")
        if kind == "uint8":
            rows.append(np.frombuffer(image.uint8, dtype=np.uint8).astype(np.float32) / np.float32(255))
        elif kind == "float32":
            rows.append(np.frombuffer(image.float32, dtype="<f4"))
        else:
            rows.append(np.asarray(image.floats.values, dtype=np.float32))
    return np.stack(rows)


class NaiveServicer(pb_grpc.DigitServiceServicer):  # type: ignore[misc, unused-ignore]  # generated
    """Predict and Evaluate through ``model.predict``; no batching across calls, no validation."""

    def __init__(self, model: Any, labels: list[str], version: int) -> None:
        self.model = model
        self.labels = labels
        self.version = version

    def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictResponse:
        probs = self.model.predict(decode(request.images), verbose=0)
        response = pb.PredictResponse(model_name="mnist", model_version=self.version)
        for row in probs:
            k = int(np.argmax(row))
            response.predictions.add(probabilities=row.tolist(), class_index=k, label=self.labels[k],
                                     probability=float(row[k]))
        return response

    def Evaluate(self, requests: Iterator[pb.EvaluateRequest],
                 context: grpc.ServicerContext) -> pb.EvaluateResponse:
        accumulator = MetricsAccumulator(self.labels)
        for request in requests:
            probs = self.model.predict(decode(request.images), verbose=0)
            accumulator.update(np.asarray(request.labels, dtype=np.int64), probs)
        metrics = accumulator.result()
        return pb.EvaluateResponse(count=metrics.count, accuracy=metrics.accuracy,
                                   mean_cross_entropy=metrics.mean_cross_entropy,
                                   labels=metrics.labels, model_name="mnist",
                                   model_version=self.version)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.naive_server", description=__doc__)
    parser.add_argument("--model-dir", type=Path, required=True, help="REPO/NAME/VERSION")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50071)
    parser.add_argument("--threads", type=int, default=10, help="the grpc examples' thread pool")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        stream=sys.stderr)

    import keras

    metadata_file = args.model_dir / METADATA_FILE
    metadata = Metadata.from_json(json.loads(metadata_file.read_text()), metadata_file)
    _, labels = metadata.served_io()
    model = keras.models.load_model(args.model_dir / "model.keras")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.threads))
    pb_grpc.add_DigitServiceServicer_to_server(  # type: ignore[no-untyped-call, unused-ignore]
        NaiveServicer(model, list(labels), metadata.version), server
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in ("", SERVICE):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    server.add_insecure_port(f"{args.host}:{args.port}")
    server.start()
    logger.info("listening on %s:%d", args.host, args.port)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(1).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
