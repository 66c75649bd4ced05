"""The transport-neutral inference request and response (after MLServer's ``types.InferenceRequest``
and KServe's ``InferRequest``): what each edge's converter (server.v1codec, server.oipcodec,
server.restcodec) reads its caller's message into, and what server.infer takes and returns.

An input records where it came from (``Where``), so that every error names the field as that edge's
caller wrote it (``inputs[0].data[3]`` in JSON, ``inputs[0].contents.fp32_contents[3]`` over V2
gRPC, ``images[0].float32[3]`` over digitserve.v1) from one InvalidInputError, built once."""

from __future__ import annotations

import functools
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from digitserve.inference import Model
from digitserve.server.errors import InvalidInputError
from digitserve.server.statistics import VersionStatistics

INPUT_NAME = "images"
# The input's datatype as the metadata and the model configuration declare it: bytes 0..255, MNIST's
# own pixels, so that every value a tool generates for it (perf_analyzer's random data) is an image.
# FP32 in [0, 1] and pictures (BYTES) are accepted too (server.pixels).
INPUT_DATATYPE = "UINT8"
# Output name -> datatype; all three are returned when the request names none.
OUTPUTS = {"probabilities": "FP32", "class_index": "INT64", "label": "BYTES"}


_LENGTH = struct.Struct("<I")  # a BYTES element's length in the V2 protocol's raw bytes


@functools.lru_cache(maxsize=64)
def _encoded_labels(labels: tuple[str, ...]) -> tuple[bytes, ...]:
    """A model's labels as UTF-8 (kept per label set: a few models)."""
    return tuple(label.encode() for label in labels)


def _raw_element(item: bytes) -> bytes:
    """One BYTES element as the V2 protocol's raw bytes: its 4-byte length, then the bytes."""
    return _LENGTH.pack(len(item)) + item


@functools.lru_cache(maxsize=64)
def _raw_labels(labels: tuple[str, ...]) -> tuple[bytes, ...]:
    """A model's labels as raw BYTES elements (kept per label set)."""
    return tuple(_raw_element(label) for label in _encoded_labels(labels))


def _raw_numbers(data: npt.NDArray[Any], datatype: str) -> bytes:
    """An FP32 or INT64 output's elements as the V2 protocol's raw (little-endian) bytes."""
    return data.astype("<f4" if datatype == "FP32" else "<i8", copy=False).tobytes()


@dataclass(frozen=True, slots=True)
class Where:
    """How the caller's message names one input: ``tensor`` the input itself (``inputs[0]``,
    ``images``), ``count`` the field that sets its number of images (``inputs[0].shape``),
    ``data`` its elements as a whole (``raw_input_contents[0]``) and ``element`` one element, a
    format of its flat index ``k``, row ``i``, column ``j`` and row i's entry of ``rows`` as ``e``
    (``images[{i}].{e}[{j}]``: digitserve.v1 names each image's encoding)."""

    tensor: str
    count: str
    data: str
    element: str
    rows: Sequence[str] = ()

    def at(self, k: int, width: int = 1) -> str:
        """The name of flat element ``k`` of rows ``width`` elements wide."""
        i, j = divmod(k, max(width, 1))
        return self.element.format(k=k, i=i, j=j, e=self.rows[i] if self.rows else "")


@dataclass(slots=True)
class InferInput:
    """One input tensor. ``data``: the elements as values (a sequence or array: typed contents,
    JSON data), as little-endian bytes (``raw``: raw_input_contents, binary data, packed rows; for
    BYTES each element a 4-byte length, then its bytes), or for BYTES a list of the elements.
    ``pictures``: rows given as PNG or JPEG bytes (row, its field, the bytes), decoded into ``data``
    (digitserve.v1 mixes them with pixels). ``fault``: what the converter found wrong in how the
    elements were sent, raised when they are read (after the checks of name, datatype and shape;
    with ``fault_row``, when the pictures before that row are decoded)."""

    name: str
    datatype: str
    shape: list[int]
    data: Any
    where: Where
    raw: bool = False
    parameters: Mapping[str, Any] = field(default_factory=dict)
    pictures: Sequence[tuple[int, str, bytes]] = ()
    fault: InvalidInputError | None = None
    fault_row: int = -1


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    """An output the caller asks for by name, with its parameters (refused ones are named)."""

    name: str
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class InferRequest:
    """An inference request: the model (``version`` 0 and no ``label``: the default version),
    its inputs, the outputs asked for (none: all of OUTPUTS) and the caller's request id."""

    model_name: str
    inputs: list[InferInput]
    version: int = 0
    label: str = ""
    id: str = ""
    outputs: Sequence[RequestedOutput] = ()
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class OutputTensor:
    """One output: name, datatype, shape and its elements (an array, or a list of bytes)."""

    name: str
    datatype: str
    shape: list[int]
    data: Any

    def raw(self) -> bytes:
        """The elements as the V2 protocol's raw bytes: little-endian; BYTES each a 4-byte
        length, then the bytes."""
        if isinstance(self.data, np.ndarray):
            return _raw_numbers(self.data, self.datatype)
        return b"".join(_raw_element(item) for item in self.data)


@dataclass(slots=True)
class InferResponse:
    """The answer: the model version that computed it, its probabilities (rows = images), the
    outputs asked for in order (``tensors`` builds them) and the request id."""

    model: Model
    probabilities: npt.NDArray[np.float32]
    outputs: Sequence[str] = tuple(OUTPUTS)
    id: str = ""
    # Where the call is counted (server.statistics), when it began, its answer's computation
    # ended (time.perf_counter_ns) and the nanoseconds its input took.
    statistics: VersionStatistics | None = None
    started_ns: int = 0
    predicted_ns: int = 0
    input_ns: int = 0

    def answered(self) -> None:
        """The edge built the answer: the call counts as answered in its version's statistics."""
        if self.statistics is not None:
            self.statistics.answered(self.probabilities.shape[0], self.started_ns,
                                     self.predicted_ns, self.input_ns)

    def raw_outputs(self) -> list[tuple[str, str, tuple[int, ...], bytes]]:
        """``tensors()`` as (name, datatype, shape, raw bytes) each, written without building the
        tensors (ModelInfer's raw answer): 947,944 instructions per 1-image ModelInfer against
        984,394 through ``tensors()`` (``python -m bench.instructions --edge v2-grpc --shape 1x64``
        on this change and a5fbfb5). tests/server/test_wire.py checks the answer byte for byte
        against the message ``oipcodec.to_response`` builds from ``tensors()``."""
        count, classes = self.probabilities.shape
        indices = self.probabilities.argmax(axis=1)
        outputs: list[tuple[str, str, tuple[int, ...], bytes]] = []
        for name in self.outputs:
            if name == "probabilities":
                outputs.append((name, "FP32", (count, classes), _raw_numbers(self.probabilities, "FP32")))
            elif name == "class_index":
                outputs.append((name, "INT64", (count,), _raw_numbers(indices, "INT64")))
            else:
                labels = _raw_labels(self.model.spec.labels)
                outputs.append((name, "BYTES", (count,), b"".join([labels[i] for i in indices.tolist()])))
        return outputs

    def tensors(self) -> list[OutputTensor]:
        """The outputs asked for: probabilities (FP32 [N, classes]), class_index (INT64 [N]) and
        label (BYTES [N], UTF-8)."""
        count, classes = self.probabilities.shape
        indices = self.probabilities.argmax(axis=1).astype(np.int64, copy=False)
        tensors = []
        for name in self.outputs:
            if name == "probabilities":
                tensors.append(OutputTensor(name, "FP32", [count, classes], self.probabilities))
            elif name == "class_index":
                tensors.append(OutputTensor(name, "INT64", [count], indices))
            else:
                encoded = _encoded_labels(self.model.spec.labels)
                labels = [encoded[i] for i in indices.tolist()]
                tensors.append(OutputTensor(name, "BYTES", [count], labels))
        return tensors
