"""The model contract the server relies on, and its Keras implementation."""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

from digitserve.idx import scale_pixels
from digitserve.metadata import Metadata
from digitserve.repository import (
    CHECK_SET_FILE,
    LITERT_FILE,
    MODEL_FILE,
    CorruptVersionError,
)
from digitserve.server.logs import native_stderr_logged

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """What a served model declares about its inputs and outputs (from its metadata)."""

    name: str
    version: int
    input_shape: tuple[int, ...]
    input_scale: float
    labels: tuple[str, ...]

    @functools.cached_property
    def input_size(self) -> int:
        return int(np.prod(self.input_shape))

    @classmethod
    def from_metadata(cls, metadata: Metadata) -> ModelSpec:
        """The spec a version's metadata declares; CorruptVersionError names the file and the
        field it lacks."""
        inp, labels = metadata.served_io()
        spec = cls(name=metadata.name, version=metadata.version, input_shape=inp.shape,
                   input_scale=inp.scale, labels=labels)
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

    @property
    def inline(self) -> bool:
        """Cheap enough to call on the event loop (see DataPlane.inline_limit): the LiteRT path."""
        ...

    @property
    def inference_path(self) -> str:
        """What computes ``predict`` (``litert``, ``tensorflow``): GetModelInfo and the
        ``model_info`` metric report it."""
        ...

    def predict(self, images: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]: ...


INFERENCE_CHOICES = ("auto", "litert", "tensorflow")
AGREEMENT_FLOOR = 1e-6
"""The fast path must agree with ``model.predict`` to this, or to TensorFlow's own batch-1 spread."""


class InferencePathError(CorruptVersionError):
    """Raised when ``--inference litert`` is demanded and the LiteRT path cannot serve a version."""


@dataclass(frozen=True)
class Agreement:
    """How the chosen path's probabilities compare with ``model.predict``'s on the probe images."""

    path: str
    images: int
    litert_diff: float | None
    """Largest |p - model.predict| of the LiteRT path, in one batch and image by image."""
    tensorflow_spread: float
    """Largest |p - model.predict| of TensorFlow's own function called image by image: how much the
    reference moves with the batch size (a batch-1 matrix-vector kernel rounds differently)."""
    reason: str = ""

    @property
    def tolerance(self) -> float:
        return max(AGREEMENT_FLOOR, self.tensorflow_spread)

    def describe(self) -> str:
        lite = "n/a" if self.litert_diff is None else f"{self.litert_diff:.2e}"
        text = (f"inference path {self.path}: on {self.images} probe images max |p - model.predict| "
                f"LiteRT {lite}, TensorFlow batch-1 {self.tensorflow_spread:.2e} (tolerance "
                f"{self.tolerance:.2e})")
        return f"{text}; {self.reason}" if self.reason else text


class LiteRTRunner:
    """A LiteRT (TensorFlow Lite) interpreter of the model, XNNPACK on one thread: a call costs
    microseconds where a TensorFlow function call costs hundreds, and each image's probabilities do
    not depend on the batch it travels in. Not thread-safe: the data plane calls it from its one
    model thread."""

    def __init__(self, flatbuffer: bytes) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.flatbuffer = flatbuffer
        # LiteRT prints a notice to stderr when it first allocates (its XNNPACK delegate): a
        # record of our log instead of a bare line among the JSON ones.
        with native_stderr_logged(logging.getLogger("litert")):
            self._interpreter = Interpreter(model_content=flatbuffer, num_threads=1)
            self._interpreter.allocate_tensors()
        inp = self._interpreter.get_input_details()[0]
        self._input = int(inp["index"])
        self._row_shape = [int(d) for d in inp["shape_signature"][1:]]
        output = self._interpreter.get_output_details()[0]
        self._output = int(output["index"])
        self._classes = int(output["shape_signature"][-1])
        self._rows = -1

    def check_fits(self, spec: ModelSpec, path: Path) -> None:
        """CorruptVersionError unless the model takes ``spec``'s inputs and gives one probability
        per label."""
        size = int(np.prod(self._row_shape)) if all(d > 0 for d in self._row_shape) else None
        if size is not None and size != spec.input_size:
            raise CorruptVersionError(
                f"{path}: the model takes inputs of shape {self._row_shape} ({size} values) but "
                f"metadata.json declares input shape {list(spec.input_shape)} "
                f"({spec.input_size} values)"
            )
        if self._classes > 0 and self._classes != len(spec.labels):
            raise CorruptVersionError(
                f"{path}: the model outputs {self._classes} classes but metadata.json declares "
                f"{len(spec.labels)} labels"
            )

    @classmethod
    def convert(cls, keras_model: Any) -> LiteRTRunner:
        import tensorflow as tf

        # The converter exports the model to a temporary SavedModel and prints where to stdout,
        # which is the trainer's --json output: keep it out.
        with contextlib.redirect_stdout(io.StringIO()):
            flatbuffer = tf.lite.TFLiteConverter.from_keras_model(keras_model).convert()
        return cls(flatbuffer)

    def __call__(self, images: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        rows = images.shape[0]
        interpreter = self._interpreter
        if rows != self._rows:  # a resize costs a few microseconds
            interpreter.resize_tensor_input(self._input, [rows, *self._row_shape], strict=False)
            interpreter.allocate_tensors()
            self._rows = rows
        interpreter.set_tensor(self._input, images.reshape(rows, *self._row_shape))
        interpreter.invoke()
        out: npt.NDArray[np.float32] = interpreter.get_tensor(self._output)  # a copy
        return out


def litert_difference(runner: LiteRTRunner, x: npt.NDArray[np.float32],
                      reference: npt.NDArray[np.float32]) -> float:
    """Largest |p - reference| of the LiteRT path on ``x``, in one batch and image by image (NaN
    when any answer is NaN)."""
    batched = runner(x)
    one_by_one = np.concatenate([runner(x[i : i + 1]) for i in range(x.shape[0])])
    return float(max(np.abs(batched - reference).max(), np.abs(one_by_one - reference).max()))


def check_outputs(model: Model) -> None:
    """Runs a batch and a single image through ``model`` and checks the output shape and that the
    probabilities sum to 1."""
    for rows in (2, 1):
        probe = np.zeros((rows, model.spec.input_size), dtype=np.float32)
        out = model.predict(probe)
        if out.shape != (rows, len(model.spec.labels)):
            raise CorruptVersionError(
                f"model outputs shape {out.shape[1:]}, metadata declares "
                f"{len(model.spec.labels)} labels"
            )
        if not np.allclose(out.sum(axis=1), 1.0, atol=1e-3):
            raise CorruptVersionError("model outputs do not sum to 1: not a softmax classifier")


def runs_inline(model: Model) -> bool:
    """Whether ``model`` is cheap enough to call on the event loop (``Model.inline``: LiteRTModel,
    and KerasModel on its LiteRT path). Others run on the data plane's model thread."""
    return model.inline


class KerasModel:
    """A saved Keras model (``model.keras``), served through the fastest path that agrees with
    ``model.predict`` (``bench/inference_paths.py`` measures them all):

    - ``litert``: the model converted to LiteRT, run by XNNPACK on one thread;
    - ``tensorflow``: the concrete function of a ``tf.function`` with a fixed signature (the
      fastest TensorFlow path; it equals ``model.predict`` exactly for batches above one).

    ``auto`` (the default) serves LiteRT when, on the probe images (the version's check set), its
    probabilities differ from ``model.predict``'s by no more than 1e-6 or than TensorFlow's own
    function does when called image by image, whichever is larger; else TensorFlow."""

    def __init__(
        self,
        keras_model: Any,
        metadata: Metadata,
        *,
        inference: str = "auto",
        probe: npt.NDArray[np.float32] | None = None,
    ) -> None:
        import tensorflow as tf

        if inference not in INFERENCE_CHOICES:
            raise ValueError(f"inference {inference!r} is not one of {', '.join(INFERENCE_CHOICES)}")
        self.spec = ModelSpec.from_metadata(metadata)
        self.metadata = metadata.to_json()
        self._keras_model = keras_model
        signature = [tf.TensorSpec(shape=(None, self.spec.input_size), dtype=tf.float32)]
        self._tf = tf
        self._fn = tf.function(
            lambda x: keras_model(x, training=False), input_signature=signature
        ).get_concrete_function()
        self._run: Any = self.tensorflow_predict
        self.litert: LiteRTRunner | None = None
        """The LiteRT runner when it is the path served (the trainer publishes its flatbuffer)."""
        self.inline = False
        """Cheap enough to run on the event loop (see DataPlane.compute): the LiteRT path."""
        self.agreement = Agreement("tensorflow", 0, None, 0.0, "chosen by --inference tensorflow")
        if inference != "tensorflow":
            self.agreement = self._choose_path(probe, required=inference == "litert")

    @property
    def inference_path(self) -> str:
        return self.agreement.path

    @property
    def keras_model(self) -> Any:
        """The loaded Keras model the served path was compared with (``bench/inference_paths.py``
        times its other paths)."""
        return self._keras_model

    def _probe(self) -> npt.NDArray[np.float32]:
        """Images to compare the paths on when the caller has none: seeded uniform noise."""
        rng = np.random.default_rng(0)
        return rng.random((PROBE_IMAGES, self.spec.input_size), dtype=np.float32)

    def _choose_path(self, probe: npt.NDArray[np.float32] | None, required: bool) -> Agreement:
        x = self._probe() if probe is None else np.ascontiguousarray(probe[:PROBE_IMAGES], np.float32)
        reference = np.asarray(self._keras_model.predict(x, verbose=0), dtype=np.float32)
        single = np.concatenate([self.tensorflow_predict(x[i : i + 1]) for i in range(x.shape[0])])
        spread = float(np.abs(single - reference).max())
        try:
            runner = LiteRTRunner.convert(self._keras_model)
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
    def load(
        cls, version_dir: Path, *, inference: str = "auto",
        probe: npt.NDArray[np.float32] | None = None,
    ) -> KerasModel:
        """Loads a published version after checking its files against the metadata checksums;
        the paths are compared on ``probe``, by default the version's check set when it has a
        readable one (the quality gate reports one that is not)."""
        import keras

        started = time.perf_counter()
        metadata = Metadata.read(version_dir)
        metadata.verify_files(version_dir, only=[MODEL_FILE])
        try:
            keras_model = keras.saving.load_model(
                version_dir / MODEL_FILE, compile=False, safe_mode=True
            )
        except Exception as exc:  # Keras raises many types for a bad archive.
            raise CorruptVersionError(f"{version_dir / MODEL_FILE}: cannot load ({exc})") from exc
        if probe is None:
            with contextlib.suppress(CorruptVersionError):
                check_set = read_check_set(version_dir)
                probe = None if check_set is None else check_set.images
        model = cls(keras_model, metadata, inference=inference, probe=probe)
        model.warm_up()
        logger.info(
            "loaded model %s version %d from %s in %.2fs; %s",
            model.spec.name, model.spec.version, version_dir, time.perf_counter() - started,
            model.agreement.describe(),
        )
        return model

    def warm_up(self) -> None:
        check_outputs(self)

    def tensorflow_predict(self, images: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        out = self._fn(self._tf.convert_to_tensor(images))
        return np.asarray(out, dtype=np.float32)

    def predict(self, images: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        result: npt.NDArray[np.float32] = self._run(images)
        return result


PROBE_IMAGES = 500
"""At most this many probe images are compared (the trainer's check set holds 500)."""

class CheckSet(NamedTuple):
    """A version's ``check_set.npz``, as read_check_set returns it."""

    images: npt.NDArray[np.float32]
    """Flattened and scaled to [0, 1]."""
    labels: npt.NDArray[np.integer[Any]]
    reference: npt.NDArray[np.float32] | None
    """``model.predict``'s probabilities on the images, as the trainer computed them (None in
    versions published before the trainer saved them)."""
    label_names: tuple[str, ...] | None = None
    """The class names the labels index, as the trainer published them (None in versions
    published before the trainer saved them)."""
    image_shape: tuple[int, ...] = ()
    """The shape of one image as stored (before flattening)."""


def check_consistency(spec: ModelSpec, check_set: CheckSet, path: Path) -> None:
    """What refuses a version without running its model: its check set (``path``) against what
    its metadata declares (input size, class labels). CorruptVersionError says which differ."""
    images, labels = check_set.images, check_set.labels
    if images.shape[1] != spec.input_size:
        shape = check_set.image_shape
        stored = f" ({'×'.join(map(str, shape))})" if len(shape) > 1 else ""
        raise CorruptVersionError(
            f"{path}: the check set's images have {images.shape[1]} values{stored} but "
            f"metadata.json declares input shape {list(spec.input_shape)} ({spec.input_size} "
            "values): the version's files do not belong together"
        )
    if labels.size and not 0 <= int(labels.min()) <= int(labels.max()) < len(spec.labels):
        raise CorruptVersionError(
            f"{path}: check-set labels range over {int(labels.min())}..{int(labels.max())} but "
            f"metadata.json declares {len(spec.labels)} labels"
        )
    if check_set.label_names is not None and check_set.label_names != spec.labels:
        raise CorruptVersionError(
            f"{path}: metadata.json labels {list(spec.labels)} differ from the label names the "
            f"check set was published with {list(check_set.label_names)}"
        )


class LiteRTModel:
    """A version's published LiteRT flatbuffer (``model.tflite``), served without importing
    TensorFlow: a worker's memory is its interpreter's, not TensorFlow's, and it starts in about a
    second. It serves only while, on the version's check set, it agrees with the probabilities
    the trainer computed with ``model.predict`` (``reference`` in ``check_set.npz``) within the
    tolerance the trainer found for the same comparison; :func:`load_version` falls back to
    :class:`KerasModel` otherwise."""

    inline = True

    def __init__(self, runner: LiteRTRunner, spec: ModelSpec, metadata: Metadata,
                 agreement: Agreement) -> None:
        self.spec = spec
        self.metadata = metadata.to_json()
        self.litert = runner
        self.agreement = agreement

    @property
    def inference_path(self) -> str:
        return self.agreement.path

    def predict(self, images: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return self.litert(images)

    @classmethod
    def load(cls, version_dir: Path, metadata: Metadata,
             check_set: CheckSet | None) -> tuple[LiteRTModel | None, str]:
        """The version served from its flatbuffer, or None and why not. A flatbuffer whose
        checksum does not match, or whose input or output shape differs from the metadata's, is a
        corrupt version (CorruptVersionError): the Keras model it was converted from could not
        serve it either."""
        info = metadata.inference
        if info is None or info.litert_file != LITERT_FILE:
            return None, "no published LiteRT model"
        if not (version_dir / LITERT_FILE).is_file():
            return None, f"{LITERT_FILE} is missing"
        if info.tolerance is None:
            return None, f"{LITERT_FILE} cannot serve: no recorded tolerance"
        metadata.verify_files(version_dir, only=[LITERT_FILE])
        spec = ModelSpec.from_metadata(metadata)
        try:
            runner = LiteRTRunner((version_dir / LITERT_FILE).read_bytes())
        except Exception as exc:  # no LiteRT here, a flatbuffer it rejects
            return None, f"{LITERT_FILE} cannot serve: {exc}"
        # The flatbuffer is the Keras model converted (and checksummed with it): shapes it cannot
        # take or give, the Keras model cannot either, so they refuse the version here.
        runner.check_fits(spec, version_dir / LITERT_FILE)
        if check_set is None or check_set.reference is None:
            return None, f"no reference probabilities in {CHECK_SET_FILE}"
        reference = check_set.reference
        x = check_set.images[:PROBE_IMAGES]
        expected = (x.shape[0], len(spec.labels))
        if reference.shape[1:] != expected[1:] or reference.shape[0] < expected[0]:
            return None, f"reference probabilities of shape {reference.shape}, expected {expected}"
        try:
            tolerance = info.tolerance
            spread = info.tensorflow_batch1_max_diff
            diff = litert_difference(runner, x, reference[: x.shape[0]])
        except Exception as exc:  # a recorded figure that is not a number
            return None, f"{LITERT_FILE} cannot serve: {exc}"
        agreement = Agreement("litert", x.shape[0], diff, spread,
                              f"{LITERT_FILE} checked against the trainer's model.predict")
        if not diff <= tolerance:  # NaN included
            return None, f"{LITERT_FILE} differs from the trainer's reference by {diff:.2e}"
        model = cls(runner, spec, metadata, agreement)
        check_outputs(model)
        return model, ""


def load_version(version_dir: Path, *, inference: str = "auto",
                 check_set: CheckSet | None = None) -> LiteRTModel | KerasModel:
    """A published version as the server serves it: from its LiteRT flatbuffer without
    TensorFlow when it has one that agrees with the trainer's reference (``--inference auto`` or
    ``litert``), else through :class:`KerasModel`, which imports TensorFlow and chooses its path
    itself. ``check_set`` is the version's (read_check_set), if it has one. What refuses the
    version without running its model (metadata, checksums, the check set against the metadata,
    the flatbuffer's input and output shapes) refuses it before TensorFlow is imported: a refused
    version costs a slim server no memory."""
    if inference not in INFERENCE_CHOICES:
        raise ValueError(f"inference {inference!r} is not one of {', '.join(INFERENCE_CHOICES)}")
    # Whatever refuses the version without running it does so before TensorFlow is imported.
    started = time.perf_counter()
    metadata = Metadata.read(version_dir)
    spec = ModelSpec.from_metadata(metadata)
    if check_set is not None:
        check_consistency(spec, check_set, version_dir / CHECK_SET_FILE)
    metadata.verify_files(version_dir, only=[MODEL_FILE])
    if inference != "tensorflow":
        model, reason = LiteRTModel.load(version_dir, metadata, check_set)
        if model is not None:
            logger.info(
                "loaded model %s version %d from %s in %.2fs without TensorFlow; %s",
                model.spec.name, model.spec.version, version_dir / LITERT_FILE,
                time.perf_counter() - started, model.agreement.describe(),
            )
            return model
        logger.info("%s: %s; loading %s", version_dir, reason, MODEL_FILE)
    return KerasModel.load(version_dir, inference=inference,
                           probe=None if check_set is None else check_set.images)


def read_check_set(version_dir: Path) -> CheckSet | None:
    """The version's check set (``check_set.npz``): images, labels and, when the trainer saved
    them, model.predict's probabilities on the images. None when the version has none;
    CorruptVersionError when it cannot be read."""
    path = version_dir / CHECK_SET_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            images, labels = data["images"], data["labels"]
            reference = (np.asarray(data["reference"], dtype=np.float32)
                         if "reference" in data.files else None)
            names = data["label_names"] if "label_names" in data.files else None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise CorruptVersionError(f"{path}: unreadable check set ({exc})") from exc
    if images.ndim < 2 or images.dtype != np.uint8:
        raise CorruptVersionError(
            f"{path}: check-set images of shape {images.shape} and type {images.dtype}, expected "
            "uint8 images of shape (N, ...)"
        )
    if labels.shape != images.shape[:1] or labels.dtype.kind not in "iu":
        raise CorruptVersionError(
            f"{path}: check-set labels of shape {labels.shape} and type {labels.dtype}, expected "
            f"{images.shape[0]} integers (one per image)"
        )
    if names is not None and (names.ndim != 1 or names.dtype.kind != "U"):
        raise CorruptVersionError(
            f"{path}: check-set label names of shape {names.shape} and type {names.dtype}, "
            "expected a list of strings"
        )
    return CheckSet(scale_pixels(images.reshape(images.shape[0], -1)), labels, reference,
                    None if names is None else tuple(str(n) for n in names),
                    tuple(int(d) for d in images.shape[1:]))
