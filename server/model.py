"""The model contract the server relies on, and its Keras implementation."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from digitserve.repository import MODEL_FILE, CorruptVersionError, read_metadata, verify_files

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """What a served model declares about its inputs and outputs (from its metadata)."""

    name: str
    version: int
    input_shape: tuple[int, ...]
    input_scale: float
    labels: tuple[str, ...]

    @property
    def input_size(self) -> int:
        return int(np.prod(self.input_shape))

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> ModelSpec:
        try:
            inp = metadata["input"]
            spec = cls(
                name=str(metadata["name"]),
                version=int(metadata["version"]),
                input_shape=tuple(int(d) for d in inp["shape"]),
                input_scale=float(inp["scale"]),
                labels=tuple(str(label) for label in metadata["labels"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptVersionError(f"metadata lacks a valid field: {exc!r}") from exc
        if spec.input_size <= 0 or len(spec.labels) < 2:
            raise CorruptVersionError(
                f"metadata declares input shape {spec.input_shape} and {len(spec.labels)} labels"
            )
        return spec


class Model(Protocol):
    """A loaded, ready model. ``predict`` takes float32 images of shape (N, input_size), scaled to
    [0, 1], and returns float32 probabilities of shape (N, len(labels))."""

    spec: ModelSpec
    metadata: dict[str, Any]

    def predict(self, images: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]: ...


class KerasModel:
    """A saved Keras model (``model.keras``) called through the concrete function of a
    ``tf.function`` with a fixed signature: of the paths ``bench/inference_paths.py`` measures
    (``model.predict``, calling the model, ``tf.function``, its concrete function, XLA padded to
    fixed batch sizes) the fastest whose probabilities equal ``model.predict``'s to 1e-6."""

    def __init__(self, keras_model: Any, metadata: dict[str, Any]) -> None:
        import tensorflow as tf

        self.spec = ModelSpec.from_metadata(metadata)
        self.metadata = metadata
        self._keras_model = keras_model
        signature = [tf.TensorSpec(shape=(None, self.spec.input_size), dtype=tf.float32)]
        self._tf = tf
        self._fn = tf.function(
            lambda x: keras_model(x, training=False), input_signature=signature
        ).get_concrete_function()

    @classmethod
    def load(cls, version_dir: Path) -> KerasModel:
        """Loads a published version after checking its files against the metadata checksums."""
        import keras

        started = time.perf_counter()
        metadata = read_metadata(version_dir)
        verify_files(version_dir, metadata, only=[MODEL_FILE])
        try:
            keras_model = keras.saving.load_model(
                version_dir / MODEL_FILE, compile=False, safe_mode=True
            )
        except Exception as exc:  # Keras raises many types for a bad archive.
            raise CorruptVersionError(f"{version_dir / MODEL_FILE}: cannot load ({exc})") from exc
        model = cls(keras_model, metadata)
        model.warm_up()
        logger.info(
            "loaded model %s version %d from %s in %.2fs",
            model.spec.name, model.spec.version, version_dir, time.perf_counter() - started,
        )
        return model

    def warm_up(self) -> None:
        """Traces the function and checks the output shape and that probabilities sum to 1."""
        probe = np.zeros((2, self.spec.input_size), dtype=np.float32)
        out = self.predict(probe)
        if out.shape != (2, len(self.spec.labels)):
            raise CorruptVersionError(
                f"model outputs shape {out.shape[1:]}, metadata declares {len(self.spec.labels)} labels"
            )
        if not np.allclose(out.sum(axis=1), 1.0, atol=1e-3):
            raise CorruptVersionError("model outputs do not sum to 1: not a softmax classifier")

    def predict(self, images: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        out = self._fn(self._tf.convert_to_tensor(images))
        return np.asarray(out, dtype=np.float32)
