"""The model contract: what a loaded model declares (``ModelSpec``, from its metadata) and what its
callers may use of it (the ``Model`` protocol), and the output check every loaded model passes."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from digitserve.metadata import Metadata
from digitserve.repository import CorruptVersionError


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
            raise CorruptVersionError(f"metadata declares input shape {spec.input_shape} and "
                                      f"{len(spec.labels)} labels")
        return spec


class Model(Protocol):
    """A loaded, ready model. ``predict`` takes float32 images of shape (N, input_size), scaled to
    [0, 1], and returns float32 probabilities of shape (N, len(labels))."""

    spec: ModelSpec
    metadata: dict[str, Any]

    @property
    def inline(self) -> bool: ...  # cheap enough for the event loop (DataPlane.inline_limit): LiteRT

    @property
    def inference_path(self) -> str: ...  # ``litert`` or ``tensorflow``, for GetModelInfo and metrics

    def predict(self, images: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]: ...


def check_outputs(model: Model) -> None:
    """Runs a batch and a single image through ``model`` and checks the output shape and that the
    probabilities sum to 1."""
    for rows in (2, 1):
        probe = np.zeros((rows, model.spec.input_size), dtype=np.float32)
        out = model.predict(probe)
        if out.shape != (rows, len(model.spec.labels)):
            raise CorruptVersionError(f"model outputs shape {out.shape[1:]}, metadata declares "
                                      f"{len(model.spec.labels)} labels")
        if not np.allclose(out.sum(axis=1), 1.0, atol=1e-3):
            raise CorruptVersionError("model outputs do not sum to 1: not a softmax classifier")


def runs_inline(model: Model) -> bool:
    """Whether ``model`` is cheap enough for the event loop (``Model.inline``: the LiteRT path);
    others run on the data plane's model thread."""
    return model.inline
