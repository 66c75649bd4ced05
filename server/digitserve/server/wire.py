"""Predict's messages read and written by numpy: the request's pixels taken straight from its bytes,
and the response serialized in a dozen array operations instead of a Python loop adding one
Prediction per image (2 µs each: 150 µs for 64).

Protobuf's wire format (https://protobuf.dev/programming-guides/encoding/) lets a message be the
concatenation of its fields. When every label has the same length, each Prediction is a record of
fixed size, so all of them are one (N, size) byte array filled column by column:

    0A len                    predictions (field 1, length-delimited), one per image
      0A 4K <K float32>       probabilities (field 1, packed)
      10 <class>              class_index (field 2, varint; written even when 0, as proto3 allows)
      1A L <label>            label (field 3)
      25 <float32>            probability (field 4, fixed32)

followed by model_name (field 2) and model_version (field 3). ``tests/server/test_wire.py`` checks that
protobuf parses it back into the message ``encode_predictions_protobuf`` builds.

A request is read the same way round: when its images all carry one packed encoding of one length,
each is a record of fixed size,

    0A len                    images (field 1), one per image
      12|1A L <L bytes>       uint8 (field 2) or float32 (field 3), the Image's only field

so their pixels are columns of one (N, size) view of the request's bytes (``parse_predict_request``)
where protobuf would build N Image objects and the server copy each one's bytes out of them and
join them; server.v1codec hands those rows to server.pixels, which decodes and checks them.
Anything else is parsed by protobuf: repeated floats, mixed encodings, and pictures (``encoded``,
tag 0x22), which are decoded on the picture threads anyway.

It pays at every size. ``python -m bench.wire_cost --measure [--part request]`` counts, under
valgrind, the instructions of a Predict's request read into float32 pixels and its answer written,
by protobuf alone and as served. Reading only: 1 image 54,327 by protobuf, 80,540 by this module;
64 images 364,786 and 146,845. Reading alone favours protobuf at 1 image, but the server's whole
path does not: protobuf's Image objects are then read into one input by server.v1codec, and
``python -m bench.call_cost server`` (CPU per 1-image call, 1 in flight, three alternating runs)
gave 116.9/124.8/107.6 µs with requests below 8 images left to protobuf against 96.6/97.4/97.1 µs
with every uniformly packed request read here (FEWEST_PACKED 1). Reading and writing as served:
1 image 103,582 and 81,776 instructions per call (0.79×), 64 images 1,283,629 and 205,422 (0.16×).
``tests/server/test_wire.py`` checks it against protobuf
with hypothesis: any request, whole or damaged, reads as protobuf reads it or fails as protobuf
fails (DecodeError), and every answer parses into the message protobuf builds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from digitserve.server.protowire import length_delimited as _length_delimited
from digitserve.server.protowire import varint as _varint
from digitserve.v1 import digit_service_pb2 as pb

# An Image's packed encodings (its bytes fields) and the numpy type of their bytes.
PACKED: dict[str, np.dtype[Any]] = {"float32": np.dtype("<f4"), "uint8": np.dtype(np.uint8)}
# Image's packed encodings (server.pixels decodes them) by their tag byte (field number << 3 | 2,
# length-delimited): 0x12 uint8, 0x1A float32.
_PACKED_TAGS = {(pb.Image.DESCRIPTOR.fields_by_name[name].number << 3) | 2: name for name in PACKED}
_IMAGES_TAG = (1 << 3) | 2  # PredictRequest.images
# The fewest images read as packed rows: every request (protobuf reads a 1-image request in fewer
# instructions, but the server's whole 1-image path is ~17 % cheaper from packed rows: see above).
FEWEST_PACKED = 1


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it; ValueError past the end or over 10 bytes."""
    value = shift = 0
    for end in range(pos, min(pos + 10, len(data))):
        byte = data[end]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, end + 1
        shift += 7
    raise ValueError("truncated varint")


@dataclass(frozen=True, slots=True)
class PackedPredictRequest:
    """A PredictRequest whose images all set one packed encoding with the same number of bytes,
    read without protobuf: ``rows[i]`` is image i's pixel bytes, a view into ``data``."""

    data: bytes
    encoding: str  # "uint8" or "float32"
    rows: npt.NDArray[np.uint8]  # (N, bytes per image)
    model_version: int
    model_name: str = ""
    version_label: str = ""

    def message(self) -> pb.PredictRequest:
        """The request as protobuf parses it (the same fields)."""
        message: pb.PredictRequest = pb.PredictRequest.FromString(self.data)
        return message


def parse_predict_request(data: bytes) -> PackedPredictRequest | pb.PredictRequest:
    """``data`` as a PackedPredictRequest when it holds FEWEST_PACKED or more images uniformly
    packed (what every client of this project sends), else as protobuf parses it. Raises
    protobuf's DecodeError for bytes that are not a PredictRequest, as ``PredictRequest.FromString``
    would."""
    packed = _packed(data)
    if packed is not None:
        return packed
    message: pb.PredictRequest = pb.PredictRequest.FromString(data)
    return message


def _packed(data: bytes) -> PackedPredictRequest | None:
    if len(data) < 3 or data[0] != _IMAGES_TAG:
        return None
    try:
        size, body = _read_varint(data, 1)  # the first Image
        encoding = _PACKED_TAGS.get(data[body]) if body < len(data) else None
        if encoding is None:
            return None
        length, start = _read_varint(data, body + 1)
    except ValueError:
        return None
    record = start + length
    if length == 0 or record != body + size or record > len(data):
        return None  # another field in the Image, or no pixels: protobuf's parse names it
    # Records after the first are images of the same encoding and length exactly when their
    # header bytes equal the first one's; the run ends at the first record that differs.
    count = len(data) // record
    if count < FEWEST_PACKED:
        return None
    rows = np.frombuffer(data, np.uint8, count=count * record).reshape(count, record)
    if count > 1:
        differ = np.flatnonzero((rows[1:, :start] != rows[0, :start]).any(axis=1))
        if differ.size:
            count = int(differ[0]) + 1
            rows = rows[:count]
    if count * record == len(data):
        return PackedPredictRequest(data, encoding, rows[:, start:], 0)
    # The other fields (version, model name, label): a message of their own records.
    rest = pb.PredictRequest.FromString(data[count * record :])
    if len(rest.images):  # images of another encoding or length follow
        return None
    return PackedPredictRequest(data, encoding, rows[:, start:], rest.model_version,
                                rest.model_name, rest.version_label)


def encode_predictions_protobuf(
    name: str, version: int, labels: Sequence[str], probabilities: npt.NDArray[np.float32]
) -> pb.PredictResponse:
    """The response built by protobuf, one Prediction per row: the reference, and the path for
    labels of different lengths."""
    indices = np.argmax(probabilities, axis=1)
    top = probabilities[np.arange(probabilities.shape[0]), indices]
    response = pb.PredictResponse(model_name=name, model_version=version)
    for row, index, p in zip(probabilities.tolist(), indices.tolist(), top.tolist(), strict=True):
        response.predictions.add(probabilities=row, class_index=index, label=labels[index], probability=p)
    return response


class PredictionEncoder:
    """Serializes PredictResponses of one model (name, version, labels) with numpy, or with
    protobuf when the records would not have a fixed size (labels of different lengths, too many
    classes for one-byte lengths)."""

    def __init__(self, name: str, version: int, labels: Sequence[str]) -> None:
        self.name = name
        self.version = version
        self.labels = tuple(labels)
        encoded = [label.encode("utf-8") for label in self.labels]
        k = len(self.labels)
        label_size = len(encoded[0]) if encoded else 0
        record = 2 + 4 * k + 2 + 2 + label_size + 5  # the Prediction's bytes
        self._fixed = (
            k > 0 and all(len(e) == label_size for e in encoded) and record < 128 and k < 128
        )
        self._trailer = (_length_delimited(2, name.encode("utf-8")) if name else b"") + (
            bytes([3 << 3]) + _varint(version if version >= 0 else version + (1 << 64))
            if version else b""
        )
        if not self._fixed:
            return
        self._k = k
        self._record = record
        self._label_table = np.frombuffer(b"".join(encoded), np.uint8).reshape(k, label_size)
        # Columns of a record, after its 2-byte header (0A, record).
        self._probs_at = 4
        self._class_at = 4 + 4 * k
        self._label_at = self._class_at + 4
        self._top_at = self._label_at + label_size + 1
        template = np.zeros(record + 2, np.uint8)
        template[[0, 1, 2, 3]] = [0x0A, record, 0x0A, 4 * k]
        template[self._class_at] = 0x10
        template[self._class_at + 2 : self._class_at + 4] = [0x1A, label_size]
        template[self._top_at - 1] = 0x25
        self._template = template
        # One image: the same record joined from bytes (a dozen numpy calls cost more than it).
        self._head = template[:4].tobytes()
        middles = [template[self._class_at : self._top_at].copy() for _ in range(k)]
        for c, middle in enumerate(middles):
            middle[1] = c
            middle[4 : 4 + label_size] = self._label_table[c]
        self._middle_bytes = [m.tobytes() for m in middles]

    def encode(self, probabilities: npt.NDArray[np.float32]) -> bytes:
        """The serialized PredictResponse for ``probabilities`` (rows = images)."""
        if not self._fixed or probabilities.ndim != 2 or probabilities.shape[1] != self._k:
            data: bytes = encode_predictions_protobuf(
                self.name, self.version, self.labels, probabilities).SerializeToString()
            return data
        n = probabilities.shape[0]
        little = probabilities.astype("<f4", copy=False)
        if n == 1:
            row = little[0]
            c = int(row.argmax())
            return b"".join((self._head, row.tobytes(), self._middle_bytes[c],
                             row[c : c + 1].tobytes(), self._trailer))
        indices = np.argmax(little, axis=1)
        top = little[np.arange(n), indices]
        out = np.empty((n, self._template.shape[0]), np.uint8)
        out[:] = self._template
        out[:, self._probs_at : self._class_at] = np.ascontiguousarray(little).view(np.uint8)
        out[:, self._class_at + 1] = indices
        out[:, self._label_at : self._top_at - 1] = self._label_table[indices]
        out[:, self._top_at :] = top.reshape(n, 1).view(np.uint8)
        return out.tobytes() + self._trailer

