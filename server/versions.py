"""Where served models come from: the repository's versions, each loaded only after it passes the
quality gate (metadata checksum, a check set that fits the metadata, loads, declared output shape,
probabilities sum to 1, check-set accuracy ≥ a floor)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from digitserve.repository import (
    CHECK_SET_FILE,
    METADATA_CHECKSUM_FILE,
    METADATA_FILE,
    CorruptVersionError,
    ModelNotFoundError,
    ModelRepository,
    RepositoryError,
    metadata_checksummed,
    read_metadata,
)
from server.model import (
    CheckSet,
    Model,
    ModelSpec,
    check_consistency,
    load_version,
    read_check_set,
)

logger = logging.getLogger(__name__)


class QualityGateError(RepositoryError):
    """Raised when a version loads but does not answer well enough to be served."""


class ModelSource(Protocol):
    """Published versions and a way to load one (checked and warmed up)."""

    def versions(self) -> list[int]: ...

    def load(self, version: int) -> Model: ...


def check_quality(model: Model, check_set: CheckSet, path: Path, min_accuracy: float) -> float:
    """Accuracy on the version's check set (read_check_set; ``path`` names it in messages);
    raises QualityGateError below ``min_accuracy``."""
    x, labels = check_set.images, check_set.labels
    check_consistency(model.spec, check_set, path)
    probs = model.predict(x)
    if probs.shape != (x.shape[0], len(model.spec.labels)):
        raise QualityGateError(
            f"model outputs shape {probs.shape}, expected {(x.shape[0], len(model.spec.labels))}"
        )
    if not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        raise QualityGateError("model outputs do not sum to 1 on the check set")
    accuracy = float((probs.argmax(axis=1) == labels).mean())
    if accuracy < min_accuracy:
        raise QualityGateError(
            f"check-set accuracy {accuracy:.4f} on {x.shape[0]} images is below the floor {min_accuracy:.4f}"
        )
    return accuracy


class RepositorySource:
    """Versions of one model in a repository, loaded by load_version and gated."""

    def __init__(self, root: Path, name: str, min_accuracy: float, inference: str = "auto",
                 *, allow_missing_check_set: bool = False) -> None:
        self.repository = ModelRepository(root)
        self.name = name
        self.min_accuracy = min_accuracy
        self.inference = inference
        self.allow_missing_check_set = allow_missing_check_set

    def versions(self) -> list[int]:
        """Published versions; ModelNotFoundError when there are none."""
        versions = self.repository.versions(self.name)
        if not versions:
            raise ModelNotFoundError(
                f"model {self.name!r} has no published version in {self.repository.root}"
            )
        return versions

    def __str__(self) -> str:
        return f"{self.repository.root}/{self.name}"

    def load(self, version: int) -> Model:
        """The version, loaded and past the gate; RepositoryError says why it is refused. The
        checks that need no model run first (metadata and its checksum, name and version, the
        check set and its agreement with the metadata), so a refused version never costs a
        TensorFlow import where the LiteRT path serves."""
        version_dir = self.repository.version_dir(self.name, version)
        metadata = read_metadata(version_dir)  # checked against metadata.json.sha256 if present
        spec = ModelSpec.from_metadata(metadata)
        if spec.name != self.name or spec.version != version:
            raise CorruptVersionError(
                f"{version_dir}: metadata says {spec.name!r} version {spec.version}"
            )
        if not metadata_checksummed(version_dir):
            logger.warning("%s has no %s (published before metadata was checksummed): its "
                           "metadata is served unverified", version_dir, METADATA_CHECKSUM_FILE)
        check_set = read_check_set(version_dir)  # read once: the inference path's probe, the gate
        if check_set is None:
            if not self.allow_missing_check_set:
                raise QualityGateError(
                    f"{version_dir / CHECK_SET_FILE} is missing, so the accuracy floor cannot be "
                    "checked: publish the version with its check set, or start the server with "
                    "--allow-missing-check-set to serve it unchecked"
                )
            logger.warning("%s has no %s: serving it unchecked (--allow-missing-check-set)",
                           version_dir, CHECK_SET_FILE)
        model = load_version(version_dir, inference=self.inference, check_set=check_set)
        if model.spec != spec:
            raise CorruptVersionError(f"{version_dir / METADATA_FILE}: changed while loading")
        if check_set is None:
            return model
        accuracy = check_quality(model, check_set, version_dir / CHECK_SET_FILE, self.min_accuracy)
        logger.info("version %d passed the quality gate: check-set accuracy %.4f", version, accuracy)
        return model


class StaticSource:
    """One model from a loader function (tests, embedding): no versions to watch."""

    def __init__(self, loader: Callable[[], Model]) -> None:
        self._loader = loader

    def versions(self) -> list[int]:
        return [0]  # the one model, whatever its version

    def __str__(self) -> str:
        return "a loader function"

    def load(self, version: int) -> Model:
        return self._loader()
