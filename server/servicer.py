"""The gRPC edge: decodes protobuf requests into numpy, calls the data plane, encodes replies, and
maps domain errors to status codes in one place."""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np
import numpy.typing as npt
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from digitserve.idx import scale_pixels
from digitserve.metadata import Metadata
from digitserve.v1 import digit_service_pb2 as pb
from digitserve.v1 import digit_service_pb2_grpc as pb_grpc
from server.dataplane import DataPlane, Evaluation, check_labels, check_pixels
from server.errors import (
    DeadlineExpiredError,
    InvalidInputError,
    ModelNotFoundError,
    ModelNotReadyError,
    OverloadedError,
    ServerError,
)
from server.model import Model
from server.wire import PackedPredictRequest, PredictionEncoder, parse_predict_request

logger = logging.getLogger(__name__)

R = TypeVar("R")

_STATUS: dict[type[ServerError], grpc.StatusCode] = {
    InvalidInputError: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFoundError: grpc.StatusCode.NOT_FOUND,
    ModelNotReadyError: grpc.StatusCode.UNAVAILABLE,
    OverloadedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExpiredError: grpc.StatusCode.DEADLINE_EXCEEDED,
}
INTERNAL_MESSAGE = "internal error; the server log has the details"


def _status(code: grpc.StatusCode, error: ServerError) -> grpc.Status:
    """The call's status, built by grpcio-status: code, message and a google.rpc.Status in the
    ``grpc-status-details-bin`` trailer, with BadRequest field violations for invalid input, so
    programs can read which field failed (grpc_status.rpc_status.from_call)."""
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=str(error))
    if isinstance(error, InvalidInputError):
        detail = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=error.field, description=error.description
                )
            ]
        )
        status.details.add().Pack(detail)
    return rpc_status.to_status(status)


class Undecodable:
    """Handed to a method instead of a request whose bytes are not a valid message (see
    add_to_server); mapped_errors turns it into INVALID_ARGUMENT."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name

    def error(self, field: str) -> InvalidInputError:
        return InvalidInputError(
            field, f"not a valid {self.type_name} message (corrupt protobuf wire format)"
        )


# Requests read by something faster than protobuf (server/wire.py), by message type.
_PARSERS: dict[str, Callable[[bytes], Any]] = {
    pb.PredictRequest.DESCRIPTOR.full_name: parse_predict_request,
}


def tolerant_deserializer(message_class: Any) -> Callable[[bytes], Any]:
    """A request deserializer that never raises: gRPC would answer UNKNOWN (unary) or the method
    would see an unexpected exception (streams) for bytes that do not parse."""
    type_name = message_class.DESCRIPTOR.full_name
    from_string = _PARSERS.get(type_name, message_class.FromString)

    def parse(data: bytes) -> Any:
        try:
            return from_string(data)
        except DecodeError:
            return Undecodable(type_name)

    return parse


def _serializer(message_class: Any) -> Callable[[Any], bytes]:
    """Serializes a response message; a method may also answer bytes it serialized itself."""

    def serialize(response: Any) -> bytes:
        if isinstance(response, bytes):
            return response
        data: bytes = message_class.SerializeToString(response)
        return data

    return serialize


async def _decoded(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    index = 0
    async for request in requests:
        if isinstance(request, Undecodable):
            raise request.error(f"requests[{index}]")
        yield request
        index += 1


def add_to_server(servicer: Any, server: Any, service: ServiceDescriptor | None = None) -> None:
    """Registers ``servicer``'s methods for ``service`` (DigitService by default) like the generated
    ``add_*Servicer_to_server``, but with request deserializers that never raise, so that
    undecodable bytes become INVALID_ARGUMENT in mapped_errors. ``server``: a grpc.aio.Server or
    server.calls.Services."""
    service = service or pb.DESCRIPTOR.services_by_name["DigitService"]
    factories = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    handlers = {
        method.name: factories[(method.client_streaming, method.server_streaming)](
            getattr(servicer, method.name),
            request_deserializer=tolerant_deserializer(message_factory.GetMessageClass(method.input_type)),
            response_serializer=_serializer(message_factory.GetMessageClass(method.output_type)),
        )
        for method in service.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def mapped_errors(
    method: Callable[..., Awaitable[R]],
) -> Callable[..., Awaitable[R]]:
    """Maps ServerError subclasses to their status code; anything else becomes INTERNAL with a
    fixed message, its traceback logged. A request that did not decode is INVALID_ARGUMENT."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
            if isinstance(request, Undecodable):
                raise request.error("request")
            if hasattr(request, "__aiter__"):
                request = _decoded(request)
            return await method(self, request, context)
        except ServerError as exc:
            code = next(c for t, c in _STATUS.items() if isinstance(exc, t))
            error: ServerError = exc
        except Exception:
            logger.exception("unexpected error in %s", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
        # Keep trailing metadata set before (the request id of server/telemetry.py).
        earlier = tuple(context.trailing_metadata() or ())
        status = _status(code, error)
        await context.abort(
            status.code,
            status.details,
            trailing_metadata=(*earlier, *status.trailing_metadata),
        )
        raise AssertionError("context.abort() returned")  # it always raises

    return wrapper


def decode_images(
    images: Sequence[pb.Image], input_size: int, field: str = "images"
) -> npt.NDArray[np.float32]:
    """float32 array (N, input_size) scaled to [0, 1]. InvalidInputError names the first image
    without pixels or of the wrong length, else the first pixel not finite or not in [0, 1]."""
    fast = _decode_uniform(images, input_size, field)
    if fast is not None:
        return fast
    out = np.empty((len(images), input_size), dtype=np.float32)
    encodings: list[str] = []
    for i, image in enumerate(images):
        kind = image.WhichOneof("pixels")
        encodings.append(kind or "")
        if kind == "float32":
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
            # The same float32 division as the trainer's, so results match bit for bit.
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
                f"{field}[{i}]", "no pixels; set one of floats, uint8 or float32"
            )
    check_pixels(out, [e if e != "floats" else "floats.values" for e in encodings], field)
    return out


# The packed encodings of an Image and the numpy type of their bytes.
_PACKED: dict[str, np.dtype[Any]] = {"float32": np.dtype("<f4"), "uint8": np.dtype(np.uint8)}


def packed_pixels(
    rows: npt.NDArray[np.uint8], encoding: str, input_size: int, field: str = "images"
) -> npt.NDArray[np.float32] | None:
    """Images of one packed encoding, one row of pixel bytes each (a PackedPredictRequest's, or
    joined by _decode_uniform), as float32 pixels validated as decode_images would: float32
    checked pixel by pixel, uint8 in [0, 1] once scaled. None when the rows are not of
    ``input_size`` pixels: decode_images then names the first, from the parsed message."""
    dtype = _PACKED[encoding]
    if rows.shape[1] != dtype.itemsize * input_size:
        return None
    if encoding == "uint8":
        return scale_pixels(rows)
    pixels = np.ascontiguousarray(rows).view(dtype)
    check_pixels(pixels, encoding, field)
    return pixels


def _decode_uniform(
    images: Sequence[pb.Image], input_size: int, field: str
) -> npt.NDArray[np.float32] | None:
    """The common case in one numpy call: every image packed (float32 or uint8) the same way and
    of the right length. None otherwise (decode_images then finds and names the bad image)."""
    kind = images[0].WhichOneof("pixels") if images else None
    dtype = _PACKED.get(kind or "")
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


class DigitServicer(pb_grpc.DigitServiceServicer):
    """digitserve.v1.DigitService over the data plane."""

    def __init__(self, plane: DataPlane) -> None:
        self._plane = plane
        self._encoders: dict[tuple[str, int], PredictionEncoder] = {}

    def _encoder(self, model: Model) -> PredictionEncoder:
        spec = model.spec
        encoder = self._encoders.get((spec.name, spec.version))
        if encoder is None or encoder.labels != spec.labels:
            if len(self._encoders) > 16:  # versions come and go with hot reloads
                self._encoders.clear()
            encoder = self._encoders[spec.name, spec.version] = PredictionEncoder(
                spec.name, spec.version, spec.labels)
        return encoder

    @mapped_errors
    async def Predict(
        self, request: pb.PredictRequest | PackedPredictRequest, context: grpc.aio.ServicerContext
    ) -> bytes:
        """Answers a serialized PredictResponse (see add_to_server's serializer). The request
        comes as server.wire read it when its images are uniformly packed."""
        model = self._plane.resolve(request.model_version)
        images = None
        if isinstance(request, PackedPredictRequest):
            self._plane.check_count(request.rows.shape[0])
            self._plane.admit(model, request.rows.shape[0])  # refused before any pixel is converted
            images = packed_pixels(request.rows, request.encoding, model.spec.input_size)
            if images is None:
                request = request.message()
        if images is None:
            assert isinstance(request, pb.PredictRequest)
            self._plane.check_count(len(request.images))
            self._plane.admit(model, len(request.images))
            images = decode_images(request.images, model.spec.input_size)
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        probabilities = await self._plane.predict(model, images, deadline)
        return self._encoder(model).encode(probabilities)

    @mapped_errors
    async def Evaluate(
        self, request_iterator: AsyncIterator[pb.EvaluateRequest], context: grpc.aio.ServicerContext
    ) -> pb.EvaluateResponse:
        evaluation = Evaluation(self._plane)
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        index = 0
        async for request in request_iterator:
            field = f"requests[{index}].images"
            model = evaluation.model_for(request.model_version)
            self._plane.check_count(len(request.images), field)
            self._plane.admit(model, len(request.images))
            images = decode_images(request.images, model.spec.input_size, field)
            labels = np.asarray(request.labels, dtype=np.int64)
            try:
                check_labels(labels, images.shape[0], len(model.spec.labels))
            except InvalidInputError as exc:
                raise InvalidInputError(f"requests[{index}].{exc.field}", exc.description) from None
            await evaluation.add(model, images, labels, deadline)
            index += 1
        model, metrics = evaluation.result()
        response = pb.EvaluateResponse(
            count=metrics.count,
            accuracy=metrics.accuracy,
            mean_cross_entropy=metrics.mean_cross_entropy,
            labels=metrics.labels,
            model_name=model.spec.name,
            model_version=model.spec.version,
        )
        for row in metrics.confusion_matrix:
            response.confusion_matrix.add(counts=row)
        for label, p, r, f, s in zip(
            metrics.labels, metrics.precision, metrics.recall, metrics.f1, metrics.support,
            strict=True,
        ):
            response.per_class.add(label=label, precision=p, recall=r, f1=f, support=s)
        return response

    @mapped_errors
    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        model = self._plane.resolve(request.model_version)
        metadata = Metadata.from_json(model.metadata)
        return pb.GetModelInfoResponse(
            model_name=model.spec.name,
            model_version=model.spec.version,
            input_size=model.spec.input_size,
            input_shape=list(model.spec.input_shape),
            input_scale=model.spec.input_scale,
            labels=list(model.spec.labels),
            preset=metadata.preset or "",
            test_accuracy=(metadata.metrics.test_accuracy if metadata.metrics else None) or 0.0,
            created_at=metadata.created_at or "",
            metadata_json=json.dumps(model.metadata, sort_keys=True),
            max_images_per_request=self._plane.max_images_per_request,
            loaded_versions=self._plane.loaded_versions,
            inference_path=model.inference_path,
            refused_versions=[
                pb.RefusedVersion(version=v, reason=r) for v, r in sorted(self._plane.refused.items())
            ],
        )
