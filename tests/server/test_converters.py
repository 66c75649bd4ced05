"""The three converters (server.v1codec, server.oipcodec, server.restcodec) read the same pixels into
the neutral input of server.infertypes, and server.pixels refuses the same bad element once, named
as each edge's caller wrote it: no message is rewritten afterwards."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable

import numpy as np
import pytest

from digitserve.oip import grpc_predict_v2_pb2 as oip
from digitserve.server.errors import InvalidInputError
from digitserve.server.infertypes import InferInput
from digitserve.server.oipcodec import to_request
from digitserve.server.pixels import tensor_count, tensor_pictures, tensor_pixels
from digitserve.server.restcodec import read_infer
from digitserve.server.v1codec import images_input
from digitserve.server.wire import FEWEST_PACKED, PackedPredictRequest, parse_predict_request
from digitserve.v1 import digit_service_pb2 as pb

SIZE = 6
BAD = 4  # the flat element that is wrong: image 0's pixel 4


def _pixels(bad: float) -> np.ndarray:
    pixels = np.full((FEWEST_PACKED, SIZE), 0.5, "<f4")  # enough for wire.py's packed rows
    pixels[0, BAD] = bad
    return pixels


def _json(pixels: np.ndarray, binary: bool) -> InferInput:
    tensor: dict[str, object] = {"name": "images", "datatype": "FP32", "shape": list(pixels.shape)}
    if not binary:
        body = json.dumps({"inputs": [{**tensor, "data": pixels.ravel().tolist()}]}).encode()
        return read_infer(body, None, "m").request.inputs[0]
    raw = pixels.tobytes()
    header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return read_infer(header + raw, str(len(header)), "m").request.inputs[0]


def _v2(pixels: np.ndarray, raw: bool) -> InferInput:
    tensor = oip.ModelInferRequest.InferInputTensor(name="images", datatype="FP32",
                                                    shape=list(pixels.shape))
    if raw:
        return to_request(oip.ModelInferRequest(inputs=[tensor],
                                                raw_input_contents=[pixels.tobytes()])).inputs[0]
    tensor.contents.fp32_contents.extend(pixels.ravel().tolist())
    return to_request(oip.ModelInferRequest(inputs=[tensor])).inputs[0]


def _v1(pixels: np.ndarray, kind: str) -> InferInput:
    if kind == "floats":
        images = [pb.Image(floats=pb.FloatPixels(values=row.tolist())) for row in pixels]
        return images_input(images, SIZE)
    data = pb.PredictRequest(images=[pb.Image(float32=row.tobytes()) for row in pixels]).SerializeToString()
    request = parse_predict_request(data)
    assert isinstance(request, PackedPredictRequest)
    return images_input(request if kind == "packed" else request.message().images, SIZE)


EDGES: list[tuple[str, Callable[[np.ndarray], InferInput], str]] = [
    ("json", lambda p: _json(p, False), f"inputs[0].data[{BAD}]"),
    ("json binary", lambda p: _json(p, True), f"inputs[0].binary_data[{BAD}]"),
    ("v2 contents", lambda p: _v2(p, False), f"inputs[0].contents.fp32_contents[{BAD}]"),
    ("v2 raw", lambda p: _v2(p, True), f"raw_input_contents[0].element[{BAD}]"),
    ("v1 packed", lambda p: _v1(p, "packed"), f"images[0].float32[{BAD}]"),
    ("v1 parsed", lambda p: _v1(p, "parsed"), f"images[0].float32[{BAD}]"),
    ("v1 floats", lambda p: _v1(p, "floats"), f"images[0].floats.values[{BAD}]"),
]


@pytest.mark.parametrize(("convert", "field"), [e[1:] for e in EDGES], ids=[e[0] for e in EDGES])
def test_every_edge_names_the_same_bad_pixel_its_own_way(
    convert: Callable[[np.ndarray], InferInput], field: str
) -> None:
    good = _pixels(0.25)
    tensor = convert(good)
    count = tensor_count(tensor, (SIZE,))
    assert tensor_pixels(tensor, count, SIZE).tobytes() == good.tobytes()
    for bad, description in [(np.nan, "nan is not a finite number; expected a pixel intensity in "
                                       "[0, 1]"),
                             (1.5, "1.5 is out of range; expected a pixel intensity in [0, 1] "
                                   "(byte / 255)")]:
        if field.endswith(f"data[{BAD}]") and np.isnan(bad):
            continue  # JSON has no NaN (test_http: the body is refused as not JSON)
        with pytest.raises(InvalidInputError) as info:
            tensor_pixels(convert(_pixels(bad)), FEWEST_PACKED, SIZE)
        assert (info.value.field, info.value.description) == (field, description)


def test_bytes_elements_are_named_as_each_binding_sends_them() -> None:
    """A BYTES element's framing broken the same way: JSON's binary data and V2 gRPC's raw
    contents name the element each its own way, in one message."""
    data = (1000).to_bytes(4, "little") + b"\xff\xd8"
    header = json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(data)}}]}).encode()
    rest = read_infer(header + data, str(len(header)), "m").request.inputs[0]
    grpc = to_request(oip.ModelInferRequest(
        inputs=[oip.ModelInferRequest.InferInputTensor(name="images", datatype="BYTES", shape=[1])],
        raw_input_contents=[data])).inputs[0]
    messages = []
    for tensor in (rest, grpc):
        with pytest.raises(InvalidInputError) as info:
            tensor_pictures(tensor, 1)
        messages.append(str(info.value))
    assert messages == [
        f"{where}: its length 1000 runs past the end of the tensor's 6 bytes"
        for where in ("inputs[0].binary_data[0]", "raw_input_contents[0].element[0]")]
    # and BYTES in JSON, base64, counted against the shape under the JSON's name
    body = json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [2],
                                   "data": [base64.b64encode(b"x").decode()]}]}).encode()
    with pytest.raises(InvalidInputError) as info:
        tensor_pictures(read_infer(body, None, "m").request.inputs[0], 2)
    assert str(info.value) == ("inputs[0].data: got 1 elements, expected 2 (one picture per "
                               "element of shape [2])")
