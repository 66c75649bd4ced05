"""The benchmark's ceiling: a grpc.aio DigitService with no model that parses each request and
returns a reply serialized in advance.

    python -m bench.null_server --port 50070
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from digitserve.v1 import digit_service_pb2 as pb

SERVICE = "digitserve.v1.DigitService"
LABELS = [str(d) for d in range(10)]
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

logger = logging.getLogger(__name__)


def reply(count: int) -> bytes:
    """A PredictResponse of ``count`` predictions, each certain of class 0."""
    response = pb.PredictResponse(model_name="null", model_version=1)
    for _ in range(count):
        response.predictions.add(probabilities=[1.0] + [0.0] * 9, class_index=0, label="0",
                                 probability=1.0)
    data: bytes = response.SerializeToString()
    return data


class NullService:
    """Predict answers from a cache of serialized replies keyed by the image count; Evaluate reads
    the stream and counts; GetModelInfo names the null model."""

    def __init__(self) -> None:
        self._replies: dict[int, bytes] = {}

    async def predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> bytes:
        count = len(request.images)
        answer = self._replies.get(count)
        if answer is None:
            answer = self._replies.setdefault(count, reply(count))
        return answer

    async def evaluate(self, requests: AsyncIterator[pb.EvaluateRequest],
                       context: grpc.aio.ServicerContext) -> bytes:
        count = 0
        async for request in requests:
            count += len(request.images)
        response = pb.EvaluateResponse(count=count, accuracy=0.1, labels=LABELS, model_name="null",
                                       model_version=1)
        data: bytes = response.SerializeToString()
        return data

    async def info(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> bytes:
        response = pb.GetModelInfoResponse(
            model_name="null", model_version=1, input_size=784, input_shape=[28, 28],
            input_scale=1 / 255, labels=LABELS, preset="null", metadata_json="{}",
            max_images_per_request=1 << 20,
        )
        data: bytes = response.SerializeToString()
        return data

    def handler(self) -> grpc.GenericRpcHandler:
        # response_serializer left out: the methods return bytes already.
        methods: dict[str, Any] = {
            "Predict": grpc.unary_unary_rpc_method_handler(
                self.predict, request_deserializer=pb.PredictRequest.FromString),
            "Evaluate": grpc.stream_unary_rpc_method_handler(
                self.evaluate, request_deserializer=pb.EvaluateRequest.FromString),
            "GetModelInfo": grpc.unary_unary_rpc_method_handler(
                self.info, request_deserializer=pb.GetModelInfoRequest.FromString),
        }
        return grpc.method_handlers_generic_handler(SERVICE, methods)


async def serve(host: str, port: int) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    server.add_generic_rpc_handlers((NullService().handler(),))
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    for service in ("", SERVICE):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    logger.info("listening on %s:%d", host, bound)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.null_server", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50070)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        stream=sys.stderr)
    asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
