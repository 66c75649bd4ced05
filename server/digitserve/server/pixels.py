"""The pixel codec of every edge: a neutral input tensor (server.infertypes) — FP32 or UINT8 values
or raw little-endian bytes of shape [N, size] or [N, *input_shape], BYTES elements holding PNG or
JPEG pictures, or digitserve.v1's images (packed rows, or pixels and pictures mixed) — decoded into
float32 (N, input_size) pixels in [0, 1] and validated here, so that every edge refuses the same
faults with one message, naming the field and the element as its caller wrote them (the input's
``Where``).

Pictures are preprocessed by ``digitserve.pictures``, the code ``mnist-client`` runs too, within
the limits of PictureLimits, on the threads of a ``server.decoding.PictureDecoder``, never the
event loop (one picture costs milliseconds).

Pixels sent as bytes are ``uint8 / 255`` through ``digitserve.idx.scale_pixels``, the trainer's
division, so results match bit for bit."""

from __future__ import annotations

import math
import struct
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from digitserve import pictures
from digitserve.idx import scale_pixels
from digitserve.server.decoding import PictureLimits
from digitserve.server.errors import DeadlineExpiredError, InvalidInputError
from digitserve.server.infertypes import InferInput, Where

# The input datatypes accepted, and the numpy type of their raw bytes.
DATATYPES: dict[str, np.dtype[Any]] = {"FP32": np.dtype("<f4"), "UINT8": np.dtype(np.uint8)}
PICTURES = "BYTES"  # a tensor of shape [N] (or [N, 1]) whose elements are PNG or JPEG pictures
Picture = tuple[int, str, bytes]  # its row, its field, its bytes


def check_count(count: int, limit: int, field: str = "images") -> None:
    """Raises InvalidInputError for a call of no image or of more than ``limit``."""
    if count == 0:
        raise InvalidInputError(field, "empty; expected at least 1 image")
    if count > limit:
        raise InvalidInputError(field, f"{count} images exceed the limit of {limit} per request")


def tensor_count(tensor: InferInput, input_shape: tuple[int, ...]) -> int:
    """The number of images N of an input of an accepted datatype shaped [N, size] or
    [N, *input_shape]; InvalidInputError names its datatype or shape otherwise."""
    shape, size = tensor.shape, math.prod(input_shape)
    if len(shape) == 2 and shape[1] == size and shape[0] >= 0 and tensor.datatype in DATATYPES:
        return int(shape[0])  # what clients send
    field = tensor.where.tensor
    if tensor.datatype not in DATATYPES and tensor.datatype != PICTURES:
        raise InvalidInputError(
            f"{field}.datatype",
            f"{tensor.datatype!r} is not accepted; expected one of {[*DATATYPES, PICTURES]}",
        )
    shape = list(shape)
    if tensor.datatype == PICTURES:
        if len(shape) not in (1, 2) or shape[1:] not in ([], [1]) or shape[0] < 0:
            raise InvalidInputError(
                f"{field}.shape", f"{shape} is not accepted for BYTES (one PNG or JPEG picture per "
                "element); expected [N] or [N, 1]")
        return int(shape[0])
    accepted = [[size], list(input_shape)]
    if len(shape) < 2 or shape[1:] not in accepted or shape[0] < 0:
        forms = " or ".join(f"[N, {', '.join(str(d) for d in dims)}]" for dims in accepted)
        raise InvalidInputError(f"{field}.shape", f"{shape} is not accepted; expected {forms}")
    return int(shape[0])


def check_pixels(images: npt.NDArray[np.float32], where: Where) -> None:
    """Raises InvalidInputError naming the first pixel (by ``where``) of the (N, size) ``images``
    that is not finite or not in [0, 1]."""
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
    name = where.at(i * images.shape[1] + j, images.shape[1])
    if not np.isfinite(images[i, j]):
        raise InvalidInputError(
            name, f"{images[i, j]} is not a finite number; expected a pixel intensity in [0, 1]")
    raise InvalidInputError(
        name, f"{float(images[i, j])!r} is out of range; expected a pixel intensity in [0, 1] "
        "(byte / 255)")


def tensor_pixels(tensor: InferInput, count: int, size: int) -> npt.NDArray[np.float32]:
    """The pixels of an FP32 or UINT8 input (its datatype and shape checked by tensor_count,
    which gave ``count``) as float32 (count, size) in [0, 1], read in one pass. InvalidInputError
    names the field and the element that is wrong."""
    if tensor.fault is not None:
        raise tensor.fault
    where, elements = tensor.where, count * size
    values: npt.NDArray[Any]
    if tensor.raw:
        dtype = DATATYPES[tensor.datatype]
        data = tensor.data  # bytes, or digitserve.v1's (N, bytes) rows
        length = data.size if isinstance(data, np.ndarray) else len(data)
        if length != elements * dtype.itemsize:
            raise InvalidInputError(
                where.data, f"got {length} bytes, expected {elements * dtype.itemsize} "
                f"({count}×{size} {tensor.datatype} elements, little-endian)")
        if isinstance(data, np.ndarray):
            values = data if dtype.itemsize == 1 else np.ascontiguousarray(data).view(dtype)
        else:
            values = np.frombuffer(data, dtype=dtype)
    else:
        values = np.asarray(tensor.data, dtype=np.float32 if tensor.datatype == "FP32" else np.int64)
        if values.size != elements:
            raise InvalidInputError(
                where.data, f"got {values.size} values, expected {elements} ({count}×{size} for "
                f"shape {list(tensor.shape)})")
    values = values.reshape(count, size)
    if tensor.datatype == "UINT8":
        if values.dtype != np.uint8:
            too_big = (values > 255) | (values < 0)
            if too_big.any():
                k = int(np.argmax(too_big))
                raise InvalidInputError(
                    where.at(k, size), f"{int(values.flat[k])} does not fit UINT8; expected 0..255")
        return scale_pixels(values)
    check_pixels(values, where)
    return values


# Pictures -----------------------------------------------------------------------------------


def tensor_pictures(tensor: InferInput, count: int) -> Sequence[Picture]:
    """The ``count`` pictures of a BYTES input (its shape checked by tensor_count), or the
    pictures among digitserve.v1's images, each with its row and field. Raw BYTES are laid out as
    the V2 protocol lays them: each element a 4-byte little-endian length, then its bytes."""
    if tensor.pictures or tensor.datatype != PICTURES:
        return tensor.pictures
    if tensor.fault is not None:
        raise tensor.fault
    where, shape = tensor.where, list(tensor.shape)
    if not tensor.raw:
        items = list(tensor.data)
        if len(items) != count:
            raise InvalidInputError(where.data, f"got {len(items)} elements, expected {count} (one "
                                    f"picture per element of shape {shape})")
        return [(k, where.at(k), item) for k, item in enumerate(items)]
    data: bytes = tensor.data
    out: list[Picture] = []
    pos = 0
    while pos < len(data) and len(out) < count:
        at = where.at(len(out))
        if pos + 4 > len(data):
            raise InvalidInputError(at, f"{len(data) - pos} bytes left where a 4-byte length was "
                                    "expected (BYTES elements: a little-endian uint32 length, then "
                                    "the bytes)")
        (length,) = struct.unpack_from("<I", data, pos)
        if pos + 4 + length > len(data):
            raise InvalidInputError(at, f"its length {length} runs past the end of the tensor's "
                                    f"{len(data)} bytes")
        out.append((len(out), at, data[pos + 4 : pos + 4 + length]))
        pos += 4 + length
    if len(out) != count or pos != len(data):
        raise InvalidInputError(
            where.data, f"holds {len(out)} elements{' and more bytes' if pos != len(data) else ''}, "
            f"expected {count} (one picture per element of shape {shape})")
    return out


def check_picture_sizes(items: Sequence[Picture], limits: PictureLimits, field: str) -> None:
    """InvalidInputError naming ``field`` for more than ``limits.max_pictures`` pictures, the
    first picture over ``limits.max_bytes``, or ``field`` when together they exceed
    ``limits.max_request_bytes``."""
    if len(items) > limits.max_pictures:
        raise InvalidInputError(
            field, f"{len(items)} pictures exceed the limit of {limits.max_pictures} per request")
    total = 0
    for _, where, data in items:
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


def decode_pictures(tensor: InferInput, items: Sequence[Picture], count: int, size: int,
                    input_shape: Sequence[int], limits: PictureLimits,
                    deadline: float | None = None) -> npt.NDArray[np.float32]:
    """float32 (count, size) pixels: the rows of ``items`` decoded from their pictures in order,
    the rest digitserve.v1's pixels (``tensor.data``, checked after). The input's fault is raised
    when the pictures before its row are decoded: the first bad image is the one named."""
    out = np.empty((count, size), np.float32) if tensor.datatype == PICTURES else tensor.data
    fault, fault_row = tensor.fault, tensor.fault_row
    for row, where, data in items:
        if fault is not None and fault_row < row:
            raise fault
        out[row] = picture_pixels(data, where, input_shape, limits, deadline)
    if fault is not None:
        raise fault
    if tensor.datatype != PICTURES:
        check_pixels(out, tensor.where)
    return out
