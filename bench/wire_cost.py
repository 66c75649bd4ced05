"""Instructions per Predict call spent reading the request and writing the answer, by
digitserve.server.wire (``--path wire``) or by protobuf alone (``--path protobuf``): the request's
bytes parsed, its pixels read into float32 by server.v1codec and server.pixels as the server reads
them, and the PredictResponse serialized. Counted by valgrind, which a noisy machine cannot move;
run twice with different ``--calls`` and divide the difference, so start-up cancels out:

    PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python -m bench.wire_cost --path wire --images 64 --calls 20
    (again with --calls 220; per call = (I_220 - I_20) / 200; 1 image: 20 and 2020 calls)

``python -m bench.wire_cost --measure [--part request|response]`` runs all of it (both paths, 1
and 64 images) and prints the table.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections.abc import Sequence

DIGITS = tuple(str(d) for d in range(10))
SIZE = 784


def run(path: str, images: int, calls: int, part: str = "both") -> None:
    import numpy as np

    from digitserve.server.pixels import tensor_pixels
    from digitserve.server.v1codec import images_input
    from digitserve.server.wire import (
        PackedPredictRequest,
        PredictionEncoder,
        encode_predictions_protobuf,
        parse_predict_request,
    )
    from digitserve.v1 import digit_service_pb2 as pb

    rng = np.random.default_rng(0)
    pixels = rng.random((images, SIZE), dtype=np.float32)
    data = pb.PredictRequest(images=[pb.Image(float32=row.tobytes()) for row in pixels],
                             model_name="mnist").SerializeToString()
    logits = rng.normal(0, 4, (images, len(DIGITS)))
    probabilities = (np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)).astype(np.float32)
    encoder = PredictionEncoder("mnist", 1, DIGITS)
    request, response = part in ("both", "request"), part in ("both", "response")
    for _ in range(calls):
        if path == "wire":
            if request:  # below FEWEST_PACKED images, as protobuf parses it
                packed = parse_predict_request(data)
                read = packed if isinstance(packed, PackedPredictRequest) else packed.images
                tensor_pixels(images_input(read, SIZE), images, SIZE)
            if response:
                encoder.encode(probabilities)
        else:
            if request:
                tensor_pixels(images_input(pb.PredictRequest.FromString(data).images, SIZE), images, SIZE)
            if response:
                encode_predictions_protobuf("mnist", 1, DIGITS, probabilities).SerializeToString()


def instructions(path: str, images: int, calls: int, part: str) -> int:
    env = {**os.environ, "PYTHONHASHSEED": "0"}  # the same start-up every run
    done = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-m",
         "bench.wire_cost", "--path", path, "--images", str(images), "--calls", str(calls),
         "--part", part],
        capture_output=True, text=True, check=True, env=env)
    found = re.search(r"Collected : (\d+)", done.stderr)
    assert found, done.stderr[-2000:]
    return int(found.group(1))


def measure(part: str, sizes: Sequence[int]) -> None:
    for images in sizes:
        low, high = 20, 20 + max(200, 2000 // images)  # start-up's own variation: far below a call
        per = {}
        for path in ("protobuf", "wire"):
            per[path] = (instructions(path, images, high, part)
                         - instructions(path, images, low, part)) / (high - low)
        print(f"{images:>3} image(s), {part}: protobuf {per['protobuf']:,.0f}, wire "
              f"{per['wire']:,.0f} instructions per call ({per['wire'] / per['protobuf']:.2f}×)",
              flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", choices=("wire", "protobuf"), default="wire")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--part", choices=("both", "request", "response"), default="both",
                        help="the request's reading, the answer's writing, or both")
    parser.add_argument("--measure", action="store_true", help="both paths under valgrind")
    parser.add_argument("--sizes", default="1,64", help="--measure: images per call, listed")
    args = parser.parse_args(argv)
    if args.measure:
        measure(args.part, [int(n) for n in args.sizes.split(",")])
    else:
        run(args.path, args.images, args.calls, args.part)


if __name__ == "__main__":
    main()
