"""A thin client of the MNIST gRPC server: the DigitClient library and the mnist-client CLI.
Installing it does not pull TensorFlow. Every error it raises is a ``DigitServeError``."""

from digitserve.client.client import DigitClient, EvaluateResult, PredictResult
from digitserve.client.errors import (
    CallError,
    ConnectError,
    DeadlineExceededError,
    DigitServeError,
    InvalidInputError,
    NotServedError,
    OverloadedError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
)
from digitserve.client.images import ImageError
from digitserve.client.security import ClientSecurityError

__all__ = ["CallError", "ClientSecurityError", "ConnectError", "DeadlineExceededError", "DigitClient",
           "DigitServeError", "EvaluateResult", "ImageError", "InvalidInputError", "NotServedError",
           "OverloadedError", "PermissionDeniedError", "PredictResult", "UnauthenticatedError",
           "UnavailableError", "UnimplementedError"]
