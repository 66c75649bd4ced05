"""Running a published model, for the trainer and the server alike: the model contract (``spec``),
the inference paths and their agreement with ``model.predict`` (``agreement``), a version's check
set (``checkset``), LiteRT without TensorFlow (``litert``), a saved Keras model on its fastest
agreeing path (``keras``, through which the trainer computes its published figures) and a version
as the server loads it (``loading``). ``ai_edge_litert`` and TensorFlow are imported only when a
model is made; the client never imports this package."""

from __future__ import annotations

from digitserve.inference.agreement import (
    AGREEMENT_FLOOR,
    INFERENCE_CHOICES,
    PROBE_IMAGES,
    Agreement,
    InferencePathError,
)
from digitserve.inference.checkset import CheckSet, check_consistency, read_check_set
from digitserve.inference.keras import KerasModel
from digitserve.inference.litert import LiteRTModel, LiteRTRunner, litert_difference
from digitserve.inference.loading import NeedsTensorFlowError, load_version
from digitserve.inference.spec import Model, ModelSpec, check_outputs, runs_inline

__all__ = [
    "AGREEMENT_FLOOR", "INFERENCE_CHOICES", "PROBE_IMAGES", "Agreement", "CheckSet", "InferencePathError",
    "KerasModel", "LiteRTModel", "LiteRTRunner", "Model", "ModelSpec", "NeedsTensorFlowError",
    "check_consistency", "check_outputs", "litert_difference", "load_version", "read_check_set",
    "runs_inline",
]
