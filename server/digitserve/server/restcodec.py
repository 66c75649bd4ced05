"""The converter of the V2 protocol's REST binding: an inference request's JSON (or JSON plus
Triton's binary-data extension) into the neutral request of server.infertypes, each input naming
its fields as the JSON does (``inputs[0].data[3]``, ``inputs[0].binary_data[3]``), and the
neutral answer back into JSON (and binary data). JSON elements are held to the ranges of the
protocol's gRPC contents (``uint_contents`` for UINT8, ...), so both bindings refuse alike."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from digitserve.server.errors import InvalidInputError
from digitserve.server.infertypes import (
    OUTPUTS,
    InferInput,
    InferRequest,
    InferResponse,
    RequestedOutput,
    Where,
)

# Triton's binary-data extension: the JSON header's length; the binary tensors follow it.
HEADER_LENGTH = "Inference-Header-Content-Length"
# Values a request holds besides its pixels (names, shape, outputs, parameters): room for them.
VALUE_SLACK = 4096
# A JSON body longer than this is read on a thread: the event loop runs between its steps.
THREAD_BYTES = 256 * 1024
_INTEGERS = ("UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64")
_DATATYPES = (*_INTEGERS, "FP32", "FP64", "BOOL", "BYTES")  # those the protocol's contents carry


def _type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def expect(value: Any, kind: type | tuple[type, ...], field: str, what: str) -> Any:
    """``value`` when it is a ``kind`` (a bool is no number); else InvalidInputError."""
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise InvalidInputError(field, f"{_type(value)}, expected {what}")
    return value


def _object(value: Any, field: str) -> dict[str, Any]:
    result: dict[str, Any] = expect(value, dict, field, "an object")
    return result


def _flatten(data: list[Any]) -> list[Any]:
    """Nested arrays (row-major, as the protocol allows) as one flat list."""
    flat: list[Any] = []
    stack: list[Iterable[Any]] = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            flat.append(value)
        else:
            stack.pop()
    return flat


def _bad_element(values: list[Any], datatype: str, field: str) -> InvalidInputError:
    """The first element of ``values`` that is not of the datatype, named."""
    for k, value in enumerate(values):
        where = f"{field}[{k}]"
        if datatype in ("FP32", "FP64"):
            if not isinstance(value, int | float):
                return InvalidInputError(where, f"{_type(value)}, expected a number ({datatype})")
        elif datatype == "BOOL":
            if not isinstance(value, bool):
                return InvalidInputError(where, f"{_type(value)}, expected true or false (BOOL)")
        elif not isinstance(value, int) or isinstance(value, bool):
            return InvalidInputError(where, f"{_type(value)}, expected an integer ({datatype})")
        elif not (info := np.iinfo(datatype.lower())).min <= value <= info.max:
            return InvalidInputError(where, f"{value} does not fit {datatype}; expected "
                                     f"{info.min}..{info.max}")
    return InvalidInputError(field, f"cannot be read as {datatype} elements")


def _elements(data: Any, datatype: str, field: str) -> Any:
    """A tensor's JSON ``data`` as its elements: an array of numbers, or the bytes of base64
    strings (BYTES: an encoded picture is not text). A datatype the protocol's contents cannot
    carry (FP16, say) is left empty: server.pixels refuses the datatype itself."""
    if datatype not in _DATATYPES:
        return []
    values: list[Any] = expect(data, list, field, "an array of the tensor's elements")
    if datatype == "BYTES":
        return [_base64(value, f"{field}[{k}]") for k, value in enumerate(_flatten(values))]
    try:
        array = np.asarray(values)
        flat = values if array.ndim == 1 else _flatten(values)
    except ValueError:  # arrays nested unevenly
        array = np.asarray(flat := _flatten(values))
    kind = array.dtype.kind
    if not array.size:
        fits = True
    elif datatype in _INTEGERS:
        info = np.iinfo(datatype.lower())
        fits = kind in "iu" and bool not in set(map(type, flat)) and (
            info.min <= array.min() and array.max() <= info.max)
    else:
        fits = kind in ("b" if datatype == "BOOL" else "iufb")
    if not fits:
        raise _bad_element(flat, datatype, field)
    with np.errstate(over="ignore"):  # as protobuf's float: beyond float32, infinite
        return array.ravel().astype(np.float32) if datatype == "FP32" else array.ravel()


def _base64(value: Any, field: str) -> bytes:
    if not isinstance(value, str):
        raise InvalidInputError(field, f"{_type(value)}, expected a base64 string (BYTES)")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInputError(field, "not base64; in JSON a BYTES element is the base64 of its "
                                "bytes (or send them with the binary data extension)") from None


def _parameters(value: Any, field: str, skip: str) -> dict[str, Any]:
    """A JSON parameters object (but for ``skip``), each a boolean, a number (integers of 64
    bits) or a string, as the protocol's InferParameter holds."""
    parameters = _object(value, field)
    for key, item in parameters.items():
        where = f"{field}[{key!r}]"
        if key == skip or isinstance(item, bool | float | str):
            continue
        if not isinstance(item, int):
            raise InvalidInputError(where, f"{_type(item)}, expected a boolean, number or string")
        if not -(2**63) <= item < 2**63:
            raise InvalidInputError(where, f"{item} does not fit a 64-bit integer")
    return {k: v for k, v in parameters.items() if k != skip}


@dataclass(frozen=True)
class ValueLimit:
    """The most values an inference request's JSON may hold: the pixels of ``images`` images of
    ``size`` elements each (the model's input, --max-images-per-request) and VALUE_SLACK more.
    Parsing costs time and memory per value, on the event loop (orjson holds the GIL even on a
    thread), and a few kilobytes of gzip can inflate to millions of values: they are counted first
    (commas, at memory speed: each value but the first of an array or object follows one)."""

    images: int
    size: int

    def check(self, body: bytes) -> None:
        most = self.images * self.size + VALUE_SLACK
        commas = body.count(b",")
        if commas >= most:
            raise InvalidInputError(
                "request body", f"up to {commas + 1:,} JSON values ({commas:,} commas), more "
                f"than the {most:,} that {self.images} images of {self.size} elements "
                "(--max-images-per-request) need; send fewer images per request, or pixels as the "
                "binary data extension")


@dataclass
class InferCall:
    """An inference request read from HTTP, and the outputs to send as binary data."""

    request: InferRequest
    binary: set[str]


def _document(body: bytes) -> dict[str, Any]:
    try:
        document = orjson.loads(body)  # faster than json.loads on arrays of numbers
    except orjson.JSONDecodeError as exc:
        if "UTF-8" in exc.msg:
            raise InvalidInputError("request body", "not UTF-8 text; expected an inference request "
                                    "in JSON") from None
        raise InvalidInputError(
            "request body", f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
            'expected an inference request such as {"inputs": [{"name": "images", "shape": [1, 784], '
            '"datatype": "FP32", "data": [...]}]}') from None
    return _object(document, "request body")


def _input(item: Any, i: int, single: bool, binary: bytes, offset: int) -> tuple[InferInput, int]:
    """Input ``i`` (its elements read only when it is the ``single`` one: more are refused) and
    the offset in ``binary`` after its binary data."""
    field = f"inputs[{i}]"
    tensor = _object(item, field)
    name = expect(tensor.get("name"), str, f"{field}.name", "a string")
    datatype = expect(tensor.get("datatype"), str, f"{field}.datatype", "a string such as 'FP32'")
    shape = expect(tensor.get("shape"), list, f"{field}.shape", "an array of integers")
    if not all(type(d) is int and -(2**63) <= d < 2**63 for d in shape):
        raise InvalidInputError(f"{field}.shape", f"{json.dumps(shape)[:80]} is not an array of "
                                "64-bit integers")
    parameters = _parameters(tensor.get("parameters", {}), f"{field}.parameters", "binary_data_size")
    size = tensor.get("parameters", {}).get("binary_data_size")
    where = Where(field, f"{field}.shape", f"{field}.data", f"{field}.data[{{k}}]")
    if size is not None:
        expect(size, int, f"{field}.parameters['binary_data_size']", "a number of bytes")
        if "data" in tensor:
            raise InvalidInputError(f"{field}.data", "set together with binary_data_size; expected "
                                    "one or the other")
        if size < 0 or offset + size > len(binary):
            raise InvalidInputError(f"{field}.parameters['binary_data_size']", f"{size} bytes from "
                                    f"byte {offset} of the binary data, which holds {len(binary)}")
        where = Where(field, f"{field}.shape", f"{field}.binary_data", f"{field}.binary_data[{{k}}]")
        return InferInput(name, datatype, shape, binary[offset:offset + size], where, raw=True,
                          parameters=parameters), offset + size
    if "data" not in tensor:
        raise InvalidInputError(f"{field}.data", "missing; expected the tensor's elements (or "
                                "parameters.binary_data_size with the binary data extension)")
    data = _elements(tensor["data"], datatype, f"{field}.data") if single else []
    return InferInput(name, datatype, shape, data, where, parameters=parameters), offset


def read_infer(body: bytes, header_length: str | None, name: str,
               limit: ValueLimit | None = None) -> InferCall:
    """Reads an inference request body (JSON; with ``header_length``, the binary-data extension:
    that many bytes of JSON, then the binary tensors); InvalidInputError names what is wrong.
    With ``limit``, JSON that holds more values than it allows is refused before it is parsed."""
    binary = b""
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            length = -1
        if not 0 <= length <= len(body):
            raise InvalidInputError(
                HEADER_LENGTH, f"{header_length[:40]!r} is not a length within the body's "
                f"{len(body)} bytes; expected the JSON header's length in bytes")
        body, binary = body[:length], body[length:]
    if limit is not None:
        limit.check(body)
    top = _document(body)
    request = InferRequest(name, [])
    if "id" in top:
        request.id = expect(top["id"], str, "id", "a string")
    binary_output = False
    if "parameters" in top:
        parameters = request.parameters = _object(top["parameters"], "parameters")
        if "binary_data_output" in parameters:
            binary_output = expect(parameters["binary_data_output"], bool,
                                   "parameters['binary_data_output']", "true or false")
    inputs = expect(top.get("inputs"), list, "inputs", "an array of input tensors")
    offset = 0
    for i, item in enumerate(inputs):
        tensor, offset = _input(item, i, len(inputs) == 1, binary, offset)
        request.inputs.append(tensor)
    if offset != len(binary):
        raise InvalidInputError(
            "request body", f"{len(binary) - offset} bytes of binary data after the inputs' "
            f"binary_data_size ({offset} bytes)")
    names: set[str] = set()
    if "outputs" in top:
        outputs = expect(top["outputs"], list, "outputs", "an array of requested outputs")
        request.outputs = requested = []
        for i, item in enumerate(outputs):
            field = f"outputs[{i}]"
            output = _object(item, field)
            output_name = expect(output.get("name"), str, f"{field}.name", "a string")
            parameters = _parameters(output.get("parameters", {}), f"{field}.parameters",
                                     "binary_data")
            requested.append(RequestedOutput(output_name, parameters))
            wanted = output.get("parameters", {}).get("binary_data", binary_output)
            if expect(wanted, bool, f"{field}.parameters['binary_data']", "true or false"):
                names.add(output_name)
    elif binary_output:
        names = set(OUTPUTS)
    return InferCall(request, names)


def infer_body(response: InferResponse, binary: set[str]) -> tuple[bytes, int | None]:
    """The inference response's body: JSON, with the outputs named in ``binary`` as binary data
    after it (the extension's framing; then also the JSON header's length)."""
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for output in response.tensors():
        entry: dict[str, Any] = {"name": output.name, "datatype": output.datatype,
                                 "shape": output.shape}
        if output.name in binary:
            chunks.append(output.raw())
            entry["parameters"] = {"binary_data_size": len(chunks[-1])}
        elif output.datatype == "BYTES":
            entry["data"] = [label.decode() for label in output.data]
        else:
            entry["data"] = output.data.ravel()  # orjson writes numpy arrays itself
        outputs.append(entry)
    answer: dict[str, Any] = {"model_name": response.model.spec.name,
                              "model_version": str(response.model.spec.version)}
    if response.id:
        answer["id"] = response.id
    answer["outputs"] = outputs
    header = orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header + b"\n", None
    return header + b"".join(chunks), len(header)
