"""Dynamic batching: concurrent Predict calls coalesce into one model call.

One task takes whatever is queued when the model is free (up to ``max_batch_size`` images, optionally
waiting ``max_queue_delay`` for more), runs the model once off the event loop, and hands each caller its
own rows. With one call in flight nothing waits: the call runs at once, alone.

A model cheap enough to run on the event loop (LiteRT; see DataPlane.inline_limit) is called at once
by each call's own task when the model is idle and the call is small (at most its inline limit in
images): a hand-off to the model thread would cost more than the call. Anything larger goes through
the queue to the model thread, so the event loop (health, reflection, new calls) is never held by
more than one small model call, and the queue bound applies to every model. Under load, calls that
arrive while the model is busy form the next batch. Evaluate messages travel the same queue, each
computed alone (``alone=True``), so they count against the same bound. The queue is bounded in
images; a call that does not fit is refused at once (``admit`` lets an edge refuse it before it
converts the pixels), and a call whose deadline has passed is dropped before it is computed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from digitserve.inference import Model, runs_inline
from digitserve.server.errors import DeadlineExpiredError, OverloadedError
from digitserve.server.statistics import PlaneStatistics

logger = logging.getLogger(__name__)

Runner = Callable[[Model, npt.NDArray[np.float32]], Awaitable[npt.NDArray[np.float32]]]
Answers = Callable[[Model, npt.NDArray[np.float32]], None]


@dataclass
class BatchStats:
    """Counters a metrics exporter or a test can read."""

    batches: int = 0
    images: int = 0
    expired: int = 0
    rejected: int = 0
    batch_sizes: collections.Counter[int] = field(default_factory=collections.Counter)


@dataclass
class _Pending:
    model: Model
    images: npt.NDArray[np.float32]
    future: asyncio.Future[npt.NDArray[np.float32]]
    deadline: float | None  # time.monotonic() seconds
    enqueued: float
    alone: bool = False  # an Evaluate message: one model call of its own, not counted as a batch


class Batcher:
    """Coalesces ``predict`` calls on the same model into batched model calls."""

    def __init__(
        self,
        run: Runner,
        *,
        max_batch_size: int,
        max_queue_delay: float,
        max_queued_images: int,
        on_batch: Callable[[int, float], None] | None = None,
        on_answers: Answers | None = None,
        statistics: PlaneStatistics | None = None,
    ) -> None:
        self._run = run
        self.statistics = statistics if statistics is not None else PlaneStatistics()
        self.max_batch_size = max_batch_size
        self.max_queue_delay = max_queue_delay
        self.max_queued_images = max_queued_images
        self._on_batch = on_batch
        self._on_answers = on_answers
        self._queue: collections.deque[_Pending] = collections.deque()
        self._queued_images = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._busy = False  # a model call is running off the loop
        # Per model (while it lives), the most images of a call computed on the event loop
        # (absent: 0, never): DataPlane.prepare sets it.
        self.inline_limits: weakref.WeakKeyDictionary[Model, int] = weakref.WeakKeyDictionary()
        self.stats = BatchStats()

    @property
    def queued_images(self) -> int:
        """Images waiting for the model (not those of the model call running)."""
        return self._queued_images

    def _inline(self, model: Model, n: int) -> bool:
        limit = self.inline_limits.get(model, 0) if runs_inline(model) else 0
        return n <= limit

    def _now(self, model: Model, n: int) -> bool:
        """A call computed at once in its caller's task: small, on an inline model, the model idle
        and nothing queued (a future and a wake-up of the batcher task would cost more)."""
        return not self._queue and not self._busy and self.max_queue_delay == 0 and self._inline(model, n)

    def admit(self, model: Model, n: int) -> None:
        """Raises OverloadedError when a call of ``n`` images on ``model`` would have to queue and
        does not fit; an edge calls it before converting the call's pixels (predict checks again)."""
        if self._now(model, n):
            return
        if self._queued_images + n > self.max_queued_images:
            self.stats.rejected += 1
            raise OverloadedError(
                f"server overloaded: {self._queued_images} images queued, limit "
                f"{self.max_queued_images}; retry with backoff"
            )

    def _ensure_started(self) -> asyncio.Event:
        if self._wakeup is None or self._task is None or self._task.done():
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")
        return self._wakeup

    async def predict(
        self, model: Model, images: npt.NDArray[np.float32], deadline: float | None = None,
        *, alone: bool = False,
    ) -> npt.NDArray[np.float32]:
        """Probabilities for ``images`` (already validated), computed in some batch (``alone``:
        in a model call of their own, as Evaluate needs)."""
        n = images.shape[0]
        if self._now(model, n):
            started = time.perf_counter_ns()
            probs = model.predict(images)
            if not alone:
                self.statistics.of(model).executed(n, 1, 0, time.perf_counter_ns() - started)
                self._account(model, n, 0.0, probs)
            return probs
        wakeup = self._ensure_started()
        self.admit(model, n)
        future: asyncio.Future[npt.NDArray[np.float32]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(model, images, future, deadline, time.monotonic(), alone))
        self._queued_images += n
        wakeup.set()
        return await future

    def _account(self, model: Model, size: int, queue_seconds: float,
                 answered: npt.NDArray[np.float32] | None) -> None:
        """Counts one model call of ``size`` images and reports it and the rows its callers got."""
        self.stats.batches += 1
        self.stats.images += size
        self.stats.batch_sizes[size] += 1
        if self._on_batch is not None:
            self._on_batch(size, queue_seconds)
        if self._on_answers is not None and answered is not None:
            self._on_answers(model, answered)

    def _take_batch(self) -> list[_Pending]:
        """Pops the next batch: consecutive calls on the same model, up to max_batch_size images
        (a single call larger than that runs alone). Expired or cancelled calls are dropped."""
        batch: list[_Pending] = []
        total = 0
        now = time.monotonic()
        while self._queue:
            head = self._queue[0]
            n = head.images.shape[0]
            gone = head.future.done()  # the caller went away
            expired = not gone and head.deadline is not None and head.deadline <= now
            if batch and not gone and not expired and (
                    head.alone or batch[0].alone or head.model is not batch[0].model
                    or total + n > self.max_batch_size):
                break
            self._queue.popleft()
            self._queued_images -= n
            if expired:
                self.stats.expired += 1
                head.future.set_exception(DeadlineExpiredError(
                    "deadline passed while queued; the call was not computed"))
            elif not gone:
                batch.append(head)
                total += n
        return batch

    async def _loop(self) -> None:
        assert self._wakeup is not None
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.max_queue_delay > 0 and self._queued_images < self.max_batch_size:
                await asyncio.sleep(self.max_queue_delay)
            batch = self._take_batch()
            if batch:
                await self._compute(batch)
            del batch  # not kept while waiting: it holds its model version

    async def _compute(self, batch: list[_Pending]) -> None:
        model = batch[0].model
        images = batch[0].images if len(batch) == 1 else np.concatenate([p.images for p in batch])
        started = time.monotonic()
        began = time.perf_counter_ns()
        try:
            if self._inline(model, images.shape[0]):
                probs = model.predict(images)  # small enough for the loop (see the docstring)
            else:
                self._busy = True
                try:
                    probs = await self._run(model, images)
                finally:
                    self._busy = False
        except Exception as exc:  # every caller of the batch gets the model's error
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return
        took = time.perf_counter_ns() - began
        offset = 0
        queued = 0.0  # seconds the calls answered waited for the model
        answered: list[npt.NDArray[np.float32]] = []
        for pending in batch:
            n = pending.images.shape[0]
            if not pending.future.done():
                rows = probs[offset : offset + n]
                pending.future.set_result(rows)
                answered.append(rows)
                queued += started - pending.enqueued
            offset += n
        if batch[0].alone:
            return
        self.statistics.of(model).executed(images.shape[0], len(answered), int(queued * 1e9), took)
        # Once per batch, not per call: the rows of the callers that were still waiting.
        self._account(
            model, images.shape[0], started - min(p.enqueued for p in batch),
            None if not answered else probs if len(answered) == len(batch) else np.concatenate(answered),
        )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(OverloadedError("server stopped before computing"))
        self._queued_images = 0
