"""A version's check set (``check_set.npz``): the images, labels and reference probabilities the
trainer published with it, read once and checked against its metadata (SHA-256, shapes, labels)."""

from __future__ import annotations

import io
import logging
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from digitserve.idx import scale_pixels
from digitserve.inference.spec import ModelSpec
from digitserve.metadata import METADATA_FILE, Metadata
from digitserve.repository import CHECK_SET_FILE, CorruptVersionError

logger = logging.getLogger(__name__)


class CheckSet(NamedTuple):
    """A version's ``check_set.npz``, as read_check_set returns it."""

    images: npt.NDArray[np.float32]  # flattened and scaled to [0, 1]
    labels: npt.NDArray[np.integer[Any]]
    reference: npt.NDArray[np.float32] | None  # the trainer's model.predict (None: older versions)
    label_names: tuple[str, ...] | None = None  # the names the labels index (None: older versions)
    image_shape: tuple[int, ...] = ()  # one image's shape as stored


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
            "values): the version's files do not belong together")
    if labels.size and not 0 <= int(labels.min()) <= int(labels.max()) < len(spec.labels):
        raise CorruptVersionError(
            f"{path}: check-set labels range over {int(labels.min())}..{int(labels.max())} but "
            f"metadata.json declares {len(spec.labels)} labels")
    if check_set.label_names is not None and check_set.label_names != spec.labels:
        raise CorruptVersionError(
            f"{path}: metadata.json labels {list(spec.labels)} differ from the label names the "
            f"check set was published with {list(check_set.label_names)}")


def read_check_set(version_dir: Path, metadata: Metadata | None = None) -> CheckSet | None:
    """The version's check set, None when it has none; CorruptVersionError when it is unreadable or
    its SHA-256 differs from ``metadata``'s (read from ``version_dir`` when not given). The arrays
    come from the very bytes hashed; one the metadata records no SHA-256 for is read with a warning."""
    path = version_dir / CHECK_SET_FILE
    if not path.is_file():
        return None
    if metadata is None:
        metadata = Metadata.read(version_dir)
    if metadata.digest(CHECK_SET_FILE) is None:
        logger.warning("%s: %s records no sha256 for it (added after publishing, or published "
                       "without one): the check set is used unverified", path, METADATA_FILE)
    buffer = io.BytesIO(metadata.read_file(version_dir, CHECK_SET_FILE, required=False))
    try:
        with np.load(buffer, allow_pickle=False) as data:
            images, labels = data["images"], data["labels"]
            reference = (np.asarray(data["reference"], dtype=np.float32)
                         if "reference" in data.files else None)
            names = data["label_names"] if "label_names" in data.files else None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise CorruptVersionError(f"{path}: unreadable check set ({exc})") from exc
    if images.ndim < 2 or images.dtype != np.uint8:
        raise CorruptVersionError(
            f"{path}: check-set images of shape {images.shape} and type {images.dtype}, expected "
            "uint8 images of shape (N, ...)")
    if labels.shape != images.shape[:1] or labels.dtype.kind not in "iu":
        raise CorruptVersionError(
            f"{path}: check-set labels of shape {labels.shape} and type {labels.dtype}, expected "
            f"{images.shape[0]} integers (one per image)")
    if names is not None and (names.ndim != 1 or names.dtype.kind != "U"):
        raise CorruptVersionError(
            f"{path}: check-set label names of shape {names.shape} and type {names.dtype}, "
            "expected a list of strings")
    return CheckSet(scale_pixels(images.reshape(images.shape[0], -1)), labels, reference,
                    None if names is None else tuple(str(n) for n in names),
                    tuple(int(d) for d in images.shape[1:]))
