"""Running a published model, for the trainer and the server alike (``digitserve.inference``).

- ``spec``: the model contract — ``ModelSpec`` (what a version's metadata declares), the ``Model``
  protocol (what callers may use of a loaded model), ``check_outputs``, ``runs_inline``;
- ``agreement``: the inference paths (``INFERENCE_CHOICES``) and how one is compared with
  ``model.predict`` (``Agreement``, ``InferencePathError``);
- ``checkset``: a version's ``check_set.npz`` (``read_check_set``, ``CheckSet``) and its
  agreement with the metadata (``check_consistency``);
- ``litert``: ``LiteRTRunner`` and ``LiteRTModel``, a version served from its flatbuffer without
  TensorFlow; ``litert_difference``;
- ``keras``: ``KerasModel``, a saved Keras model served through the fastest path that agrees with
  ``model.predict`` — the trainer computes its published figures through it, so they are the
  server's;
- ``loading``: ``load_version``, a version as the server serves it; ``NeedsTensorFlowError``, its
  refusal of a version only TensorFlow could serve where TensorFlow is not installed.

It needs numpy and, only when a model is made, ``ai_edge_litert`` or TensorFlow/Keras (imported
lazily, inside the functions that need them: importing this package imports neither). The client
never imports it, nor anything of the server; the rest of the core (``digitserve.idx``,
``.metrics``, ``.repository``, ``.metadata``, ...) stays framework-free.
"""

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
    "AGREEMENT_FLOOR",
    "INFERENCE_CHOICES",
    "PROBE_IMAGES",
    "Agreement",
    "CheckSet",
    "InferencePathError",
    "KerasModel",
    "LiteRTModel",
    "LiteRTRunner",
    "Model",
    "ModelSpec",
    "NeedsTensorFlowError",
    "check_consistency",
    "check_outputs",
    "litert_difference",
    "load_version",
    "read_check_set",
    "runs_inline",
]
