"""The version mix of a load test, on hand-built answers: which (model, version) gave an answer is
read right whatever the order of the answer's fields (protobuf allows any; our server writes the
name and version after the predictions), counted per version with and without --no-verify, merged
over load processes and reported as text and JSON."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest
from google.protobuf.message import DecodeError

from digitserve.loadtest import answers, format_result, format_versions
from digitserve.loadtest import generator as loadtest
from digitserve.oip import grpc_predict_v2_pb2 as oip
from digitserve.v1 import digit_service_pb2 as pb


def reader(protocol: str) -> Callable[[bytes], answers.Answer]:
    """(model name, version) as the load tester reads them from an answer."""
    parse = answers.parser(protocol)

    def read(data: bytes) -> answers.Answer:
        parsed = parse(data)
        return parsed.model_name, parsed.model_version

    return read


def field(number: int, kind: int, payload: bytes) -> bytes:
    """One field as protobuf writes it: tag (field number, wire type), then its payload."""
    return bytes([number << 3 | kind]) + payload


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def text(number: int, value: str) -> bytes:
    data = value.encode()
    return field(number, 2, varint(len(data)) + data)


def predictions(count: int) -> list[bytes]:
    """``count`` Prediction fields (field 1 of PredictResponse), each a record of its own."""
    out = []
    for k in range(count):
        probs = np.full(10, 0.01, np.float32)
        probs[k % 10] = 0.91
        record = pb.Prediction(probabilities=probs.tolist(), class_index=k % 10, label=str(k % 10),
                               probability=0.91).SerializeToString()
        out.append(field(1, 2, varint(len(record)) + record))
    return out


def orders(parts: list[bytes]) -> set[bytes]:
    """Every order of ``parts``, joined."""
    return {b"".join(order) for order in itertools.permutations(parts)}


@pytest.mark.parametrize("count", [1, 3])
def test_predict_answers_in_every_field_order(count: int) -> None:
    read = reader("digitserve")
    preds = predictions(count)
    name, version = text(2, "mnist"), field(3, 0, varint(1234567))
    # Our server's order (predictions, then name and version), and every other: the predictions as
    # one run or each on its own among the other fields.
    ours = b"".join(preds) + name + version
    assert read(ours) == ("mnist", 1234567)
    layouts = orders([b"".join(preds), name, version]) | orders([*preds, name, version])
    assert len(layouts) == {1: 6, 3: 120}[count]
    for data in layouts:
        parsed = pb.PredictResponse.FromString(data)  # what the full message says of the same bytes
        assert (parsed.model_name, parsed.model_version, len(parsed.predictions)) == (
            "mnist", 1234567, count)
        assert read(data) == ("mnist", 1234567)


def test_predict_answer_edge_cases() -> None:
    read = reader("digitserve")
    preds = b"".join(predictions(2))
    assert read(preds) == ("", 0)  # neither field: proto3's defaults, as the full message has them
    assert read(b"") == ("", 0)
    # A field given twice: the last one counts, as in the full message.
    twice = text(2, "old") + field(3, 0, varint(1)) + preds + text(2, "new") + field(3, 0, varint(2))
    assert read(twice) == ("new", 2) == (pb.PredictResponse.FromString(twice).model_name,
                                         pb.PredictResponse.FromString(twice).model_version)
    # Fields this client does not know are skipped wherever they are.
    unknown = field(9, 2, varint(3) + b"abc") + preds + field(15, 0, varint(7)) + text(2, "m") \
        + field(3, 0, varint(5)) + field(12, 5, b"\x00\x00\x80\x3f")
    assert read(unknown) == ("m", 5)
    # The encoder's bytes themselves: protobuf's serialization of the full message.
    response = pb.PredictResponse(model_name="digits", model_version=3)
    response.predictions.add(probabilities=[0.5, 0.5], class_index=1, label="1", probability=0.5)
    assert read(response.SerializeToString()) == ("digits", 3)
    for broken in (b"\xff\xff", preds[:-3], b"\x12\x05mn"):  # truncated / not a message
        with pytest.raises(DecodeError):
            read(broken)


def test_v2_answers_in_every_field_order() -> None:
    read = reader("oip")
    output = oip.ModelInferResponse.InferOutputTensor(name="probabilities", datatype="FP32",
                                                      shape=[1, 10]).SerializeToString()
    parts = [text(1, "mnist"), text(2, "canary-4"), text(3, "request-id"),
             field(5, 2, varint(len(output)) + output),
             field(6, 2, varint(40) + np.zeros(10, "<f4").tobytes())]
    for data in orders(parts):
        parsed = oip.ModelInferResponse.FromString(data)
        assert (parsed.model_name, parsed.model_version) == ("mnist", "canary-4")
        assert read(data) == ("mnist", "canary-4")
    assert read(oip.ModelInferResponse(model_name="m", model_version="7").SerializeToString()) == (
        "m", "7")


def predict_answer(probs: npt.NDArray[np.float32], name: str, version: int,
                   trailer_first: bool = False) -> bytes:
    body = pb.PredictResponse()
    for row in probs:
        body.predictions.add(probabilities=row.tolist(), class_index=int(row.argmax()))
    trailer = pb.PredictResponse(model_name=name, model_version=version).SerializeToString()
    data: bytes = body.SerializeToString()
    return trailer + data if trailer_first else data + trailer


@pytest.mark.parametrize("verify", [True, False])
def test_the_recorder_counts_answers_by_version(verify: bool) -> None:
    images = np.arange(2 * 784, dtype=np.int64).reshape(2, 784).astype(np.uint8)
    workload = loadtest.build_workload(  # a different answer per request: its second pixel's class
        images, [0, 1], expected=lambda x: np.eye(10, dtype=np.float32)[
            np.rint(x[:, 1] * 255).astype(int) % 10])
    recorder = loadtest._Recorder(workload, verify, loadtest._LocalCounter())
    assert workload.expected is not None
    good = workload.expected[0]
    for k in range(9):
        recorder.ok(0, predict_answer(good, "mnist", 3, trailer_first=k % 2 == 1), 0.001)
    recorder.ok(0, predict_answer(good, "mnist", 4), 0.001)
    recorder.ok(1, predict_answer(good, "mnist", 4), 0.001)  # request 0's answer: still version 4's
    recorder.ok(0, b"\xff\xff", 0.001)  # not a PredictResponse: no version, a mismatch
    result = recorder.finish()
    assert result.versions == {("mnist", 3): 9, ("mnist", 4): 2}
    assert result.ok == 12 and result.mismatches == (2 if verify else 1)


def test_the_recorder_counts_v2_answers_by_version() -> None:
    images = np.zeros((1, 784), np.uint8)
    for verify in (True, False):
        workload = loadtest.build_workload(images, [0], protocol="oip", model_name="mnist")
        recorder = loadtest._Recorder(workload, verify, loadtest._LocalCounter())
        for version in ("2", "2", "10"):
            output = oip.ModelInferResponse.InferOutputTensor(name="probabilities", datatype="FP32",
                                                              shape=[1, 10])
            answer = oip.ModelInferResponse(model_name="mnist", model_version=version,
                                            outputs=[output],
                                            raw_output_contents=[np.eye(10, dtype="<f4")[0].tobytes()])
            recorder.ok(0, answer.SerializeToString(), 0.001)
        result = recorder.finish()
        assert result.versions == {("mnist", "2"): 2, ("mnist", "10"): 1}, verify
        assert result.mismatches == 0 and (result.checked == 3) == verify


def merged(*parts: dict[answers.Answer, int]) -> loadtest.LoadResult:
    """A LoadResult merged from load processes that counted ``parts``."""
    config = loadtest.LoadConfig(target="127.0.0.1:1")
    workload = loadtest.build_workload(np.zeros((1, 784), np.uint8), [0])
    processes = []
    for versions in parts:
        ok = sum(versions.values())
        processes.append(loadtest.ProcessResult(
            np.full(ok, 0.001), {}, completions=np.linspace(0.1, 1.0, ok), ok=ok, images=ok,
            finished=1.0, versions=versions))
    return loadtest._merge(config, workload, processes, 0.0)


def test_the_version_mix_is_reported_as_text_and_json() -> None:
    result = merged({("mnist", 3): 2300, ("mnist", 4): 250}, {("mnist", 3): 2212, ("mnist", 4): 238})
    assert result.versions == (("mnist", 3, 4512), ("mnist", 4, 488))
    assert format_versions(result) == "mnist 3: 4,512 (90.2 %), 4: 488 (9.8 %)"
    assert "versions    mnist 3: 4,512 (90.2 %), 4: 488 (9.8 %)" in format_result(result).splitlines()
    assert result.to_dict()["versions"] == [
        {"model_name": "mnist", "model_version": 3, "count": 4512, "fraction": 4512 / 5000},
        {"model_name": "mnist", "model_version": 4, "count": 488, "fraction": 488 / 5000},
    ]


def test_versions_are_ordered_by_model_then_number() -> None:
    result = merged({("b", "10"): 1, ("b", "9"): 1, ("a", "2"): 2, ("", "1"): 4, ("b", "x"): 2})
    assert [(name, version) for name, version, _ in result.versions] == [
        ("", "1"), ("a", "2"), ("b", "9"), ("b", "10"), ("b", "x")]
    assert format_versions(result) == (
        "(no name) 1: 4 (40.0 %); a 2: 2 (20.0 %); b 9: 1 (10.0 %), 10: 1 (10.0 %), x: 2 (20.0 %)")


def test_no_answers_no_versions() -> None:
    result = merged({})
    assert result.versions == () and result.to_dict()["versions"] == []
    assert format_versions(result) == "none"
    assert not any(line.startswith("versions") for line in format_result(result).splitlines())


def test_a_workload_names_its_model_and_label() -> None:
    images = np.zeros((2, 784), np.uint8)
    workload = loadtest.build_workload(images, [0, 1], model_name="digits", label="canary")
    request = pb.PredictRequest.FromString(workload.payloads[0])
    assert (request.model_name, request.version_label, request.model_version) == (
        "digits", "canary", 0)
    workload = loadtest.build_workload(images, [0, 1], model_version=3)
    request = pb.PredictRequest.FromString(workload.payloads[0])
    assert (request.model_name, request.version_label, request.model_version) == ("", "", 3)
    # V2: the model's name, and a label as the version's text (the server takes either).
    for kwargs, version in (({"label": "stable"}, "stable"), ({"model_version": 2}, "2"), ({}, "")):
        workload = loadtest.build_workload(images, [0, 1], protocol="oip", model_name="digits",
                                           **kwargs)  # type: ignore[arg-type]
        v2 = oip.ModelInferRequest.FromString(workload.payloads[0])
        assert (v2.model_name, v2.model_version) == ("digits", version)
    with pytest.raises(loadtest.LoadTestError) as info:
        loadtest.build_workload(images, [0, 1], model_version=3, label="canary")
    assert str(info.value) == ("model version 3 and label 'canary' both given: pin a version or "
                               "name a label, not both")
