"""k8s/kserve, the ServingRuntime and InferenceServices that run the server on KServe: they validate
against KServe's CRD schemas and rules (.ci/kserve-validate.py, which CI runs on the kustomize
render), a wrong field or value is refused with a line naming it, and the runtime's container
configures the server as KServe expects (its model repository at /mnt/models, the ports it
declares are the ones the server listens on)."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support import require_module

ROOT = Path(__file__).resolve().parent.parent
KSERVE = ROOT / "k8s" / "kserve"
VALIDATE = ROOT / ".ci" / "kserve-validate.py"

require_module("jsonschema", "the dev extra: pip install -e .[dev]", allow_module_level=True)
require_module("yaml", "the dev extra (PyYAML): pip install -e .[dev]", allow_module_level=True)

import yaml  # noqa: E402


def manifests() -> list[dict[str, Any]]:
    """The resources k8s/kserve/kustomization.yaml lists, in its namespace (what kustomize renders)."""
    kustomization = yaml.safe_load((KSERVE / "kustomization.yaml").read_text())
    documents = []
    for resource in kustomization["resources"]:
        for document in yaml.safe_load_all((KSERVE / resource).read_text()):
            document["metadata"]["namespace"] = kustomization["namespace"]
            documents.append(document)
    return documents


def validate(documents: list[dict[str, Any]]) -> tuple[int, list[str]]:
    """.ci/kserve-validate.py's exit code and lines for these documents on its stdin."""
    done = subprocess.run([sys.executable, str(VALIDATE), "-"], input=yaml.safe_dump_all(documents),
                          capture_output=True, text=True, timeout=120)
    assert not done.stderr, done.stderr
    return done.returncode, done.stdout.splitlines()


def of_kind(documents: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in documents if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def test_the_manifests_validate() -> None:
    documents = manifests()
    assert sorted((d["kind"], d["metadata"]["name"]) for d in documents) == [
        ("InferenceService", "mnist"), ("InferenceService", "mnist-grpc"), ("ServingRuntime", "digitserve")]
    assert validate(documents) == (0, ["3 KServe resources valid (InferenceService, ServingRuntime)"])


def broken(change: Any) -> list[dict[str, Any]]:
    documents = copy.deepcopy(manifests())
    change(of_kind(documents, "ServingRuntime", "digitserve")["spec"],
           of_kind(documents, "InferenceService", "mnist")["spec"]["predictor"]["model"])
    return documents


# (what is wrong, the change, the one line the validator prints)
WRONG = [
    ("a protocol KServe does not know",
     lambda runtime, model: runtime["protocolVersions"].append("v3"),
     "ServingRuntime digitserve: spec.protocolVersions[2]: 'v3' is not a KServe protocol; expected one "
     "of v1, v2, grpc-v1, grpc-v2"),
    ("a field the CRD does not declare (misspelt)",
     lambda runtime, model: model.__setitem__("storageURI", model.pop("storageUri")),
     "InferenceService mnist: spec.predictor.model: Additional properties are not allowed ('storageURI' "
     "was unexpected)"),
    ("a value of the wrong type",
     lambda runtime, model: runtime["supportedModelFormats"][0].__setitem__("version", 1),
     "ServingRuntime digitserve: spec.supportedModelFormats[0].version: 1 is not of type 'string'"),
    ("no kserve-container",
     lambda runtime, model: runtime["containers"][0].__setitem__("name", "server"),
     "ServingRuntime digitserve: spec.containers: no container named 'kserve-container' (found "
     "['server']); KServe merges the InferenceService's predictor into the container of that name"),
    ("a protocol the runtime does not serve",
     lambda runtime, model: model.__setitem__("protocolVersion", "grpc-v1"),
     "InferenceService mnist: spec.predictor.model.protocolVersion: 'grpc-v1' is not one of runtime "
     "'digitserve''s protocolVersions ['v2', 'grpc-v2']"),
    ("a model format the runtime does not serve",
     lambda runtime, model: model.__setitem__("modelFormat", {"name": "tensorflow", "version": "2"}),
     "InferenceService mnist: spec.predictor.model.modelFormat: {'name': 'tensorflow', 'version': '2'} "
     "is not among runtime 'digitserve''s supportedModelFormats [('digitserve', '1')]"),
]


@pytest.mark.parametrize(("change", "line"), [(c, line) for _, c, line in WRONG], ids=[w[0] for w in WRONG])
def test_a_wrong_field_is_refused_with_a_line_naming_it(change: Any, line: str) -> None:
    assert validate(broken(change)) == (1, [line])


def test_a_kind_without_a_kserve_schema_is_refused() -> None:
    documents = manifests()
    documents[0]["apiVersion"] = "serving.kserve.io/v1beta1"  # ServingRuntime is v1alpha1
    code, lines = validate(documents)
    assert code == 1 and lines == [
        "ServingRuntime digitserve: no KServe schema for serving.kserve.io/v1beta1 ServingRuntime (known: "
        "serving.kserve.io/v1alpha1 ServingRuntime, serving.kserve.io/v1beta1 InferenceService)"]


def test_the_runtime_configures_the_server_as_kserve_expects() -> None:
    """The container's args and env, read by mnist-serve's own settings: the model repository is
    where KServe mounts storageUri, the HTTP port is the one the runtime declares (KServe's v2)
    and probes, the gRPC port the grpc-v2 example names h2c, and the metrics port KServe's
    scrape annotation names."""
    from digitserve.server.settings import load_settings

    documents = manifests()
    runtime = of_kind(documents, "ServingRuntime", "digitserve")["spec"]
    (container,) = runtime["containers"]
    assert container["args"][0] == "serve"  # the image's entrypoint runs mnist-serve with the rest
    settings = load_settings(container["args"][1:], {e["name"]: e["value"] for e in container["env"]})
    assert settings.model_repo == Path("/mnt/models")
    assert settings.model_name == ()  # every model of the repository, whatever its name
    assert [p["containerPort"] for p in container["ports"]] == [settings.http_port] == [8080]
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": settings.http_port}
    grpc = of_kind(documents, "InferenceService", "mnist-grpc")["spec"]["predictor"]["model"]
    assert grpc["ports"] == [{"name": "h2c", "containerPort": settings.port, "protocol": "TCP"}]
    assert int(runtime["annotations"]["prometheus.kserve.io/port"]) == settings.metrics_port
    for service in ("mnist", "mnist-grpc"):
        model = of_kind(documents, "InferenceService", service)["spec"]["predictor"]["model"]
        # the PVC the training Job publishes NAME/VERSION/ into (k8s/base/pvc.yaml), at its root
        assert model["storageUri"] == "pvc://digitserve-models"
    assert yaml.safe_load((ROOT / "k8s" / "base" / "pvc.yaml").read_text())["metadata"]["name"] == \
        "digitserve-models"
