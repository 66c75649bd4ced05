"""The pixel codec of both gRPC edges: every way images arrive — ``digitserve.v1`` Images (repeated
floats, uint8 bytes, float32 bytes; parsed by protobuf or read as packed rows by digitserve.server.wire) and
the V2 protocol's FP32/UINT8 input tensors of shape [N, size] or [N, *input_shape] (typed contents
or raw bytes) — decoded into float32 (N, input_size) pixels in [0, 1] and validated here, so that
both protocols refuse the same faults with one message naming the field and the element.

Pictures (``Image.encoded``, a V2 ``BYTES`` tensor: PNG or JPEG bytes) are preprocessed by
``digitserve.pictures``, the code ``mnist-client`` runs too, within the limits of PictureLimits,
on the threads of a ``server.decoding.PictureDecoder``, never the event loop (one picture costs
milliseconds).

Pixels sent as bytes are ``uint8 / 255`` through ``digitserve.idx.scale_pixels``, the trainer's
division, so results match bit for bit."""

from __future__ import annotations

import struct
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from digitserve import pictures
from digitserve.idx import scale_pixels
from digitserve.oip import grpc_predict_v2_pb2 as oip
from digitserve.server.decoding import PictureLimits
from digitserve.server.errors import DeadlineExpiredError, InvalidInputError
from digitserve.v1 import digit_service_pb2 as pb

# An Image's packed encodings (its bytes fields) and the numpy type of their bytes.
PACKED: dict[str, np.dtype[Any]] = {"float32": np.dtype("<f4"), "uint8": np.dtype(np.uint8)}
# The V2 protocol's input datatypes accepted, and the numpy type of their raw bytes.
V2_DATATYPES: dict[str, np.dtype[Any]] = {"FP32": np.dtype("<f4"), "UINT8": np.dtype(np.uint8)}
V2_PICTURES = "BYTES"  # a tensor of shape [N] (or [N, 1]) whose elements are PNG or JPEG pictures


# Pictures -----------------------------------------------------------------------------------


def check_picture_sizes(items: Sequence[tuple[str, bytes]], limits: PictureLimits,
                        field: str) -> None:
    """InvalidInputError naming ``field`` for more than ``limits.max_pictures`` pictures, the
    first picture (``items``: its field and bytes) over ``limits.max_bytes``, or ``field`` when
    together they exceed ``limits.max_request_bytes``."""
    if len(items) > limits.max_pictures:
        raise InvalidInputError(
            field, f"{len(items)} pictures exceed the limit of {limits.max_pictures} per request")
    total = 0
    for where, data in items:
        if len(data) > limits.max_bytes:
            raise InvalidInputError(
                where, f"{len(data)} bytes exceed the limit of {limits.max_bytes} bytes per picture")
        total += len(data)
    if total > limits.max_request_bytes:
        raise InvalidInputError(
            field, f"{len(items)} pictures of {total} bytes exceed the limit of "
            f"{limits.max_request_bytes} bytes of pictures per request")


def picture_pixels(data: bytes, where: str, input_shape: Sequence[int], limits: PictureLimits,
                   deadline: float | None = None) -> npt.NDArray[np.float32]:
    """One picture preprocessed into a model's float32 pixels in [0, 1] (``digitserve.pictures``,
    then the bytes' scale); InvalidInputError at ``where`` when it is not a PNG or JPEG picture of a
    digit within the limits, or the model does not take pictures; DeadlineExpiredError when the
    call's ``deadline`` passed before it was decoded."""
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExpiredError("deadline passed while decoding pictures; the call was not computed")
    if len(input_shape) != 2:
        raise InvalidInputError(where, f"this model takes inputs of shape {list(input_shape)}, not "
                                "pictures (they need a rows×cols input); send its pixels instead")
    try:
        flat = pictures.from_bytes(data, input_shape, max_bytes=limits.max_bytes,
                                   max_pixels=limits.max_pixels,
                                   max_decoded_bytes=limits.max_decoded_bytes)
    except pictures.ImageError as exc:
        raise InvalidInputError(where, str(exc)) from None
    return scale_pixels(flat)


def decode_pictures(items: Sequence[tuple[str, bytes]], input_shape: Sequence[int],
                    limits: PictureLimits, deadline: float | None = None) -> npt.NDArray[np.float32]:
    """float32 (N, input_size) pixels of N pictures (``items``: each one's field and bytes), in
    order; the first that fails raises (see picture_pixels)."""
    size = int(np.prod(input_shape))
    out = np.empty((len(items), size), dtype=np.float32)
    for i, (where, data) in enumerate(items):
        out[i] = picture_pixels(data, where, input_shape, limits, deadline)
    return out


def check_count(count: int, limit: int, field: str = "images") -> None:
    """Raises InvalidInputError for a call of no image or of more than ``limit``."""
    if count == 0:
        raise InvalidInputError(field, "empty; expected at least 1 image")
    if count > limit:
        raise InvalidInputError(field, f"{count} images exceed the limit of {limit} per request")


def check_pixels(
    images: npt.NDArray[np.float32], encodings: Sequence[str] | str, field: str = "images"
) -> None:
    """Raises InvalidInputError naming the first pixel that is not finite or not in [0, 1].

    ``encodings[i]`` names image i's encoding, for the message (e.g. ``images[3].float32[17]``);
    one string names that of every image.
    """
    if images.size == 0:
        return
    if images.dtype == np.float32 and images.flags.c_contiguous:
        # One pass over the bits: +0.0 to 1.0 are exactly the patterns 0 to 0x3F800000; NaN, the
        # infinities, values above 1 and every negative (sign bit set) lie above.
        if int(images.view(np.uint32).max()) <= 0x3F800000:
            return
    elif images.min() >= 0.0 and images.max() <= 1.0:  # NaN fails both
        return
    bad = ~np.isfinite(images) | (images < 0.0) | (images > 1.0)
    if not bad.any():  # -0.0, in range though its sign bit is set
        return
    i, j = (int(k) for k in np.argwhere(bad)[0])
    encoding = encodings if isinstance(encodings, str) else encodings[i]
    if not np.isfinite(images[i, j]):
        raise InvalidInputError(
            f"{field}[{i}].{encoding}[{j}]",
            f"{images[i, j]} is not a finite number; expected a pixel intensity in [0, 1]",
        )
    raise InvalidInputError(
        f"{field}[{i}].{encoding}[{j}]",
        f"{float(images[i, j])!r} is out of range; expected a pixel intensity in [0, 1] "
        "(byte / 255)",
    )


# digitserve.v1 ------------------------------------------------------------------------------


def packed_pixels(
    rows: npt.NDArray[np.uint8], encoding: str, input_size: int, field: str = "images"
) -> npt.NDArray[np.float32] | None:
    """Images of one packed encoding, one row of pixel bytes each (a PackedPredictRequest's, or
    joined by uniform_pixels), as float32 pixels validated as decode_images would: float32
    checked pixel by pixel, uint8 in [0, 1] once scaled. None when the rows are not of
    ``input_size`` pixels: decode_images then names the first, from the parsed message."""
    dtype = PACKED[encoding]
    if rows.shape[1] != dtype.itemsize * input_size:
        return None
    if encoding == "uint8":
        return scale_pixels(rows)
    pixels = np.ascontiguousarray(rows).view(dtype)
    check_pixels(pixels, encoding, field)
    return pixels


def uniform_pixels(
    images: Sequence[pb.Image], input_size: int, field: str = "images"
) -> npt.NDArray[np.float32] | None:
    """The common case in one numpy call: every image packed (float32 or uint8) the same way and
    of the right length. None otherwise (decode_images then finds and names the bad image)."""
    kind = images[0].WhichOneof("pixels") if images else None
    dtype = PACKED.get(kind or "")
    if kind is None or dtype is None:
        return None
    parts = [getattr(image, kind) for image in images]
    # An image that set another field reads as b"" here, so equal lengths mean all of this kind.
    size = dtype.itemsize * input_size
    if set(map(len, parts)) != {size}:
        return None
    data = parts[0] if len(parts) == 1 else b"".join(parts)
    return packed_pixels(np.frombuffer(data, np.uint8).reshape(len(parts), size), kind,
                         input_size, field)


def encoded_images(images: Sequence[pb.Image], field: str = "images") -> list[tuple[str, bytes]]:
    """The pictures among ``images`` (those that set ``encoded``): each one's field and bytes."""
    return [(f"{field}[{i}].encoded", image.encoded) for i, image in enumerate(images)
            if image.WhichOneof("pixels") == "encoded"]


def decode_images(
    images: Sequence[pb.Image], input_size: int, field: str = "images", *,
    input_shape: Sequence[int] = (), limits: PictureLimits | None = None,
    deadline: float | None = None,
) -> npt.NDArray[np.float32]:
    """float32 array (N, input_size) scaled to [0, 1]. InvalidInputError names the first image
    without pixels or of the wrong length, else the first pixel not finite or not in [0, 1].
    Pictures (``encoded``) are preprocessed for a model of ``input_shape`` within ``limits``: an
    edge calls this on a PictureDecoder's thread when the request holds any."""
    fast = uniform_pixels(images, input_size, field)
    if fast is not None:
        return fast
    out = np.empty((len(images), input_size), dtype=np.float32)
    encodings: list[str] = []
    for i, image in enumerate(images):
        kind = image.WhichOneof("pixels")
        encodings.append(kind or "")
        if kind == "encoded":
            out[i] = picture_pixels(image.encoded, f"{field}[{i}].encoded", input_shape,
                                    limits or PictureLimits(), deadline)
        elif kind == "float32":
            data = image.float32
            if len(data) != 4 * input_size:
                raise InvalidInputError(
                    f"{field}[{i}].float32",
                    f"got {len(data)} bytes, expected {4 * input_size} "
                    f"({input_size} little-endian float32 pixels)",
                )
            out[i] = np.frombuffer(data, dtype="<f4")
        elif kind == "uint8":
            data = image.uint8
            if len(data) != input_size:
                raise InvalidInputError(
                    f"{field}[{i}].uint8",
                    f"got {len(data)} bytes, expected {input_size} (one byte per pixel)",
                )
            out[i] = scale_pixels(np.frombuffer(data, dtype=np.uint8))
        elif kind == "floats":
            values = image.floats.values
            if len(values) != input_size:
                raise InvalidInputError(
                    f"{field}[{i}].floats.values",
                    f"got {len(values)} pixels, expected {input_size}",
                )
            out[i] = np.asarray(values, dtype=np.float32)
        else:
            raise InvalidInputError(
                f"{field}[{i}]", "no pixels; set one of floats, uint8, float32 or encoded"
            )
    check_pixels(out, [e if e != "floats" else "floats.values" for e in encodings], field)
    return out


# The V2 protocol (inference.GRPCInferenceService) ------------------------------------------


def tensor_count(
    tensor: oip.ModelInferRequest.InferInputTensor, input_shape: tuple[int, ...], field: str
) -> int:
    """The number of images N of an input tensor of an accepted datatype shaped [N, size] or
    [N, *input_shape]; InvalidInputError names ``field``'s datatype or shape otherwise."""
    if tensor.datatype not in V2_DATATYPES and tensor.datatype != V2_PICTURES:
        raise InvalidInputError(
            f"{field}.datatype",
            f"{tensor.datatype!r} is not accepted; expected one of {[*V2_DATATYPES, V2_PICTURES]}",
        )
    shape = list(tensor.shape)
    if tensor.datatype == V2_PICTURES:
        if len(shape) not in (1, 2) or shape[1:] not in ([], [1]) or shape[0] < 0:
            raise InvalidInputError(
                f"{field}.shape", f"{shape} is not accepted for BYTES (one PNG or JPEG picture per "
                "element); expected [N] or [N, 1]")
        return int(shape[0])
    size = int(np.prod(input_shape))
    accepted = [[size], list(input_shape)]
    if len(shape) < 2 or shape[1:] not in accepted or shape[0] < 0:
        forms = " or ".join(f"[N, {', '.join(str(d) for d in dims)}]" for dims in accepted)
        raise InvalidInputError(f"{field}.shape", f"{shape} is not accepted; expected {forms}")
    return int(shape[0])


def tensor_pictures(request: oip.ModelInferRequest, count: int) -> list[tuple[str, bytes]]:
    """The ``count`` pictures of the request's BYTES tensor ``inputs[0]`` (shape checked by
    tensor_count), each with its field for messages: ``inputs[0].contents.bytes_contents[k]``, or
    ``raw_input_contents[0].element[k]`` when sent raw (each element a 4-byte little-endian length,
    then its bytes, as the protocol lays BYTES out)."""
    tensor = request.inputs[0]
    if len(request.raw_input_contents) == 0:
        items = list(tensor.contents.bytes_contents)
        if len(items) != count:
            raise InvalidInputError(
                "inputs[0].contents.bytes_contents",
                f"got {len(items)} elements, expected {count} (one picture per element of shape "
                f"{list(tensor.shape)})")
        return [(f"inputs[0].contents.bytes_contents[{k}]", item) for k, item in enumerate(items)]
    if len(request.raw_input_contents) != len(request.inputs):
        raise InvalidInputError(
            "raw_input_contents",
            f"got {len(request.raw_input_contents)} entries for {len(request.inputs)} inputs; "
            "expected one per input")
    if tensor.HasField("contents"):
        raise InvalidInputError(
            "inputs[0].contents", "set together with raw_input_contents; expected one or the other")
    data = request.raw_input_contents[0]
    out: list[tuple[str, bytes]] = []
    pos = 0
    while pos < len(data) and len(out) < count:
        where = f"raw_input_contents[0].element[{len(out)}]"
        if pos + 4 > len(data):
            raise InvalidInputError(where, f"{len(data) - pos} bytes left where a 4-byte length was "
                                    "expected (BYTES elements: a little-endian uint32 length, then "
                                    "the bytes)")
        (length,) = struct.unpack_from("<I", data, pos)
        if pos + 4 + length > len(data):
            raise InvalidInputError(where, f"its length {length} runs past the end of the tensor's "
                                    f"{len(data)} bytes")
        out.append((where, data[pos + 4 : pos + 4 + length]))
        pos += 4 + length
    if len(out) != count or pos != len(data):
        raise InvalidInputError(
            "raw_input_contents[0]",
            f"holds {len(out)} elements{' and more bytes' if pos != len(data) else ''}, expected "
            f"{count} (one picture per element of shape {list(tensor.shape)})")
    return out


def decode_tensor(
    request: oip.ModelInferRequest, count: int, input_size: int
) -> tuple[npt.NDArray[np.float32], bool]:
    """The pixels of the request's one input tensor ``inputs[0]`` (its datatype and shape checked
    by tensor_count, which gave ``count``) as float32 (count, input_size) in [0, 1], and whether
    they came as raw bytes. InvalidInputError names the field and the flat element that is
    wrong."""
    tensor = request.inputs[0]
    elements = count * input_size
    raw = len(request.raw_input_contents) > 0
    values: npt.NDArray[Any]
    if raw:
        if len(request.raw_input_contents) != len(request.inputs):
            raise InvalidInputError(
                "raw_input_contents",
                f"got {len(request.raw_input_contents)} entries for {len(request.inputs)} inputs; "
                "expected one per input",
            )
        if tensor.HasField("contents"):
            raise InvalidInputError(
                "inputs[0].contents", "set together with raw_input_contents; expected one or the other"
            )
        data = request.raw_input_contents[0]
        dtype = V2_DATATYPES[tensor.datatype]
        if len(data) != elements * dtype.itemsize:
            raise InvalidInputError(
                "raw_input_contents[0]",
                f"got {len(data)} bytes, expected {elements * dtype.itemsize} "
                f"({count}×{input_size} {tensor.datatype} elements, little-endian)",
            )
        values = np.frombuffer(data, dtype=dtype)
        # Messages read raw_input_contents[0].element[k]: the k-th element of the flat tensor.
        where, item = "raw_input_contents", "element"
    elif tensor.datatype == "FP32":
        values = np.asarray(tensor.contents.fp32_contents, dtype=np.float32)
        where, item = "inputs", "contents.fp32_contents"
    else:
        values = np.asarray(tensor.contents.uint_contents, dtype=np.uint32)
        where, item = "inputs", "contents.uint_contents"
    if values.size != elements:
        raise InvalidInputError(
            f"{where}[0]" + ("" if raw else f".{item}"),
            f"got {values.size} values, expected {elements} ({count}×{input_size} for shape "
            f"{list(tensor.shape)})",
        )
    if tensor.datatype == "UINT8":
        too_big = values > 255
        if too_big.any():
            k = int(np.argmax(too_big))
            raise InvalidInputError(
                f"{where}[0].{item}[{k}]", f"{int(values[k])} does not fit UINT8; expected 0..255"
            )
        return scale_pixels(values.reshape(count, input_size)), raw
    # One row holding the whole flat tensor, so the message names the flat element index.
    check_pixels(values.astype(np.float32)[np.newaxis], [item], where)
    return values.reshape(count, input_size).astype(np.float32), raw
