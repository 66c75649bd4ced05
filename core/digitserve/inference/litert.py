"""The LiteRT path: ``LiteRTRunner`` (a flatbuffer's interpreter) and ``LiteRTModel`` (a version
served from its ``model.tflite`` without TensorFlow); ``ai_edge_litert`` is imported lazily."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from digitserve.inference.agreement import PROBE_IMAGES, Agreement
from digitserve.inference.checkset import CheckSet
from digitserve.inference.spec import ModelSpec, check_outputs
from digitserve.metadata import Metadata
from digitserve.nativelog import native_stderr_logged
from digitserve.repository import CHECK_SET_FILE, LITERT_FILE, CorruptVersionError


class LiteRTRunner:
    """A LiteRT interpreter of the model, XNNPACK on one thread: a call costs microseconds where a
    TensorFlow function costs hundreds, and an image's probabilities do not depend on its batch.
    Not thread-safe: the data plane calls it from one thread."""

    def __init__(self, flatbuffer: bytes) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.flatbuffer = flatbuffer
        # LiteRT's notice on stderr when it first allocates: a log record, not a bare line.
        with native_stderr_logged(logging.getLogger("litert")):
            self._interpreter = Interpreter(model_content=flatbuffer, num_threads=1)
            self._interpreter.allocate_tensors()
        inp, output = self._interpreter.get_input_details()[0], self._interpreter.get_output_details()[0]
        self._input, self._row_shape = int(inp["index"]), [int(d) for d in inp["shape_signature"][1:]]
        self._output, self._classes = int(output["index"]), int(output["shape_signature"][-1])
        self._rows = -1

    def check_fits(self, spec: ModelSpec, path: Path) -> None:
        """CorruptVersionError unless the model takes ``spec``'s inputs and gives one probability
        per label."""
        size = int(np.prod(self._row_shape)) if all(d > 0 for d in self._row_shape) else None
        if size is not None and size != spec.input_size:
            raise CorruptVersionError(
                f"{path}: the model takes inputs of shape {self._row_shape} ({size} values) but "
                f"metadata.json declares input shape {list(spec.input_shape)} "
                f"({spec.input_size} values)")
        if self._classes > 0 and self._classes != len(spec.labels):
            raise CorruptVersionError(
                f"{path}: the model outputs {self._classes} classes but metadata.json declares "
                f"{len(spec.labels)} labels")

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
        if images.flags.writeable:
            interpreter.set_tensor(self._input, images.reshape(rows, *self._row_shape))
        else:
            # Pixels read from a request's bytes (read-only): copied straight into the input
            # tensor, where set_tensor takes a slow path for a read-only array: 106-135 us against
            # 8-11 for 64 images (two runs of ``python -m bench.litert_input``). The view is
            # dropped before invoke.
            interpreter.tensor(self._input)()[...] = images.reshape(rows, *self._row_shape)
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


class LiteRTModel:
    """A version's ``model.tflite`` served without TensorFlow (a worker starts in about a second and
    holds only its interpreter), while it agrees on the check set with the trainer's
    ``model.predict`` within the recorded tolerance; else ``load_version`` falls back to Keras."""

    inline = True

    def __init__(self, runner: LiteRTRunner, spec: ModelSpec, metadata: Metadata,
                 agreement: Agreement) -> None:
        self.spec, self.metadata, self.litert, self.agreement = spec, metadata.to_json(), runner, agreement

    @property
    def inference_path(self) -> str:
        return self.agreement.path

    def predict(self, images: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return self.litert(images)

    @classmethod
    def load(cls, version_dir: Path, metadata: Metadata,
             check_set: CheckSet | None) -> tuple[LiteRTModel | None, str]:
        """The version served from its flatbuffer, or None and why not. A checksum or shape that
        differs from the metadata's is a corrupt version (CorruptVersionError): the Keras model it
        was converted from could not serve either. The bytes checked are the bytes run."""
        info = metadata.inference
        if info is None or info.litert_file != LITERT_FILE:
            return None, "no published LiteRT model"
        if not (version_dir / LITERT_FILE).is_file():
            return None, f"{LITERT_FILE} is missing"
        if info.tolerance is None:
            return None, f"{LITERT_FILE} cannot serve: no recorded tolerance"
        flatbuffer = metadata.read_file(version_dir, LITERT_FILE)
        spec = ModelSpec.from_metadata(metadata)
        try:
            runner = LiteRTRunner(flatbuffer)
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
            tolerance, spread = info.tolerance, info.tensorflow_batch1_max_diff
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
