"""The transport-neutral core: validates numpy inputs, picks the model, runs it and computes
metrics. Knows nothing of protobuf or gRPC."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from digitserve.metrics import ClassificationMetrics, MetricsAccumulator
from server.batcher import Batcher
from server.errors import InvalidInputError, ModelNotFoundError, ModelNotReadyError
from server.model import Model, runs_inline

logger = logging.getLogger(__name__)


def check_pixels(
    images: npt.NDArray[np.float32], encodings: Sequence[str] | str, field: str = "images"
) -> None:
    """Raises InvalidInputError naming the first pixel that is not finite or not in [0, 1].

    ``encodings[i]`` names image i's encoding, for the message (e.g. ``images[3].float32[17]``);
    one string names that of every image.
    """
    if images.size == 0:
        return
    if images.dtype == np.float32 and images.flags.c_contiguous:
        # One pass over the bits: +0.0 to 1.0 are exactly the patterns 0 to 0x3F800000; NaN, the
        # infinities, values above 1 and every negative (sign bit set) lie above.
        if int(images.view(np.uint32).max()) <= 0x3F800000:
            return
    elif images.min() >= 0.0 and images.max() <= 1.0:  # NaN fails both
        return
    bad = ~np.isfinite(images) | (images < 0.0) | (images > 1.0)
    if not bad.any():  # -0.0, in range though its sign bit is set
        return
    i, j = (int(k) for k in np.argwhere(bad)[0])
    encoding = encodings if isinstance(encodings, str) else encodings[i]
    if not np.isfinite(images[i, j]):
        raise InvalidInputError(
            f"{field}[{i}].{encoding}[{j}]",
            f"{images[i, j]} is not a finite number; expected a pixel intensity in [0, 1]",
        )
    raise InvalidInputError(
        f"{field}[{i}].{encoding}[{j}]",
        f"{float(images[i, j])!r} is out of range; expected a pixel intensity in [0, 1] "
        "(byte / 255)",
    )


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
    """What the data plane reports to telemetry (server/telemetry.py): each model call the batcher
    makes, the probabilities Predict calls get back (per batch: the rows of the calls answered),
    and each model it starts serving."""

    def on_batch(self, size: int, queue_seconds: float) -> None: ...

    def on_predictions(self, model: Model, probabilities: npt.NDArray[np.float32]) -> None: ...

    def on_model(self, model: Model) -> None: ...


class DataPlane:
    """Holds the served model and runs it off the event loop, one model call at a time: Predict
    calls through the dynamic batcher, Evaluate batches as they come."""

    def __init__(
        self,
        max_images_per_request: int,
        *,
        max_batch_size: int = 256,
        max_queue_delay: float = 0.0,
        max_queued_images: int = 8192,
        keep_versions: int = 2,
        observer: PlaneObserver | None = None,
    ) -> None:
        self.max_images_per_request = max_images_per_request
        self.keep_versions = keep_versions
        self._model: Model | None = None
        self._loaded: dict[int, Model] = {}
        self.refused: dict[int, str] = {}
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
    def loaded_versions(self) -> list[int]:
        """Versions that answer pinned requests, newest first."""
        return sorted(self._loaded, reverse=True)

    def set_model(self, model: Model) -> None:
        """Serves ``model`` from now on (one assignment: calls already holding the previous model
        finish on it); the newest ``keep_versions`` stay loaded for pinned requests."""
        self._loaded[model.spec.version] = model
        for version in self.loaded_versions[self.keep_versions :]:
            if version != model.spec.version:
                del self._loaded[version]
        self._model = model
        if self._observer is not None:
            self._observer.on_model(model)

    def unload(self, version: int) -> None:
        """Forgets a loaded version that is not the served one (its files are gone): pinned
        requests for it are answered NOT_FOUND from now on."""
        if self._model is not None and self._model.spec.version == version:
            raise ValueError(f"version {version} is the served one; serve another first")
        self._loaded.pop(version, None)

    def resolve(self, version: int) -> Model:
        """The model that answers a request pinning ``version`` (0 = the served one)."""
        model = self._model
        if model is None:
            raise ModelNotReadyError("no model is loaded yet; retry when health reports SERVING")
        if version == 0:
            return model
        pinned = self._loaded.get(version)
        if pinned is None:
            loaded = ", ".join(str(v) for v in self.loaded_versions)
            reason = f"; it was refused: {self.refused[version]}" if version in self.refused else ""
            raise ModelNotFoundError(
                f"model {model.spec.name!r} version {version} is not served "
                f"(serving version {model.spec.version}; loaded: {loaded}){reason}"
            )
        return pinned

    def check_count(self, count: int, field: str = "images") -> None:
        if count == 0:
            raise InvalidInputError(field, "empty; expected at least 1 image")
        if count > self.max_images_per_request:
            raise InvalidInputError(
                field,
                f"{count} images exceed the limit of {self.max_images_per_request} per request",
            )

    async def compute(self, model: Model, images: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """One model call. A model that says it runs inline (LiteRT: tens of microseconds for a
        batch of Dense-128) runs on the event loop, which spares the hand-off to a thread and back
        (more CPU than the call itself); any other runs on the model thread, so the loop keeps
        serving meanwhile."""
        if runs_inline(model):
            return model.predict(images)
        return await asyncio.get_running_loop().run_in_executor(self._executor, model.predict, images)

    async def predict(
        self, model: Model, images: npt.NDArray[np.float32], deadline: float | None = None
    ) -> npt.NDArray[np.float32]:
        """Probabilities of already validated images, computed in a dynamic batch."""
        return await self.batcher.predict(model, images, deadline)

    async def close(self) -> None:
        await self.batcher.close()
        self._executor.shutdown(wait=False, cancel_futures=True)


class Evaluation:
    """One Evaluate call: batches accumulate into metrics against one model version."""

    def __init__(self, plane: DataPlane) -> None:
        self._plane = plane
        self._model: Model | None = None
        self._accumulator: MetricsAccumulator | None = None

    def model_for(self, version: int) -> Model:
        """The model of this evaluation; every batch must agree with the first on the version."""
        if self._model is None:
            self._model = self._plane.resolve(version)
            self._accumulator = MetricsAccumulator(list(self._model.spec.labels))
        elif version not in (0, self._model.spec.version):
            raise InvalidInputError(
                "model_version",
                f"{version} differs from version {self._model.spec.version} "
                "pinned or served at the start of this stream",
            )
        return self._model

    async def add(self, model: Model, images: npt.NDArray[np.float32], labels: Any) -> None:
        # Each message is one model call, never merged with other calls: the figures then equal
        # the trainer's, which predicts the test set in the same batches.
        probabilities = await self._plane.compute(model, images)
        assert self._accumulator is not None
        self._accumulator.update(labels, probabilities)

    def result(self) -> tuple[Model, ClassificationMetrics]:
        if self._model is None or self._accumulator is None or self._accumulator.count == 0:
            raise InvalidInputError("images", "the stream held no images; expected at least 1")
        return self._model, self._accumulator.result()
