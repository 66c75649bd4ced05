"""digitserve.server.pixels, the codec of every edge: every way the same pixels arrive decodes to the
same float32 array bit for bit, and the same bad pixel is named the same way by each path of an
edge; the converters share the one inference path, not each other."""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from digitserve.oip import grpc_predict_v2_pb2 as oip
from digitserve.server.errors import InvalidInputError
from digitserve.server.oipcodec import to_request
from digitserve.server.pixels import tensor_count, tensor_pixels
from digitserve.server.v1codec import images_input
from digitserve.server.wire import FEWEST_PACKED, PackedPredictRequest, parse_predict_request
from digitserve.v1 import digit_service_pb2 as pb
from tests.support import decode_v1_images as decode_images

SIZE = 12  # pixels per image; the codec hard-codes no size
SERVER = Path(__file__).resolve().parents[2] / "server" / "digitserve" / "server"


def _outcome(decode: Callable[[], object]) -> tuple[str, object]:
    """("ok", array bytes) or ("error", (field, description)) of a decoding."""
    try:
        out = decode()
    except InvalidInputError as exc:
        return "error", (exc.field, exc.description)
    return "ok", np.asarray(out).tobytes()


@settings(max_examples=200, deadline=None, database=None)
@given(kind=st.sampled_from(["uint8", "float32"]), n=st.integers(FEWEST_PACKED, 24),
       data=st.data())
def test_packed_rows_and_parsed_images_decode_alike(kind: str, n: int, data: st.DataObject) -> None:
    """wire.py's packed rows (the Predict fast path) and protobuf's Images give the same pixels,
    or the same InvalidInputError — bad float32 pixels (NaN, -1, 2) included."""
    if kind == "uint8":
        pixels = data.draw(st.binary(min_size=n * SIZE, max_size=n * SIZE))
        images = [pb.Image(uint8=pixels[i * SIZE:(i + 1) * SIZE]) for i in range(n)]
    else:
        values = data.draw(st.lists(st.sampled_from([0.0, 0.25, 1.0, -0.0, -1.0, 2.0, np.nan]),
                                    min_size=n * SIZE, max_size=n * SIZE))
        raw = np.asarray(values, "<f4").tobytes()
        images = [pb.Image(float32=raw[i * 4 * SIZE:(i + 1) * 4 * SIZE]) for i in range(n)]
    request = parse_predict_request(pb.PredictRequest(images=images).SerializeToString())
    assert isinstance(request, PackedPredictRequest)
    fast = _outcome(lambda: tensor_pixels(images_input(request, SIZE), n, SIZE))
    assert fast == _outcome(lambda: decode_images(images, SIZE))
    # One image at a time, through protobuf's message: the same pixels, row by row.
    if fast[0] == "ok":
        joined = b"".join(decode_images([image], SIZE).tobytes() for image in images)
        assert joined == fast[1]


def _v2(datatype: str, shape: list[int], raw: bytes | None = None,
        contents: oip.InferTensorContents | None = None) -> oip.ModelInferRequest:
    tensor = oip.ModelInferRequest.InferInputTensor(name="images", datatype=datatype, shape=shape)
    if contents is not None:
        tensor.contents.CopyFrom(contents)
    return oip.ModelInferRequest(inputs=[tensor], raw_input_contents=[raw] if raw is not None else [])


@pytest.mark.parametrize("shape", [[3, SIZE], [3, 3, 4]])
def test_both_protocols_decode_the_same_pixels_bit_for_bit(shape: list[int]) -> None:
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, size=(3, SIZE), dtype=np.uint8)
    floats = (data / np.float32(255)).astype("<f4")
    ours = decode_images([pb.Image(uint8=row.tobytes()) for row in data], SIZE)
    arrivals = {
        "v1 float32": decode_images([pb.Image(float32=row.tobytes()) for row in floats], SIZE),
        "v1 floats": decode_images(
            [pb.Image(floats=pb.FloatPixels(values=row.tolist())) for row in floats], SIZE),
    }
    for datatype, raw, contents in [
        ("UINT8", data.tobytes(), None),
        ("FP32", floats.tobytes(), None),
        ("UINT8", None, oip.InferTensorContents(uint_contents=data.ravel().tolist())),
        ("FP32", None, oip.InferTensorContents(fp32_contents=floats.ravel().tolist())),
    ]:
        tensor = to_request(_v2(datatype, shape, raw, contents)).inputs[0]
        count = tensor_count(tensor, (3, 4))
        images = tensor_pixels(tensor, count, SIZE)
        assert tensor.raw == (raw is not None)
        arrivals[f"v2 {datatype} {'raw' if raw else 'contents'}"] = images
    for name, images in arrivals.items():
        assert images.dtype == np.float32 and images.tobytes() == ours.tobytes(), name


def test_v2_tensor_faults_name_the_flat_element() -> None:
    bad = np.zeros(2 * SIZE, "<f4")
    bad[SIZE + 5] = np.float32(1.5)
    with pytest.raises(InvalidInputError) as raw:
        tensor_pixels(to_request(_v2("FP32", [2, SIZE], bad.tobytes())).inputs[0], 2, SIZE)
    assert raw.value.field == f"raw_input_contents[0].element[{SIZE + 5}]"
    big = oip.InferTensorContents(uint_contents=[0] * (2 * SIZE - 1) + [256])
    with pytest.raises(InvalidInputError) as typed:
        tensor_pixels(to_request(_v2("UINT8", [2, SIZE], contents=big)).inputs[0], 2, SIZE)
    assert typed.value.field == f"inputs[0].contents.uint_contents[{2 * SIZE - 1}]"
    assert typed.value.description == "256 does not fit UINT8; expected 0..255"


def _imports(module: str) -> set[str]:
    tree = ast.parse((SERVER / f"{module}.py").read_text())
    return {node.module for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module} | {
        alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}


def test_the_edges_share_the_codec_and_the_error_mapping_not_each_other() -> None:
    converters = {name: _imports(name) for name in ("v1codec", "oipcodec", "restcodec")}
    for name, imports in converters.items():
        assert not {f"digitserve.server.{other}" for other in converters} & imports, name
        assert "digitserve.server.infertypes" in imports, name
    assert "digitserve.server.infer" in converters["v1codec"] & converters["oipcodec"]
    assert "digitserve.server.pixels" in _imports("infer")  # the one path reads the one codec
    for servicer in (_imports("servicer"), _imports("oip")):
        assert "digitserve.server.status" in servicer
    assert "digitserve.server.oip" not in _imports("servicer")
    assert "digitserve.server.servicer" not in _imports("oip")
