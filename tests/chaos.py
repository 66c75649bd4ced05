"""A hostile gRPC client for the crash tests: calls that end early in every way a client can end
them — reflection and health ``Watch`` streams opened and abandoned (the channel closed under
them) or cancelled, ``Evaluate`` streams cancelled mid-way or outlived by their deadline, unary
calls with random or truncated payloads and deadlines that expire while they run — on every
method of the server, many at once. A grpc.aio server that touches a call after grpc ended it
(issue 21's SIGSEGV) dies under it within seconds."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Sequence

import grpc
from grpc._cython.cygrpc import ExecuteBatchError as CallGone
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from digitserve.oip import grpc_predict_v2_pb2 as oip_pb
from digitserve.v1 import digit_service_pb2 as pb

# Every unary method of the server, with a valid request to truncate or garble.
UNARY: dict[str, bytes] = {
    "/digitserve.v1.DigitService/Predict": pb.PredictRequest(
        images=[pb.Image(uint8=bytes(784))]).SerializeToString(),
    "/digitserve.v1.DigitService/GetModelInfo": pb.GetModelInfoRequest().SerializeToString(),
    "/digitserve.v1.DigitService/ListModels": pb.ListModelsRequest().SerializeToString(),
    "/inference.GRPCInferenceService/ServerLive": b"",
    "/inference.GRPCInferenceService/ServerReady": b"",
    "/inference.GRPCInferenceService/ModelReady": oip_pb.ModelReadyRequest(name="tiny").SerializeToString(),
    "/inference.GRPCInferenceService/ServerMetadata": b"",
    "/inference.GRPCInferenceService/ModelMetadata": oip_pb.ModelMetadataRequest(
        name="tiny").SerializeToString(),
    "/inference.GRPCInferenceService/ModelInfer": oip_pb.ModelInferRequest(
        model_name="tiny", inputs=[oip_pb.ModelInferRequest.InferInputTensor(
            name="images", datatype="FP32", shape=[1, 784],
            contents=oip_pb.InferTensorContents(fp32_contents=[0.0] * 784))]).SerializeToString(),
    "/grpc.health.v1.Health/Check": health_pb2.HealthCheckRequest(service="").SerializeToString(),
}
EVALUATE = "/digitserve.v1.DigitService/Evaluate"
EVALUATE_REQUEST = pb.EvaluateRequest(images=[pb.Image(uint8=bytes(784))], labels=[0]).SerializeToString()
# How a client's call ends when the server (or its own deadline) ended it first: grpc.aio's
# errors, and its "execute_batch" failure for a write or half-close on a finished call.
_ENDINGS: tuple[type[BaseException], ...] = (
    grpc.RpcError, asyncio.CancelledError, asyncio.InvalidStateError, grpc.aio.UsageError, CallGone)


def _identity(data: bytes) -> bytes:
    return data


def garbled(rng: random.Random, valid: bytes) -> bytes:
    """A payload of one of three kinds: random bytes, ``valid`` cut short, or ``valid`` as is."""
    kind = rng.randrange(3)
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 400))
    if kind == 1 and valid:
        return valid[: rng.randrange(len(valid))]
    return valid


class Chaos:
    """Rounds of ``width`` hostile calls on a fresh channel each, closed at the end of its round
    whatever is still open on it (abandoned streams). ``counts`` says what was done."""

    def __init__(self, target: str, seed: int, width: int = 40,
                 metadata: Sequence[tuple[str, str]] = ()) -> None:
        self.target = target
        self.rng = random.Random(seed)
        self.width = width
        self.metadata = tuple(metadata)
        self.counts: collections.Counter[str] = collections.Counter()
        self._kinds: list[Callable[[grpc.aio.Channel], Awaitable[None]]] = [
            self.reflection, self.watch, self.evaluate, self.unary, self.unary]

    def _deadline(self) -> float:
        return self.rng.choice((0.002, 0.02, 0.1, 2.0))

    async def reflection(self, channel: grpc.aio.Channel) -> None:
        call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            metadata=self.metadata)
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        if self.rng.random() < 0.5:
            await call.read()
        if self.rng.random() < 0.5:
            call.cancel()
            self.counts["reflection cancelled"] += 1
        else:
            self.counts["reflection abandoned"] += 1  # left open: its channel closes under it

    async def watch(self, channel: grpc.aio.Channel) -> None:
        call = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=self._deadline(), metadata=self.metadata)
        await call.read()
        if self.rng.random() < 0.5:
            call.cancel()
        self.counts["watch"] += 1

    async def evaluate(self, channel: grpc.aio.Channel) -> None:
        call = channel.stream_unary(EVALUATE, _identity, _identity)(
            timeout=self._deadline(), metadata=self.metadata)
        self.counts["evaluate"] += 1
        for _ in range(self.rng.randrange(6)):
            await call.write(garbled(self.rng, EVALUATE_REQUEST))
            await asyncio.sleep(self.rng.random() * 0.01)
        if self.rng.random() < 0.3:
            call.cancel()  # mid-way
            return
        await call.done_writing()
        await call

    async def unary(self, channel: grpc.aio.Channel) -> None:
        method, valid = self.rng.choice(list(UNARY.items()))
        self.counts["unary"] += 1
        await channel.unary_unary(method, _identity, _identity)(
            garbled(self.rng, valid), timeout=self._deadline(), metadata=self.metadata)

    async def _one(self, channel: grpc.aio.Channel) -> None:
        with contextlib.suppress(*_ENDINGS):
            await self.rng.choice(self._kinds)(channel)

    async def round(self) -> None:
        async with grpc.aio.insecure_channel(self.target) as channel:
            tasks = [asyncio.ensure_future(self._one(channel)) for _ in range(self.width)]
            await asyncio.sleep(self.rng.random() * 0.05)
            _, pending = await asyncio.wait(tasks, timeout=0.5)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def run(self, seconds: float, alive: Callable[[], bool] = lambda: True, steps: int = 1,
            between: Callable[[int], None] | None = None) -> None:
        """``steps`` spans of rounds of ``seconds`` each, ``between(step)`` run in a thread after
        each (a publish, a reload), or until ``alive()`` turns False (the server died). One event
        loop for all of it: grpc.aio's poller still delivers a finished channel's last events to
        the loop it ran on, and a loop closed under it fails them."""

        async def rounds() -> None:
            for step in range(steps):
                until = time.monotonic() + seconds
                while time.monotonic() < until and alive():
                    await self.round()
                    self.counts["rounds"] += 1
                if between is not None and alive():
                    await asyncio.to_thread(between, step)
            await asyncio.sleep(0.5)  # the closed channels' last events

        asyncio.run(rounds())
