"""The transport-neutral core: validates numpy inputs, runs the model version the registry picked
and computes metrics. Knows nothing of protobuf or gRPC."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from digitserve.inference import Model, runs_inline
from digitserve.metrics import ClassificationMetrics, MetricsAccumulator
from digitserve.server.batcher import Batcher
from digitserve.server.errors import InvalidInputError
from digitserve.server.statistics import PlaneStatistics

logger = logging.getLogger(__name__)


def check_labels(labels: npt.NDArray[np.int64], count: int, num_classes: int) -> None:
    """Raises InvalidInputError when the labels do not match the images or name no class."""
    if labels.shape[0] != count:
        raise InvalidInputError(
            "labels", f"got {labels.shape[0]} labels for {count} images; expected one per image"
        )
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        i = int(np.argmax(bad))
        raise InvalidInputError(
            f"labels[{i}]",
            f"{int(labels[i])} is not a class; expected a class index in 0..{num_classes - 1}",
        )


class PlaneObserver(Protocol):
    """What the data plane reports to telemetry (digitserve.server.telemetry): each model call the batcher
    makes, the probabilities Predict calls get back (per batch: the rows of the calls answered),
    each model it starts serving, and each call answered (by the version that answered it, with
    its seconds in the data plane: queue and model)."""

    def on_batch(self, size: int, queue_seconds: float) -> None: ...

    def on_predictions(self, model: Model, probabilities: npt.NDArray[np.float32]) -> None: ...

    def on_model(self, model: Model) -> None: ...

    def on_answered(self, model: Model, seconds: float) -> None: ...


INLINE_BUDGET_S = 0.001
"""The longest a model call may hold the event loop. A model's inline limit (below) is lowered
until its measured call fits in it."""


class DataPlane:
    """Runs one model's versions, as the registry hands them over, one model call at a time:
    Predict calls through the dynamic batcher, Evaluate messages through the same queue, each
    alone. Only small calls on a model that runs inline are computed on the event loop (see
    inline_limit); the rest on the model thread. Which version answers is the registry's choice."""

    def __init__(
        self,
        max_images_per_request: int,
        *,
        max_batch_size: int = 256,
        max_queue_delay: float = 0.0,
        max_queued_images: int = 8192,
        inline_max_images: int = 64,
        observer: PlaneObserver | None = None,
    ) -> None:
        self.max_images_per_request = max_images_per_request
        self.inline_max_images = inline_max_images
        self.in_use = 0  # calls holding one of this plane's versions (Predict, Evaluate streams)
        self._observer = observer
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.statistics = PlaneStatistics()  # per version: server.statistics
        self.batcher = Batcher(
            self.compute,
            max_batch_size=max_batch_size,
            max_queue_delay=max_queue_delay,
            max_queued_images=max_queued_images,
            on_batch=None if observer is None else observer.on_batch,
            on_answers=None if observer is None else observer.on_predictions,
            statistics=self.statistics,
        )

    def prepare(self, model: Model) -> None:
        """Readies a version the registry loaded: its inline limit, its metrics series and
        statistics."""
        self.batcher.inline_limits[model] = self.inline_limit(model)
        self.statistics.of(model)
        if self._observer is not None:
            self._observer.on_model(model)

    def inline_limit(self, model: Model) -> int:
        """The most images of one call of ``model`` computed on the event loop: 0 for a model
        that does not run inline or whose 1-image call takes longer than INLINE_BUDGET_S; else
        ``inline_max_images``, lowered to what fits in INLINE_BUDGET_S by the costs of a 1-image
        and an ``inline_max_images`` call (best of 3 each, timed here at load).

        Measured with LiteRT on one core of the 2-core development machine (the per-batch costs
        the server logs here at load): the seed preset (Dense-128) takes 10 us for 1 image, 119 us
        for 64 and 3.4 ms for 1,024, while handing a call to the model thread and back costs ~94
        us; so up to 64 images the hand-off would cost as much as the call, and beyond it the
        saving is marginal while the loop is held longer. The default preset takes ~72 us an
        image (64 images: 4.6 ms, so its limit is about 13), the cnn preset ~0.9 ms for one
        image (limit 0: always on the model thread)."""
        cap = self.inline_max_images
        if not runs_inline(model) or cap == 0:
            return 0

        def cost(n: int) -> float:
            probe = np.zeros((n, model.spec.input_size), dtype=np.float32)
            best = float("inf")
            for _ in range(3):
                started = time.perf_counter()
                model.predict(probe)
                best = min(best, time.perf_counter() - started)
            return best

        one, full = cost(1), cost(cap)
        if one > INLINE_BUDGET_S:
            limit = 0
        elif full <= INLINE_BUDGET_S or cap == 1:
            limit = cap
        else:
            per_image = max(full - one, 0.0) / (cap - 1)
            limit = min(cap, 1 + int((INLINE_BUDGET_S - one) / per_image))
        logger.info("model %s version %d: calls of up to %d images run on the event loop (1 image "
                    "took %.0f us, %d images %.0f us; budget %.0f us)", model.spec.name,
                    model.spec.version, limit, one * 1e6, cap, full * 1e6, INLINE_BUDGET_S * 1e6)
        return limit

    def admit(self, model: Model, count: int) -> None:
        """Raises OverloadedError when a call of ``count`` images would wait for the model and the
        queue has no room: the edges call it before converting pixels, so refusing costs little."""
        self.batcher.admit(model, count)

    async def compute(self, model: Model, images: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """One model call on the model thread, so the loop keeps serving meanwhile (the batcher
        computes small calls of an inline model on the loop itself)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, model.predict, images)

    async def predict(
        self, model: Model, images: npt.NDArray[np.float32], deadline: float | None = None
    ) -> npt.NDArray[np.float32]:
        """Probabilities of already validated images, computed in a dynamic batch."""
        started = time.perf_counter()
        self.in_use += 1
        try:
            probabilities = await self.batcher.predict(model, images, deadline)
        finally:
            self.in_use -= 1
        if self._observer is not None:
            self._observer.on_answered(model, time.perf_counter() - started)
        return probabilities

    async def close(self) -> None:
        await self.batcher.close()
        self._executor.shutdown(wait=False, cancel_futures=True)


class Versions(Protocol):
    """What an Evaluate stream asks of the registry about its model (registry.ModelVersions)."""

    plane: DataPlane

    @property
    def labels(self) -> Mapping[str, int]: ...

    def resolve(self, version: int = 0, label: str = "", *, split: bool = False) -> Model: ...


class Evaluation:
    """One Evaluate call: batches accumulate into metrics against one model version."""

    def __init__(self, versions: Versions) -> None:
        self._versions = versions
        self.plane = versions.plane
        self._model: Model | None = None
        self._accumulator: MetricsAccumulator | None = None
        self._holding = False

    def release(self) -> None:
        """The stream is over: the plane's version is no longer held by it."""
        if self._holding:
            self._holding = False
            self.plane.in_use -= 1

    def model_for(self, version: int, label: str = "") -> Model:
        """The model of this evaluation; every batch must agree with the first on the version."""
        if self._model is None:
            self._model = self._versions.resolve(version, label)
            self._accumulator = MetricsAccumulator(list(self._model.spec.labels))
            self.plane.in_use += 1
            self._holding = True
        elif label and self._versions.labels.get(label) != self._model.spec.version:
            raise InvalidInputError(
                "version_label",
                f"{label!r} does not name version {self._model.spec.version}, "
                "pinned or served at the start of this stream",
            )
        elif version not in (0, self._model.spec.version):
            raise InvalidInputError(
                "model_version",
                f"{version} differs from version {self._model.spec.version} "
                "pinned or served at the start of this stream",
            )
        return self._model

    async def add(self, model: Model, images: npt.NDArray[np.float32], labels: Any,
                  deadline: float | None = None) -> None:
        # Each message is one model call, never merged with other calls: the figures then equal
        # the trainer's, which predicts the test set in the same batches. It waits in the
        # batcher's queue like a Predict call, so it counts against the same bound.
        probabilities = await self.plane.batcher.predict(model, images, deadline, alone=True)
        assert self._accumulator is not None
        self._accumulator.update(labels, probabilities)

    def result(self) -> tuple[Model, ClassificationMetrics]:
        if self._model is None or self._accumulator is None or self._accumulator.count == 0:
            raise InvalidInputError("images", "the stream held no images; expected at least 1")
        return self._model, self._accumulator.result()
