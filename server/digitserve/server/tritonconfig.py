"""Triton's model configuration extension, built once for both bindings of the V2 protocol: a
model's configuration as the server really runs it, as a dict in the shape of Triton's JSON (the
field names of Triton's model_config.proto, enums by name), which server.rest answers as it is and
server.oipcodec parses into the protobuf ModelConfig; and the extensions the server declares
(ServerMetadata, ``GET /v2``). No protobuf here: each edge converts."""

from __future__ import annotations

from typing import Any

from digitserve.server.infer import platform, resolve
from digitserve.server.infertypes import INPUT_DATATYPE, INPUT_NAME, OUTPUTS
from digitserve.server.modelconfig import ModelPolicy
from digitserve.server.registry import Registry

# The extensions of the V2 protocol (Triton's names) this server serves, on both bindings, as
# ServerMetadata and GET /v2 list them: add a name here when its routes and RPCs land.
EXTENSIONS = ("binary_tensor_data", "model_configuration", "statistics", "model_repository")

def triton_type(datatype: str) -> str:
    """A V2 datatype (``UINT8``, ``BYTES``) as Triton's model configuration names it (``TYPE_UINT8``,
    ``TYPE_STRING``)."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def output_dims(output: str, classes: int) -> list[int]:
    """An output's dims without the batch dimension: ``probabilities`` one per class; ``class_index``
    and ``label`` one scalar per image (shape [N]), so none."""
    return [classes] if output == "probabilities" else []


def version_policy(policy: ModelPolicy) -> dict[str, Any]:
    """The model's version policy (``policy.versions``: --version-policy or the config file's
    version_policy; a pinned version N is ``specific`` [N]) as Triton's ``version_policy``.
    (Versions that labels name are loaded too; Triton's policy has no labels.)"""
    versions = policy.versions
    if versions.kind == "latest":
        return {"latest": {"num_versions": versions.num_versions}}
    if versions.kind == "specific":
        return {"specific": {"versions": list(versions.versions)}}
    return {"all": {}}


def model_config(router: Registry, name: str, version: str, instances: int = 1) -> dict[str, Any]:
    """The configuration of model ``name`` (``version`` as ModelMetadata takes it; the same
    NotServedError / ModelNotReadyError / InvalidInputError): ``max_batch_size`` the most images a
    request may hold (--max-images-per-request), dims without that batch dimension, the dynamic
    batcher's settings (absent when --max-batch-size 1 leaves no two calls to batch), and
    ``instances`` copies of the model running at once (--workers: each process runs one model call
    at a time, on its model thread)."""
    _, model = resolve(router, name, version, "version")
    versions = router.model(name)
    plane, spec = versions.plane, model.spec
    batcher = plane.batcher
    config: dict[str, Any] = {
        "name": spec.name,
        "platform": platform(model),
        "backend": model.inference_path,
        "version_policy": version_policy(versions.policy),
        "max_batch_size": plane.max_images_per_request,
        "input": [{"name": INPUT_NAME, "data_type": triton_type(INPUT_DATATYPE),
                   "format": "FORMAT_NONE", "dims": [spec.input_size]}],
        "output": [{"name": output, "data_type": triton_type(datatype),
                    "dims": output_dims(output, len(spec.labels))}
                   for output, datatype in OUTPUTS.items()],
        "instance_group": [{"name": spec.name, "count": instances, "kind": "KIND_CPU"}],
        "parameters": {"max_queued_images": {"string_value": str(batcher.max_queued_images)}},
    }
    if batcher.max_batch_size > 1:
        config["dynamic_batching"] = {
            "preferred_batch_size": [batcher.max_batch_size],
            "max_queue_delay_microseconds": round(batcher.max_queue_delay * 1_000_000),
        }
    return config
