"""Which model and version gave an answer, read from its serialized bytes for the load tester's
version mix (a canary split read off a run).

A call whose answer is not otherwise decoded (``--no-verify``) must not pay for decoding it: protobuf
(upb, in C) parses the answer into a message that declares only the two fields wanted, skipping
the predictions or V2 outputs as unknown fields, for any field order, without a Python object per
prediction (``PredictResponse.FromString`` builds every one): a 64-image answer costs little more
than a 1-image one (``tests/loadtest/test_answers.py`` checks every field order).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

Answer = tuple[str, int | str]
"""(model name, version) of an answer: an int for this API's Predict, the text of a V2 answer."""

_STRING = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
_INT64 = descriptor_pb2.FieldDescriptorProto.TYPE_INT64


def _version_messages() -> dict[str, Any]:
    """The two messages, each with only model_name and model_version at their numbers in the
    answer they read: PredictResponse (2: string, 3: int64) and the V2 ModelInferResponse (1:
    string, 2: string). In a pool of their own: nothing else sees them."""
    source = descriptor_pb2.FileDescriptorProto(
        name="digitserve/loadtest/answer_version.proto", package="digitserve.loadtest",
        syntax="proto3")
    for name, fields in (("PredictAnswer", ((2, _STRING), (3, _INT64))),
                         ("InferAnswer", ((1, _STRING), (2, _STRING)))):
        message = source.message_type.add(name=name)
        for (number, kind), field in zip(fields, ("model_name", "model_version"), strict=True):
            message.field.add(name=field, number=number, type=kind,
                              label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(source)
    return {protocol: message_factory.GetMessageClass(
                pool.FindMessageTypeByName(f"digitserve.loadtest.{name}"))
            for protocol, name in (("digitserve", "PredictAnswer"), ("oip", "InferAnswer"))}


_MESSAGES = _version_messages()


class VersionFields(Protocol):
    """What a parsed answer holds: the model and version that gave it."""

    model_name: str
    model_version: int | str


def parser(protocol: str) -> Callable[[bytes], VersionFields]:
    """``parse(answer)`` for serialized answers of ``protocol`` ("digitserve": PredictResponse,
    "oip": ModelInferResponse): a message whose ``model_name`` and ``model_version`` are the
    answer's (an int for Predict, text for V2). Raises protobuf's DecodeError for bytes that are
    not a message. The message class's own ``FromString``: no Python frame of ours per answer."""
    parse: Callable[[bytes], VersionFields] = _MESSAGES[protocol].FromString
    return parse
