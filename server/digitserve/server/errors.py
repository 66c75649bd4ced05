"""Domain errors of the server; they know nothing of gRPC (servicer.py maps them to status codes)."""

from __future__ import annotations


class ServerError(Exception):
    """Base class of the errors the server reports to callers."""


class InvalidInputError(ServerError):
    """Raised when a request is malformed: which field, which index, what was expected."""

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description


class ModelNotFoundError(ServerError):
    """Raised when a request pins a model version that the server does not serve."""


class ModelNotReadyError(ServerError):
    """Raised when no model is loaded yet (or the server is shutting down)."""


class OverloadedError(ServerError):
    """Raised when the server's queue is full and the request is refused at once."""


class DeadlineExpiredError(ServerError):
    """Raised when a call's deadline passed while it waited in the queue; it was not computed."""
