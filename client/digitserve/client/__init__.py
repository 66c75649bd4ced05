"""A thin client of the MNIST gRPC server: the DigitClient library and the mnist-client CLI.
Installing it does not pull TensorFlow."""

from digitserve.client.client import DigitClient, EvaluateResult, PredictResult
from digitserve.client.connect import ConnectError
from digitserve.client.images import ImageError

__all__ = ["ConnectError", "DigitClient", "EvaluateResult", "ImageError", "PredictResult"]
