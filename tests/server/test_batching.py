"""Dynamic batching: batched answers equal unbatched ones, no answer is lost or handed to the wrong
caller under heavy concurrency, a full queue refuses at once, expired calls are not computed."""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest

from digitserve.client.client import encode_images
from digitserve.server.batcher import Batcher
from digitserve.server.dataplane import DataPlane
from digitserve.server.errors import DeadlineExpiredError, OverloadedError
from digitserve.v1 import digit_service_pb2 as pb
from digitserve.v1 import digit_service_pb2_grpc as pb_grpc
from tests.servers import ServerThread
from tests.support import FakeModel, tiny_litert, wait_for, wait_for_async

D = 784


def distinct_images(n: int, seed: int = 0) -> npt.NDArray[np.uint8]:
    return np.random.default_rng(seed).integers(0, 256, size=(n, D), dtype=np.uint8)


def test_concurrent_calls_batch_and_each_gets_its_own_answer(
    start_server: Callable[..., ServerThread],
) -> None:
    # A fake on purpose: it runs every call on the model thread (the LiteRT model computes calls
    # this small at once on the event loop: nothing to coalesce), and it records its calls.
    model = FakeModel()
    server = start_server(loader=lambda: model)
    images = distinct_images(512, seed=1)
    expected = FakeModel().predict(images.astype(np.float32) / np.float32(255))
    results: dict[int, npt.NDArray[np.float32]] = {}
    errors: list[BaseException] = []

    async def drive() -> None:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = pb_grpc.DigitServiceStub(channel)

            async def one(i: int) -> None:
                # 1 or 3 images per call, so batches hold calls of several sizes
                rows = [i, (i + 1) % 512, (i + 2) % 512] if i % 4 == 0 else [i]
                response = await stub.Predict(
                    pb.PredictRequest(images=encode_images(images[rows])), timeout=30)
                got = np.array([p.probabilities for p in response.predictions], np.float32)
                for row, probs in zip(rows, got, strict=True):
                    if row == i:
                        results[i] = probs

            tasks = [one(i) for i in range(512)]
            for outcome in await asyncio.gather(*tasks, return_exceptions=True):
                if isinstance(outcome, BaseException):
                    errors.append(outcome)

    asyncio.run(drive())
    assert errors == []
    assert sorted(results) == list(range(512))
    for i, probs in results.items():
        np.testing.assert_allclose(probs, expected[i], rtol=0, atol=1e-6, err_msg=f"call {i}")
    stats = server.plane.batcher.stats
    assert stats.images == sum(model.calls) == 384 + 3 * 128
    assert stats.batches < 512 and max(stats.batch_sizes) > 1  # calls really were coalesced
    assert max(stats.batch_sizes) <= 256


@pytest.mark.parametrize("inference", ["tensorflow", "litert"])
def test_batched_answers_equal_unbatched_ones_on_the_trained_model(
    start_server: Callable[..., ServerThread], inference: str,
) -> None:
    server = start_server(inference=inference)  # from the repository, as mnist-serve --inference
    images = distinct_images(64, seed=2)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.DigitServiceStub(channel)
        alone = [np.array(stub.Predict(pb.PredictRequest(images=encode_images(images[i:i + 1])))
                          .predictions[0].probabilities, np.float32) for i in range(64)]
        futures = [stub.Predict.future(pb.PredictRequest(images=encode_images(images[i:i + 1])))
                   for i in range(64)]
        together = [np.array(f.result(30).predictions[0].probabilities, np.float32) for f in futures]
        one_request = [np.array(p.probabilities, np.float32) for p in stub.Predict(
            pb.PredictRequest(images=encode_images(images))).predictions]
    np.testing.assert_allclose(np.array(together), np.array(alone), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.array(one_request), np.array(alone), rtol=0, atol=1e-6)
    model = server.model
    assert model is not None and model.inference_path == inference  # type: ignore[attr-defined]
    if inference == "tensorflow":  # on the model thread: concurrent calls are coalesced
        assert max(server.plane.batcher.stats.batch_sizes) > 1
    else:  # on the event loop, each call computed at once; LiteRT rows do not depend on the batch
        np.testing.assert_array_equal(np.array(one_request), np.array(alone))


class SlowModel(FakeModel):
    """Holds every model call until released, so a queue builds up behind it: a fake on purpose,
    one that runs every call, however small, on the model thread."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.entered = threading.Event()

    def predict(self, images: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        self.entered.set()
        self.release.wait(30)
        return super().predict(images)


class HeldLiteRT:
    """The tiny model as production serves it (the LiteRT interpreter, ``inline`` as the loaded
    model says; start_server(wrap=HeldLiteRT) wraps it past the gate), whose model calls, once
    ``hold`` is set, wait until released (before it, e.g. at load, they run at once)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.spec, self.metadata, self.inline = model.spec, model.metadata, model.inline
        self.inference_path = model.inference_path
        self.hold = threading.Event()
        self.release = threading.Event()
        self.entered = threading.Event()
        self.calls: list[int] = []

    def predict(self, images: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        if self.hold.is_set():
            self.entered.set()
            self.release.wait(30)
            self.calls.append(images.shape[0])
        result: npt.NDArray[np.float32] = self.model.predict(images)
        return result


# The fake model runs on the model thread whatever the size of a call; the LiteRT model runs
# small calls on the event loop, so its variants scale every call by UNIT images (one more than
# the default --inline-max-images, which the measurement at load can only lower): calls that
# go through the queue to the model thread, as big calls do in production.
UNIT = {"fake": 1, "litert": 65}
PATHS = list(UNIT)


@pytest.fixture(scope="module")
def litert_model(tiny_repo: Path) -> Any:
    return tiny_litert(tiny_repo)


@pytest.mark.parametrize("path", PATHS)
def test_full_queue_is_refused_at_once_and_expired_calls_are_not_computed(
    path: str, request: pytest.FixtureRequest,
) -> None:
    u = UNIT[path]
    model: SlowModel | HeldLiteRT

    async def scenario() -> None:
        nonlocal model
        loop = asyncio.get_running_loop()
        batcher: Batcher
        plane: DataPlane | None = None
        if path == "fake":
            model = SlowModel()

            async def run(model: Any, images: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
                return await loop.run_in_executor(None, model.predict, images)

            batcher = Batcher(run, max_batch_size=4, max_queue_delay=0, max_queued_images=9)
        else:  # the data plane's own batcher and model thread, as the server builds them
            model = HeldLiteRT(request.getfixturevalue("litert_model"))
            plane = DataPlane(4 * u, max_batch_size=4 * u, max_queued_images=9 * u)
            plane.prepare(model)  # type: ignore[arg-type]
            assert plane.batcher.inline_limits[model] < u  # type: ignore[index]
            model.hold.set()
            batcher = plane.batcher
        x = np.zeros((4 * u, D), np.float32)
        first = asyncio.ensure_future(batcher.predict(model, x))  # type: ignore[arg-type]
        await loop.run_in_executor(None, model.entered.wait, 10)  # the model is now busy
        queued = [asyncio.ensure_future(batcher.predict(model, x)) for _ in range(2)]  # type: ignore[arg-type]
        expiring = asyncio.ensure_future(
            batcher.predict(model, x[:u], time.monotonic() + 0.05))  # type: ignore[arg-type]
        await asyncio.sleep(0)
        # Refused at once: while the model is still held (a refusal that waited for room in the
        # queue would wait for a release that comes only after it, and time out).
        with pytest.raises(OverloadedError, match=f"{9 * u} images queued, limit {9 * u}"):
            await asyncio.wait_for(batcher.predict(model, x[:1]), 20)  # type: ignore[arg-type] # 9 + 1 would not fit
        assert not model.release.is_set() and batcher.queued_images == 9 * u
        await asyncio.sleep(0.1)  # the expiring call's deadline passes while it waits
        model.release.set()
        assert (await first).shape == (4 * u, 10)
        for q in queued:
            assert (await q).shape == (4 * u, 10)
        with pytest.raises(DeadlineExpiredError, match="not computed"):
            await expiring
        assert sum(model.calls) == 12 * u  # the expired images were never computed
        assert batcher.stats.rejected == 1 and batcher.stats.expired == 1
        await (batcher.close() if plane is None else plane.close())

    asyncio.run(scenario())


@pytest.mark.parametrize("path", PATHS)
def test_overload_is_resource_exhausted_over_grpc(
    start_server: Callable[..., ServerThread], path: str,
) -> None:
    u = UNIT[path]
    limits = {"max_images_per_request": 4 * u, "max_queued_images": 4 * u, "max_batch_size": 4 * u}
    model: SlowModel | HeldLiteRT
    if path == "fake":
        model = SlowModel()  # a fake on purpose: see SlowModel
        server = start_server(loader=lambda: model, **limits)
        model.release.set()  # warm path: let the loader's calls through
        model.release.clear()
    else:  # the tiny model from its repository, past the gate, then held
        server = start_server(wrap=HeldLiteRT, **limits)
        assert isinstance(server.model, HeldLiteRT)
        model = server.model
        model.hold.set()
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.DigitServiceStub(channel)
        request_ = pb.PredictRequest(images=encode_images(distinct_images(4 * u)))
        busy = stub.Predict.future(request_, timeout=30)
        assert model.entered.wait(10)
        waiting = stub.Predict.future(request_, timeout=30)  # fills the queue
        batcher = server.plane.batcher
        wait_for(lambda: batcher.queued_images == 4 * u, 10, "the second call to fill the queue",
                 poll=0.005)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Predict(request_, timeout=5)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "server overloaded" in refused.value.details()
        model.release.set()
        assert len(busy.result(30).predictions) == 4 * u
        assert len(waiting.result(30).predictions) == 4 * u


@pytest.mark.parametrize(("queued", "expected"), [
    (4, [8]),  # exactly max_batch_size images: one model call of that size
    (5, [8, 2]),  # one call more: it waits for the next model call
    (3, [6]),
])
def test_exactly_max_batch_size_queued_images_are_one_model_call(
    queued: int, expected: list[int],
) -> None:
    """Calls of 2 images queue behind a held model call (max_batch_size 8): once it ends, what is
    queued is taken in as few model calls as max_batch_size allows (a ``>=`` where the batcher
    compares a batch with max_batch_size would split 8 images into 6 and 2)."""
    model = SlowModel()  # a fake on purpose: it holds the first call, so the others queue

    async def scenario() -> None:
        loop = asyncio.get_running_loop()

        async def run(model: Any, images: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
            return await loop.run_in_executor(None, model.predict, images)

        batcher = Batcher(run, max_batch_size=8, max_queue_delay=0, max_queued_images=64)
        images = np.random.default_rng(3).random((2 * queued + 1, D), dtype=np.float32)
        first = asyncio.ensure_future(batcher.predict(model, images[:1]))  # type: ignore[arg-type]
        await loop.run_in_executor(None, model.entered.wait, 10)  # the model is now busy
        calls = [asyncio.ensure_future(batcher.predict(model, images[1 + 2 * i:3 + 2 * i]))  # type: ignore[arg-type]
                 for i in range(queued)]
        await wait_for_async(lambda: batcher.queued_images == 2 * queued, 30, "the calls to queue")
        model.release.set()
        answers = await asyncio.wait_for(asyncio.gather(first, *calls), 60)
        expected_rows = FakeModel().predict(images)
        np.testing.assert_allclose(np.concatenate(answers), expected_rows, rtol=0, atol=1e-6)
        assert model.calls == [1, *expected]
        assert batcher.stats.batch_sizes == collections.Counter([1, *expected])
        await batcher.close()

    asyncio.run(scenario())


def test_exactly_max_batch_size_queued_images_do_not_wait_the_queue_delay() -> None:
    """With a queue delay, the batcher waits for more only while fewer than max_batch_size images
    are queued: 8 queued images of max_batch_size 8 are computed at once, in one model call, not
    after the delay (an hour: a ``<=`` there would hold them past the test's 60 s)."""
    model = FakeModel()  # a fake on purpose: it records the size of each model call

    async def scenario() -> None:
        loop = asyncio.get_running_loop()

        async def run(model: Any, images: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
            return await loop.run_in_executor(None, model.predict, images)

        batcher = Batcher(run, max_batch_size=8, max_queue_delay=3600, max_queued_images=64)
        images = np.random.default_rng(4).random((8, D), dtype=np.float32)
        # Queued in one step of the event loop, before the batcher's task first looks.
        calls = [batcher.predict(model, images[2 * i:2 * i + 2]) for i in range(4)]  # type: ignore[arg-type]
        answers = await asyncio.wait_for(asyncio.gather(*calls), 60)
        np.testing.assert_allclose(np.concatenate(answers), FakeModel().predict(images),
                                   rtol=0, atol=1e-6)
        assert model.calls == [8]
        await batcher.close()

    asyncio.run(scenario())


def test_each_model_keeps_its_own_inline_limit_and_a_new_limit_counts_at_once() -> None:
    # Two models taking turns must not get each other's inline limit, a limit set again must count
    # from the next call, and neither the batcher's lookups nor its last batch (the batcher's loop
    # kept it while waiting) may keep a retired version alive. Fakes: inline and model-thread calls
    # both observable; the limits are what DataPlane.prepare sets.
    import gc
    import weakref

    async def scenario() -> None:
        threaded: list[tuple[int, int]] = []  # (model version, images) of the calls off the loop

        async def run(model: Any, images: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
            threaded.append((model.spec.version, images.shape[0]))
            return model.predict(images)  # type: ignore[no-any-return]

        batcher = Batcher(run, max_batch_size=64, max_queue_delay=0, max_queued_images=64)
        small, large = FakeModel(version=1), FakeModel(version=2)
        small.inline = large.inline = True
        batcher.inline_limits[small] = 4
        batcher.inline_limits[large] = 0
        x = np.zeros((2, D), np.float32)
        for _ in range(3):
            await batcher.predict(small, x)  # type: ignore[arg-type]
            await batcher.predict(large, x)  # type: ignore[arg-type]
        assert threaded == [(2, 2)] * 3
        batcher.inline_limits[small] = 1  # lowered: 2 images no longer run inline
        await batcher.predict(small, x)  # type: ignore[arg-type]  # the batcher's last batch
        assert threaded == [(2, 2)] * 3 + [(1, 2)]
        gone = weakref.ref(small)
        del small
        gc.collect()
        assert gone() is None  # neither a lookup nor the last batch keeps a version alive
        await batcher.predict(large, x)  # type: ignore[arg-type]
        assert threaded[-1] == (2, 2) and len(threaded) == 5
        await batcher.close()

    asyncio.run(scenario())
