"""The client's errors, under one root: ``except DigitServeError`` catches every failure of the
library (and of the load tester) without importing grpc, as httpx's ``HTTPError`` does."""

from __future__ import annotations

import grpc


class DigitServeError(Exception):
    """The root of every error the client library and the load tester raise."""


class CallError(DigitServeError):
    """A call ended without an answer: the server refused it, or it could not be made. ``code()``
    is its gRPC status (``grpc.StatusCode``), ``details()`` the server's message, as on grpc's
    errors; ``str()`` is ``CODE: details``. The subclasses below name the codes a caller handles
    differently; any other code (INTERNAL, CANCELLED, ...) raises this class itself."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class InvalidInputError(CallError):
    """INVALID_ARGUMENT: the server refused the request; the details name the field and why."""


class NotServedError(CallError):
    """NOT_FOUND: no such model, version, label or health service; the details name the served."""


class UnavailableError(CallError):
    """UNAVAILABLE after gRPC's retries: the server is starting, draining, or has no version yet."""


class OverloadedError(CallError):
    """RESOURCE_EXHAUSTED: the server's queue is full; a retry later may be served."""


class DeadlineExceededError(CallError):
    """DEADLINE_EXCEEDED: no answer within the call's deadline, from a server that was reached."""


class UnauthenticatedError(CallError):
    """UNAUTHENTICATED: the server wants a valid bearer token (``--token-file``)."""


class PermissionDeniedError(CallError):
    """PERMISSION_DENIED: the server refused this client's credentials."""


class UnimplementedError(CallError):
    """UNIMPLEMENTED: the server does not have the method (an older server, another API's)."""


class ConnectError(CallError):
    """The client could not connect to ``target`` (nothing listens there, the name does not
    resolve, the TLS handshake failed, or nothing answered in time). ``code()`` is UNAVAILABLE
    (DEADLINE_EXCEEDED when nothing answered in time); ``str()`` and ``details()`` are the one
    line to show."""

    def __init__(self, target: str, reason: str,
                 code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
                 waited: float | None = None) -> None:
        self.target, self.reason, self.waited = target, reason, waited
        within = "" if waited is None else f" within {waited:.3g} s"
        super().__init__(code, f"cannot connect to {target}{within}: {reason}")

    def __str__(self) -> str:
        return self.details()


_BY_CODE: dict[grpc.StatusCode, type[CallError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInputError,
    grpc.StatusCode.NOT_FOUND: NotServedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: OverloadedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
}


def call_error(code: grpc.StatusCode, details: str) -> CallError:
    """The error of a call that ended with ``code``: the subclass that names it, else CallError."""
    return _BY_CODE.get(code, CallError)(code, details)


def from_grpc(error: grpc.RpcError) -> CallError:
    """grpc's error of a finished call as the client's (its code and details kept)."""
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = error.details() if callable(getattr(error, "details", None)) else str(error)
    return call_error(code, details or "")
