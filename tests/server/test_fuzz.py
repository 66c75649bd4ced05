"""Hostile input: property-based tests of the request decoding, and a fuzz run of malformed requests
against a real server over a real channel, serving the tiny model from its repository as mnist-serve
does. Never INTERNAL or UNKNOWN, never a crash."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import re
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from digitserve import pictures
from digitserve.idx import scale_pixels
from digitserve.server.dataplane import check_labels
from digitserve.server.errors import InvalidInputError
from digitserve.server.infertypes import Where
from digitserve.server.pixels import check_pixels
from digitserve.v1 import digit_service_pb2 as pb
from tests.servers import ServerThread
from tests.support import decode_v1_images as decode_images
from tests.support import digit_photo, tiny_litert

# ---------------------------------------------------------------------------------------------
# Properties of the decoding (no server): any Image content either decodes to float32 pixels in
# [0, 1] of the right shape, or raises InvalidInputError naming the right field and index.

ENCODING_FIELD = {"uint8": "uint8", "float32": "float32", "floats": "floats.values"}


def any_float32() -> st.SearchStrategy[float]:
    return st.floats(width=32, allow_nan=True, allow_infinity=True)


def pixel() -> st.SearchStrategy[float]:
    return st.floats(0.0, 1.0, width=32)


def pack(values: list[float]) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def image_strategy(size: int) -> st.SearchStrategy[pb.Image]:
    """Valid and invalid images, weighted so that every branch is reached often."""
    length = st.one_of(st.just(size), st.integers(0, 2 * size + 1))
    values = st.one_of(st.lists(pixel(), min_size=size, max_size=size),
                       st.lists(st.one_of(pixel(), any_float32()), min_size=size, max_size=size),
                       length.flatmap(lambda n: st.lists(any_float32(), min_size=n, max_size=n)))
    return st.one_of(
        st.one_of(st.binary(min_size=size, max_size=size), length.flatmap(
            lambda n: st.binary(min_size=n, max_size=n))).map(lambda b: pb.Image(uint8=b)),
        values.map(lambda v: pb.Image(float32=pack(v))),
        st.binary(max_size=4 * size + 5).map(lambda b: pb.Image(float32=b)),
        values.map(lambda v: pb.Image(floats=pb.FloatPixels(values=v))),
        st.just(pb.Image()),
        st.binary(max_size=20).map(lambda b: pb.Image(encoded=b)),  # never a picture
    )


def pixels_of(image: pb.Image) -> npt.NDArray[np.float32]:
    """The oracle's own decoding of an image already known to have the right size."""
    kind = image.WhichOneof("pixels")
    if kind == "uint8":
        return np.array(list(image.uint8), dtype=np.float32) / np.float32(255)
    if kind == "float32":
        return np.array(struct.unpack(f"<{len(image.float32) // 4}f", image.float32), np.float32)
    return np.array(list(image.floats.values), dtype=np.float32)


def expected_field(images: list[pb.Image], size: int, prefix: str) -> str | None:
    """What decode_images must name: the first image without pixels or of the wrong length, else
    the first pixel (row-major) that is not finite or not in [0, 1]; None if all are good."""
    for i, image in enumerate(images):
        kind = image.WhichOneof("pixels")
        if kind is None:
            return f"{prefix}[{i}]"
        if kind == "encoded":  # decoded in turn: bytes that are no picture fail there
            return f"{prefix}[{i}].encoded"
        n = {"uint8": len(image.uint8), "float32": len(image.float32),
             "floats": len(image.floats.values)}[kind]
        if n != (4 * size if kind == "float32" else size):
            return f"{prefix}[{i}].{ENCODING_FIELD[kind]}"
    for i, image in enumerate(images):
        for j, v in enumerate(pixels_of(image).tolist()):
            if not (np.isfinite(v) and 0.0 <= v <= 1.0):
                return f"{prefix}[{i}].{ENCODING_FIELD[image.WhichOneof('pixels') or '']}[{j}]"
    return None


@settings(max_examples=400, deadline=None, database=None)
@given(size=st.integers(1, 12), data=st.data(),
       prefix=st.sampled_from(["images", "requests[3].images"]))
def test_any_image_decodes_to_unit_pixels_or_names_the_bad_one(
    size: int, data: st.DataObject, prefix: str
) -> None:
    images = data.draw(st.lists(image_strategy(size), max_size=5))
    expected = expected_field(images, size, prefix)
    if expected is None:
        out = decode_images(images, size, prefix, input_shape=(1, size))
        assert out.dtype == np.float32 and out.shape == (len(images), size)
        assert np.all((out >= 0) & (out <= 1))
        for row, image in zip(out, images, strict=True):
            np.testing.assert_array_equal(row, pixels_of(image))
    else:
        with pytest.raises(InvalidInputError) as info:
            decode_images(images, size, prefix, input_shape=(1, size))
        assert info.value.field == expected, (info.value, expected)
        assert str(info.value) == f"{expected}: {info.value.description}"


@settings(max_examples=300, deadline=None, database=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, max_side=6),
                  elements=st.one_of(pixel(), any_float32())))
def test_check_pixels_names_the_first_bad_pixel(images: npt.NDArray[np.float32]) -> None:
    encodings = ["float32"] * images.shape[0]
    bad = ~np.isfinite(images) | (images < 0) | (images > 1)
    if not bad.any():
        check_pixels(images, Where("images", "images", "images", "images[{i}].{e}[{j}]", encodings))
        return
    i, j = np.argwhere(bad)[0]
    with pytest.raises(InvalidInputError) as info:
        check_pixels(images, Where("images", "images", "images", "images[{i}].{e}[{j}]", encodings))
    assert info.value.field == f"images[{i}].float32[{j}]"


@settings(max_examples=300, deadline=None, database=None)
@given(labels=st.lists(st.integers(-(2**31), 2**31 - 1) | st.integers(-2, 12), max_size=8),
       count=st.integers(0, 8), classes=st.integers(1, 12))
def test_check_labels_accepts_one_class_per_image_or_names_the_bad_label(
    labels: list[int], count: int, classes: int
) -> None:
    array = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(labels) != count:
        expected: str | None = "labels"
    else:
        expected = next((f"labels[{i}]" for i, y in enumerate(labels) if not 0 <= y < classes), None)
    if expected is None:
        check_labels(array, count, classes)
    else:
        with pytest.raises(InvalidInputError) as info:
            check_labels(array, count, classes)
        assert info.value.field == expected


# ---------------------------------------------------------------------------------------------
# The fuzz run: a real server, a real channel, 10,000+ malformed (and some good) calls.

SIZE = 784
MAX_IMAGES = 64
MAX_BYTES = 256 * 1024
FUZZ_CALLS = 10_000
CONCURRENCY = 32
SERVICE = "/digitserve.v1.DigitService/"
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND


@dataclass
class Case:
    """One call: which RPC, its request (message(s) or raw bytes), the codes it may end with, and
    the BadRequest field an INVALID_ARGUMENT must name (None: not checked)."""

    kind: str
    rpc: str  # predict | evaluate | info
    request: Any  # a message, a list of messages, bytes or a list of bytes
    allowed: set[grpc.StatusCode]
    field: str | None = None
    timeout: float = 30.0
    expected_probs: npt.NDArray[np.float32] | None = None
    expected_count: int | None = None


@dataclass
class Tally:
    codes: collections.Counter[str] = field(default_factory=collections.Counter)
    kinds: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    bad_request_checked: int = 0
    answers_checked: int = 0
    failures: list[str] = field(default_factory=list)


class Fuzzer:
    """Builds malformed requests from a seeded generator, and the answers of good ones from
    ``model`` (a copy of the served model, in this thread)."""

    def __init__(self, seed: int, model: Any) -> None:
        self.rng = np.random.default_rng(seed)
        self.model = model
        # Good pictures (small, so that thousands decode quickly) and their pixels, once.
        self.photos = [digit_photo(fmt, seed=k, size=(120 + 20 * k, 90 + 10 * k))
                       for k, fmt in enumerate(["PNG", "JPEG", "PNG", "JPEG"])]
        self.photo_pixels = [scale_pixels(pictures.from_bytes(p)) for p in self.photos]

    # -- images --------------------------------------------------------------------------------
    def good_pixels(self, n: int) -> tuple[list[pb.Image], npt.NDArray[np.float32]]:
        images, rows = [], []
        for _ in range(n):
            kind = self.rng.choice(["uint8", "float32", "floats"], p=[0.5, 0.4, 0.1])
            if kind == "uint8":
                raw = self.rng.integers(0, 256, SIZE, dtype=np.uint8)
                images.append(pb.Image(uint8=raw.tobytes()))
                rows.append(raw.astype(np.float32) / np.float32(255))
                continue
            values = self.rng.random(SIZE, dtype=np.float32)
            values[self.rng.integers(0, SIZE, 3)] = [0.0, 1.0, -0.0]  # the edges are valid
            values[0] = 0.0  # never FakeModel's crash pixel, whichever model serves
            if kind == "float32":
                images.append(pb.Image(float32=values.astype("<f4").tobytes()))
            else:
                images.append(pb.Image(floats=pb.FloatPixels(values=values.tolist())))
            rows.append(values)
        return images, np.asarray(rows, dtype=np.float32).reshape(n, SIZE)

    def wrong_size(self) -> tuple[pb.Image, str]:
        kind = str(self.rng.choice(["uint8", "float32", "floats"]))
        n = int(self.rng.choice([0, 1, SIZE - 1, SIZE + 1, 2 * SIZE, int(self.rng.integers(0, 3 * SIZE))]))
        if kind == "uint8":
            n = n if n != SIZE else SIZE + 1
            return pb.Image(uint8=self.rng.bytes(n)), "uint8"
        if kind == "float32":
            n = n if n != 4 * SIZE else 4 * SIZE - 1
            return pb.Image(float32=self.rng.bytes(n)), "float32"
        n = n if n != SIZE else SIZE - 1
        return pb.Image(floats=pb.FloatPixels(values=[0.5] * n)), "floats.values"

    def bad_value(self) -> tuple[pb.Image, str, int]:
        values = np.full(SIZE, 0.5, dtype=np.float32)
        j = int(self.rng.integers(0, SIZE))
        values[j] = self.rng.choice(np.array([np.nan, np.inf, -np.inf, 1.0000001, -1e-30, 255.0,
                                              -1.0, 3.4e38, -1e-45], dtype=np.float32))
        if self.rng.random() < 0.7:
            return pb.Image(float32=values.astype("<f4").tobytes()), "float32", j
        return pb.Image(floats=pb.FloatPixels(values=values.tolist())), "floats.values", j

    def with_bad_at(self, bad: pb.Image, total: int) -> tuple[list[pb.Image], int]:
        images, _ = self.good_pixels(total - 1)
        k = int(self.rng.integers(0, total))
        images.insert(k, bad)
        return images, k

    # -- cases ---------------------------------------------------------------------------------
    def case(self) -> Case:
        kinds: dict[str, tuple[float, Callable[[], Case]]] = {
            "good-mixed": (0.10, self.good_predict),
            "wrong-size": (0.10, self.predict_wrong_size),
            "nan-inf-range": (0.10, self.predict_bad_value),
            "no-pixels": (0.04, self.predict_no_pixels),
            "empty-batch": (0.03, lambda: Case("empty-batch", "predict", pb.PredictRequest(),
                                                {INVALID}, "images")),
            "huge-batch": (0.04, self.predict_huge_batch),
            "huge-message": (0.02, self.predict_huge_message),
            "pinned-version": (0.04, self.predict_pinned),
            "random-bytes": (0.14, self.random_bytes),
            "mutated-bytes": (0.10, self.mutated_bytes),
            "short-deadline": (0.02, self.short_deadline),
            "evaluate-good": (0.04, self.evaluate_good),
            "evaluate-labels": (0.08, self.evaluate_bad_labels),
            "evaluate-bad-batch": (0.06, self.evaluate_bad_batch),
            "evaluate-bytes": (0.05, self.evaluate_bytes),
            "evaluate-version": (0.02, self.evaluate_version),
            "info": (0.02, lambda: Case("info", "info", pb.GetModelInfoRequest(), {OK})),
            "picture-good": (0.03, self.picture_good),
            "picture-garbage": (0.03, self.picture_garbage),
            "picture-truncated": (0.03, self.picture_truncated),
            "picture-mutated": (0.03, self.picture_mutated),
            "picture-huge": (0.02, self.picture_huge),
        }
        names = list(kinds)
        weights = np.array([kinds[n][0] for n in names])
        return kinds[names[int(self.rng.choice(len(names), p=weights / weights.sum()))]][1]()

    def good_predict(self) -> Case:
        images, rows = self.good_pixels(int(self.rng.integers(1, 9)))
        return Case("good-mixed", "predict", pb.PredictRequest(images=images), {OK},
                    expected_probs=self.model.predict(rows))

    def predict_wrong_size(self) -> Case:
        bad, name = self.wrong_size()
        images, k = self.with_bad_at(bad, int(self.rng.integers(1, 6)))
        return Case("wrong-size", "predict", pb.PredictRequest(images=images), {INVALID},
                    f"images[{k}].{name}")

    def predict_bad_value(self) -> Case:
        bad, name, j = self.bad_value()
        images, k = self.with_bad_at(bad, int(self.rng.integers(1, 6)))
        return Case("nan-inf-range", "predict", pb.PredictRequest(images=images), {INVALID},
                    f"images[{k}].{name}[{j}]")

    def predict_no_pixels(self) -> Case:
        images, k = self.with_bad_at(pb.Image(), int(self.rng.integers(1, 6)))
        return Case("no-pixels", "predict", pb.PredictRequest(images=images), {INVALID},
                    f"images[{k}]")

    def predict_huge_batch(self) -> Case:
        n = int(self.rng.integers(MAX_IMAGES + 1, 4 * MAX_IMAGES))
        image = pb.Image() if self.rng.random() < 0.5 else pb.Image(uint8=bytes(SIZE))
        return Case("huge-batch", "predict", pb.PredictRequest(images=[image] * n), {INVALID},
                    "images")

    def predict_huge_message(self) -> Case:
        blob = bytes(int(self.rng.integers(MAX_BYTES + 1, 2 * MAX_BYTES)))
        return Case("huge-message", "predict", pb.PredictRequest(images=[pb.Image(uint8=blob)]),
                    {grpc.StatusCode.RESOURCE_EXHAUSTED})

    def predict_pinned(self) -> Case:
        version = int(self.rng.choice([1, 2, -1, 2**63 - 1, -(2**63), int(self.rng.integers(2, 1000))]))
        images, rows = self.good_pixels(1)
        if version == 1:
            return Case("pinned-version", "predict",
                        pb.PredictRequest(images=images, model_version=1), {OK},
                        expected_probs=self.model.predict(rows))
        return Case("pinned-version", "predict", pb.PredictRequest(images=images, model_version=version),
                    {NOT_FOUND})

    def random_bytes(self) -> Case:
        rpc = str(self.rng.choice(["predict", "info"], p=[0.8, 0.2]))
        data = self.rng.bytes(int(self.rng.choice([0, 1, 2, 5, 17, 100, 1000, 10_000])))
        # Bytes that happen to parse give an empty or version-pinning request.
        return Case("random-bytes", rpc, data, {INVALID, NOT_FOUND} | ({OK} if rpc == "info" else set()))

    def mutated_bytes(self) -> Case:
        images, _ = self.good_pixels(int(self.rng.integers(1, 4)))
        data = bytearray(pb.PredictRequest(images=images).SerializeToString())
        how = self.rng.integers(0, 3)
        if how == 0:
            data = data[: int(self.rng.integers(0, len(data)))]
        else:
            for _ in range(int(self.rng.integers(1, 8))):
                data[int(self.rng.integers(0, len(data)))] = int(self.rng.integers(0, 256))
        if how == 2:
            data += self.rng.bytes(int(self.rng.integers(1, 50)))
        return Case("mutated-bytes", "predict", bytes(data), {OK, INVALID, NOT_FOUND})

    def short_deadline(self) -> Case:
        images, _ = self.good_pixels(4)
        return Case("short-deadline", "predict", pb.PredictRequest(images=images),
                    {OK, grpc.StatusCode.DEADLINE_EXCEEDED}, timeout=float(self.rng.choice([1e-4, 1e-3])))

    # -- pictures (Image.encoded): at most 2 a call, so 32 callers never fill the decoder's 64 --
    def with_picture(self, picture: bytes) -> tuple[list[pb.Image], int]:
        images, _ = self.good_pixels(int(self.rng.integers(0, 3)))
        if self.rng.random() < 0.3:  # and a good picture beside it
            images.append(pb.Image(encoded=self.photos[int(self.rng.integers(0, len(self.photos)))]))
        k = int(self.rng.integers(0, len(images) + 1))
        images.insert(k, pb.Image(encoded=picture))
        return images, k

    def picture_good(self) -> Case:
        images, rows = self.good_pixels(int(self.rng.integers(0, 3)))
        k = int(self.rng.integers(0, len(self.photos)))
        images.append(pb.Image(encoded=self.photos[k]))
        rows = np.concatenate([rows, self.photo_pixels[k][np.newaxis]])
        return Case("picture-good", "predict", pb.PredictRequest(images=images), {OK},
                    expected_probs=self.model.predict(rows))

    def picture_garbage(self) -> Case:
        images, k = self.with_picture(self.rng.bytes(int(self.rng.choice([1, 8, 100, 5000]))))
        return Case("picture-garbage", "predict", pb.PredictRequest(images=images), {INVALID},
                    f"images[{k}].encoded")

    def picture_truncated(self) -> Case:
        photo = self.photos[int(self.rng.integers(0, len(self.photos)))]
        images, k = self.with_picture(photo[: int(self.rng.integers(0, len(photo)))])
        # A cut in a PNG's last chunk (IEND) still decodes: OK is right then.
        return Case("picture-truncated", "predict", pb.PredictRequest(images=images), {INVALID, OK},
                    f"images[{k}].encoded")

    def picture_mutated(self) -> Case:
        photo = bytearray(self.photos[int(self.rng.integers(0, len(self.photos)))])
        for _ in range(int(self.rng.integers(1, 20))):
            photo[int(self.rng.integers(0, len(photo)))] = int(self.rng.integers(0, 256))
        images, k = self.with_picture(bytes(photo))
        return Case("picture-mutated", "predict", pb.PredictRequest(images=images), {INVALID, OK},
                    f"images[{k}].encoded")

    def picture_huge(self) -> Case:
        width, height = (int(v) for v in self.rng.integers(1001, 2**31 - 1, size=2))
        header = struct.pack(">IIBBBBB", width, height, 8, int(self.rng.choice([0, 2, 6])), 0, 0, 0)
        chunk = struct.pack(">I", 13) + b"IHDR" + header + struct.pack(">I", zlib.crc32(b"IHDR" + header))
        images, k = self.with_picture(b"\x89PNG\r\n\x1a\n" + chunk + self.rng.bytes(100))
        return Case("picture-huge", "predict", pb.PredictRequest(images=images), {INVALID},
                    f"images[{k}].encoded")

    def evaluate_batches(self, n: int) -> list[pb.EvaluateRequest]:
        batches = []
        for _ in range(n):
            images, _ = self.good_pixels(int(self.rng.integers(1, 5)))
            labels = self.rng.integers(0, 10, len(images)).tolist()
            batches.append(pb.EvaluateRequest(images=images, labels=labels))
        return batches

    def evaluate_good(self) -> Case:
        batches = self.evaluate_batches(int(self.rng.integers(1, 4)))
        return Case("evaluate-good", "evaluate", batches, {OK},
                    expected_count=sum(len(b.images) for b in batches))

    def evaluate_bad_labels(self) -> Case:
        batches = self.evaluate_batches(int(self.rng.integers(1, 4)))
        b = int(self.rng.integers(0, len(batches)))
        labels = list(batches[b].labels)
        if self.rng.random() < 0.5:  # count does not match
            labels = labels[:-1] if self.rng.random() < 0.5 else labels + [1] * int(self.rng.integers(1, 5))
            expected = f"requests[{b}].labels"
        else:
            i = int(self.rng.integers(0, len(labels)))
            labels[i] = int(self.rng.choice([-1, 10, 11, 2**31 - 1, -(2**31)]))
            expected = f"requests[{b}].labels[{i}]"
        del batches[b].labels[:]
        batches[b].labels.extend(labels)
        return Case("evaluate-labels", "evaluate", batches, {INVALID}, expected)

    def evaluate_bad_batch(self) -> Case:
        batches = self.evaluate_batches(int(self.rng.integers(1, 4)))
        b = int(self.rng.integers(0, len(batches) + 1))
        if self.rng.random() < 0.1:  # an empty stream
            return Case("evaluate-bad-batch", "evaluate", [], {INVALID}, "images")
        if self.rng.random() < 0.3:  # an empty batch
            batches.insert(b, pb.EvaluateRequest())
            return Case("evaluate-bad-batch", "evaluate", batches, {INVALID}, f"requests[{b}].images")
        bad, name = self.wrong_size()
        images, k = self.with_bad_at(bad, int(self.rng.integers(1, 4)))
        batches.insert(b, pb.EvaluateRequest(images=images, labels=[0] * len(images)))
        return Case("evaluate-bad-batch", "evaluate", batches, {INVALID},
                    f"requests[{b}].images[{k}].{name}")

    def evaluate_bytes(self) -> Case:
        batches: list[bytes] = [m.SerializeToString() for m in self.evaluate_batches(2)]
        b = int(self.rng.integers(0, 3))
        n = int(self.rng.integers(1, 100))  # a length-delimited field 1 cut short: never parses
        batches.insert(b, b"\x0a" + bytes([n]) + self.rng.bytes(int(self.rng.integers(0, n))))
        return Case("evaluate-bytes", "evaluate", batches, {INVALID}, f"requests[{b}]")

    def evaluate_version(self) -> Case:
        batches = self.evaluate_batches(2)
        batches[1].model_version = int(self.rng.integers(2, 100))
        return Case("evaluate-version", "evaluate", batches, {INVALID}, "model_version")


def bad_request_field(error: Any) -> str:
    """The BadRequest field violation in the grpc-status-details-bin trailer."""
    details = [v for k, v in (error.trailing_metadata() or ()) if k == "grpc-status-details-bin"]
    assert len(details) == 1, error.trailing_metadata()
    status = status_pb2.Status.FromString(details[0])
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert status.message == error.details()
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    violation = bad_request.field_violations[0]
    assert error.details() == f"{violation.field}: {violation.description}"
    return str(violation.field)


def bind_calls(channel: Any) -> dict[tuple[str, bool], Any]:
    """Multi-callables of the three RPCs, taking messages (raw=False) or bytes (raw=True)."""
    methods = {"predict": ("Predict", pb.PredictResponse), "evaluate": ("Evaluate", pb.EvaluateResponse),
               "info": ("GetModelInfo", pb.GetModelInfoResponse)}
    calls = {}
    for rpc, (method, response) in methods.items():
        for raw in (False, True):
            factory = channel.stream_unary if rpc == "evaluate" else channel.unary_unary
            calls[(rpc, raw)] = factory(
                SERVICE + method,
                request_serializer=None if raw else (lambda m: m.SerializeToString()),
                response_deserializer=response.FromString,
            )
    return calls


async def run_fuzz(target: str, cases: Iterator[Case], tally: Tally) -> None:
    """Unary calls go through grpc.aio; Evaluate streams through the sync API in threads, because
    the aio client reports INTERNAL "Internal error from Core" instead of the server's status when
    a write fails after the server already answered (grpc/grpc#36066, seen here in ~1% of the
    streams that the server refused early); the sync client reports the server's status."""
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(target, options=options) as sync_channel:
        async with grpc.aio.insecure_channel(target, options=options) as channel:
            calls, sync_calls = bind_calls(channel), bind_calls(sync_channel)

            async def worker() -> None:
                for case in cases:  # one shared iterator: each case is taken once
                    await run_case(case, calls, sync_calls, tally)

            await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


async def run_case(case: Case, calls: dict[tuple[str, bool], Any],
                   sync_calls: dict[tuple[str, bool], Any], tally: Tally) -> None:
    raw = isinstance(case.request, bytes) or (
        isinstance(case.request, list) and any(isinstance(r, bytes) for r in case.request))
    if raw and isinstance(case.request, list):
        request: Any = iter([r if isinstance(r, bytes) else r.SerializeToString() for r in case.request])
    else:
        request = iter(case.request) if isinstance(case.request, list) else case.request
    code: grpc.StatusCode = OK
    response: Any = None
    try:
        if case.rpc == "evaluate":
            response = await asyncio.to_thread(sync_calls[(case.rpc, raw)], request, timeout=case.timeout)
        else:
            response = await calls[(case.rpc, raw)](request, timeout=case.timeout)
    except grpc.RpcError as exc:
        code = exc.code()
        if code == INVALID:
            named = bad_request_field(exc)
            tally.bad_request_checked += 1
            if case.field is not None and named != case.field:
                tally.failures.append(f"{case.kind}: named {named!r}, expected {case.field!r}")
        elif code in NEVER:
            tally.failures.append(f"{case.kind}: {code.name}: {exc.details()}")
    tally.codes[code.name] += 1
    tally.kinds[(case.kind, code.name)] += 1
    if code not in case.allowed:
        tally.failures.append(f"{case.kind}: got {code.name}, allowed {sorted(c.name for c in case.allowed)}")
    if code == OK and case.expected_probs is not None:
        got = np.array([p.probabilities for p in response.predictions], np.float32)
        np.testing.assert_allclose(got, case.expected_probs, rtol=1e-5, atol=1e-7)
        tally.answers_checked += 1
    if code == OK and case.expected_count is not None:
        assert response.count == case.expected_count
        tally.answers_checked += 1


@pytest.mark.timeout(600)
def test_fuzz_ten_thousand_malformed_requests_never_internal(
    start_server: Callable[..., ServerThread], tiny_repo: Path, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str], record_property: Callable[[str, object], None],
) -> None:
    caplog.set_level(logging.WARNING)
    server = start_server(max_images_per_request=MAX_IMAGES, max_message_bytes=MAX_BYTES,
                          max_queued_images=16 * MAX_IMAGES, max_picture_pixels=1_000_000)
    assert server.model is not None and server.model.inference_path == "litert"
    model = tiny_litert(tiny_repo)  # the served model's answers, computed in this thread
    fuzzer = Fuzzer(seed=20260101, model=model)
    cases = (fuzzer.case() for _ in range(FUZZ_CALLS))
    tally = Tally()
    started = time.perf_counter()
    asyncio.run(run_fuzz(server.target, cases, tally))
    elapsed = time.perf_counter() - started

    sent = sum(tally.codes.values())
    line = (f"fuzz: {sent} calls in {elapsed:.1f}s ({sent / elapsed:.0f}/s), by code: "
            + ", ".join(f"{c} {n}" for c, n in tally.codes.most_common())
            + f"; BadRequest checked {tally.bad_request_checked}, answers checked {tally.answers_checked}")
    record_property("fuzz", line)
    with capsys.disabled():
        print("\n" + line)
        for (kind, code), n in sorted(tally.kinds.items()):
            print(f"  {kind:<20} {code:<20} {n}")

    assert sent == FUZZ_CALLS
    assert not tally.failures, tally.failures[:20]
    assert not NEVER & {grpc.StatusCode[c] for c in tally.codes}
    assert tally.codes["INVALID_ARGUMENT"] > FUZZ_CALLS // 2 and tally.codes["OK"] > 0
    assert tally.codes["RESOURCE_EXHAUSTED"] > 0 and tally.codes["NOT_FOUND"] > 0
    assert tally.bad_request_checked == tally.codes["INVALID_ARGUMENT"]

    # No crash, nothing logged as unexpected, nothing left queued; still healthy and correct.
    assert server.thread.is_alive() and server.loop.is_running()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors[:5]]
    assert server.plane.batcher.queued_images == 0
    assert server.app.pictures.queued == 0
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        images, rows = Fuzzer(seed=1, model=model).good_pixels(3)
        response = channel.unary_unary(
            SERVICE + "Predict", request_serializer=pb.PredictRequest.SerializeToString,
            response_deserializer=pb.PredictResponse.FromString,
        )(pb.PredictRequest(images=images), timeout=5)
        got = np.array([p.probabilities for p in response.predictions], np.float32)
        np.testing.assert_allclose(got, model.predict(rows), rtol=1e-5, atol=1e-7)


def test_undecodable_bytes_are_invalid_argument_naming_the_message(
    tiny_server: ServerThread,
) -> None:
    """Before the fix, gRPC answered UNKNOWN ("Unexpected <class DecodeError>...") for a unary
    call and the servicer INTERNAL for a stream."""
    with grpc.insecure_channel(tiny_server.target) as channel:
        predict = channel.unary_unary(SERVICE + "Predict")
        evaluate = channel.stream_unary(SERVICE + "Evaluate")
        good = pb.EvaluateRequest(images=[pb.Image(uint8=bytes(SIZE))], labels=[3]).SerializeToString()
        for call, request, message in (
            (predict, b"\xff\xff", "request: not a valid digitserve.v1.PredictRequest message"),
            (evaluate, iter([good, good, b"\x0a\x05ab"]),
             "requests[2]: not a valid digitserve.v1.EvaluateRequest message"),
        ):
            with pytest.raises(grpc.RpcError) as info:
                call(request, timeout=5)
            assert info.value.code() == INVALID, info.value.details()
            assert re.match(re.escape(message), info.value.details())
        assert evaluate(iter([good]), timeout=5)


# ---------------------------------------------------------------------------------------------
# The HTTP edge (--http-port): 10,000+ malformed (and some good) requests over keep-alive
# connections, raw HTTP included. Never a 500, never a traceback, always JSON; healthy after.

HTTP_CALLS = 10_000
HTTP_CONCURRENCY = 16
HTTP_PATH = "/v2/models/tiny/infer"


@dataclass
class HttpCase:
    """One request as bytes on the wire, the statuses it may get, and the answer it must carry."""

    kind: str
    wire: bytes
    allowed: set[int]
    expected_probs: npt.NDArray[np.float32] | None = None


def http_request(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class HttpFuzzer:
    """Malformed V2 REST requests from a seeded generator; the answers of good ones from ``model``."""

    def __init__(self, seed: int, model: Any) -> None:
        self.rng = np.random.default_rng(seed)
        self.model = model

    def pixels(self, n: int) -> npt.NDArray[np.float32]:
        values = self.rng.random((n, SIZE), dtype=np.float32)
        values[:, 0] = 0.0
        return values

    def tensor(self, n: int = 1, datatype: str = "FP32") -> dict[str, Any]:
        pixels = self.pixels(n)
        data: list[Any] = (pixels.ravel().tolist() if datatype == "FP32"
                           else (pixels * 255).astype(np.uint8).ravel().tolist())
        return {"name": "images", "shape": [n, SIZE], "datatype": datatype, "data": data}

    def post(self, document: Any, path: str = HTTP_PATH, headers: dict[str, str] | None = None) -> bytes:
        return http_request("POST", path, json.dumps(document).encode(), headers)

    def case(self) -> HttpCase:
        kinds: dict[str, tuple[float, Callable[[], HttpCase]]] = {
            "good": (0.10, self.good),
            "mutated-json": (0.16, self.mutated_json),
            "random-json": (0.10, self.random_json),
            "wrong-tensor": (0.16, self.wrong_tensor),
            "bad-values": (0.10, self.bad_values),
            "binary": (0.10, self.binary),
            "routes": (0.10, self.routes),
            "raw-http": (0.04, self.raw_http),
            "too-large": (0.02, lambda: HttpCase("too-large", http_request(
                "POST", HTTP_PATH, b"[" * (MAX_BYTES + 1)), {413})),
            "models": (0.12, self.models),
        }
        names = list(kinds)
        weights = np.array([kinds[n][0] for n in names])
        return kinds[names[int(self.rng.choice(len(names), p=weights / weights.sum()))]][1]()

    def good(self) -> HttpCase:
        n = int(self.rng.integers(1, 5))
        tensor = self.tensor(n)
        expected = self.model.predict(np.asarray(tensor["data"], np.float32).reshape(n, SIZE))
        return HttpCase("good", self.post({"inputs": [tensor]}), {200}, expected)

    def mutated_json(self) -> HttpCase:
        data = bytearray(json.dumps({"inputs": [self.tensor(1)]}).encode())
        for _ in range(int(self.rng.integers(1, 6))):
            i = int(self.rng.integers(0, len(data)))
            how = int(self.rng.integers(0, 3))
            if how == 0:
                data[i] = int(self.rng.integers(0, 256))
            elif how == 1:
                del data[i:i + int(self.rng.integers(1, 40))]
            else:
                count = int(self.rng.integers(1, 5))
                data[i:i] = bytes(self.rng.choice(list(b'{}[]",:0e-.9nulltrue'), count))
        return HttpCase("mutated-json", http_request("POST", HTTP_PATH, bytes(data)), {200, 400})

    def random_value(self, depth: int = 0) -> Any:
        kind = int(self.rng.integers(0, 7 if depth < 3 else 5))
        if kind == 0:
            return None
        if kind == 1:
            return bool(self.rng.integers(0, 2))
        if kind == 2:
            return float(self.rng.choice([0.5, -1.0, 1e308, 2**63, -(2**64), 3]))
        if kind == 3:
            return str(self.rng.choice(["images", "FP32", "UINT8", "", "x" * 50, "\u00e9\u4e2d"]))
        if kind == 4:
            return int(self.rng.choice([0, 1, -1, 784, 2**70]))
        if kind == 5:
            return [self.random_value(depth + 1) for _ in range(int(self.rng.integers(0, 4)))]
        keys = ["inputs", "outputs", "name", "shape", "datatype", "data", "parameters", "id",
                "binary_data_size", "binary_data_output"]
        return {str(self.rng.choice(keys)): self.random_value(depth + 1)
                for _ in range(int(self.rng.integers(0, 4)))}

    def random_json(self) -> HttpCase:
        document: Any = {"inputs": [self.random_value(1) for _ in range(int(self.rng.integers(0, 3)))]}
        if self.rng.random() < 0.3:
            document = self.random_value()
        return HttpCase("random-json", self.post(document), {400})

    def wrong_tensor(self) -> HttpCase:
        tensor = self.tensor(int(self.rng.integers(1, 3)), str(self.rng.choice(["FP32", "UINT8"])))
        change = int(self.rng.integers(0, 8))
        if change == 0:
            tensor["shape"] = [int(self.rng.integers(1, 3)), int(self.rng.choice([783, 785, 28, 1]))]
        elif change == 1:
            tensor["datatype"] = str(self.rng.choice(["INT32", "FP64", "FP16", "fp32", "", "BOOL"]))
        elif change == 2:
            tensor["name"] = str(self.rng.choice(["image", "", "IMAGES"]))
        elif change == 3:
            tensor["data"] = tensor["data"][: int(self.rng.integers(0, len(tensor["data"])))]
        elif change == 4:
            tensor["shape"] = [MAX_IMAGES + int(self.rng.integers(1, 50)), SIZE]
        elif change == 5:
            tensor["data"][int(self.rng.integers(0, len(tensor["data"])))] = self.random_value()
            if tensor["datatype"] == "FP32" and isinstance(tensor["data"][0], bool):
                tensor["data"][0] = "x"
        elif change == 6:
            tensor["parameters"] = {"shared_memory_region": "r0"}
        else:
            return HttpCase("wrong-tensor", self.post({"inputs": [tensor, tensor]}), {400})
        allowed = {400, 200} if change == 5 else {400}
        return HttpCase("wrong-tensor", self.post({"inputs": [tensor]}), allowed)

    def bad_values(self) -> HttpCase:
        tensor = self.tensor(1)
        j = int(self.rng.integers(0, SIZE))
        value = self.rng.choice(["NaN", "Infinity", "-Infinity", "1.0000001", "-1e-30", "255", "1e39"])
        body = json.dumps({"inputs": [tensor]}).replace(
            json.dumps(tensor["data"]), json.dumps(tensor["data"][:j])[:-1] + (", " if j else "")
            + str(value) + ", " + json.dumps(tensor["data"][j + 1:])[1:])
        return HttpCase("bad-values", http_request("POST", HTTP_PATH, body.encode()), {400})

    def binary(self) -> HttpCase:
        pixels = self.pixels(1).astype("<f4").tobytes()
        size = int(self.rng.choice([len(pixels), len(pixels) - 4, len(pixels) + 4, -1, 0]))
        header = json.dumps({"inputs": [{"name": "images", "shape": [1, SIZE], "datatype": "FP32",
                                          "parameters": {"binary_data_size": size}}]}).encode()
        length = int(self.rng.choice([len(header), len(header) + 3, -5, 10**9]))
        if size == len(pixels) and length == len(header):
            length += 1  # always one fault
        wire = http_request("POST", HTTP_PATH, header + pixels,
                            {"Inference-Header-Content-Length": str(length)})
        return HttpCase("binary", wire, {400})

    def routes(self) -> HttpCase:
        method = str(self.rng.choice(["GET", "POST", "PUT", "DELETE", "PATCH", "FOO"]))
        path = str(self.rng.choice(["/", "/v2/", "/v2/models", "/v2/models/tiny/infer/x", "/v1/models/tiny",
                                    "/v2/models/tiny/versions/1/infer", "/v2/health/ready", "/metrics",
                                    "/v2/repository/index", "/%00", "/v2/models/%2F/ready"]))
        body = self.rng.bytes(int(self.rng.integers(0, 30)))
        return HttpCase("routes", http_request(method, path, body), {200, 400, 404, 405, 503})

    def raw_http(self) -> HttpCase:
        garbage = [self.rng.bytes(int(self.rng.integers(1, 200))) + b"\r\n\r\n",
                   b"GET / HTTP/9.9\r\n\r\n", b"GET /v2 HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
                   b"POST /v2/repository/index HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                   b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
                   b"GET /v2 HTTP/1.1\r\n" + b"".join(b"H%d: v\r\n" % i for i in range(100)) + b"\r\n"]
        return HttpCase("raw-http", garbage[int(self.rng.integers(0, len(garbage)))], {400, 431, 0})

    def models(self) -> HttpCase:
        path = str(self.rng.choice(["/v2/models/nope/infer", "/v2/models/tiny/versions/7/infer",
                                    "/v2/models/tiny/versions/canary/infer",
                                    "/v2/models/tiny/versions/x!/infer",
                                    "/v2/models//infer", "/v2/models/tiny/versions/1/infer"]))
        tensor = self.tensor(1)
        if path.endswith("/1/infer"):
            expected = self.model.predict(np.asarray(tensor["data"], np.float32).reshape(1, SIZE))
            return HttpCase("models", self.post({"inputs": [tensor]}, path), {200}, expected)
        return HttpCase("models", self.post({"inputs": [tensor]}, path), {400, 404})


async def http_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    version, status = lines[0].split(" ")[:2]
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    if version == "HTTP/1.0":  # no keep-alive: the server closes the connection after it
        headers["connection"] = "close"
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status), headers, body


async def run_http_fuzz(port: int, cases: Iterator[HttpCase], tally: Tally) -> None:
    async def worker() -> None:
        connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        for case in cases:
            if connection is None:
                connection = await asyncio.open_connection("127.0.0.1", port)
            reader, writer = connection
            writer.write(case.wire)
            try:
                status, headers, body = await asyncio.wait_for(http_answer(reader), 30)
            except (asyncio.IncompleteReadError, ConnectionError):
                status, headers, body = 0, {"connection": "close"}, b""
            tally.codes[str(status)] += 1
            tally.kinds[(case.kind, str(status))] += 1
            if status not in case.allowed:
                tally.failures.append(f"{case.kind}: got {status}, allowed {sorted(case.allowed)}: "
                                      f"{body[:200]!r} for {case.wire[:120]!r}")
            if status:
                document = json.loads(body) if status != 200 or case.expected_probs is not None else None
                is_error = isinstance(document, dict) and isinstance(document.get("error"), str)
                if status >= 400 and not is_error:
                    tally.failures.append(f"{case.kind}: {status} without a JSON error: {body[:200]!r}")
                if status == 200 and case.expected_probs is not None:
                    got = np.asarray(document["outputs"][0]["data"], np.float32)
                    got = got.reshape(case.expected_probs.shape)
                    np.testing.assert_allclose(got, case.expected_probs, rtol=1e-5, atol=1e-7)
                    tally.answers_checked += 1
            if status == 0 or headers.get("connection", "").lower() == "close":
                writer.close()
                connection = None
        if connection is not None:
            connection[1].close()

    await asyncio.gather(*(worker() for _ in range(HTTP_CONCURRENCY)))


@pytest.mark.timeout(600)
def test_fuzz_http_ten_thousand_malformed_requests_never_500(
    start_server: Callable[..., ServerThread], tiny_repo: Path, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str], record_property: Callable[[str, object], None],
) -> None:
    caplog.set_level(logging.WARNING)
    server = start_server(http_port=0, max_images_per_request=MAX_IMAGES, max_message_bytes=MAX_BYTES,
                          max_queued_images=16 * MAX_IMAGES)
    port = server.app.http_port
    assert port
    model = tiny_litert(tiny_repo)
    fuzzer = HttpFuzzer(seed=20261129, model=model)
    cases = (fuzzer.case() for _ in range(HTTP_CALLS))
    tally = Tally()
    started = time.perf_counter()
    asyncio.run(run_http_fuzz(port, cases, tally))
    elapsed = time.perf_counter() - started
    sent = sum(tally.codes.values())
    line = (f"HTTP fuzz: {sent} requests in {elapsed:.1f}s ({sent / elapsed:.0f}/s), by status: "
            + ", ".join(f"{c} {n}" for c, n in tally.codes.most_common())
            + f" (0: closed without an answer); answers checked {tally.answers_checked}")
    record_property("http_fuzz", line)
    with capsys.disabled():
        print("\n" + line)
        for (kind, code), n in sorted(tally.kinds.items()):
            print(f"  {kind:<14} {code:<5} {n}")
    assert sent == HTTP_CALLS
    assert not tally.failures, tally.failures[:20]
    assert "500" not in tally.codes
    assert tally.codes["400"] > HTTP_CALLS // 3 and tally.codes["200"] > 0 and tally.answers_checked > 0
    assert tally.codes["404"] > 0 and tally.codes["413"] > 0 and tally.codes["431"] > 0
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors[:5]]
    assert server.plane.batcher.queued_images == 0
    assert server.app.http is not None and server.app.http.in_flight == 0
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5) as ready:
        assert json.loads(ready.read()) == {"ready": True}
    good = HttpFuzzer(seed=1, model=model).tensor(3)
    request = urllib.request.Request(f"http://127.0.0.1:{port}{HTTP_PATH}",
                                     data=json.dumps({"inputs": [good]}).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=5) as answer:
        got = np.asarray(json.loads(answer.read())["outputs"][0]["data"], np.float32).reshape(3, 10)
    np.testing.assert_allclose(got, model.predict(np.asarray(good["data"], np.float32).reshape(3, SIZE)),
                               rtol=1e-5, atol=1e-7)
