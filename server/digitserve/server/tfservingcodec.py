"""The converter of TF Serving's REST API (KServe's V1 protocol): a ``:predict`` body's
``instances`` (row format) or ``inputs`` (columnar) into the neutral request of
server.infertypes, and the neutral answer back into ``predictions`` or ``outputs``; and the
model status and metadata documents, as TF Serving spells them. Its errors name the fields as the
JSON does (``instances[3]``) and are answered as TF Serving's ``{"error": "..."}``."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from digitserve.server.errors import InvalidInputError, NotServedError
from digitserve.server.infertypes import INPUT_NAME, InferInput, InferRequest, InferResponse, Where

SIGNATURE = "serving_default"  # the one signature, as a SavedModel's default is named
EXAMPLE = ('expected a predict request such as {"instances": [[...784 pixels...]]} or '
           '{"inputs": {"images": [[...]]}}')
# The repository index's states (server.modelcontrol) as TF Serving's ModelVersionStatus names them.
_STATES = {"READY": "AVAILABLE", "LOADING": "LOADING", "UNAVAILABLE": "END"}


@dataclass
class PredictCall:
    """A predict request read: the neutral request and whether it used the row format."""

    request: InferRequest
    rows: bool


def _document(body: bytes) -> dict[str, Any]:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInputError("request body", f"not valid JSON ({exc.msg} at line {exc.lineno} "
                                f"column {exc.colno}); {EXAMPLE}") from None
    if not isinstance(document, dict):
        raise InvalidInputError("request body", f"not a JSON object; {EXAMPLE}")
    return document


def _named(value: Any, field: str) -> Any:
    """A value given by input name (``{"images": ...}``) as the value; any other name refused. A
    ``{"b64": ...}`` object is a value (TF Serving's binary string), not a name."""
    if not isinstance(value, dict) or set(value) == {"b64"}:
        return value
    for key in value:
        if key != INPUT_NAME:
            raise InvalidInputError(f"{field}[{key!r}]", f"is not an input of this model; "
                                    f"expected {INPUT_NAME!r}")
    if INPUT_NAME not in value:
        raise InvalidInputError(field, f"an object without {INPUT_NAME!r}; expected the input "
                                f"{INPUT_NAME!r} by name, or its value")
    return value[INPUT_NAME]


def _picture(value: Any, field: str) -> bytes:
    encoded = value.get("b64") if isinstance(value, dict) else None
    if not isinstance(encoded, str):
        raise InvalidInputError(field, 'expected {"b64": "<base64 of a PNG or JPEG>"} as every '
                                "other image of the request")
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInputError(f"{field}.b64", "not base64; expected the base64 of a PNG or "
                                "JPEG picture") from None


def _tensor(images: list[Any], field: str) -> InferInput:
    """The images (a list, one entry per image: pixels as nested arrays of numbers, or a
    ``{"b64": ...}`` picture) as one neutral input tensor."""
    element = f"{field}[{{i}}] (pixel {{j}})"
    where = Where(field, field, field, element)
    if images and isinstance(images[0], dict):
        pictures = [_picture(value, f"{field}[{i}]") for i, value in enumerate(images)]
        return InferInput(INPUT_NAME, "BYTES", [len(pictures)], pictures,
                          Where(field, field, field, f"{field}[{{k}}]"))
    try:
        array = np.asarray(images)
    except ValueError:  # nested unevenly
        raise InvalidInputError(field, "images of unequal shapes; expected each image as 784 "
                                "numbers or 28 rows of 28") from None
    if array.dtype.kind in "iu":
        datatype = "UINT8"  # whole numbers: bytes 0..255
    elif array.dtype.kind == "f":
        datatype = "FP32"  # numbers with a fraction: intensities in [0, 1]
    else:
        raise InvalidInputError(field, "holds values that are not numbers; expected each image as "
                                "pixel numbers (0..255, or 0.0..1.0) or {\"b64\": ...}")
    return InferInput(INPUT_NAME, datatype, list(array.shape), array.ravel(), where)


def read_predict(body: bytes, name: str, version: int = 0, label: str = "") -> PredictCall:
    """A ``:predict`` body into the neutral request; InvalidInputError names what is wrong."""
    document = _document(body)
    signature = document.get("signature_name", SIGNATURE)
    if signature != SIGNATURE:
        raise InvalidInputError("signature_name", f"{str(signature)[:80]!r} is not a signature of "
                                f"model {name!r}; expected {SIGNATURE!r} (or none)")
    for key in document:
        if key not in ("signature_name", "instances", "inputs"):
            raise InvalidInputError(key, 'is not a field of a predict request; expected '
                                    '"instances" or "inputs" (and "signature_name")')
    if ("instances" in document) == ("inputs" in document):
        raise InvalidInputError("request body", 'expected one of "instances" (row format) or '
                                '"inputs" (columnar format), not both, not neither')
    rows = "instances" in document
    field = "instances" if rows else "inputs"
    value = document[field]
    if rows:
        if not isinstance(value, list) or not value:
            raise InvalidInputError(field, "expected a non-empty list, one entry per image")
        images = [_named(item, f"{field}[{i}]") for i, item in enumerate(value)]
    else:
        if isinstance(value, dict) and set(value) != {"b64"}:
            field = f"inputs[{INPUT_NAME!r}]"
        images = _named(value, "inputs")
        if not isinstance(images, list) or not images:
            raise InvalidInputError(field, "expected a non-empty list, one entry per image")
    request = InferRequest(name, [_tensor(images, field)], version=version, label=label)
    return PredictCall(request, rows)


def predict_body(response: InferResponse, rows: bool) -> dict[str, Any]:
    """TF Serving's answer: ``predictions``, one object of the outputs per image (row format),
    or ``outputs``, each output for all images (columnar)."""
    columns: dict[str, Any] = {}
    for tensor in response.tensors():
        if tensor.datatype == "BYTES":
            columns[tensor.name] = [label.decode() for label in tensor.data]
        else:
            columns[tensor.name] = tensor.data.tolist()
    if not rows:
        return {"outputs": columns}
    count = response.probabilities.shape[0]
    return {"predictions": [{key: values[i] for key, values in columns.items()} for i in range(count)]}


def model_status(entries: Iterable[dict[str, Any]], name: str, version: int = 0) -> dict[str, Any]:
    """TF Serving's model status from the repository index's entries: each version of ``name``
    (or only ``version``) with its state and, for one that failed, why."""
    statuses = []
    for entry in entries:
        if entry["name"] != name or "version" not in entry:
            continue
        if version and entry["version"] != str(version):
            continue
        state = _STATES[entry["state"]]
        failed = state == "END"
        statuses.append({"version": entry["version"], "state": state,
                         "status": {"error_code": "UNKNOWN" if failed else "OK",
                                    "error_message": entry["reason"] if failed else ""}})
    if version and not statuses:
        raise NotServedError(f"model {name!r} version {version} is not served")
    return {"model_version_status": statuses}


def _tensor_info(name: str, dtype: str, dims: Iterable[int]) -> dict[str, Any]:
    return {"dtype": dtype, "tensor_shape": {"dim": [{"size": str(d), "name": ""} for d in dims],
                                             "unknown_rank": False}, "name": name}


def model_metadata(name: str, version: int, input_size: int, classes: int) -> dict[str, Any]:
    """TF Serving's metadata of a model version: its spec and its one signature's inputs and
    outputs (what this server accepts and answers, not a SavedModel's graph names)."""
    signature = {
        "inputs": {INPUT_NAME: _tensor_info(INPUT_NAME, "DT_FLOAT", (-1, input_size))},
        "outputs": {"probabilities": _tensor_info("probabilities", "DT_FLOAT", (-1, classes)),
                    "class_index": _tensor_info("class_index", "DT_INT64", (-1,)),
                    "label": _tensor_info("label", "DT_STRING", (-1,))},
        "method_name": "tensorflow/serving/predict",
    }
    return {"model_spec": {"name": name, "signature_name": "", "version": str(version)},
            "metadata": {"signature_def": {"signature_def": {SIGNATURE: signature}}}}

