"""The server's domain errors, under one root, ServerError: what a caller did wrong or cannot have
now. They know nothing of gRPC or HTTP; server.status maps each to its status on both."""

from __future__ import annotations


class ServerError(Exception):
    """Base class of the errors the server reports to callers."""


class InvalidInputError(ServerError):
    """Raised when a request is malformed: which field, which index, what was expected."""

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description


class NotServedError(ServerError):
    """Raised when a request names a model, version or label that the server does not serve
    (the repository's own ModelNotFoundError is digitserve.errors')."""


class ModelNotReadyError(ServerError):
    """Raised when no model is loaded yet (or the server is shutting down)."""


class OverloadedError(ServerError):
    """Raised when the server's queue is full and the request is refused at once."""


class DeadlineExpiredError(ServerError):
    """Raised when a call's deadline passed while it waited in the queue; it was not computed."""


class ControlRefusedError(ServerError):
    """Loading or unloading a model was asked of a server whose model control is off."""
