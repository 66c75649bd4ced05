"""``python -m bench.instructions`` and ``bench.versus`` without a server: callgrind's output read
into instructions per shared object (its name compression, the inclusive costs after ``calls=``
left out), the objects grouped, and the requests bench.versus sends parsed back by protobuf."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench import versus
from bench.instructions import components, read_callgrind
from digitserve.oip import grpc_predict_v2_pb2 as oip
from digitserve.v1 import digit_service_pb2 as pb

# Two objects; fn 1 in libpython calls fn 2 in cygrpc (the 500 after calls= is that call's
# inclusive cost, not the caller's own); names given once with their id, then the id alone.
CALLGRIND = """\
# callgrind format
version: 1
creator: callgrind-3.19.0
events: Ir

ob=(1) /usr/lib/libpython3.11.so.1.0
fl=(1) ceval.c
fn=(1) _PyEval_EvalFrameDefault
10 100
+2 50
cob=(2) /venv/grpc/_cython/cygrpc.cpython-311-x86_64-linux-gnu.so
cfi=(2) ???
cfn=(2) 0x795c70
calls=3 0
* 500
-1 7

ob=(2)
fl=(2)
fn=(2)
0 480
+1 20

ob=(3) /venv/numpy/_core/_multiarray_umath.cpython-311-x86_64-linux-gnu.so
fl=(3) ???
fn=(3) FLOAT_argmax
0 9
ob=(1)
fl=(1)
fn=(1)
12 4

totals: 663
"""


def test_callgrind_output_reads_as_each_object_s_own_instructions(tmp_path: Path) -> None:
    path = tmp_path / "callgrind.out"
    path.write_text(CALLGRIND)
    total, own = read_callgrind(path)
    assert total == 663
    assert own == {"/usr/lib/libpython3.11.so.1.0": 161,
                   "/venv/grpc/_cython/cygrpc.cpython-311-x86_64-linux-gnu.so": 500,
                   "/venv/numpy/_core/_multiarray_umath.cpython-311-x86_64-linux-gnu.so": 9}
    assert components(own) == {"Python interpreter": 161, "gRPC core and Cython": 500, "numpy": 9}


def test_unknown_objects_are_grouped_as_other() -> None:
    assert components({"/lib/x86_64-linux-gnu/libc.so.6": 5, "/venv/_json.cpython.so": 3,
                       "/venv/ai_edge_litert/libpywrap_litert_common.so": 7}) == {
        "libc, libm, loader": 5, "other (kernel entry, other extensions)": 3, "LiteRT and XNNPACK": 7}


def test_the_requests_sent_parse_as_the_shape_says() -> None:
    pixels = np.random.default_rng(0).random((64, 784), dtype=np.float32)
    bodies = versus.payloads(pixels, "mnist")
    for shape, (count, _) in versus.SHAPES.items():
        infer = oip.ModelInferRequest.FromString(bodies["v2-grpc", shape])
        assert (infer.model_name, list(infer.inputs[0].shape), infer.inputs[0].datatype) == (
            "mnist", [count, 784], "FP32")
        np.testing.assert_array_equal(
            np.frombuffer(infer.raw_input_contents[0], "<f4").reshape(count, 784), pixels[:count])
        predict = pb.PredictRequest.FromString(bodies["predict", shape])
        assert len(predict.images) == count
        assert np.frombuffer(predict.images[-1].float32, "<f4").tolist() == pixels[count - 1].tolist()


def test_the_table_gives_each_pair_s_ratio_of_medians() -> None:
    rps = {("v2-grpc", "1x64", "digitserve"): [130.0, 100.0, 120.0],
           ("v2-grpc", "1x64", "kserve"): [100.0, 90.0, 110.0]}
    lines = versus.table(rps, ["v2-grpc"], ["1x64"])
    assert lines[2].endswith("| 120 | KServe (same LiteRT) (100 / 90 / 110) | 100 | **1.20×** |")
