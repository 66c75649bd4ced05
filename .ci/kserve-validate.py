"""Offline validation of KServe manifests (k8s/kserve), which kubernetes-validate cannot check (it
has no schema for KServe's kinds). Each ServingRuntime and InferenceService of the YAML stream is
validated against the OpenAPI schema of KServe's own CRD (tests/fixtures/kserve: where they come
from), strictly as kubernetes-validate --strict is: a field the CRD does not declare is refused
(the API server would drop it silently). Then the rules KServe's controller applies that the CRD
schema leaves out: protocol names, the ``kserve-container``, and an InferenceService's runtime
supporting its model format and protocol. One line per problem; exit 1 if there is any.

  kubectl kustomize k8s/kserve | python .ci/kserve-validate.py -
  python .ci/kserve-validate.py FILE...

Needs jsonschema and PyYAML (the dev extra; .ci/containers.sh's tools venv has both)."""

from __future__ import annotations

import gzip
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMAS = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "kserve"
# (apiVersion, kind) -> the schema of the CRD version KServe serves and stores
KINDS = {
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "servingruntime.v1alpha1.schema.json.gz",
    ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice.v1beta1.schema.json.gz",
}
# KServe's pkg/constants: InferenceServiceProtocol values, and the container a predictor merges into
PROTOCOLS = ("v1", "v2", "grpc-v1", "grpc-v2")
CONTAINER = "kserve-container"
# KServe's webhook: an InferenceService's name is a DNS-1035 label
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")


def strict(schema: Any) -> Any:
    """The schema with ``additionalProperties: false`` on every object that declares its
    properties and does not keep unknown fields (``x-kubernetes-preserve-unknown-fields``), as
    kubeconform's and kubernetes-validate's --strict do."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


def load_schema(name: str) -> dict[str, Any]:
    return strict(json.loads(gzip.decompress((SCHEMAS / name).read_bytes())))


def where(path: Any) -> str:
    """A jsonschema path as a field: spec.containers[0].ports[1].name."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text or "(document)"


def schema_problems(document: dict[str, Any], schema: dict[str, Any]) -> Iterator[str]:
    validator = jsonschema.Draft4Validator(schema)
    for error in sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path))):
        yield f"{where(error.absolute_path)}: {error.message}"


def runtime_problems(runtime: dict[str, Any]) -> Iterator[str]:
    spec = runtime.get("spec", {})
    for i, protocol in enumerate(spec.get("protocolVersions", [])):
        if protocol not in PROTOCOLS:
            yield (f"spec.protocolVersions[{i}]: {protocol!r} is not a KServe protocol; expected one "
                   f"of {', '.join(PROTOCOLS)}")
    names = [c.get("name") for c in spec.get("containers", [])]
    if CONTAINER not in names:
        yield (f"spec.containers: no container named {CONTAINER!r} (found {names}); KServe merges "
               "the InferenceService's predictor into the container of that name")


def service_problems(service: dict[str, Any], runtimes: dict[str, dict[str, Any]]) -> Iterator[str]:
    name = service.get("metadata", {}).get("name", "")
    if not DNS_1035.fullmatch(name):
        yield f"metadata.name: {name!r} is not a DNS-1035 label (a-z, 0-9, '-', starting with a letter)"
    model = service.get("spec", {}).get("predictor", {}).get("model")
    if model is None:
        return
    protocol = model.get("protocolVersion", "v1")
    if protocol not in PROTOCOLS:
        yield (f"spec.predictor.model.protocolVersion: {protocol!r} is not a KServe protocol; "
               f"expected one of {', '.join(PROTOCOLS)}")
    runtime_name = model.get("runtime")
    if runtime_name is None:
        return
    runtime = runtimes.get(runtime_name)
    if runtime is None:
        yield f"spec.predictor.model.runtime: no ServingRuntime {runtime_name!r} in these manifests"
        return
    spec = runtime.get("spec", {})
    if protocol not in spec.get("protocolVersions", ["v1"]):
        yield (f"spec.predictor.model.protocolVersion: {protocol!r} is not one of runtime "
               f"{runtime_name!r}'s protocolVersions {spec.get('protocolVersions')}")
    wanted = model.get("modelFormat", {})
    formats = [(f.get("name"), f.get("version")) for f in spec.get("supportedModelFormats", [])]
    if not any(wanted.get("name") == n and wanted.get("version") in (None, v) for n, v in formats):
        yield (f"spec.predictor.model.modelFormat: {wanted} is not among runtime {runtime_name!r}'s "
               f"supportedModelFormats {formats}")


def problems(documents: list[Any]) -> list[str]:
    """Every problem of a stream of manifests, each ``Kind name: field: what``. An InferenceService
    is checked against the runtimes that are valid themselves (a broken one is reported once)."""
    schemas = {key: load_schema(file) for key, file in KINDS.items()}
    checked: list[tuple[str, dict[str, Any], list[str]]] = []
    for document in documents:
        if document is None:
            continue
        if not isinstance(document, dict):
            checked.append(("", {}, [f"a document is not a mapping: {str(document)[:80]!r}"]))
            continue
        key = (document.get("apiVersion"), document.get("kind"))
        label = f"{key[1]} {document.get('metadata', {}).get('name', '?')}: "
        if key not in schemas:
            checked.append((label, document, [f"no KServe schema for {key[0]} {key[1]} (known: "
                                              f"{', '.join(f'{a} {k}' for a, k in KINDS)})"]))
            continue
        lines = list(schema_problems(document, schemas[key]))
        if not lines and key[1] == "ServingRuntime":
            lines = list(runtime_problems(document))
        checked.append((label, document, lines))
    runtimes = {d["metadata"]["name"]: d for _, d, lines in checked
                if d.get("kind") == "ServingRuntime" and not lines}
    broken = {d.get("metadata", {}).get("name") for _, d, lines in checked
              if d.get("kind") == "ServingRuntime" and lines}
    found = []
    for label, document, lines in checked:
        if not lines and document.get("kind") == "InferenceService":
            runtime = document["spec"]["predictor"].get("model", {}).get("runtime")
            if runtime not in broken:
                lines = list(service_problems(document, runtimes))
        found.extend(label + line for line in lines)
    return found


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    documents: list[Any] = []
    for source in argv:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
        documents.extend(yaml.safe_load_all(text))
    found = problems(documents)
    for line in found:
        print(line)
    kinds = [d.get("kind") for d in documents if isinstance(d, dict)]
    if not kinds:
        print("no manifests")
        return 1
    if found:
        return 1
    print(f"{len(kinds)} KServe resources valid ({', '.join(sorted(set(kinds)))})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
