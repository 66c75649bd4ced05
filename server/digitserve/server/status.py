"""The one error mapping of every edge (``digitserve.v1`` and the V2 protocol on gRPC, the V2
protocol's REST binding on HTTP): domain errors to status codes and details, undecodable requests
to INVALID_ARGUMENT, anything else to INTERNAL with a fixed message; and a call's deadline on the
monotonic clock."""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from digitserve.server.errors import (
    ControlRefusedError,
    DeadlineExpiredError,
    InvalidInputError,
    ModelNotReadyError,
    NotServedError,
    OverloadedError,
    ServerError,
)

R = TypeVar("R")

# Each domain error's gRPC status code and HTTP status (the HTTP/JSON edge, digitserve.server.rest):
# one table, so that both transports refuse the same fault the same way, with the same message.
_STATUS: dict[type[ServerError], tuple[grpc.StatusCode, int]] = {
    InvalidInputError: (grpc.StatusCode.INVALID_ARGUMENT, 400),
    NotServedError: (grpc.StatusCode.NOT_FOUND, 404),
    ModelNotReadyError: (grpc.StatusCode.UNAVAILABLE, 503),
    OverloadedError: (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    DeadlineExpiredError: (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    ControlRefusedError: (grpc.StatusCode.FAILED_PRECONDITION, 403),
}
INTERNAL_MESSAGE = "internal error; the server log has the details"
HTTP_INTERNAL = 500


def _codes(error: ServerError) -> tuple[grpc.StatusCode, int]:
    return next(codes for kind, codes in _STATUS.items() if isinstance(error, kind))


def http_status(error: ServerError) -> int:
    """The HTTP status of a domain error (its message is the same as over gRPC)."""
    return _codes(error)[1]


def _status(code: grpc.StatusCode, error: ServerError) -> grpc.Status:
    """The call's status, built by grpcio-status: code, message and a google.rpc.Status in the
    ``grpc-status-details-bin`` trailer, with BadRequest field violations for invalid input, so
    programs can read which field failed (grpc_status.rpc_status.from_call)."""
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=str(error))
    if isinstance(error, InvalidInputError):
        violation = error_details_pb2.BadRequest.FieldViolation(field=error.field,
                                                                 description=error.description)
        status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    return rpc_status.to_status(status)


class Undecodable:
    """Handed to a method instead of a request whose bytes are not a valid message (see
    server.calls.tolerant_deserializer); mapped_errors turns it into INVALID_ARGUMENT."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name

    def error(self, field: str) -> InvalidInputError:
        return InvalidInputError(field, f"not a valid {self.type_name} message (corrupt protobuf "
                                 "wire format)")


async def _decoded(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    index = 0
    async for request in requests:
        if isinstance(request, Undecodable):
            raise request.error(f"requests[{index}]")
        yield request
        index += 1


def mapped_errors(method: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    """Maps ServerError subclasses to their status code; anything else becomes INTERNAL with a
    fixed message, its traceback logged by the logger of the method's module (``server.servicer``
    or ``server.oip``). A request that did not decode is INVALID_ARGUMENT."""
    method_logger = logging.getLogger(method.__module__)
    # A method whose request is a stream names it as grpc's generated servicers do. Decided here,
    # not per call: hasattr() on a protobuf message without the attribute costs an exception.
    names = list(inspect.signature(method).parameters)[1:2]
    if names not in (["request"], ["request_iterator"]):
        raise TypeError(f"{method.__qualname__}: its second parameter is {names}; name it request, "
                        "or request_iterator when the request is a stream")
    streamed = names == ["request_iterator"]

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
            if isinstance(request, Undecodable):
                raise request.error("request")
            if streamed:
                request = _decoded(request)
            return await method(self, request, context)
        except ServerError as exc:
            code, error = _codes(exc)[0], exc
        except Exception:
            method_logger.exception("unexpected error in %s", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
        # Keep trailing metadata set before (the request id of digitserve.server.telemetry).
        earlier = tuple(context.trailing_metadata() or ())
        status = _status(code, error)
        await context.abort(status.code, status.details,
                            trailing_metadata=(*earlier, *status.trailing_metadata))
        raise AssertionError("context.abort() returned")  # it always raises

    return wrapper


def deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline as a ``time.monotonic()`` instant; None when the client set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining
