"""``load_version``: a published version as the server serves it, from its LiteRT flatbuffer when
it agrees with the trainer's reference, else its Keras model (refused with NeedsTensorFlowError
where TensorFlow is not installed)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from digitserve.errors import RepositoryError
from digitserve.extras import WITH_TENSORFLOW, available
from digitserve.inference.agreement import INFERENCE_CHOICES
from digitserve.inference.checkset import CheckSet, check_consistency
from digitserve.inference.keras import KerasModel
from digitserve.inference.litert import LiteRTModel
from digitserve.inference.spec import ModelSpec
from digitserve.metadata import Metadata
from digitserve.repository import CHECK_SET_FILE, LITERT_FILE, MODEL_FILE

logger = logging.getLogger(__name__)


class NeedsTensorFlowError(RepositoryError):
    """A version that only TensorFlow can serve (no flatbuffer, or one that does not agree with
    the trainer's reference), where TensorFlow is not installed: refused, never a crash."""


def load_version(version_dir: Path, *, inference: str = "auto",
                 check_set: CheckSet | None = None,
                 metadata: Metadata | None = None) -> LiteRTModel | KerasModel:
    """A published version as the server serves it: its LiteRT flatbuffer when it agrees with the
    trainer's reference (``--inference auto`` or ``litert``), else ``KerasModel``. Whatever refuses
    the version without running it (metadata, checksums, ``check_set`` against the metadata,
    shapes) does so before TensorFlow is imported. ``model.keras`` is checked even where the
    flatbuffer serves: a version whose model file changed is not the one published."""
    if inference not in INFERENCE_CHOICES:
        raise ValueError(f"inference {inference!r} is not one of {', '.join(INFERENCE_CHOICES)}")
    # Whatever refuses the version without running it does so before TensorFlow is imported.
    started = time.perf_counter()
    if metadata is None:
        metadata = Metadata.read(version_dir)
    spec = ModelSpec.from_metadata(metadata)
    if check_set is not None:
        check_consistency(spec, check_set, version_dir / CHECK_SET_FILE)
    metadata.verify_files(version_dir, only=[MODEL_FILE])
    reason = "--inference tensorflow"
    if inference != "tensorflow":
        model, why = LiteRTModel.load(version_dir, metadata, check_set)
        if model is not None:
            logger.info("loaded model %s version %d from %s in %.2fs without TensorFlow; %s",
                        model.spec.name, model.spec.version, version_dir / LITERT_FILE,
                        time.perf_counter() - started, model.agreement.describe())
            return model
        reason = f"LiteRT cannot serve it: {why}"
    if not available("tensorflow"):
        raise NeedsTensorFlowError(
            f"{version_dir}: {reason}, and TensorFlow is not installed here: serve it with {WITH_TENSORFLOW}")
    logger.info("%s: %s; loading %s", version_dir, reason, MODEL_FILE)
    return KerasModel.load(version_dir, inference=inference, metadata=metadata,
                           probe=None if check_set is None else check_set.images)
