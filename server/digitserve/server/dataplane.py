"""The transport-neutral core: validates numpy inputs, picks the model, runs it and computes
metrics. Knows nothing of protobuf or gRPC."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from digitserve.inference import Model, runs_inline
from digitserve.metrics import ClassificationMetrics, MetricsAccumulator
from digitserve.server.batcher import Batcher
from digitserve.server.errors import InvalidInputError, ModelNotReadyError, NotServedError

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


CANARY = "canary"
STABLE = "stable"


class DataPlane:
    """Holds one model's loaded versions and runs them one model call at a time: Predict calls
    through the dynamic batcher, Evaluate messages through the same queue, each alone. Only small
    calls on a model that runs inline are computed on the event loop (see inline_limit); the rest
    on the model thread.

    Which version answers: a pinned version, or a label's (``set_labels``: label -> loaded
    version); else the default version (the ``stable`` label's when set, else the served one:
    newest past the gate, or pinned), except that a ``canary_weight`` fraction of those unpinned
    calls go to the ``canary`` label's version, drawn at random per call."""

    def __init__(
        self,
        max_images_per_request: int,
        *,
        name: str = "",
        max_batch_size: int = 256,
        max_queue_delay: float = 0.0,
        max_queued_images: int = 8192,
        inline_max_images: int = 64,
        keep_versions: int = 2,
        observer: PlaneObserver | None = None,
    ) -> None:
        self.max_images_per_request = max_images_per_request
        self.name = name  # the model's, for messages before a version is loaded
        self.keep_versions = keep_versions
        self.inline_max_images = inline_max_images
        self._model: Model | None = None
        self._loaded: dict[int, Model] = {}
        self._refused: dict[int, str] = {}  # version -> why the gate refused it
        self._labels: dict[str, int] = {}  # version labels in force (their versions are loaded)
        self._canary_weight = 0.0
        self._random = random.Random()
        self.in_use = 0  # calls holding one of this plane's versions (Predict, Evaluate streams)
        self._observer = observer
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.batcher = Batcher(
            self.compute,
            max_batch_size=max_batch_size,
            max_queue_delay=max_queue_delay,
            max_queued_images=max_queued_images,
            on_batch=None if observer is None else observer.on_batch,
            on_answers=None if observer is None else observer.on_predictions,
        )

    @property
    def model(self) -> Model | None:
        return self._model

    @property
    def refused(self) -> Mapping[int, str]:
        """Versions refused by the gate and why (a read-only view: refuse() and forgive() change
        it)."""
        return MappingProxyType(self._refused)

    def refuse(self, version: int, reason: str) -> None:
        """Records that ``version`` was refused and why: a request pinning it is told the reason,
        GetModelInfo lists it."""
        self._refused[version] = reason

    def forgive(self, version: int) -> None:
        """Forgets a refusal (the version now serves, or its files are gone)."""
        self._refused.pop(version, None)

    @property
    def loaded_versions(self) -> list[int]:
        """Versions that answer pinned requests, newest first."""
        return sorted(self._loaded, reverse=True)

    @property
    def labels(self) -> Mapping[str, int]:
        """Version labels in force: label -> version (read-only: set_labels changes them)."""
        return MappingProxyType(self._labels)

    @property
    def canary_weight(self) -> float:
        return self._canary_weight if CANARY in self._labels else 0.0

    @property
    def default_version(self) -> int:
        """The version unpinned calls get (canary aside); 0 while nothing serves."""
        if STABLE in self._labels:
            return self._labels[STABLE]
        return 0 if self._model is None else self._model.spec.version

    def add_version(self, model: Model) -> None:
        """Loads ``model`` for pinned and labelled requests without serving it to unpinned ones
        (a version a label is about to name)."""
        self.batcher.set_inline_limit(model, self.inline_limit(model))
        self._loaded[model.spec.version] = model
        if self._observer is not None:
            self._observer.on_model(model)

    def set_labels(self, labels: Mapping[str, int], canary_weight: float) -> None:
        """Puts version labels in force, all at once (every version named must be loaded:
        add_version); ``canary_weight``: the fraction of unpinned calls the ``canary`` label's
        version answers. Versions neither labelled nor among the newest ``keep_versions`` are
        unloaded."""
        missing = sorted(v for v in labels.values() if v not in self._loaded)
        if missing:
            raise ValueError(f"versions {missing} are not loaded; add_version them first")
        self._labels = dict(labels)
        self._canary_weight = canary_weight
        self._evict()

    def _evict(self) -> None:
        keep = set(self.loaded_versions[: self.keep_versions]) | set(self._labels.values())
        if self._model is not None:
            keep.add(self._model.spec.version)
        for version in [v for v in self._loaded if v not in keep]:
            del self._loaded[version]

    def set_model(self, model: Model) -> None:
        """Serves ``model`` from now on (one assignment: calls already holding the previous model
        finish on it); the newest ``keep_versions`` and the labelled versions stay loaded for
        pinned and labelled requests."""
        self.batcher.set_inline_limit(model, self.inline_limit(model))
        self._loaded[model.spec.version] = model
        self._model = model
        self._evict()
        if self._observer is not None:
            self._observer.on_model(model)

    def unload(self, version: int) -> None:
        """Forgets a loaded version that is not the served one (its files are gone): pinned
        requests for it are answered NOT_FOUND from now on."""
        if self._model is not None and self._model.spec.version == version:
            raise ValueError(f"version {version} is the served one; serve another first")
        if version in self._labels.values():
            self._labels = {k: v for k, v in self._labels.items() if v != version}
        self._loaded.pop(version, None)

    def resolve(self, version: int, label: str = "", *, split: bool = False) -> Model:
        """The model that answers a request pinning ``version`` or naming ``label`` (neither: the
        default version; with ``split``, as for a Predict call, the canary for a
        ``canary_weight`` fraction of calls)."""
        model = self._model
        if model is None:
            raise ModelNotReadyError("no model is loaded yet; retry when health reports SERVING")
        if label:
            if version:
                raise InvalidInputError(
                    "version_label", f"{label!r} and model_version {version} both name a version; "
                    "set one of them")
            labelled = self._labels.get(label)
            if labelled is None:
                known = ", ".join(f"{k} -> {v}" for k, v in sorted(self._labels.items())) or "none"
                raise NotServedError(
                    f"model {model.spec.name!r} has no version label {label!r} (labels: {known})")
            return self._loaded[labelled]
        if version == 0:
            if self._labels:
                canary = self._labels.get(CANARY)
                if split and canary is not None and self._canary_weight > 0 \
                        and self._random.random() < self._canary_weight:
                    return self._loaded[canary]
                stable = self._labels.get(STABLE)
                if stable is not None:
                    return self._loaded[stable]
            return model
        pinned = self._loaded.get(version)
        if pinned is None:
            loaded = ", ".join(str(v) for v in self.loaded_versions)
            reason = f"; it was refused: {self._refused[version]}" if version in self._refused else ""
            raise NotServedError(
                f"model {model.spec.name!r} version {version} is not served "
                f"(serving version {model.spec.version}; loaded: {loaded}){reason}"
            )
        return pinned

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


class Evaluation:
    """One Evaluate call: batches accumulate into metrics against one model version."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = self._plane = plane
        self._model: Model | None = None
        self._accumulator: MetricsAccumulator | None = None
        self._holding = False

    def release(self) -> None:
        """The stream is over: the plane's version is no longer held by it."""
        if self._holding:
            self._holding = False
            self._plane.in_use -= 1

    def model_for(self, version: int, label: str = "") -> Model:
        """The model of this evaluation; every batch must agree with the first on the version."""
        if self._model is None:
            self._model = self._plane.resolve(version, label)
            self._accumulator = MetricsAccumulator(list(self._model.spec.labels))
            self._plane.in_use += 1
            self._holding = True
        elif label and self._plane.labels.get(label) != self._model.spec.version:
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
        probabilities = await self._plane.batcher.predict(model, images, deadline, alone=True)
        assert self._accumulator is not None
        self._accumulator.update(labels, probabilities)

    def result(self) -> tuple[Model, ClassificationMetrics]:
        if self._model is None or self._accumulator is None or self._accumulator.count == 0:
            raise InvalidInputError("images", "the stream held no images; expected at least 1")
        return self._model, self._accumulator.result()
