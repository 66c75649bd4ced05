"""server/wire.py: the PredictResponse serialized by numpy parses into the message protobuf builds."""

from __future__ import annotations

import numpy as np
import pytest

from digitserve.v1 import digit_service_pb2 as pb
from server.wire import PredictionEncoder, encode_predictions_protobuf

DIGITS = tuple(str(d) for d in range(10))


def softmax_rows(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    logits = rng.normal(0, 4, size=(n, k))
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize(
    ("name", "version", "labels", "rows"),
    [
        ("mnist", 1, DIGITS, 1),
        ("mnist", 7, DIGITS, 64),
        ("mnist", 2**40, DIGITS, 3),  # a version of several varint bytes
        ("", 0, DIGITS, 5),  # default name and version are left out, as protobuf does
        ("model-ü", 3, ("cat", "dog", "owl"), 33),  # longer labels, not ASCII
        ("m", 1, ("zero", "one", "two"), 9),  # labels of different lengths: protobuf's path
        ("m", 1, tuple(f"c{i:02d}" for i in range(40)), 4),  # records too long for one byte
    ],
)
def test_packed_response_parses_into_protobuf_s_message(
    name: str, version: int, labels: tuple[str, ...], rows: int
) -> None:
    rng = np.random.default_rng(rows + len(labels))
    probabilities = softmax_rows(rng, rows, len(labels))
    probabilities[0] = 0.0
    probabilities[0, 0] = 1.0  # class 0: its class_index is written explicitly, still parses as 0
    encoder = PredictionEncoder(name, version, labels)
    got = pb.PredictResponse.FromString(encoder.encode(probabilities))
    expected = encode_predictions_protobuf(name, version, labels, probabilities)
    assert got == expected
    assert [p.label for p in got.predictions] == [labels[i] for i in probabilities.argmax(axis=1)]
    np.testing.assert_array_equal(
        np.array([p.probabilities for p in got.predictions], np.float32), probabilities)


def test_many_random_batches_round_trip() -> None:
    rng = np.random.default_rng(0)
    encoder = PredictionEncoder("mnist", 4, DIGITS)
    for _ in range(200):
        probabilities = softmax_rows(rng, int(rng.integers(1, 300)), 10)
        assert pb.PredictResponse.FromString(encoder.encode(probabilities)) == (
            encode_predictions_protobuf("mnist", 4, DIGITS, probabilities))
