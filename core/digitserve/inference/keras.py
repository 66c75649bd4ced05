"""``KerasModel``: a saved ``model.keras`` served through the fastest path that agrees with
``model.predict``; the trainer evaluates what it publishes through it, so its figures are the
server's. TensorFlow and Keras are imported only when one is made or loaded."""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from digitserve.inference.agreement import INFERENCE_CHOICES, PROBE_IMAGES, Agreement, InferencePathError
from digitserve.inference.checkset import read_check_set
from digitserve.inference.litert import LiteRTRunner, litert_difference
from digitserve.inference.spec import ModelSpec, check_outputs
from digitserve.metadata import Metadata
from digitserve.repository import MODEL_FILE, CorruptVersionError

logger = logging.getLogger(__name__)


class KerasModel:
    """A saved Keras model served through ``litert`` (converted, XNNPACK on one thread) when it agrees
    with ``model.predict`` on the probe images within ``Agreement.tolerance``, else ``tensorflow`` (a
    concrete ``tf.function``); ``bench/inference_paths.py`` measures them."""

    def __init__(self, keras_model: Any, metadata: Metadata, *, inference: str = "auto",
                 probe: npt.NDArray[np.float32] | None = None) -> None:
        import tensorflow as tf

        if inference not in INFERENCE_CHOICES:
            raise ValueError(f"inference {inference!r} is not one of {', '.join(INFERENCE_CHOICES)}")
        self.spec = ModelSpec.from_metadata(metadata)
        self.metadata = metadata.to_json()
        self._keras_model = keras_model
        signature = [tf.TensorSpec(shape=(None, self.spec.input_size), dtype=tf.float32)]
        self._tf = tf
        self._fn = tf.function(lambda x: keras_model(x, training=False),
                               input_signature=signature).get_concrete_function()
        self._run: Any = self.tensorflow_predict
        self.litert: LiteRTRunner | None = None  # when LiteRT serves (the trainer publishes it)
        self.inline = False  # cheap enough for the event loop (DataPlane.compute): LiteRT
        self.agreement = Agreement("tensorflow", 0, None, 0.0, "chosen by --inference tensorflow")
        if inference != "tensorflow":
            self.agreement = self._choose_path(probe, required=inference == "litert")

    @property
    def inference_path(self) -> str:
        return self.agreement.path

    @property
    def keras_model(self) -> Any:
        """The Keras model the served path was compared with (bench/inference_paths.py times it)."""
        return self._keras_model

    def _probe(self) -> npt.NDArray[np.float32]:
        """Images to compare the paths on when the caller has none: seeded uniform noise."""
        rng = np.random.default_rng(0)
        return rng.random((PROBE_IMAGES, self.spec.input_size), dtype=np.float32)

    def _choose_path(self, probe: npt.NDArray[np.float32] | None, required: bool) -> Agreement:
        x = self._probe() if probe is None else np.ascontiguousarray(probe[:PROBE_IMAGES], np.float32)
        reference = np.asarray(self.keras_model.predict(x, verbose=0), dtype=np.float32)
        single = np.concatenate([self.tensorflow_predict(x[i : i + 1]) for i in range(x.shape[0])])
        spread = float(np.abs(single - reference).max())
        try:
            runner = LiteRTRunner.convert(self.keras_model)
            diff = litert_difference(runner, x, reference)
        except Exception as exc:  # no LiteRT for this platform, or an op it cannot convert
            if required:
                raise InferencePathError(f"the LiteRT path cannot serve this model: {exc}") from exc
            return Agreement("tensorflow", x.shape[0], None, spread, f"LiteRT unavailable: {exc}")
        agreement = Agreement("litert", x.shape[0], diff, spread)
        if not diff <= agreement.tolerance:  # NaN included
            reason = "LiteRT differs by more than the tolerance"
            if required:
                raise InferencePathError(f"{agreement.describe()}: {reason}")
            return Agreement("tensorflow", x.shape[0], diff, spread, reason)
        self._run = self.litert = runner
        self.inline = True
        return agreement

    @classmethod
    def load(cls, version_dir: Path, *, inference: str = "auto", probe: npt.NDArray[np.float32] | None = None,
             metadata: Metadata | None = None) -> KerasModel:
        """Loads a version's ``model.keras`` from the bytes checked against ``metadata``'s SHA-256
        (``load_archive``), its paths compared on ``probe`` (default: its readable check set)."""
        started = time.perf_counter()
        if metadata is None:
            metadata = Metadata.read(version_dir)
        keras_model = load_archive(metadata.read_file(version_dir, MODEL_FILE),
                                   version_dir / MODEL_FILE)
        if probe is None:
            with contextlib.suppress(CorruptVersionError):
                check_set = read_check_set(version_dir, metadata)
                probe = None if check_set is None else check_set.images
        model = cls(keras_model, metadata, inference=inference, probe=probe)
        model.warm_up()
        logger.info("loaded model %s version %d from %s in %.2fs; %s", model.spec.name, model.spec.version,
                    version_dir, time.perf_counter() - started, model.agreement.describe())
        return model

    def warm_up(self) -> None:
        check_outputs(self)

    def tensorflow_predict(self, images: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        out = self._fn(self._tf.convert_to_tensor(images))
        return np.asarray(out, dtype=np.float32)

    def predict(self, images: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        result: npt.NDArray[np.float32] = self._run(images)
        return result


def load_archive(data: bytes, path: Path) -> Any:
    """The Keras model in ``data`` (the checked bytes of ``path``) with ``safe_mode``, loaded from a
    private temporary copy (Keras opens only paths): it reads the archive whose checksum held,
    whatever happens to ``path`` meanwhile. CorruptVersionError naming ``path`` when it cannot."""
    import keras

    with tempfile.TemporaryDirectory(prefix="digitserve-model-") as private:
        copy = Path(private) / MODEL_FILE
        copy.write_bytes(data)
        try:
            return keras.saving.load_model(copy, compile=False, safe_mode=True)
        except Exception as exc:  # Keras raises many types for a bad archive.
            reason = str(exc).replace(str(copy), str(path))
            raise CorruptVersionError(f"{path}: cannot load ({reason})") from exc
