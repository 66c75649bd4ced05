"""digitserve.server.wire: the PredictResponse serialized by numpy parses into the message protobuf builds,
and requests read from their bytes hold what protobuf reads from them."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from digitserve.server.wire import (
    FEWEST_PACKED,
    PackedPredictRequest,
    PredictionEncoder,
    encode_predictions_protobuf,
    parse_predict_request,
)
from digitserve.v1 import digit_service_pb2 as pb

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


# --- requests: parse_predict_request reads what protobuf reads ----------------------------------


def packed_images() -> st.SearchStrategy[list[pb.Image]]:
    """Mostly uniform batches (the fast path), with now and then an image of another encoding or
    length, one without pixels, repeated floats, or a picture (``encoded``: never the fast path,
    protobuf reads it); and batches of pictures only."""
    def uniform(kind: str, length: int, n: int) -> st.SearchStrategy[list[pb.Image]]:
        return st.lists(st.binary(min_size=length, max_size=length), min_size=n, max_size=n).map(
            lambda blobs: [pb.Image(**{kind: b}) for b in blobs])

    odd = st.one_of(
        st.binary(max_size=9).map(lambda b: pb.Image(uint8=b)),
        st.binary(max_size=9).map(lambda b: pb.Image(float32=b)),
        st.just(pb.Image()),
        st.lists(st.floats(0, 1, width=32), max_size=3).map(
            lambda v: pb.Image(floats=pb.FloatPixels(values=v))),
        st.binary(max_size=9).map(lambda b: pb.Image(encoded=b)),
    )
    batch = st.builds(uniform, st.sampled_from(["uint8", "float32", "uint8", "float32", "encoded"]),
                      st.integers(0, 200), st.integers(1, 40)).flatmap(lambda s: s)
    return st.tuples(batch, st.lists(odd, max_size=2), st.integers(0, 40)).map(
        lambda t: t[0][: t[2]] + t[1] + t[0][t[2] :] if t[1] else t[0])


def assert_reads_as_protobuf(data: bytes) -> None:
    expected = pb.PredictRequest.FromString(data)
    got = parse_predict_request(data)
    if isinstance(got, pb.PredictRequest):
        assert got == expected
        return
    assert got.message() == expected
    assert got.model_version == expected.model_version
    assert got.model_name == expected.model_name
    assert got.version_label == expected.version_label
    assert got.rows.shape[0] == len(expected.images)
    for row, image in zip(got.rows, expected.images, strict=True):
        assert image.WhichOneof("pixels") == got.encoding
        assert row.tobytes() == getattr(image, got.encoding)


@settings(max_examples=300, deadline=None, database=None)
@given(images=packed_images(), version=st.integers(-(2**63), 2**63 - 1),
       version_first=st.booleans(), unknown=st.binary(max_size=3),
       name=st.sampled_from(["", "mnist", "fashion-2"]), label=st.sampled_from(["", "canary"]))
def test_any_request_reads_as_protobuf_reads_it(
    images: list[pb.Image], version: int, version_first: bool, unknown: bytes, name: str, label: str
) -> None:
    message = pb.PredictRequest(images=images, model_version=version, model_name=name,
                                version_label=label)
    data = message.SerializeToString()
    if version_first and version:  # fields in another order, as a hand-written encoder may put them
        head = pb.PredictRequest(model_version=version, model_name=name,
                                 version_label=label).SerializeToString()
        data = head + pb.PredictRequest(images=images).SerializeToString()
    if unknown:  # an unknown field (number 15, length-delimited) after the images
        data += bytes([15 << 3 | 2, len(unknown)]) + unknown
    assert_reads_as_protobuf(data)
    shapes = {(kind, len(getattr(image, kind)) if kind in ("uint8", "float32") else 0)
              for image in images for kind in [image.WhichOneof("pixels")]}
    (kind, length), *others = shapes
    uniform = not others and kind in ("uint8", "float32") and length > 0
    first_is_images = not (version_first and version)
    # Enough images (the bytes of FEWEST_PACKED records of the first image's size, at least).
    many = bool(images) and len(data) // len(pb.PredictRequest(images=images[:1]).SerializeToString()) \
        >= FEWEST_PACKED
    # The fast path is taken for what clients send, so the properties above cover it.
    assert isinstance(parse_predict_request(data), PackedPredictRequest) == (
        uniform and first_is_images and many)


@settings(max_examples=500, deadline=None, database=None)
@given(images=packed_images(), cut=st.integers(0, 10_000), flip=st.integers(0, 10_000),
       value=st.integers(0, 255))
def test_damaged_requests_fail_or_read_as_protobuf_reads_them(
    images: list[pb.Image], cut: int, flip: int, value: int
) -> None:
    data = bytearray(pb.PredictRequest(images=images, model_version=7).SerializeToString())
    if data:
        data[flip % len(data)] = value
    damaged = bytes(data[: len(data) - cut % (len(data) + 1)])
    try:
        pb.PredictRequest.FromString(damaged)
    except DecodeError:
        with pytest.raises(DecodeError):
            parse_predict_request(damaged)
        return
    assert_reads_as_protobuf(damaged)


def test_varints_of_more_bytes_than_needed_read_as_protobuf_reads_them() -> None:
    # An image of 3 uint8 pixels whose lengths are written in two bytes each (0x86 0x00 is 6).
    record = bytes([0x0A, 0x86, 0x00, 0x12, 0x83, 0x00, 1, 2, 3])
    data = record * FEWEST_PACKED + bytes([0x10, 0x09])
    assert_reads_as_protobuf(data)
    got = parse_predict_request(data)
    assert isinstance(got, PackedPredictRequest) and got.rows.tolist() == [[1, 2, 3]] * FEWEST_PACKED
    assert got.model_version == 9


class _Model:
    """What an InferResponse reads of the model that answered: its spec."""

    def __init__(self, name: str, version: int, labels: tuple[str, ...]) -> None:
        from digitserve.inference.spec import ModelSpec

        self.spec = ModelSpec(name=name, version=version, input_shape=(28, 28), input_scale=1 / 255,
                              labels=labels)


@settings(max_examples=150, deadline=None)
@given(name=st.text(min_size=0, max_size=20), version=st.integers(0, 2**62),
       request_id=st.text(max_size=40), rows=st.integers(0, 70), seed=st.integers(0, 2**32 - 1),
       outputs=st.lists(st.sampled_from(["probabilities", "class_index", "label"]), min_size=0,
                        max_size=3, unique=True),
       labels=st.sampled_from([DIGITS, ("cat", "dög", "owl"), ("", "x")]))
def test_the_written_infer_response_is_protobuf_s_byte_for_byte(
        name: str, version: int, request_id: str, rows: int, seed: int, outputs: list[str],
        labels: tuple[str, ...]) -> None:
    """oipcodec.to_response_bytes (server.wire's writer) against protobuf serializing the message
    to_response builds, for any model name and version, request id, number of images (0 too),
    outputs asked for (in any order) and labels (empty and non-ASCII ones): the same bytes."""
    from digitserve.oip import grpc_predict_v2_pb2 as oip
    from digitserve.server.infertypes import OUTPUTS, InferResponse
    from digitserve.server.oipcodec import to_response, to_response_bytes

    probabilities = softmax_rows(np.random.default_rng(seed), rows, len(labels))
    response = InferResponse(_Model(name, version, labels), probabilities,  # type: ignore[arg-type]
                             tuple(outputs) or tuple(OUTPUTS), request_id)
    written = to_response_bytes(response)
    message = to_response(response, raw=True)
    assert written == message.SerializeToString()
    assert oip.ModelInferResponse.FromString(written) == message
