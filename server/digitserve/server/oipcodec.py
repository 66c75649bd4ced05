"""The converter of the V2 protocol's gRPC binding (inference.GRPCInferenceService): a
ModelInferRequest into the neutral request of server.infertypes, each input naming its fields as
the message does (``inputs[0].contents.fp32_contents[3]``, ``raw_input_contents[0].element[3]``),
and the neutral answer and metadata back into the protocol's messages."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Literal, overload

import numpy as np
from google.protobuf import json_format

from digitserve.oip import grpc_predict_v2_pb2 as oip
from digitserve.server.decoding import PictureDecoder
from digitserve.server.errors import InvalidInputError
from digitserve.server.infer import infer, resolve
from digitserve.server.infertypes import InferInput, InferRequest, InferResponse, RequestedOutput, Where
from digitserve.server.protowire import length_delimited, varint
from digitserve.server.registry import Registry

# A datatype's typed contents field.
_CONTENTS = {"FP32": "fp32_contents", "UINT8": "uint_contents", "INT64": "int64_contents",
             "BYTES": "bytes_contents"}


@functools.lru_cache(maxsize=256)
def _where(i: int, contents: str) -> Where:
    """How input ``i`` is named, its elements raw (``contents`` "") or in a typed contents field
    (kept: the same few per server; formatting them was the largest own time of reading a request
    in cProfile, but the saving is within callgrind's noise: 1,023,924 instructions per 1-image
    ModelInfer on 461f425 against 1,007,322 before it, runs differing by up to 3 %)."""
    field = f"inputs[{i}]"
    if not contents:
        return Where(field, f"{field}.shape", f"raw_input_contents[{i}]",
                     f"raw_input_contents[{i}].element[{{k}}]")
    return Where(field, f"{field}.shape", f"{field}.contents.{contents}",
                 f"{field}.contents.{contents}[{{k}}]")


def _input(message: oip.ModelInferRequest, i: int) -> InferInput:
    """Input ``i``: its raw_input_contents entry when the message sends its inputs raw (a fault
    when those do not pair with the inputs), else its typed contents."""
    tensor, raw = message.inputs[i], message.raw_input_contents
    fault = None
    if raw:
        if len(raw) != len(message.inputs):
            fault = InvalidInputError("raw_input_contents", f"got {len(raw)} entries for "
                                      f"{len(message.inputs)} inputs; expected one per input")
        elif tensor.HasField("contents"):
            fault = InvalidInputError(f"inputs[{i}].contents", "set together with raw_input_contents; "
                                      "expected one or the other")
        data: Any = raw[i] if i < len(raw) else b""
        where = _where(i, "")
    else:
        name = _CONTENTS.get(tensor.datatype, "fp32_contents")
        data = getattr(tensor.contents, name)
        where = _where(i, name)
    return InferInput(tensor.name, tensor.datatype, list(tensor.shape), data, where, raw=bool(raw),
                      parameters=tensor.parameters, fault=fault)


def to_request(message: oip.ModelInferRequest) -> InferRequest:
    inputs = message.inputs
    return InferRequest(
        message.model_name, [_input(message, 0)] if len(inputs) == 1 else
        [_input(message, i) for i in range(len(inputs))],
        id=message.id, parameters=message.parameters,
        outputs=[RequestedOutput(o.name, o.parameters) for o in message.outputs]
        if message.outputs else ())


def to_response(response: InferResponse, raw: bool) -> oip.ModelInferResponse:
    """The answer; its outputs' elements in raw_output_contents when the inputs came raw."""
    message = oip.ModelInferResponse(model_name=response.model.spec.name, id=response.id,
                                     model_version=str(response.model.spec.version))
    for output in response.tensors():
        tensor = message.outputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
        if raw:
            message.raw_output_contents.append(output.raw())
        elif isinstance(output.data, np.ndarray):
            getattr(tensor.contents, _CONTENTS[output.datatype]).extend(output.data.ravel().tolist())
        else:
            tensor.contents.bytes_contents.extend(output.data)
    return message


_RAW_TAG = bytes([6 << 3 | 2])  # ModelInferResponse.raw_output_contents


@functools.lru_cache(maxsize=256)
def _infer_head(model_name: str, model_version: str) -> bytes:
    """ModelInferResponse's fields 1 and 2 (model_name, model_version), omitted when empty."""
    return b"".join(length_delimited(field, value.encode())
                    for field, value in ((1, model_name), (2, model_version)) if value)


@functools.lru_cache(maxsize=1024)
def _output_tensor(name: str, datatype: str, shape: tuple[int, ...]) -> bytes:
    """One ModelInferResponse.outputs entry (field 5): name, datatype and the packed shape."""
    body = b"".join(length_delimited(field, value.encode())
                    for field, value in ((1, name), (2, datatype)) if value)
    if shape:
        body += length_delimited(3, b"".join(varint(d) for d in shape))
    return length_delimited(5, body)


def encode_infer_response(model_name: str, model_version: str, request_id: str,
                          outputs: Sequence[tuple[str, str, tuple[int, ...], bytes]]) -> bytes:
    """The V2 protocol's ModelInferResponse answering with ``raw_output_contents``, serialized as
    protobuf serializes it (fields in number order; each output's name, datatype and shape, then
    its raw bytes): the model's name and version and each output's header are written once per
    shape and kept, so a 1-image answer costs a join, where building the message costs a dozen
    protobuf calls: a 1-image ModelInfer took 1,007,322 instructions against 1,054,724 (``python -m
    bench.instructions --edge v2-grpc --shape 1x64`` on 65fb275 and 7c4895a). Shapes are counts
    (non-negative). ``tests/server/test_wire.py`` checks it is the bytes of the message
    ``to_response`` builds, byte for byte."""
    parts = [_infer_head(model_name, model_version)]
    if request_id:
        parts.append(length_delimited(3, request_id.encode()))
    parts.extend(_output_tensor(name, datatype, shape) for name, datatype, shape, _ in outputs)
    for *_, raw in outputs:
        parts.append(_RAW_TAG + varint(len(raw)))
        parts.append(raw)
    return b"".join(parts)


def to_response_bytes(response: InferResponse) -> bytes:
    """``to_response(response, raw=True)`` serialized, written by ``encode_infer_response``
    without building the message (ModelInfer's answer when its inputs came raw)."""
    spec = response.model.spec
    return encode_infer_response(spec.name, str(spec.version), response.id, response.raw_outputs())


def metadata(value: dict[str, Any]) -> oip.ModelMetadataResponse:
    tensor = oip.ModelMetadataResponse.TensorMetadata
    return oip.ModelMetadataResponse(
        name=value["name"], versions=value["versions"], platform=value["platform"],
        inputs=[tensor(**t) for t in value["inputs"]], outputs=[tensor(**t) for t in value["outputs"]])


def model_config(value: dict[str, Any]) -> oip.ModelConfigResponse:
    """server.tritonconfig's configuration (Triton's JSON shape) as the protobuf ModelConfig; a key
    the message lacks is a bug, raised (ParseError)."""
    response = oip.ModelConfigResponse()
    json_format.ParseDict(value, response.config)
    return response


def statistics(value: dict[str, Any]) -> oip.ModelStatisticsResponse:
    """Triton's statistics (server.statistics' JSON) as the protocol's message."""
    message = oip.ModelStatisticsResponse()
    json_format.ParseDict(value, message)
    return message


def repository_index(entries: list[dict[str, Any]]) -> oip.RepositoryIndexResponse:
    """The repository index (server.modelcontrol's entries) as Triton's message, whose ModelIndex
    has no field for the version labels: they are on the HTTP edge's entries only."""
    index = oip.RepositoryIndexResponse.ModelIndex
    return oip.RepositoryIndexResponse(models=[
        index(name=e["name"], version=e.get("version", ""), state=e["state"], reason=e["reason"])
        for e in entries])


@overload
async def model_infer(router: Registry, pictures: PictureDecoder, message: oip.ModelInferRequest,
                      until: float | None, serialized: Literal[False] = False
                      ) -> oip.ModelInferResponse: ...


@overload
async def model_infer(router: Registry, pictures: PictureDecoder, message: oip.ModelInferRequest,
                      until: float | None, serialized: bool) -> oip.ModelInferResponse | bytes: ...


async def model_infer(router: Registry, pictures: PictureDecoder, message: oip.ModelInferRequest,
                      until: float | None, serialized: bool = False) -> oip.ModelInferResponse | bytes:
    """The request answered, its outputs raw when its inputs came raw, and counted as answered
    once the answer is built. ``serialized`` (a unary call, whose answer grpc serializes): a raw
    answer as its bytes (``to_response_bytes``)."""
    plane, model = resolve(router, message.model_name, message.model_version, "model_version",
                           split=True)
    response = await infer(plane, model, to_request(message), pictures, until)
    raw = len(message.raw_input_contents) > 0
    answer = to_response_bytes(response) if raw and serialized else to_response(response, raw)
    response.answered()
    return answer
