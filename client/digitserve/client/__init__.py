"""A thin client of the MNIST gRPC server: the DigitClient library and the mnist-client CLI.
Installing it does not pull TensorFlow."""

from digitserve.client.client import DigitClient, EvaluateResult, PredictResult

__all__ = ["DigitClient", "EvaluateResult", "PredictResult"]
